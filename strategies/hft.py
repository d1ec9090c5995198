"""Half Fine-Tuning (HFT): each experience trains a random half of every transformer block.

Before each experience a new random half of every block's attention and feed-forward
matrices is frozen; the other half learns the new task.

Hui et al., "HFT: Half Fine-Tuning for Large Language Models", ACL 2025 (arXiv 2404.18466),
Figure 2: the half is chosen at the category level inside each block: 2 of the 4 attention
projections (q, k, v, o), and 2 then 1 of the 3 feed-forward matrices (gate, up, down) in
alternate blocks, so about half of the block matrices keep what the model knew. Frozen
matrices get no gradient and no optimizer state (the optimizer is rebuilt over the trainable
half), which is where HFT's speed-up comes from. The paper selects within the blocks'
attention and FFN only; keeping the token embeddings, the LM head and the norms trainable is
a documented choice of forgetless, and `freeze_embeddings: true` freezes them instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from forgetless.core.schema import ConfigError, param
from forgetless.strategies.base import Strategy, register_strategy
from forgetless.streams import Experience

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
FEED_FORWARD = ("gate_proj", "up_proj", "down_proj")


@dataclass
class HFTConfig:
    freeze_embeddings: bool = param(
        False,
        "also freeze the token embeddings, LM head and norms (by default they train; the "
        "random half is drawn within the blocks' attention and FFN matrices)",
    )


def transformer_blocks(model: nn.Module) -> list[list[nn.Module]]:
    """Per block, its q, k, v, o, gate, up and down modules (Llama, Mistral, Qwen layout)."""
    blocks = []
    for module in model.modules():
        attention, mlp = getattr(module, "self_attn", None), getattr(module, "mlp", None)
        if all(hasattr(attention, n) for n in ATTENTION) and all(
            hasattr(mlp, n) for n in FEED_FORWARD
        ):
            blocks.append(
                [getattr(attention, n) for n in ATTENTION] + [getattr(mlp, n) for n in FEED_FORWARD]
            )
    if not blocks:
        has = sorted({f"{name.rsplit('.', 1)[-1]} ({type(m).__name__})"
                      for name, m in model.named_modules()
                      if name and next(m.parameters(recurse=False), None) is not None})  # fmt: skip
        raise ConfigError(
            f"strategy hft: the model has no transformer block with self_attn.{{q,k,v,o}}_proj "
            f"and mlp.{{gate,up,down}}_proj (Llama, Mistral or Qwen layout); its modules with "
            f"parameters are: {', '.join(has) or '(none)'}; use a Llama-style model"
        )
    return blocks


def draw_frozen_half(n_blocks: int) -> torch.Tensor:
    """[block, q k v o gate up down] -> frozen: 2 of 4 attention matrices in every block,
    2 of 3 feed-forward matrices in even blocks and 1 of 3 in odd ones; torch's global RNG."""
    frozen = torch.zeros(n_blocks, len(ATTENTION) + len(FEED_FORWARD), dtype=torch.bool)
    attention, feed_forward = frozen[:, : len(ATTENTION)], frozen[:, len(ATTENTION) :]
    for b in range(n_blocks):
        attention[b, torch.randperm(len(ATTENTION))[:2]] = True
        feed_forward[b, torch.randperm(len(FEED_FORWARD))[: 2 if b % 2 == 0 else 1]] = True
    return frozen


@register_strategy("hft")
class HalfFineTuning(Strategy):
    Config = HFTConfig
    supports = ("generation",)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.blocks = transformer_blocks(self.model)
        self.frozen = torch.zeros(len(self.blocks), len(self.blocks[0]), dtype=torch.bool)
        self._freeze()

    def before_experience(self, experience: Experience) -> None:
        super().before_experience(experience)
        self.frozen = draw_frozen_half(len(self.blocks))
        self._freeze()

    def _freeze(self) -> None:
        """Apply `self.frozen` (and `freeze_embeddings`), then rebuild the optimizer over
        what stays trainable: a frozen matrix has no gradient and no optimizer state. The
        optimizer's state (momentum, Adam moments) thus restarts at every experience."""
        in_blocks = set()
        for block, frozen in zip(self.blocks, self.frozen.tolist()):
            for matrix, is_frozen in zip(block, frozen):
                matrix.requires_grad_(not is_frozen)
                in_blocks.update(id(p) for p in matrix.parameters())
        for p in self.model.parameters():
            if id(p) not in in_blocks:
                p.requires_grad_(not self.config.freeze_embeddings)
        self.optimizer = self.make_optimizer()

    def state_dict(self) -> dict:
        return {**super().state_dict(), "frozen": self.frozen.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.frozen = state["frozen"].to(torch.bool).cpu()
        self._freeze()  # the optimizer must hold the same parameters before its state loads
        super().load_state_dict(state)
