"""Finding and swapping the modules that editors change (FT-L, GRACE and WISE edit one
feed-forward projection of one block)."""

from __future__ import annotations

from torch import nn

from forgetless.core.schema import ConfigError


def ffn_module(model: nn.Module, layer: int, name: str, where: str) -> nn.Linear:
    """The feed-forward projection `name` of transformer block `layer` (Llama layout:
    `layers.<i>.mlp.<name>`); a ConfigError names the blocks the model has."""
    found = {}
    for path, module in model.named_modules():
        parts = path.split(".")
        block = len(parts) >= 4 and parts[-4] in ("layers", "h") and parts[-2] == "mlp"
        if block and parts[-1] == name and isinstance(module, nn.Linear):
            found[int(parts[-3])] = module
    if layer not in found:
        have = f"layers 0-{max(found)}" if found else f"no mlp.{name} Linear module"
        raise ConfigError(f"{where}: the model has no layer {layer} with mlp.{name}; it has {have}")
    return found[layer]


def replace_module(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put `new` where `old` sits in `model` (an editor wrapping one layer)."""
    for parent in model.modules():
        for name, child in parent.named_children():
            if child is old:
                setattr(parent, name, new)
                return
    raise ValueError(f"{type(old).__name__} is not a module of the model")
