"""Class-incremental streams on image files from a local `data_root`: CIFAR-10/100 (the
python pickle batches) and ImageFolder trees (ImageNet, Tiny-ImageNet, CORe50).

Nothing downloads. The whole set is decoded once per process into uint8 pixels
(N, 3, H, W) on the CPU; a set larger than memory wants a lazy loader instead.

- CIFAR: `cifar-10-batches-py/{data_batch_1..5, test_batch}` and `cifar-100-python/{train,
  test}`, read by an unpickler that rebuilds numpy arrays and nothing else (torchvision's
  reader unpickles anything, and checks md5 sums that only the original files match).
- ImageFolder (torchvision's): `<data_root>/<train_dir>/<class>/**/<image>` and the same
  under `<test_dir>`; Tiny-ImageNet's `val/images/` with `val_annotations.txt` is read as
  its labels say. Classes are the train folder's sub-folders, sorted (ImageNet's wnids).
- CORe50 (`core50_128x128/s<session>/o<object>/*.png`): the 50 objects, or their 10
  categories (`labels: category`), trained on sessions 1, 2, 4, 5, 6, 8, 9, 11 and tested
  on 3, 7, 10 (Lomonaco and Maltoni, CoRL 2017).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch

from forgetless.core.schema import ConfigError, param, positive
from forgetless.streams.base import Samples, Stream, register_stream
from forgetless.streams.mnist import ArrayUnpickler
from forgetless.streams.vision import ImageSet, SplitConfig, check_image_set, split_stream

CIFAR = {
    10: ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]),
    100: ("cifar-100-python", ["train"], ["test"]),
}
GET_CIFAR = (
    'on a machine with internet: python -c "import torchvision; torchvision.datasets.CIFAR{n}'
    "('DATA_ROOT', download=True)\" and copy DATA_ROOT/{folder} here"
)


def icarl_order() -> list[int]:
    """iCaRL's CIFAR-100 class order (Rebuffi et al. 2017, their code): numpy's legacy
    generator seeded 1993, one permutation of the 100 classes."""
    return np.random.RandomState(1993).permutation(100).tolist()


# --- CIFAR -----------------------------------------------------------------------------------


def cifar_folder(n: int, data_root: str) -> Path:
    folder, train, test = CIFAR[n]
    root = Path(data_root).expanduser()
    for place in (root / folder, root):
        if all((place / name).is_file() for name in train + test):
            return place
    raise ConfigError(
        f"CIFAR-{n} not found: looked for {', '.join(train + test)} in {root / folder} and "
        f"{root}. Nothing is downloaded at run time: "
        + GET_CIFAR.format(n=n, folder=folder).replace("DATA_ROOT", str(root))
    )


def read_cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """One python-pickle batch: (uint8 images (N, 3, 32, 32), labels (N,))."""
    with open(path, "rb") as f:
        batch = ArrayUnpickler(f, encoding="latin1").load()
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: expected a dict batch, got {type(batch).__name__}")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or label_key not in batch:
        raise ValueError(f"{path}: expected keys 'data' and {label_key!r}, got {sorted(batch)}")
    data = np.asarray(batch["data"], dtype=np.uint8)
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise ValueError(f"{path}: data {data.shape} and {len(labels)} labels; expected "
                         "(N, 3072) uint8 rows, channel-major")  # fmt: skip
    return data.reshape(-1, 3, 32, 32), labels


@cache
def load_cifar(n: int, data_root: str, coarse: bool = False) -> ImageSet:
    folder = cifar_folder(n, data_root)
    _, train, test = CIFAR[n]
    key = "labels" if n == 10 else ("coarse_labels" if coarse else "fine_labels")
    parts = []
    for names in (train, test):
        batches = [read_cifar_batch(folder / name, key) for name in names]
        x, y = np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])
        parts.append(Samples(torch.from_numpy(x), torch.from_numpy(y)))
    classes = 20 if coarse else n
    return check_image_set(ImageSet(parts[0], parts[1], classes), str(folder))


@dataclass
class CIFARSource:
    data_root: str = param(help="folder holding cifar-10-batches-py/ or cifar-100-python/")


@dataclass
class SplitCIFAR10Config(SplitConfig, CIFARSource):
    def validate(self, where: str) -> None:
        super().validate(where)
        _check(lambda: cifar_folder(10, self.data_root), where)


@dataclass
class SplitCIFAR100Config(SplitConfig, CIFARSource):
    num_classes: ClassVar[int] = 100
    named_orders: ClassVar[dict[str, list[int]]] = {"icarl": icarl_order()}
    n_experiences: int = param(10, "number of experiences; must divide the classes")
    labels: Literal["fine", "coarse"] = param(
        "fine", "fine: the 100 classes; coarse: the 20 superclasses"
    )

    def validate(self, where: str) -> None:
        self.num_classes = 100 if self.labels == "fine" else 20
        if self.labels == "coarse" and self.fixed_class_order == "icarl":
            raise ConfigError(f"{where}.fixed_class_order: icarl orders the 100 fine classes")
        super().validate(where)
        _check(lambda: cifar_folder(100, self.data_root), where)


def _check(find, where: str) -> None:
    try:
        find()
    except ConfigError as e:
        raise ConfigError(f"{where}.data_root: {e}") from None


@register_stream("split_cifar10")
def split_cifar10(config: SplitCIFAR10Config, seed: int) -> Stream:
    """CIFAR-10 split by class (class-, task- or domain-incremental)."""
    return split_stream("split_cifar10", load_cifar(10, config.data_root), config, seed)


@register_stream("split_cifar100")
def split_cifar100(config: SplitCIFAR100Config, seed: int) -> Stream:
    """CIFAR-100 split by class; `fixed_class_order: icarl` is iCaRL's order (seed 1993)."""
    coarse = config.labels == "coarse"
    config.num_classes = 20 if coarse else 100
    data = load_cifar(100, config.data_root, coarse)
    return split_stream("split_cifar100", data, config, seed)


# --- ImageFolder trees -----------------------------------------------------------------------


def decode(paths: list[str], size: int) -> torch.Tensor:
    """Images as uint8 (N, 3, size, size): RGB, resized (bilinear) to size x size."""
    from PIL import Image

    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        with Image.open(path) as image:
            image = image.convert("RGB")
            if image.size != (size, size):
                image = image.resize((size, size), Image.Resampling.BILINEAR)
            out[i] = np.asarray(image)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def folder_classes(root: Path, where: str) -> list[str]:
    if not root.is_dir():
        raise ConfigError(f"{where}: {str(root)!r} is not a folder of class folders")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ConfigError(f"{where}: {str(root)!r} holds no class folders (ImageFolder layout: "
                          "<root>/<class>/<image>)")  # fmt: skip
    return classes


def list_split(root: Path, classes: list[str]) -> tuple[list[str], list[int]]:
    """(paths, labels) of an ImageFolder split; Tiny-ImageNet's flat val/images with
    val_annotations.txt is read from its annotations."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    annotations = root / "val_annotations.txt"
    if annotations.is_file() and (root / "images").is_dir():
        index = {c: i for i, c in enumerate(classes)}
        paths, labels = [], []
        for line in annotations.read_text().splitlines():
            name, wnid, *_ = line.split("\t")
            if wnid not in index:
                raise ValueError(f"{annotations}: class {wnid!r} is not a train class")
            paths.append(str(root / "images" / name))
            labels.append(index[wnid])
        return paths, labels
    index = {c: i for i, c in enumerate(classes)}
    pairs = make_dataset(str(root), index, extensions=IMG_EXTENSIONS, allow_empty=True)
    return [p for p, _ in pairs], [y for _, y in pairs]


@cache
def load_image_folder(train: str, test: str, size: int) -> ImageSet:
    classes = folder_classes(Path(train), "train folder")
    parts = []
    for folder in (train, test):
        paths, labels = list_split(Path(folder), classes)
        if not paths:
            raise ConfigError(f"{folder}: no images found")
        parts.append(Samples(decode(paths, size), torch.tensor(labels, dtype=torch.long)))
    return check_image_set(ImageSet(parts[0], parts[1], len(classes)), train)


@dataclass
class ImageFolderSource:
    data_root: str = param(help="folder holding the train and test ImageFolder trees")


@dataclass
class ImageFolderConfig(SplitConfig, ImageFolderSource):
    train_dir: str = param("train", "train split, under data_root: <class>/**/<image>")
    test_dir: str = param(
        "val", "test split, under data_root (ImageFolder, or Tiny-ImageNet's val)"
    )
    image_size: int = param(64, "images are resized to image_size x image_size (RGB)")

    def validate(self, where: str) -> None:
        positive(self.image_size, f"{where}.image_size")
        root = Path(self.data_root).expanduser()
        classes = folder_classes(root / self.train_dir, f"{where}.data_root")
        if not (root / self.test_dir).is_dir():
            raise ConfigError(f"{where}.test_dir: {str(root / self.test_dir)!r} is not a folder")
        self.num_classes = len(classes)  # this tree's, for the checks below
        super().validate(where)


@register_stream("split_image_folder")
def split_image_folder(config: ImageFolderConfig, seed: int) -> Stream:
    """An ImageFolder tree (ImageNet, Tiny-ImageNet) split by class."""
    root = Path(config.data_root).expanduser()
    data = load_image_folder(str(root / config.train_dir), str(root / config.test_dir),
                             config.image_size)  # fmt: skip
    config.num_classes = data.num_classes
    return split_stream("split_image_folder", data, config, seed)


CORE50_TRAIN = (1, 2, 4, 5, 6, 8, 9, 11)
CORE50_TEST = (3, 7, 10)


@dataclass
class CORe50Source:
    data_root: str = param(help="folder holding core50_128x128/s1..s11/o1..o50/*.png")


@dataclass
class CORe50Config(SplitConfig, CORe50Source):
    num_classes: ClassVar[int] = 50
    labels: Literal["object", "category"] = param(
        "object", "object: the 50 objects; category: their 10 categories (5 objects each)"
    )
    image_size: int = param(128, "images are resized to image_size x image_size")

    def validate(self, where: str) -> None:
        positive(self.image_size, f"{where}.image_size")
        self.num_classes = 50 if self.labels == "object" else 10
        super().validate(where)
        core50_root(self.data_root, f"{where}.data_root")


def core50_root(data_root: str, where: str) -> Path:
    root = Path(data_root).expanduser()
    for place in (root / "core50_128x128", root):
        if (place / "s1").is_dir():
            return place
    raise ConfigError(f"{where}: no CORe50 sessions (s1/, ...) in {root / 'core50_128x128'} or "
                      f"{root}; unpack core50_128x128.zip there")  # fmt: skip


@cache
def load_core50(data_root: str, labels: str, size: int) -> ImageSet:
    root = core50_root(data_root, "data_root")
    parts = []
    for sessions in (CORE50_TRAIN, CORE50_TEST):
        paths, ys = [], []
        for s in sessions:
            for obj in range(1, 51):
                found = sorted(str(p) for p in (root / f"s{s}" / f"o{obj}").glob("*.png"))
                paths += found
                ys += [obj - 1 if labels == "object" else (obj - 1) // 5] * len(found)
        if not paths:
            raise ConfigError(f"{root}: no images in sessions {sessions}")
        parts.append(Samples(decode(paths, size), torch.tensor(ys, dtype=torch.long)))
    return check_image_set(ImageSet(parts[0], parts[1], 50 if labels == "object" else 10),
                           str(root))  # fmt: skip


@register_stream("split_core50")
def split_core50(config: CORe50Config, seed: int) -> Stream:
    """CORe50's objects (or categories) split by class, on its standard session split."""
    config.num_classes = 50 if config.labels == "object" else 10
    data = load_core50(config.data_root, config.labels, config.image_size)
    return split_stream("split_core50", data, config, seed)
