"""Streams on scikit-learn's digits, the stream manifest, and the avalanche benchmark adapter."""

from __future__ import annotations

import itertools

import pytest
import torch

from forgetless.core.schema import ConfigError
from forgetless.streams import STREAMS, Experience, Samples, Stream, build_stream, stream_factory
from forgetless.streams.avalanche_benchmarks import AvalancheBenchmarkConfig
from forgetless.streams.digits import (
    PermutedDigitsConfig,
    RotatedDigitsConfig,
    SplitDigitsConfig,
    load_digits_split,
    read_digits,
)

N_TRAIN, N_TEST = (len(s) for s in load_digits_split())


def split(seed: int = 0, **params) -> Stream:
    return build_stream("split_digits", SplitDigitsConfig(**params), seed)


def _image_bytes(samples: Samples) -> list[bytes]:
    return [x.numpy().tobytes() for x in samples.x]


# --- split_digits --------------------------------------------------------------------------


@pytest.mark.parametrize("n_experiences", [1, 2, 5, 10])
def test_split_digits_gives_each_class_to_exactly_one_experience(n_experiences):
    stream = split(n_experiences=n_experiences)
    per = 10 // n_experiences
    assert len(stream) == n_experiences
    assert stream.scenario == "class" and stream.num_classes == 10
    classes = [e.info["classes"] for e in stream]
    assert all(len(c) == per for c in classes)
    assert sorted(itertools.chain(*classes)) == list(range(10))
    for e in stream:
        assert set(e.train.y.tolist()) == set(e.info["classes"])
        assert set(e.test.y.tolist()) == set(e.info["classes"])


def test_split_digits_images_are_8x8_single_channel_in_unit_range():
    stream = split(n_experiences=5)
    assert stream.input_shape == (1, 8, 8)
    for e in stream:
        for samples in (e.train, e.test):
            assert samples.x.shape == (len(samples), 1, 8, 8)
            assert samples.x.dtype == torch.float32 and samples.y.dtype == torch.long
            assert samples.x.min() >= 0.0 and samples.x.max() <= 1.0
            assert samples.task is None


def test_split_digits_test_sets_are_disjoint_and_cover_the_test_split():
    stream = split(n_experiences=5)
    test_images = [img for e in stream for img in _image_bytes(e.test)]
    train_images = {img for e in stream for img in _image_bytes(e.train)}
    assert len(test_images) == N_TEST == len(set(test_images))
    assert sum(len(e.train) for e in stream) == N_TRAIN
    assert train_images.isdisjoint(test_images)


def test_split_digits_same_seed_gives_identical_stream():
    a, b = split(seed=3), split(seed=3)
    assert [e.info["classes"] for e in a] == [e.info["classes"] for e in b]
    for ea, eb in zip(a, b):
        assert torch.equal(ea.train.x, eb.train.x) and torch.equal(ea.train.y, eb.train.y)
        assert torch.equal(ea.test.x, eb.test.x) and torch.equal(ea.test.y, eb.test.y)
    assert a.manifest() == b.manifest()


def test_split_digits_different_seed_draws_different_class_order():
    orders = {tuple(itertools.chain(*(e.info["classes"] for e in split(seed=s)))) for s in (0, 1)}
    assert len(orders) == 2


def test_split_digits_fixed_class_order_overrides_the_seed():
    order = [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    for seed in (0, 1):
        stream = split(seed=seed, n_experiences=5, fixed_class_order=order)
        assert [e.info["classes"] for e in stream] == [[9, 8], [7, 6], [5, 4], [3, 2], [1, 0]]
        assert stream.experiences[0].name == "classes_9_8"


def test_split_digits_with_task_labels_labels_each_sample_with_its_experience():
    stream = split(n_experiences=5, task_labels=True)
    assert stream.scenario == "task"
    assert stream.task_classes == [e.info["classes"] for e in stream]
    for i, e in enumerate(stream):
        assert e.info["task"] == i
        for samples in (e.train, e.test):
            assert samples.task is not None
            assert samples.task.shape == samples.y.shape
            assert samples.task.eq(i).all()


def test_split_digits_task_labels_keep_the_class_order_of_the_seed():
    plain, tasks = split(seed=4), split(seed=4, task_labels=True)
    assert [e.info["classes"] for e in plain] == tasks.task_classes


def test_split_digits_config_refuses_n_experiences_not_dividing_10():
    with pytest.raises(ConfigError, match=r"streams\[0\]\.n_experiences.*\[1, 2, 5, 10\]"):
        SplitDigitsConfig(n_experiences=3).validate("streams[0]")


@pytest.mark.parametrize(
    "n_experiences, sizes", [(4, [4, 2, 2, 2]), (3, [4, 3, 3]), (7, [4] + [1] * 6)]
)
def test_split_digits_base_classes_make_a_larger_first_experience(n_experiences, sizes):
    stream = split(seed=3, n_experiences=n_experiences, base_classes=4)
    classes = [e.info["classes"] for e in stream]
    assert [len(c) for c in classes] == sizes
    assert list(itertools.chain(*classes)) == [c for e in split(seed=3) for c in e.info["classes"]]
    for e in stream:
        assert set(e.train.y.tolist()) == set(e.info["classes"])


@pytest.mark.parametrize(
    "params, message",
    [
        ({"n_experiences": 5, "base_classes": 4}, r"other 6 classes.*use one of \[2, 3, 4, 7\]"),
        ({"n_experiences": 1, "base_classes": 4}, r"n_experiences - 1"),
        ({"n_experiences": 2, "base_classes": 10}, r"base_classes: must be between 1 and 9"),
        ({"n_experiences": 2, "base_classes": 0}, r"base_classes: must be between 1 and 9"),
    ],
)
def test_split_digits_refuses_base_classes_that_leave_an_uneven_rest(params, message):
    with pytest.raises(ConfigError, match=message):
        SplitDigitsConfig(**params).validate("streams[0]")


# --- permuted and rotated digits -----------------------------------------------------------


def permuted(seed: int = 0, n: int = 3) -> Stream:
    return build_stream("permuted_digits", PermutedDigitsConfig(n_experiences=n), seed)


def rotated(seed: int = 0, n: int = 4) -> Stream:
    return build_stream("rotated_digits", RotatedDigitsConfig(n_experiences=n), seed)


@pytest.mark.parametrize("make", [permuted, rotated], ids=["permuted", "rotated"])
def test_domain_streams_show_all_classes_in_every_experience(make):
    stream = make()
    assert stream.scenario == "domain" and stream.num_classes == 10
    assert stream.input_shape == (1, 8, 8)
    original_train, original_test = load_digits_split()
    for e in stream:
        assert e.train.x.shape == (N_TRAIN, 1, 8, 8) and e.test.x.shape == (N_TEST, 1, 8, 8)
        assert torch.equal(e.train.y, original_train.y) and torch.equal(e.test.y, original_test.y)
        assert set(e.train.y.tolist()) == set(range(10))


def test_permuted_digits_moves_pixels_without_changing_them():
    original_train, _ = load_digits_split()
    stream = permuted(n=3)
    for e in stream:
        # each image holds the same pixel values, in another order
        assert torch.equal(
            e.train.x.flatten(1).sort(dim=1).values, original_train.x.flatten(1).sort(dim=1).values
        )
    first, second = (e.train.x for e in stream.experiences[:2])
    assert not torch.equal(first, second)


def test_permuted_digits_seed_fixes_the_permutations():
    a, b, c = permuted(seed=0), permuted(seed=0), permuted(seed=1)
    assert [r["train_hash"] for r in a.manifest()] == [r["train_hash"] for r in b.manifest()]
    assert a.manifest()[0]["train_hash"] != c.manifest()[0]["train_hash"]


def test_rotated_digits_uses_evenly_spaced_angles_in_seed_drawn_order():
    stream = rotated(seed=0, n=4)
    angles = [e.info["angle"] for e in stream]
    assert sorted(angles) == [0.0, 45.0, 90.0, 135.0]
    assert [e.name for e in stream] == [f"rotation_{a:g}" for a in angles]
    assert [e.info["angle"] for e in rotated(seed=0, n=4)] == angles
    orders = {tuple(e.info["angle"] for e in rotated(seed=s, n=4)) for s in range(4)}
    assert len(orders) > 1


def test_rotated_digits_zero_angle_is_the_original_image():
    original_train, _ = load_digits_split()
    (upright,) = [e for e in rotated(n=4) if e.info["angle"] == 0.0]
    assert torch.allclose(upright.train.x, original_train.x)


# --- manifest and duplicate detection ------------------------------------------------------


def test_manifest_lists_each_experience_with_counts_classes_and_data_hash():
    stream = split(n_experiences=5, task_labels=True)
    rows = stream.manifest()
    assert [r["index"] for r in rows] == list(range(5))
    for row, e in zip(rows, stream):
        assert row["name"] == e.name
        assert row["train"] == len(e.train) and row["test"] == len(e.test)
        assert row["classes"] == e.info["classes"] and row["task"] == e.index
        assert row["train_hash"] == e.train.digest()
        assert len(row["train_hash"]) == 16
    assert len({r["train_hash"] for r in rows}) == 5


def _stream_with_repeated_experience() -> Stream:
    train, test = load_digits_split()
    part = train.subset(torch.arange(20))
    experiences = [
        Experience(0, "first", part, test),
        Experience(1, "second", train.subset(torch.arange(20, 40)), test),
        Experience(2, "again", Samples(part.x.clone(), part.y.clone()), test),
    ]
    return Stream("repeats", "class", experiences, 10, (1, 8, 8))


def test_check_distinct_refuses_two_experiences_with_the_same_training_data():
    with pytest.raises(ValueError, match=r"'first' and 'again' carry the same training data"):
        _stream_with_repeated_experience().check_distinct()


def test_build_stream_refuses_a_factory_that_repeats_an_experience(monkeypatch):
    def repeating(config: SplitDigitsConfig, seed: int) -> Stream:
        return _stream_with_repeated_experience()

    monkeypatch.setitem(STREAMS._entries, "test_repeating_stream", repeating)
    with pytest.raises(ValueError, match="same training data"):
        build_stream("test_repeating_stream", SplitDigitsConfig(), 0)


def test_check_distinct_accepts_the_built_in_streams():
    for stream in (split(n_experiences=10), permuted(n=3), rotated(n=3)):
        stream.check_distinct()


# --- avalanche benchmarks: local data only ------------------------------------------------


def test_avalanche_split_mnist_without_data_names_the_path_and_downloads_nothing(tmp_path):
    empty = tmp_path / "no_mnist_here"
    empty.mkdir()
    factory = stream_factory("avalanche.SplitMNIST", "streams[0]")
    with pytest.raises(ConfigError) as error:
        factory(AvalancheBenchmarkConfig(data_root=str(empty), n_experiences=5), 0)
    message = str(error.value)
    assert "avalanche.SplitMNIST.data_root" in message
    assert str(empty) in message
    assert "MNIST not found" in message and "download=True" in message
    assert list(empty.iterdir()) == []  # nothing was downloaded into it


def test_build_stream_of_avalanche_benchmark_with_missing_folder_raises_config_error(tmp_path):
    missing = tmp_path / "does" / "not" / "exist"
    with pytest.raises(ConfigError, match=str(missing)):
        build_stream("avalanche.SplitMNIST", AvalancheBenchmarkConfig(data_root=str(missing)), 0)
    assert not missing.exists()


def test_unknown_avalanche_benchmark_suggests_the_closest_name():
    with pytest.raises(ConfigError, match=r'no benchmark .SplitMINST.*did you mean "SplitMNIST"'):
        stream_factory("avalanche.SplitMINST", "streams[0].name")


def test_grid_with_avalanche_benchmark_without_data_fails_validation(tmp_path):
    from forgetless.experiments.config import grid_from_dict

    empty = tmp_path / "no_mnist_here"
    empty.mkdir()
    data = {
        "name": "mnist",
        "streams": [{"name": "avalanche.SplitMNIST", "data_root": str(empty)}],
        "strategies": ["naive"],
    }
    with pytest.raises(ConfigError, match=str(empty)):
        grid_from_dict(data)


def test_read_digits_reads_the_same_images_and_labels_as_scikit_learn():
    from sklearn.datasets import load_digits

    images, labels = read_digits()
    digits = load_digits()
    assert images.shape == (1797, 8, 8)
    assert (images == digits.images).all() and (labels == digits.target).all()
