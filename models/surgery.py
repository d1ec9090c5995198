"""Swapping the module that an editor wraps (GRACE's codebook, WISE's side memory;
models/families.py finds it), replaying the unchanged blocks below it while an edit
trains, and running the output head only where an edit's loss reads it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from forgetless.models.causal_lm import IGNORE
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


@contextlib.contextmanager
def logits_only_at(model: nn.Module, where: torch.Tensor) -> Iterator[None]:
    """Within, the output head runs only at the positions that the (rows, positions) mask
    `where` marks: the model returns logits of shape (1, marked positions, vocabulary), in
    row-major order. A small model's head is most of its cost (SmolLM2: a 49k vocabulary
    on a width of 576), and an edit's loss reads it at a few answer positions of its rows."""
    head = transformers_model(model).get_output_embeddings()

    def keep_marked(module, args):
        return (args[0][where].unsqueeze(0), *args[1:])

    hook = head.register_forward_pre_hook(keep_marked)
    try:
        yield
    finally:
        hook.remove()


def answer_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """causal_lm.lm_loss(model(x), y), the next-token cross-entropy where labels are not
    -100, with the head run only at the positions that predict a label."""
    predicts = torch.zeros_like(y, dtype=torch.bool)
    predicts[:, :-1] = y[:, 1:] != IGNORE
    with logits_only_at(model, predicts):
        logits = model(x)
    return nn.functional.cross_entropy(logits[0], y[:, 1:][predicts[:, :-1]])
