"""GRACE: a codebook of keys and values at one layer, each key with a deferral radius.

Hartvigsen et al., "Aging with GRACE: Lifelong Model Editing with Discrete Key-Value
Adaptors", NeurIPS 2023, as EasyEdit (easyeditor/models/grace/GRACE.py) and the authors'
code run it. The layer's input at the last prompt token of an edit is its key; a value,
trained for the edit, replaces the layer's output wherever an input falls within the
radius of a key, and every other input runs the layer untouched. A new key whose label
differs from its nearest key's, within both radii, splits the two balls; one with the
same label widens the nearest ball (`coverage`) or moves it (`moving_average`).

Every position is its own query: what replace_last does at each step of decoding, so the
teacher-forced score equals greedy generation. EasyEdit keys an edit at its last prompt
token only (`keys: last_prompt`), so one replaced output must carry every token of the
answer through the layers above; `keys: answer` also keys the positions that predict
the rest of the answer (their inputs at this layer do not depend on the replacement,
which acts after the layer's attention), one codebook entry each. Values train with
Adam on the target tokens' loss (EasyEdit: lr 1.0); `cold` values start at U[0, 1),
`warm` ones at the layer's own output at the key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from forgetless.core.schema import ConfigError, param, positive
from forgetless.models.causal_lm import IGNORE, edit_batch
from forgetless.models.families import block_matrix, check_role_name, in_out
from forgetless.models.surgery import answer_loss, replace_module, reuse_blocks_below
from forgetless.strategies.base import Strategy, register_strategy
from forgetless.streams import Experience


class Codebook(nn.Module):
    """A layer and its codebook: the output at an input within a key's radius is the value."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer  # an nn.Linear, or GPT-2's Conv1D
        width_in, width_out = in_out(layer)
        self.register_buffer("keys", torch.zeros(0, width_in))
        self.register_buffer("radii", torch.zeros(0))
        self.values = nn.Parameter(torch.zeros(0, width_out))
        self.labels: list[str] = []
        self.last_input: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.last_input = x.detach()
        out = self.layer(x)
        if not len(self.keys):
            return out
        distance, nearest = self.nearest(x)
        hit = (distance <= self.radii[nearest]).unsqueeze(-1)
        return torch.where(hit, self.values[nearest].to(out.dtype), out)

    def nearest(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = x.reshape(-1, x.shape[-1]).float()
        distance, nearest = torch.cdist(flat, self.keys.float()).min(dim=-1)
        return distance.view(x.shape[:-1]), nearest.view(x.shape[:-1])

    def add(self, key: torch.Tensor, value: torch.Tensor, radius: float, label: str) -> int:
        self.keys = torch.cat([self.keys, key[None]])
        self.radii = torch.cat([self.radii, self.radii.new_tensor([radius])])
        self.values = nn.Parameter(torch.cat([self.values.detach(), value[None]]))
        self.labels.append(label)
        return len(self.labels) - 1


@dataclass
class GraceConfig:
    layer: int = param(2, "transformer block whose matrix gets the codebook")
    module: str = param(
        "down_proj",
        "the matrix, by its Llama role (the FFN output; models/families.py); EasyEdit's GPT-2 "
        "hparams wrap up_proj (c_fc)",
    )
    eps: float = param(1.0, "initial deferral radius of a key (EasyEdit: 1.0)")
    lr: float = param(1.0, "Adam learning rate of a value (EasyEdit: 1.0)")
    steps: int = param(100, "value training steps per edit (authors: 100; EasyEdit: 50-200)")
    value_init: Literal["cold", "warm"] = param(
        "cold", "cold: U[0, 1); warm: the layer's own output at the key"
    )
    keys: Literal["last_prompt", "answer"] = param(
        "last_prompt", "key the last prompt token (EasyEdit), or every answer-predicting position"
    )
    eps_expand: Literal["coverage", "moving_average"] = param(
        "coverage", "same label within range: widen the nearest ball, or move its key"
    )

    def validate(self, where: str) -> None:
        for name in ("eps", "lr", "steps"):
            positive(getattr(self, name), f"{where}.{name}")
        if self.layer < 0:
            raise ConfigError(f"{where}.layer: must be >= 0, got {self.layer}")
        check_role_name(self.module, f"{where}.module")


@register_strategy("grace")
class Grace(Strategy):
    """GRACE: a key-value codebook with deferral radii at one layer (Hartvigsen et al. 2023)."""

    Config = GraceConfig
    supports = ("edit",)
    resumable = False  # the codebook's labels are strings: a retried cell restarts

    reads_positions = True  # its wrapper reads the matrix's input per sequence and position

    @staticmethod
    def model_roles(config: GraceConfig) -> tuple[str, ...]:
        return (config.module,)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        layer = block_matrix(
            self.model, self.config.layer, self.config.module, "strategy.layer", positions=True
        )
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.codebook = Codebook(layer)
        replace_module(self.model, layer, self.codebook)

    def train(self, experience: Experience) -> None:
        self.model.eval()
        for request in experience.train:
            self.edit(request.prompt, request.target)

    def edit(self, prompt: str, target: str) -> None:
        book, cfg = self.codebook, self.config
        batch = edit_batch(self.model, prompt, target, self.device)
        predicts = (batch.y[0, 1:] != IGNORE).nonzero().flatten().tolist()  # [last prompt, ...]
        positions = predicts[:1] if cfg.keys == "last_prompt" else predicts
        with reuse_blocks_below(self.model, cfg.layer):
            with torch.no_grad():
                self.model(batch.x)
                inputs = book.last_input[0]
            entries = [self.add_key(inputs[p], f"{target}\x00{k}") for k, p in enumerate(positions)]
            optimizer = torch.optim.Adam([book.values], lr=cfg.lr)
            for _ in range(cfg.steps):
                loss = answer_loss(self.model, batch.x, batch.y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                keep = torch.zeros_like(book.values.grad)
                keep[entries] = 1  # only this edit's values learn
                book.values.grad.mul_(keep)
                optimizer.step()

    @torch.no_grad()
    def add_key(self, layer_input: torch.Tensor, label: str) -> int:
        """The codebook entry for this query (section 3 of the paper; EasyEdit's rules)."""
        book, cfg = self.codebook, self.config
        query = layer_input.float()
        original = book.layer(layer_input).float()
        value = original.clone() if cfg.value_init == "warm" else torch.rand_like(original)
        if not len(book.keys):
            return book.add(query, value, cfg.eps, label)
        distance, nearest = book.nearest(query[None])
        d, j = float(distance[0]), int(nearest[0])
        if d > cfg.eps + float(book.radii[j]):
            return book.add(query, value, cfg.eps, label)
        if book.labels[j] != label:  # conflicting labels: split the two balls
            book.radii[j] = d / 2 - 1e-5
            return book.add(query, value, d / 2, label)
        if cfg.eps_expand == "moving_average":
            book.keys[j] = (book.keys[j] + query) / 2
            book.radii[j] = d
        elif d > float(book.radii[j]):
            book.radii[j] = d
        return j

    def memory_bytes(self) -> int:
        book = self.codebook
        return sum(t.numel() * t.element_size() for t in (book.keys, book.radii, book.values))
