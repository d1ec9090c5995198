"""The one training loop. A method overrides only the hooks it needs.

    train(experience):
        before_experience(experience)
        data = training_data(experience)      # cumulative: everything seen so far
        for epoch, batch in batches(data):
            batch = compose(batch)            # rehearsal: append replayed samples
            loss = loss(batch)                # e.g. distillation terms
            backward, optimizer step
        after_experience(experience)          # rehearsal: update the buffer

Methods whose unit is not a batch (editors, the Avalanche adapter) override
`train` whole. A strategy never talks to MLflow or Ray.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from forgetless.core.registry import Registry
from forgetless.core.schema import ConfigError, param, positive
from forgetless.models.causal_lm import lm_loss, trim_padding
from forgetless.streams import Experience, Samples, Stream


@dataclass
class TrainConfig:
    """How every strategy trains; the grid's `train:` section."""

    epochs: int = param(1, "passes over each experience's training data")
    batch_size: int = param(32, "samples per optimizer step (before any replayed samples)")
    lr: float = param(0.1, "learning rate")
    optimizer: Literal["sgd", "adam", "adamw"] = param("sgd", "optimizer")
    momentum: float = param(0.0, "SGD momentum")
    weight_decay: float = param(0.0, "weight decay")
    warmup_steps: int = param(
        0, "steps of linear learning-rate warm-up at the start of every experience"
    )
    decay: Literal["constant", "cosine"] = param(
        "constant",
        "learning rate after the warm-up: constant, or a cosine to 0 over each experience's "
        "steps (re-warmed and re-decayed every experience, as continual pre-training does)",
    )
    eval_batch_size: int = param(512, "samples per forward pass when scoring")

    def validate(self, where: str) -> None:
        for name in ("epochs", "batch_size", "lr", "eval_batch_size"):
            positive(getattr(self, name), f"{where}.{name}")
        if self.warmup_steps < 0:
            raise ConfigError(f"{where}.warmup_steps: must be >= 0, got {self.warmup_steps}")
        if self.weight_decay < 0 or self.momentum < 0:
            raise ConfigError(f"{where}: momentum and weight_decay must be >= 0")


class NonFiniteLoss(RuntimeError):
    """Training diverged; the runner ends the cell FAILED with this message."""


@dataclass
class NoParams:
    """This strategy takes no parameters."""


class Strategy:
    """Base of every method: the loop above, checkpoint state and a memory account."""

    Config: ClassVar[type] = NoParams
    supports: ClassVar[tuple[str, ...]] = ("classification",)
    resumable: ClassVar[bool] = True
    """False when part of the state cannot be checkpointed: a retried cell restarts."""

    def __init__(self, model: nn.Module, config: Any, train: TrainConfig, stream: Stream) -> None:
        self.model = model
        self.config = config
        self.train_config = train
        self.device = next(model.parameters()).device
        self.generation = stream.kind == "generation"
        self.criterion = lm_loss if self.generation else F.cross_entropy
        self.optimizer = self.make_optimizer()
        self.class_mask = None
        if stream.task_classes is not None:
            self.class_mask = torch.zeros(
                len(stream.task_classes), stream.num_classes, dtype=torch.bool, device=self.device
            )
            for task, classes in enumerate(stream.task_classes):
                self.class_mask[task, classes] = True

    # --- the loop -------------------------------------------------------------------
    def train(self, experience: Experience) -> None:
        self.before_experience(experience)
        data = self.training_data(experience).to(self.device)
        batch_size = self.train_config.batch_size
        self.model.train()
        step, steps = 0, self.train_config.epochs * -(-len(data) // batch_size)
        for epoch in range(self.train_config.epochs):
            order = torch.randperm(len(data), device=self.device)
            total = torch.zeros((), device=self.device)
            for start in range(0, len(data), batch_size):
                batch = self.compose(data.subset(order[start : start + batch_size]))
                if self.generation:
                    batch = trim_padding(batch)
                loss = self.loss(batch)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.schedule_lr(step, steps)
                self.optimizer.step()
                step += 1
                total += loss.detach()
            # One device sync per epoch, not per step: a NaN survives to the sum.
            if not torch.isfinite(total):
                raise NonFiniteLoss(
                    f"loss became {total.item()} in epoch {epoch} of experience {experience.name!r}"
                    f" (lr={self.train_config.lr}); lower train.lr or check the data"
                )
        self.after_experience(experience)

    # --- hooks ----------------------------------------------------------------------
    def before_experience(self, experience: Experience) -> None:
        """Called before training on `experience`."""

    def training_data(self, experience: Experience) -> Samples:
        """The samples this experience trains on."""
        return experience.train

    def compose(self, batch: Samples) -> Samples:
        """Turn a batch of the experience into the batch that is trained on."""
        return batch

    def loss(self, batch: Samples) -> torch.Tensor:
        return self.criterion(self.logits(batch), batch.y)

    def after_experience(self, experience: Experience) -> None:
        """Called after training on `experience`."""

    # --- shared pieces --------------------------------------------------------------
    def schedule_lr(self, step: int, steps: int) -> None:
        """Linear warm-up from each experience's first step (the usual guard for Adam on
        transformers), then a constant rate or a cosine to 0 at the experience's last of
        `steps`. It keeps no state: checkpoints fall between experiences."""
        cfg = self.train_config
        if step < cfg.warmup_steps:
            factor = (step + 1) / cfg.warmup_steps
        elif cfg.decay == "cosine":
            progress = (step - cfg.warmup_steps) / max(1, steps - cfg.warmup_steps)
            factor = 0.5 * (1 + math.cos(math.pi * progress))
        else:
            return
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr * factor

    def logits(self, batch: Samples) -> torch.Tensor:
        """Model outputs; task-incremental streams mask them to the batch's task classes."""
        return self.mask_to_task(self.model(batch.x), batch.task)

    def mask_to_task(self, out: torch.Tensor, task: torch.Tensor | None) -> torch.Tensor:
        """-inf outside the classes of each sample's task (task-incremental streams only)."""
        if self.class_mask is None or task is None:
            return out
        return out.masked_fill(~self.class_mask[task], float("-inf"))

    def make_optimizer(self) -> torch.optim.Optimizer:
        """An optimizer over the parameters that currently require gradients."""
        cfg = self.train_config
        params = [p for p in self.model.parameters() if p.requires_grad]
        if cfg.optimizer == "sgd":
            return torch.optim.SGD(
                params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
            )
        cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
        return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def memory_bytes(self) -> int:
        """Bytes held beyond the model (buffers, codebooks, adapters), for fair budgets."""
        return 0

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values only, so checkpoints load with weights_only=True."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])


STRATEGIES: Registry = Registry("strategy", "forgetless.strategies")
register_strategy = STRATEGIES.register
