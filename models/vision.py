"""Networks for image streams, and the step that lets any model read uint8 pixels.

Image streams hold uint8 pixels (a quarter of float32, moved to the device as such);
`scale_pixels` makes a model turn them into floats in [0, 1] on entry, so replay buffers,
the evaluator and avalanche-lib all pass pixels through unchanged.
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from forgetless.core.schema import ConfigError, param
from forgetless.streams import Stream


def holds_pixels(stream: Stream | None) -> bool:
    """Whether the stream's inputs are uint8 pixels (no stream: a model built on its own)."""
    first = stream.experiences[0].train if stream is not None and stream.experiences else None
    dtype = getattr(getattr(first, "x", None), "dtype", None) or getattr(first, "dtype", None)
    return dtype == torch.uint8


class PixelScaling:
    """A forward pre-hook: uint8 pixels to floats in [0, 1], then (x - mean) / std when
    the stream asks for it; anything else passes through."""

    def __init__(self, mean: list[float] | None = None, std: list[float] | None = None):
        self.mean = None if mean is None else torch.tensor(mean).view(-1, 1, 1)
        self.std = None if std is None else torch.tensor(std).view(-1, 1, 1)

    def __call__(self, module: nn.Module, args: tuple) -> tuple | None:
        x = args[0] if args else None
        if not (isinstance(x, torch.Tensor) and x.dtype == torch.uint8):
            return None
        x = x.float().div_(255)
        if self.mean is not None:
            x = (x - self.mean.to(x.device)) / self.std.to(x.device)
        return (x, *args[1:])


def scale_pixels(model: nn.Module, stream: Stream | None = None) -> nn.Module:
    """Make `model` take uint8 pixels: a forward pre-hook scales them to [0, 1] floats
    (and normalises them by the stream's `pixel_mean` and `pixel_std`, if it gives them).

    On a Sequential it sits on the first block, so a model split for latent replay keeps it
    in its lower part. The state dict is unchanged; float inputs pass through as they are.
    """
    info = stream.experiences[0].info if stream is not None and stream.experiences else {}
    hook = PixelScaling(info.get("pixel_mean"), info.get("pixel_std"))
    first = model[0] if isinstance(model, nn.Sequential) and len(model) else model
    first.register_forward_pre_hook(hook)
    return model


# --- multi-head MLP --------------------------------------------------------------------------


@dataclass
class MultiHeadMLPConfig:
    hidden: list[int] = param([256, 256], "widths of the shared hidden layers")
    dropout: float = param(0.0, "dropout after each hidden layer")

    def validate(self, where: str) -> None:
        if any(h <= 0 for h in self.hidden):
            raise ConfigError(f"{where}.hidden: every width must be > 0, got {self.hidden}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"{where}.dropout: must be in [0, 1), got {self.dropout}")


def mlp_trunk(in_features: int, hidden: list[int], dropout: float) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Flatten()]
    for a, b in zip([in_features, *hidden], hidden):
        layers += [nn.Linear(a, b), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
    return layers


MASKED = -1e9
"""What a head outputs for classes outside a sample's task: finite, so distillation terms
(0 * log of it) stay finite, and no probability in a softmax."""


@functools.cache
def _multitask_base() -> type:
    """avalanche-lib's MultiTaskModule where it is installed, so its strategies pass the
    task labels to `forward`; a plain Module otherwise."""
    try:
        from avalanche.models import MultiTaskModule
    except ImportError:
        return nn.Module

    class MultiHead(MultiTaskModule):
        def __init__(self, trunk: nn.Module, width: int, task_classes, num_classes: int):
            super().__init__()
            self.features = trunk
            self.heads = nn.ModuleList(nn.Linear(width, len(c)) for c in task_classes)
            order = torch.tensor([c for classes in task_classes for c in classes])
            self.register_buffer("order", order, persistent=False)
            mask = torch.zeros(len(task_classes), num_classes, dtype=torch.bool)
            for t, classes in enumerate(task_classes):
                mask[t, classes] = True
            self.register_buffer("task_mask", mask, persistent=False)
            self.num_classes = num_classes

        def forward(self, x: torch.Tensor, task_labels=None) -> torch.Tensor:
            h = self.features(x)
            heads = torch.cat([head(h) for head in self.heads], dim=1)
            out = heads.new_zeros(len(h), self.num_classes).index_copy(1, self.order, heads)
            if task_labels is None:
                return out  # every head: forgetless masks by the batch's task labels
            if isinstance(task_labels, int):
                task_labels = torch.full((len(h),), task_labels, device=h.device)
            return out.masked_fill(~self.task_mask[task_labels], MASKED)

        def forward_single_task(self, x: torch.Tensor, task_label: int) -> torch.Tensor:
            return self.forward(x, task_label)

        def adaptation(self, experience) -> None:
            """Nothing to grow: the heads are fixed by the stream's task classes."""

    return MultiHead


def mlp_multihead(config: MultiHeadMLPConfig, stream: Stream) -> nn.Module:
    """A shared MLP trunk and one linear head per task over that task's classes.

    Scored and trained by forgetless, the heads' outputs sit at their classes' positions and
    each sample is read from its task's head (the stream's task labels); avalanche-lib
    strategies pass task labels to `forward` and get the other heads masked. On a stream
    whose tasks share class ids this needs labels offset per task (`scenario: task` does it).
    """
    if stream.task_classes is None:
        raise ConfigError(
            f"model mlp_multihead: stream {stream.name!r} has no task labels; use a "
            "task-incremental stream (scenario: task) or the mlp"
        )
    trunk = mlp_trunk(math.prod(stream.input_shape), config.hidden, config.dropout)
    cls = _multitask_base()
    width = config.hidden[-1] if config.hidden else math.prod(stream.input_shape)
    if cls is nn.Module:
        raise ConfigError("model mlp_multihead: needs avalanche-lib installed")
    return cls(nn.Sequential(*trunk), width, stream.task_classes, stream.num_classes)


# --- convolutional networks ------------------------------------------------------------------


@dataclass
class SimpleCNNConfig:
    dropout: float = param(0.25, "dropout after each pooling stage")


def simple_cnn(config: SimpleCNNConfig, stream: Stream) -> nn.Module:
    """avalanche-lib's SimpleCNN: two conv-conv-maxpool stages (32, 64 channels), a 1x1
    conv, global max pooling and a linear classifier over its 64 features."""
    c = stream.input_shape[0]
    p = config.dropout
    features = nn.Sequential(
        nn.Conv2d(c, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3), nn.ReLU(),
        nn.MaxPool2d(2), nn.Dropout(p),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3), nn.ReLU(),
        nn.MaxPool2d(2), nn.Dropout(p),
        nn.Conv2d(64, 64, 1), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Dropout(p), nn.Flatten(),
    )  # fmt: skip
    return nn.Sequential(
        OrderedDict(features=features, classifier=nn.Linear(64, stream.num_classes))
    )


class BasicBlock(nn.Module):
    """Two 3x3 convs with batch norm and a shortcut (a 1x1 conv where the shape changes)."""

    def __init__(self, inputs: int, planes: int, stride: int = 1, bias: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, planes, 3, stride, 1, bias=bias)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=bias)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or inputs != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(inputs, planes, 1, stride, bias=bias), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def _resnet(stream: Stream, widths: list[int], blocks: list[int], bias: bool) -> nn.Module:
    """A CIFAR-style ResNet as named blocks (stem, layer1.., pool, fc): 3x3 stride-1 stem,
    no max-pool, each stage after the first halving the map."""
    inputs = widths[0]
    parts: OrderedDict[str, nn.Module] = OrderedDict(
        stem=nn.Sequential(
            nn.Conv2d(stream.input_shape[0], inputs, 3, 1, 1, bias=bias),
            nn.BatchNorm2d(inputs),
            nn.ReLU(),
        )
    )
    for i, (width, n) in enumerate(zip(widths, blocks)):
        layer = []
        for j in range(n):
            layer.append(BasicBlock(inputs, width, 2 if i and not j else 1, bias))
            inputs = width
        parts[f"layer{i + 1}"] = nn.Sequential(*layer)
    parts["pool"] = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    parts["fc"] = nn.Linear(inputs, stream.num_classes)
    return nn.Sequential(parts)


@dataclass
class ReducedResNet18Config:
    nf: int = param(20, "width of the first stage; the stages are nf, 2nf, 4nf, 8nf")


def reduced_resnet18(config: ReducedResNet18Config, stream: Stream) -> nn.Module:
    """The reduced ResNet-18 of GEM (Lopez-Paz and Ranzato 2017, their code): ResNet-18's
    [2, 2, 2, 2] basic blocks at widths nf..8nf (nf=20: 160 features), convs with bias,
    average-pooled features (4x4 on 32x32 inputs) and one linear classifier."""
    nf = config.nf
    return _resnet(stream, [nf, 2 * nf, 4 * nf, 8 * nf], [2, 2, 2, 2], bias=True)


@dataclass
class ResNet32Config:
    depth: int = param(32, "6n + 2 layers: n basic blocks in each of the three stages")

    def validate(self, where: str) -> None:
        if self.depth < 8 or (self.depth - 2) % 6:
            raise ConfigError(f"{where}.depth: must be 6n + 2 (20, 32, 44, 56, ...), got "
                              f"{self.depth}")  # fmt: skip


def resnet32(config: ResNet32Config, stream: Stream) -> nn.Module:
    """The CIFAR ResNet of He et al. (2016, sec. 4.2) that iCaRL uses: three stages of
    (depth - 2) / 6 basic blocks at 16, 32 and 64 channels, global average pooling, a
    linear classifier. Shortcuts that change shape are 1x1 convs (option B)."""
    n = (config.depth - 2) // 6
    return _resnet(stream, [16, 32, 64], [n, n, n], bias=False)
