"""Swapping the module that an editor wraps (GRACE's codebook, WISE's side memory;
models/families.py finds it), and replaying the unchanged blocks below it while an edit
trains."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from forgetless.models.families import blocks, transformers_model


def replace_module(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put `new` where `old` sits in `model` (an editor wrapping one layer)."""
    for parent in model.modules():
        for name, child in parent.named_children():
            if child is old:
                setattr(parent, name, new)
                return
    raise ValueError(f"{type(old).__name__} is not a module of the model")


class _Passthrough(nn.Module):
    """A block that returns its input: what a block below the edited one becomes while its
    output is replayed."""

    def forward(self, *args, **kwargs):
        return args[0] if args else kwargs["hidden_states"]


@contextlib.contextmanager
def reuse_blocks_below(model: nn.Module, layer: int) -> Iterator[None]:
    """Within, every forward pass must read the same input ids: the first runs the whole
    model and keeps the hidden states entering block `layer`; later ones skip the blocks
    below (nothing below `layer` changes while an editor trains a matrix of that block) and
    start there from the kept states. The outputs are the ones a whole pass gives: an
    editor's step costs the blocks from `layer` up, not the whole stack."""
    family, found = blocks(model, "reuse_blocks_below")
    container = transformers_model(model).get_submodule(family.blocks)
    kept: dict[str, torch.Tensor] = {}

    def replay(module, args, kwargs):
        if "states" not in kept:
            kept["states"] = (args[0] if args else kwargs["hidden_states"]).detach()
            for i in range(layer):
                container[i] = _Passthrough()
            return None
        if args:
            return (kept["states"], *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kept["states"]}

    hook = found[layer].register_forward_pre_hook(replay, with_kwargs=True)
    try:
        yield
    finally:
        hook.remove()
        for i in range(layer):
            container[i] = found[i]
