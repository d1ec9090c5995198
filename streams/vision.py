"""Image streams: how a labelled image set becomes split, permuted or rotated experiences.

The data (MNIST and Fashion-MNIST in `streams.mnist`, CIFAR and ImageFolder trees in
`streams.image_files`) is held once per process as uint8 pixels (N, C, H, W) on the CPU,
a quarter of float32; models scale it to [0, 1] on entry (`models.vision.scale_pixels`).
The cell seed draws the class order, the permutations and the order of the angles.

Scenarios, one way to say each (`scenario:`):
- split streams: `class` (default; one output per class seen so far), `task` (task labels
  attached, each experience scored over its own classes: a head per task) or `domain`
  (each experience relabelled 0..k-1 by position in its class group: one k-way head);
- permuted and rotated streams: `domain` (default; the same 10 classes each time),
  `class` (experience i's labels are offset by 10 i: new classes every time) or `task`
  (offset labels and task labels: a 10-way head per task).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from forgetless.core.schema import ConfigError, param, positive
from forgetless.streams.base import Experience, Samples, Stream

SplitScenario = Literal["class", "task", "domain"]
DomainScenario = Literal["domain", "class", "task"]


@dataclass
class ImageSet:
    """A train and a test split as uint8 pixels (N, C, H, W) and int64 labels 0..classes-1."""

    train: Samples
    test: Samples
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train.x.shape[1:])


def check_image_set(data: ImageSet, source: str) -> ImageSet:
    """Refuse data that would silently train on nonsense: shapes, dtypes, label range."""
    for split, s in (("train", data.train), ("test", data.test)):
        if s.x.dtype != torch.uint8 or s.x.dim() != 4:
            raise ValueError(f"{source}: {split} images must be uint8 (N, C, H, W), got "
                             f"{s.x.dtype} {tuple(s.x.shape)}")  # fmt: skip
        if len(s.x) != len(s.y) or len(s.y) == 0:
            raise ValueError(f"{source}: {split} has {len(s.x)} images and {len(s.y)} labels")
        if int(s.y.min()) < 0 or int(s.y.max()) >= data.num_classes:
            raise ValueError(f"{source}: {split} labels outside 0..{data.num_classes - 1}")
    if data.train.x.shape[1:] != data.test.x.shape[1:]:
        raise ValueError(f"{source}: train and test images differ in shape")
    return data


# --- the experience sizes every image stream shares ------------------------------------------


@dataclass
class SizeConfig:
    augment: list[dict[str, Any]] = param(
        [],
        "torchvision.transforms.v2 transforms applied to each training image as it is drawn, "
        "by class name and arguments: [{name: RandomCrop, size: 32, padding: 4}, "
        "{name: RandomHorizontalFlip}]",
    )
    max_train: int | None = param(
        None,
        "train on at most this many samples per experience (a seeded draw; GEM and A-GEM use "
        "1,000 per task); all of them when null",
    )
    max_test: int | None = param(
        None, "score on at most this many test samples per experience (a fixed draw)"
    )
    pixel_mean: list[float] | None = param(
        None,
        "with pixel_std: models normalise inputs to (x - mean) / std after scaling pixels "
        "to [0, 1], one value or one per channel (MNIST as avalanche-lib: 0.1307, 0.3081)",
    )
    pixel_std: list[float] | None = param(None, "see pixel_mean")

    def validate(self, where: str) -> None:
        positive(self.max_train, f"{where}.max_train")
        positive(self.max_test, f"{where}.max_test")
        if (self.pixel_mean is None) != (self.pixel_std is None):
            raise ConfigError(f"{where}: give both pixel_mean and pixel_std, or neither")
        if self.pixel_std is not None and (
            len(self.pixel_mean) != len(self.pixel_std) or min(self.pixel_std) <= 0
        ):
            raise ConfigError(f"{where}.pixel_std: one positive value per pixel_mean value")
        if self.augment:
            build_augment(self.augment, f"{where}.augment")

    def normalisation(self) -> dict[str, list[float]]:
        """What experiences carry in `info` for the model to normalise by (none: {})."""
        if self.pixel_mean is None:
            return {}
        return {"pixel_mean": list(self.pixel_mean), "pixel_std": list(self.pixel_std)}

    def training_set(self, samples: Samples) -> Samples:
        """The experience's training samples, augmented as they are drawn when asked."""
        if not self.augment:
            return samples
        transform = build_augment(self.augment, "augment")
        return AugmentedSamples(samples.x, samples.y, samples.task, transform=transform)


def build_augment(specs: list[dict[str, Any]], where: str):
    """A torchvision.transforms.v2 Compose of `specs` ({name: Class, **arguments})."""
    import torchvision.transforms.v2 as v2

    from forgetless.core.schema import suggest

    known = [n for n in dir(v2) if n[:1].isupper() and isinstance(getattr(v2, n), type)]
    steps = []
    for i, spec in enumerate(specs):
        here = f"{where}[{i}]"
        name = spec.get("name") if isinstance(spec, dict) else None
        if not isinstance(name, str):
            raise ConfigError(f"{here}: expected {{name: <transform>, ...its arguments}}, got "
                              f"{spec!r}")  # fmt: skip
        if name not in known:
            raise ConfigError(f"{here}.name: torchvision.transforms.v2 has no {name!r}"
                              f"{suggest(name, known)}")  # fmt: skip
        arguments = {k: v for k, v in spec.items() if k != "name"}
        try:
            steps.append(getattr(v2, name)(**arguments))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{here}: {name}({arguments}) fails: {e}") from None
    return v2.Compose(steps)


@dataclass
class AugmentedSamples(Samples):
    """Training samples whose images are transformed each time they are drawn (`subset`,
    or one at a time as a torch Dataset); `x` keeps the stored, untransformed images, which
    the manifest hashes and replay buffers keep.

    As a Dataset (`loader`), worker processes transform the images.
    """

    transform: Any = field(default=None, kw_only=True)

    def subset(self, index: torch.Tensor) -> Samples:
        picked = super().subset(index.to(self.x.device))
        images = torch.stack([self.transform(image) for image in picked.x])
        return Samples(images, picked.y, picked.task)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> AugmentedSamples:
        moved = super().to(device, non_blocking)
        return AugmentedSamples(moved.x, moved.y, moved.task, transform=self.transform)

    def __getitem__(self, i: int) -> tuple:
        x, y, task = super().__getitem__(i)
        return self.transform(x), y, task


def limit(samples: Samples, n: int | None, seed: int) -> Samples:
    """At most `n` samples, drawn by `seed`, kept in their original order."""
    if n is None or len(samples) <= n:
        return samples
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.choice(len(samples), size=n, replace=False))
    return samples.subset(torch.from_numpy(keep))


# --- split streams ---------------------------------------------------------------------------


@dataclass
class SplitConfig(SizeConfig):
    """A class-split image stream; subclasses set `num_classes` and where the data is."""

    num_classes: ClassVar[int] = 10
    named_orders: ClassVar[dict[str, list[int]]] = {}

    n_experiences: int = param(
        5,
        "number of experiences; must divide the classes (with base_classes: n - 1 must "
        "divide the rest)",
    )
    scenario: SplitScenario = param(
        "class",
        "class: one output per class; task: task labels, each experience scored over its own "
        "classes; domain: each experience relabelled 0..k-1 (one k-way output)",
    )
    base_classes: int | None = param(
        None,
        "classes of a larger first (base) experience; the rest split evenly over the others",
    )
    fixed_class_order: list[int] | str | None = param(
        None, "class order instead of a seed-drawn one: a permutation of the class ids"
    )

    def validate(self, where: str) -> None:
        super().validate(where)
        n, classes = self.n_experiences, self.num_classes
        positive(n, f"{where}.n_experiences")
        if self.base_classes is not None:
            if not 0 < self.base_classes < classes:
                raise ConfigError(f"{where}.base_classes: must be between 1 and {classes - 1}, "
                                  f"got {self.base_classes}")  # fmt: skip
            rest = classes - self.base_classes
            if n < 2 or rest % (n - 1):
                counts = [d + 1 for d in range(1, rest + 1) if rest % d == 0]
                raise ConfigError(
                    f"{where}.n_experiences: with base_classes {self.base_classes} the other "
                    f"{rest} classes must split evenly over n_experiences - 1 experiences; "
                    f"{n} does not, use one of {counts}"
                )
            if self.scenario == "domain":
                raise ConfigError(f"{where}.base_classes: a domain-incremental stream needs "
                                  "experiences of equal size; remove base_classes")  # fmt: skip
        elif classes % n:
            divisors = [d for d in range(1, classes + 1) if classes % d == 0]
            raise ConfigError(f"{where}.n_experiences: {n} does not divide the {classes} "
                              f"classes; use one of {divisors}")  # fmt: skip
        order = self.fixed_class_order
        if isinstance(order, str):
            if order not in self.named_orders:
                known = ", ".join(self.named_orders) or "none for this stream"
                raise ConfigError(f"{where}.fixed_class_order: no named order {order!r} "
                                  f"(known: {known}); or give a list of class ids")  # fmt: skip
        elif order is not None and sorted(order) != list(range(classes)):
            raise ConfigError(f"{where}.fixed_class_order: must list each class 0..{classes - 1} "
                              f"once, got {order}")  # fmt: skip

    def class_order(self, seed: int) -> list[int]:
        order = self.fixed_class_order
        if isinstance(order, str):
            return list(self.named_orders[order])
        if order is not None:
            return list(order)
        return np.random.default_rng(seed).permutation(self.num_classes).tolist()

    def class_groups(self, order: list[int]) -> list[list[int]]:
        """The classes of each experience, in `order`: the base ones first, if any."""
        base, total = self.base_classes or 0, len(order)
        per = (total - base) // (self.n_experiences - (1 if base else 0))
        starts = ([0] if base else []) + list(range(base, total, per))
        return [order[a:b] for a, b in zip(starts, [*starts[1:], total])]


def split_stream(name: str, data: ImageSet, config: SplitConfig, seed: int) -> Stream:
    """Each experience holds the images of its classes, in the scenario's labelling."""
    groups = config.class_groups(config.class_order(seed))
    experiences = []
    for i, classes in enumerate(groups):
        parts = []
        for k, samples in enumerate((data.train, data.test)):
            part = samples.subset(torch.from_numpy(np.isin(samples.y.numpy(), classes)))
            part = limit(part, config.max_train if k == 0 else config.max_test, seed * 1009 + i)
            if config.scenario == "task":
                part.task = torch.full_like(part.y, i)
            elif config.scenario == "domain":
                relabel = torch.zeros(data.num_classes, dtype=torch.long)
                relabel[classes] = torch.arange(len(classes))
                part = Samples(part.x, relabel[part.y])
            parts.append(config.training_set(part) if k == 0 else part)
        info: dict = {"classes": classes}
        if config.scenario == "task":
            info["task"] = i
        elif config.scenario == "domain":
            info = {"classes": list(range(len(classes))), "original_classes": classes}
        info.update(config.normalisation())
        experiences.append(Experience(i, f"classes_{'_'.join(map(str, classes))}", *parts,
                                      info=info))  # fmt: skip
    domain = config.scenario == "domain"
    return Stream(
        name=name,
        scenario=config.scenario,
        experiences=experiences,
        num_classes=len(groups[0]) if domain else data.num_classes,
        input_shape=data.input_shape,
        task_classes=groups if config.scenario == "task" else None,
    )


# --- streams of transformed copies: permuted and rotated -----------------------------------


@dataclass
class DomainConfig(SizeConfig):
    n_experiences: int = param(10, "number of experiences, each its own transformation")
    scenario: DomainScenario = param(
        "domain",
        "domain: the same classes every experience; class: experience i's labels offset by "
        "num_classes * i; task: offset labels and task labels (a head per task)",
    )

    def validate(self, where: str) -> None:
        super().validate(where)
        positive(self.n_experiences, f"{where}.n_experiences")


def transformed_stream(
    name: str, data: ImageSet, config: DomainConfig, seed: int, transforms: list
) -> Stream:
    """One experience per (name, info, function on a uint8 image batch) in `transforms`."""
    k, scenario = data.num_classes, config.scenario
    experiences = []
    for i, (label, info, transform) in enumerate(transforms):
        parts = []
        for j, samples in enumerate((data.train, data.test)):
            part = limit(samples, config.max_train if j == 0 else config.max_test, seed * 1009 + i)
            y = part.y if scenario == "domain" else part.y + k * i
            task = torch.full_like(y, i) if scenario == "task" else None
            moved = Samples(transform(part.x), y, task)
            parts.append(config.training_set(moved) if j == 0 else moved)
        info = dict(info)
        if scenario != "domain":
            info["classes"] = list(range(k * i, k * (i + 1)))
        if scenario == "task":
            info["task"] = i
        info.update(config.normalisation())
        experiences.append(Experience(i, label, *parts, info=info))
    offset = scenario != "domain"
    return Stream(
        name=name,
        scenario=scenario,
        experiences=experiences,
        num_classes=k * len(transforms) if offset else k,
        input_shape=data.input_shape,
        task_classes=[e.info["classes"] for e in experiences] if scenario == "task" else None,
    )


def permutations(config: DomainConfig, shape: tuple[int, ...], seed: int) -> list:
    """A seed-drawn pixel permutation per experience (the same for every channel)."""
    generator = torch.Generator().manual_seed(seed)
    pixels = int(np.prod(shape[1:]))
    out = []
    for i in range(config.n_experiences):
        perm = torch.randperm(pixels, generator=generator)

        def permute(x: torch.Tensor, perm=perm) -> torch.Tensor:
            return x.flatten(2)[:, :, perm].reshape(x.shape)

        out.append((f"permutation_{i}", {"permutation": i}, permute))
    return out


@dataclass
class RotationConfig(DomainConfig):
    max_angle: float = param(180.0, "angles are evenly spaced in [0, max_angle) degrees")

    def validate(self, where: str) -> None:
        super().validate(where)
        positive(self.max_angle, f"{where}.max_angle")


def rotations(config: RotationConfig, seed: int) -> list:
    """Evenly spaced angles in a seed-drawn order; nearest-pixel rotation keeps uint8 pixels."""
    import torchvision.transforms.v2.functional as TF  # here: seconds of import for one stream

    angles = np.linspace(0.0, config.max_angle, config.n_experiences, endpoint=False)
    out = []
    for angle in np.random.default_rng(seed).permutation(angles):

        def rotate(x: torch.Tensor, angle=float(angle)) -> torch.Tensor:
            return TF.rotate(x, angle) if angle else x.clone()

        out.append((f"rotation_{angle:g}", {"angle": float(angle)}, rotate))
    return out
