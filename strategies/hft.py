"""Half Fine-Tuning (HFT): each experience trains a random half of every transformer block.

Before each experience a new random half of every block's attention and feed-forward
matrices is frozen; the other half learns the new task.

Hui et al., "HFT: Half Fine-Tuning for Large Language Models", ACL 2025 (arXiv 2404.18466),
Figure 2: the half is chosen at the category level inside each block: 2 of the 4 attention
projections (q, k, v, o), and 2 then 1 of the 3 feed-forward matrices (gate, up, down) in
alternate blocks, so about half of the block matrices keep what the model knew. A family
with fused or fewer matrices (models/families.py: GPT-2's c_attn, c_proj and c_fc, c_proj)
freezes half of each group the same way: n / 2, or (n + 1) / 2 then (n - 1) / 2 in
alternate blocks when n is odd. Frozen
matrices get no gradient and no optimizer state (the optimizer is rebuilt over the trainable
half), which is where HFT's speed-up comes from. The paper selects within the blocks'
attention and FFN only; keeping the token embeddings, the LM head and the norms trainable is
a documented choice of forgetless, and `freeze_embeddings: true` freezes them instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from forgetless.core.schema import param
from forgetless.models.families import ATTENTION_ROLES, FFN_ROLES, blocks
from forgetless.strategies.base import Strategy, register_strategy
from forgetless.streams import Experience


@dataclass
class HFTConfig:
    freeze_embeddings: bool = param(
        False,
        "also freeze the token embeddings, LM head and norms (by default they train; the "
        "random half is drawn within the blocks' attention and FFN matrices)",
    )


def transformer_blocks(model: nn.Module) -> tuple[list[list[nn.Module]], int]:
    """Per block, its attention matrices then its feed-forward ones (models/families.py),
    and how many of each block's matrices are attention ones."""
    family, found = blocks(model, "strategy hft")
    matrices = [[b.get_submodule(p) for p in family.attention + family.ffn] for b in found]
    return matrices, len(family.attention)


def draw_frozen_half(n_blocks: int, attention: int = 4, feed_forward: int = 3) -> torch.Tensor:
    """[block, attention matrices then FFN ones] -> frozen, torch's global RNG: half of each
    group, the odd one out frozen in even blocks and trained in odd ones (Llama: 2 of 4
    attention matrices in every block, 2 of 3 FFN matrices in even blocks and 1 in odd)."""
    frozen = torch.zeros(n_blocks, attention + feed_forward, dtype=torch.bool)
    groups = frozen[:, :attention], frozen[:, attention:]
    for b in range(n_blocks):
        for group in groups:
            n = group.shape[1]
            group[b, torch.randperm(n)[: (n + 1) // 2 if b % 2 == 0 else n // 2]] = True
    return frozen


@register_strategy("hft")
class HalfFineTuning(Strategy):
    Config = HFTConfig
    supports = ("generation",)

    @staticmethod
    def model_roles(config: HFTConfig) -> tuple[str, ...]:
        """HFT splits every block: the model's family must have a row (each row has these)."""
        return ATTENTION_ROLES + FFN_ROLES[1:]

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.blocks, self.attention = transformer_blocks(self.model)
        self.frozen = torch.zeros(len(self.blocks), len(self.blocks[0]), dtype=torch.bool)
        self._freeze()

    def before_experience(self, experience: Experience) -> None:
        super().before_experience(experience)
        n = len(self.blocks[0])
        self.frozen = draw_frozen_half(len(self.blocks), self.attention, n - self.attention)
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
