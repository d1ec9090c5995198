"""Models: the networks a cell trains, built from a name and declared parameters."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from forgetless.experiments.registry import Registry
from forgetless.experiments.schema import ConfigError, param
from forgetless.models.causal_lm import HFConfig, hf_model, llama_tiny
from forgetless.streams import Stream

MODELS: Registry = Registry("model", "forgetless.models")
register_model = MODELS.register


@dataclass
class MLPConfig:
    hidden: list[int] = param([128], "widths of the hidden layers")

    def validate(self, where: str) -> None:
        if any(h <= 0 for h in self.hidden):
            raise ConfigError(f"{where}.hidden: every width must be > 0, got {self.hidden}")


@register_model("mlp")
def mlp(config: MLPConfig, stream: Stream) -> nn.Module:
    widths = [math.prod(stream.input_shape), *config.hidden]
    layers: list[nn.Module] = [nn.Flatten()]
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers.append(nn.Linear(widths[-1], stream.num_classes))
    return nn.Sequential(*layers)


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


register_model("llama_tiny")(llama_tiny)

DEFAULT_MODEL = {"classification": "mlp", "generation": "llama_tiny"}
HF_PREFIX = "hf:"


def model_factory(name: str, where: str):
    """The factory registered under `name`; `hf:<path>` loads a local Hugging Face model."""
    if name.startswith(HF_PREFIX):
        path = name[len(HF_PREFIX) :]

        def factory(config: HFConfig, stream: Stream) -> nn.Module:
            return hf_model(path, config)

        return factory
    return MODELS.get(name, where)


def build_model(name: str, config: object, stream: Stream) -> nn.Module:
    return model_factory(name, "model.name")(config, stream)
