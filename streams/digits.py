"""Streams on scikit-learn's digits: 1,797 real 8x8 handwritten digits, shipped offline.

The train/test split is fixed (stratified, 25% test) so every cell is scored on the
same images; the cell seed draws the class order, permutations and rotation order.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch

from forgetless.core.schema import ConfigError, param, positive
from forgetless.streams.base import Experience, Samples, Stream, register_stream

NUM_CLASSES = 10


def read_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 8, 8) in 0..16, labels (N,)) from the CSV that scikit-learn ships.

    Read straight from the file `sklearn.datasets.load_digits` reads: importing
    scikit-learn costs a Ray worker seconds of start-up for a 50 kB file.
    """
    package = importlib.util.find_spec("sklearn")  # locates it without importing it
    path = Path(package.submodule_search_locations[0], "datasets", "data", "digits.csv.gz")
    if not path.is_file():  # another layout: let scikit-learn find its own file
        from sklearn.datasets import load_digits

        digits = load_digits()
        return digits.images, digits.target
    table = np.loadtxt(path, delimiter=",")
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)


@cache
def load_digits_split() -> tuple[Samples, Samples]:
    """Digits as (N, 1, 8, 8) floats in [0, 1], split 75/25 per class."""
    images, labels = read_digits()
    x = torch.tensor(images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(labels, dtype=torch.long)
    rng = np.random.default_rng(0)
    test = np.zeros(len(y), dtype=bool)
    for c in range(NUM_CLASSES):
        members = np.flatnonzero(labels == c)
        test[rng.choice(members, size=len(members) // 4, replace=False)] = True
    test_index = torch.from_numpy(np.flatnonzero(test))
    train_index = torch.from_numpy(np.flatnonzero(~test))
    return Samples(x[train_index], y[train_index]), Samples(x[test_index], y[test_index])


@dataclass
class SplitDigitsConfig:
    n_experiences: int = param(
        5,
        "number of experiences; must divide the 10 classes (with base_classes: n - 1 must "
        "divide the rest)",
    )
    base_classes: int | None = param(
        None,
        "classes of a larger first (base) experience, as REMIND's base initialisation; the "
        "other 10 - base_classes are split evenly over the remaining experiences",
    )
    task_labels: bool = param(
        False, "task-incremental: attach task labels and score each task over its own classes"
    )
    fixed_class_order: list[int] | None = param(
        None, "class order instead of a seed-drawn one (a permutation of 0..9)"
    )

    def validate(self, where: str) -> None:
        positive(self.n_experiences, f"{where}.n_experiences")
        if self.base_classes is not None:
            self._validate_base(where)
        elif NUM_CLASSES % self.n_experiences:
            divisors = [d for d in range(1, NUM_CLASSES + 1) if NUM_CLASSES % d == 0]
            raise ConfigError(
                f"{where}.n_experiences: {self.n_experiences} does not divide the "
                f"{NUM_CLASSES} classes; use one of {divisors}"
            )
        if self.fixed_class_order is not None and sorted(self.fixed_class_order) != list(
            range(NUM_CLASSES)
        ):
            raise ConfigError(
                f"{where}.fixed_class_order: must list each class 0..9 once, "
                f"got {self.fixed_class_order}"
            )

    def _validate_base(self, where: str) -> None:
        if not 0 < self.base_classes < NUM_CLASSES:
            raise ConfigError(
                f"{where}.base_classes: must be between 1 and {NUM_CLASSES - 1}, "
                f"got {self.base_classes}"
            )
        rest = NUM_CLASSES - self.base_classes
        if self.n_experiences < 2 or rest % (self.n_experiences - 1):
            counts = [d + 1 for d in range(1, rest + 1) if rest % d == 0]
            raise ConfigError(
                f"{where}.n_experiences: with base_classes {self.base_classes} the other {rest} "
                f"classes must split evenly over n_experiences - 1 experiences; "
                f"{self.n_experiences} does not, use one of {counts}"
            )

    def class_groups(self, order: list[int]) -> list[list[int]]:
        """The classes of each experience, in `order`: the base ones first, if any."""
        base = self.base_classes or 0
        per = (NUM_CLASSES - base) // (self.n_experiences - (1 if base else 0))
        starts = ([0] if base else []) + list(range(base, NUM_CLASSES, per))
        return [order[a:b] for a, b in zip(starts, [*starts[1:], NUM_CLASSES])]


@register_stream("split_digits")
def split_digits(config: SplitDigitsConfig, seed: int) -> Stream:
    """Class-incremental (or, with task_labels, task-incremental) digits; with base_classes
    the first experience holds more classes (a base for methods that pre-train on it)."""
    train, test = load_digits_split()
    if config.fixed_class_order is not None:
        order = list(config.fixed_class_order)
    else:
        order = np.random.default_rng(seed).permutation(NUM_CLASSES).tolist()
    groups = config.class_groups(order)
    experiences = []
    for i, classes in enumerate(groups):
        parts = []
        for samples in (train, test):
            part = samples.subset(torch.from_numpy(np.isin(samples.y.numpy(), classes)))
            if config.task_labels:
                part.task = torch.full_like(part.y, i)
            parts.append(part)
        name = f"classes_{'_'.join(map(str, classes))}"
        info = {"classes": classes, "task": i} if config.task_labels else {"classes": classes}
        experiences.append(Experience(i, name, parts[0], parts[1], info=info))
    return Stream(
        name="split_digits",
        scenario="task" if config.task_labels else "class",
        experiences=experiences,
        num_classes=NUM_CLASSES,
        input_shape=(1, 8, 8),
        task_classes=groups if config.task_labels else None,
    )


@dataclass
class PermutedDigitsConfig:
    n_experiences: int = param(5, "number of experiences, each with its own pixel permutation")

    def validate(self, where: str) -> None:
        positive(self.n_experiences, f"{where}.n_experiences")


@register_stream("permuted_digits")
def permuted_digits(config: PermutedDigitsConfig, seed: int) -> Stream:
    """Domain-incremental: all 10 classes each time, pixels shuffled by a seed-drawn permutation."""
    train, test = load_digits_split()
    generator = torch.Generator().manual_seed(seed)
    experiences = []
    for i in range(config.n_experiences):
        perm = torch.randperm(64, generator=generator)

        def permute(s: Samples, perm=perm) -> Samples:
            return Samples(s.x.flatten(1)[:, perm].view_as(s.x), s.y)

        experiences.append(
            Experience(
                i, f"permutation_{i}", permute(train), permute(test), info={"permutation": i}
            )
        )
    return Stream("permuted_digits", "domain", experiences, NUM_CLASSES, (1, 8, 8))


@dataclass
class RotatedDigitsConfig:
    n_experiences: int = param(5, "number of experiences, each at its own rotation")
    max_angle: float = param(180.0, "angles are evenly spaced in [0, max_angle) degrees")

    def validate(self, where: str) -> None:
        positive(self.n_experiences, f"{where}.n_experiences")
        positive(self.max_angle, f"{where}.max_angle")


@register_stream("rotated_digits")
def rotated_digits(config: RotatedDigitsConfig, seed: int) -> Stream:
    """Domain-incremental: all 10 classes each time, rotated; the seed orders the angles."""
    import torchvision.transforms.functional as TF  # here: a slow import for one stream

    train, test = load_digits_split()
    angles = np.linspace(0.0, config.max_angle, config.n_experiences, endpoint=False)
    angles = np.random.default_rng(seed).permutation(angles)
    experiences = []
    for i, angle in enumerate(angles):

        def rotate(s: Samples, angle=float(angle)) -> Samples:
            return Samples(TF.rotate(s.x, angle), s.y)

        name = f"rotation_{angle:g}"
        experiences.append(Experience(i, name, rotate(train), rotate(test), info={"angle": angle}))
    return Stream("rotated_digits", "domain", experiences, NUM_CLASSES, (1, 8, 8))
