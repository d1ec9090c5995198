"""FT-L: fine-tune one feed-forward layer on each edit, within a norm constraint.

Zhu et al., "Modifying Memories in Transformer Models", 2020, as EasyEdit runs it
(easyeditor/models/ft): for every edit request, Adam on one FFN output matrix (the
family's down_proj: mlp.c_proj on GPT-2, fc_out on GPT-J, models/families.py) for a
few steps on the new target, then each weight is clamped to within `norm_constraint`
of its value before the edit. The loss is the teacher-forced cross-entropy of every
target token (EasyEdit's `objective_optimization: target_new`); its `prompt_last`
variant scores all target tokens from the last prompt position, which cannot make a
multi-token answer the greedy output, so forgetless does not offer it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from forgetless.core.schema import ConfigError, param, positive
from forgetless.models.causal_lm import edit_batch
from forgetless.models.families import block_matrix, check_role_name
from forgetless.models.surgery import answer_loss, reuse_blocks_below
from forgetless.strategies.base import Strategy, register_strategy
from forgetless.streams import Experience


@dataclass
class FTLConfig:
    layer: int = param(2, "transformer block whose matrix is fine-tuned")
    module: str = param(
        "down_proj", "the matrix, by its Llama role (the FFN output; models/families.py)"
    )
    lr: float = param(5e-4, "Adam learning rate (EasyEdit: 5e-4)")
    steps: int = param(25, "steps per edit at most (EasyEdit: 25)")
    norm_constraint: float = param(
        5e-3, "each weight stays within this distance of its pre-edit value (0: none)"
    )
    stop_loss: float = param(1e-2, "stop an edit early once its loss is below this")

    def validate(self, where: str) -> None:
        positive(self.lr, f"{where}.lr")
        positive(self.steps, f"{where}.steps")
        if self.norm_constraint < 0 or self.layer < 0:
            raise ConfigError(f"{where}: layer and norm_constraint must be >= 0")
        check_role_name(self.module, f"{where}.module")


@register_strategy("ft_l")
class FTL(Strategy):
    """FT-L (EasyEdit): fine-tune one FFN output matrix on each edit, under a norm constraint."""

    Config = FTLConfig
    supports = ("edit",)

    @staticmethod
    def model_roles(config: FTLConfig) -> tuple[str, ...]:
        return (config.module,)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        cfg = self.config
        self.weight = block_matrix(self.model, cfg.layer, cfg.module, "strategy.layer").weight
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.weight.requires_grad_(True)

    def train(self, experience: Experience) -> None:
        self.model.eval()  # no dropout: the edit is fitted on what evaluation computes
        for request in experience.train:
            batch = edit_batch(self.model, request.prompt, request.target, self.device)
            before = self.weight.detach().clone()
            optimizer = torch.optim.Adam([self.weight], lr=self.config.lr)
            with reuse_blocks_below(self.model, self.config.layer):
                for _ in range(self.config.steps):
                    loss = answer_loss(self.model, batch.x, batch.y)
                    if loss.item() < self.config.stop_loss:
                        break
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    if self.config.norm_constraint:
                        eps = self.config.norm_constraint
                        with torch.no_grad():
                            self.weight.copy_(torch.clamp(self.weight, before - eps, before + eps))
