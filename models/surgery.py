"""Swapping the module that an editor wraps (GRACE's codebook, WISE's side memory);
models/families.py finds it."""

from __future__ import annotations

from torch import nn


def replace_module(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put `new` where `old` sits in `model` (an editor wrapping one layer)."""
    for parent in model.modules():
        for name, child in parent.named_children():
            if child is old:
                setattr(parent, name, new)
                return
    raise ValueError(f"{type(old).__name__} is not a module of the model")
