"""Models: the networks a cell trains, built from a name and declared parameters."""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

from torch import nn

from forgetless.core.registry import Registry
from forgetless.core.schema import ConfigError, param
from forgetless.models.causal_lm import (
    HFConfig,
    gguf_file,
    gguf_model,
    gguf_model_type,
    hf_model,
    hf_model_type,
    hf_source,
    llama_tiny,
)
from forgetless.models.families import check_roles
from forgetless.models.vision import (
    holds_pixels,
    mlp_multihead,
    mlp_trunk,
    reduced_resnet18,
    resnet32,
    scale_pixels,
    simple_cnn,
)
from forgetless.streams import Stream

MODELS: Registry = Registry("model", "forgetless.models")
register_model = MODELS.register


@dataclass
class MLPConfig:
    hidden: list[int] = param([128], "widths of the hidden layers")
    dropout: float = param(0.0, "dropout after each hidden layer")

    def validate(self, where: str) -> None:
        if any(h <= 0 for h in self.hidden):
            raise ConfigError(f"{where}.hidden: every width must be > 0, got {self.hidden}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"{where}.dropout: must be in [0, 1), got {self.dropout}")


@register_model("mlp")
def mlp(config: MLPConfig, stream: Stream) -> nn.Module:
    layers = mlp_trunk(math.prod(stream.input_shape), config.hidden, config.dropout)
    width = config.hidden[-1] if config.hidden else math.prod(stream.input_shape)
    return nn.Sequential(*layers, nn.Linear(width, stream.num_classes))


@dataclass
class CNNConfig:
    channels: list[int] = param([32, 64], "output channels of each 3x3 conv block")
    hidden: int = param(128, "width of the fully connected layer before the classifier")


@register_model("cnn")
def cnn(config: CNNConfig, stream: Stream) -> nn.Module:
    """Conv blocks (conv3x3-BN-ReLU) then a classifier; the first block keeps the spatial size."""
    in_channels, height, width = stream.input_shape
    layers: list[nn.Module] = []
    for i, out in enumerate(config.channels):
        layers += [nn.Conv2d(in_channels, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU()]
        if i > 0:
            layers.append(nn.MaxPool2d(2))
            height, width = height // 2, width // 2
        in_channels = out
    layers += [
        nn.Flatten(),
        nn.Linear(in_channels * height * width, config.hidden),
        nn.ReLU(),
        nn.Linear(config.hidden, stream.num_classes),
    ]
    return nn.Sequential(*layers)


@dataclass
class LatentCNNConfig:
    channels: list[int] = param(
        [32, 64], "conv3x3-BN-ReLU blocks of G; each after the first halves the size"
    )
    latent_channels: int = param(2, "channels of the latent map: a 1x1 conv with no ReLU")
    head_channels: int = param(64, "channels of F's conv3x3-BN-ReLU block")
    hidden: int = param(128, "width of F's fully connected layer before the classifier")


@register_model("latent_cnn")
def latent_cnn(config: LatentCNNConfig, stream: Stream) -> nn.Module:
    """A small CNN with a split point: G (`block*`, `latent`) ends in a linear spatial
    latent (C x H x W; 2 x 4 x 4 on 8x8 digits), F (`head`, `classifier`) reads it.

    The latent has no ReLU: after a base training a ReLU left many units dead, which
    product quantization then spends codes on. Latent replay splits it at `head`. On
    digits a 4x4 map of 2 channels beat a 2x2 map of 4 at the same bits a sample: a
    shallower G trained on a few base classes leaves F more to learn the others with.
    """
    in_channels, height, width = stream.input_shape
    blocks: OrderedDict[str, nn.Module] = OrderedDict()
    for i, out in enumerate(config.channels):
        layers = [nn.Conv2d(in_channels, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU()]
        if i > 0:
            layers.append(nn.MaxPool2d(2))
            height, width = height // 2, width // 2
        blocks[f"block{i}"] = nn.Sequential(*layers)
        in_channels = out
    if height < 1 or width < 1:
        raise ConfigError(
            f"model.channels: {len(config.channels)} blocks halve the {stream.input_shape[1:]} "
            "input to nothing; use fewer blocks"
        )
    blocks["latent"] = nn.Conv2d(in_channels, config.latent_channels, 1)
    blocks["head"] = nn.Sequential(
        nn.Conv2d(config.latent_channels, config.head_channels, 3, padding=1),
        nn.BatchNorm2d(config.head_channels),
        nn.ReLU(),
    )
    blocks["classifier"] = nn.Sequential(
        nn.Flatten(),
        nn.Linear(config.head_channels * height * width, config.hidden),
        nn.ReLU(),
        nn.Linear(config.hidden, stream.num_classes),
    )
    model = nn.Sequential(blocks)
    model.latent_split = "head"
    return model


@dataclass
class ResNet18Config:
    small_input: bool = param(
        False,
        "CIFAR-style stem (3x3 stride-1 first conv, no max-pool) for 32x32 inputs, so layer4 "
        "maps are 4x4 rather than 1x1",
    )


@register_model("resnet18")
def resnet18(config: ResNet18Config, stream: Stream) -> nn.Module:
    """torchvision's ResNet-18 (untrained) as named blocks: stem, layer1..4, pool, fc.

    Latent replay splits it at `layer4.1` as REMIND does (Hayes et al., ECCV 2020, sec. 4):
    G runs through the first block of layer4 and its 512 x 7 x 7 output (on 224x224 inputs)
    is the latent; unlike latent_cnn's, it ends in that block's ReLU.
    """
    import torchvision

    net = torchvision.models.resnet18(weights=None, num_classes=stream.num_classes)
    in_channels = stream.input_shape[0]
    if config.small_input:
        net.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    model = nn.Sequential(
        OrderedDict(
            stem=nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool),
            layer1=net.layer1,
            layer2=net.layer2,
            layer3=net.layer3,
            layer4=net.layer4,
            pool=nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()),
            fc=net.fc,
        )
    )
    model.latent_split = "layer4.1"
    return model


def split_points(model: nn.Module, prefix: str = "") -> list[str]:
    """Names of the blocks a Sequential model can be split before (`head`, `layer4.1`):
    its children, and the blocks inside a child that is a Sequential of blocks."""
    if not isinstance(model, nn.Sequential):
        return []
    names = []
    for i, (name, child) in enumerate(model.named_children()):
        if i > 0 or prefix:
            names.append(prefix + name)
        if all(next(c.children(), None) is not None for c in child.children()):
            names += split_points(child, f"{prefix}{name}.")[1:]
    return names


def split_model(model: nn.Module, at: str, where: str) -> tuple[nn.Sequential, nn.Sequential]:
    """(G, F): the modules before `at` and from `at` on; both share the model's modules."""
    if at not in split_points(model):
        points = split_points(model) or ["(none: the model is not a Sequential of blocks)"]
        raise ConfigError(
            f"{where}: the model has no split point {at!r}; its split points are "
            f"{', '.join(points)} (models with one: latent_cnn, resnet18)"
        )
    head, _, rest = at.partition(".")
    children = list(model.named_children())
    i = [name for name, _ in children].index(head)
    lower, upper = OrderedDict(children[:i]), OrderedDict(children[i:])
    if rest:
        lower[head], upper[head] = split_model(children[i][1], rest, where)
    return nn.Sequential(lower), nn.Sequential(upper)


register_model("llama_tiny")(llama_tiny)
register_model("mlp_multihead")(mlp_multihead)
register_model("simple_cnn")(simple_cnn)
register_model("reduced_resnet18")(reduced_resnet18)
register_model("resnet32")(resnet32)

DEFAULT_MODEL = {"classification": "mlp", "generation": "llama_tiny", "edit": "llama_tiny"}
HF_PREFIX = "hf:"
GGUF_PREFIX = "gguf:"


def model_factory(name: str, where: str):
    """The factory registered under `name`; `hf:<folder or hub id>` loads a Hugging Face
    model, `gguf:<package or path>[:<file>]` a GGUF checkpoint de-quantized once."""
    for prefix, load in ((HF_PREFIX, hf_model), (GGUF_PREFIX, gguf_model)):
        if name.startswith(prefix):
            spec = name[len(prefix) :]

            def factory(config: HFConfig, stream: Stream, spec=spec, load=load) -> nn.Module:
                return load(spec, config)

            return factory
    return MODELS.get(name, where)


def check_model(name: str, roles: tuple[str, ...], who: str, positions: bool = False) -> None:
    """Before any cell: the model can be had (a saved folder, the hub when online, an
    installed GGUF), and its family has the matrices `roles` a method needs (and sees
    positions at them, for a method that reads them: `check_roles`)."""
    if name.startswith(HF_PREFIX):
        spec = name[len(HF_PREFIX) :]
        hf_source(spec)
        if roles:
            check_roles(hf_model_type(spec), name, roles, who, positions)
    elif name.startswith(GGUF_PREFIX):
        spec = name[len(GGUF_PREFIX) :]
        gguf_file(spec)
        if roles:
            check_roles(gguf_model_type(spec), name, roles, who, positions)
    elif name == "llama_tiny":
        check_roles("llama", name, roles, who, positions)


def build_model(name: str, config: object, stream: Stream) -> nn.Module:
    model = model_factory(name, "model.name")(config, stream)
    return scale_pixels(model, stream) if holds_pixels(stream) else model  # uint8 images
