"""The one training loop. A method overrides only the hooks it needs.

    train(experience):
        before_experience(experience)
        data = training_data(experience)      # cumulative: everything seen so far
        for epoch, batch in batches(data):   # by index, or a DataLoader's workers
            batch = compose(batch)            # rehearsal: append replayed samples
            loss = loss(batch)                # e.g. distillation terms
            backward; every `accumulate` batches: clip, optimizer step
        after_experience(experience)          # rehearsal: update the buffer

`train.precision` runs `loss` under torch.autocast (bf16, or fp16 with a GradScaler on
CUDA). Methods whose unit is not a batch (editors, the Avalanche adapter) override
`train` whole, and with it these settings. A strategy never talks to MLflow or Ray.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from forgetless.core.registry import Registry
from forgetless.core.schema import ConfigError, param, positive
from forgetless.models.causal_lm import lm_loss, trim_padding
from forgetless.streams import Experience, Samples, Stream

log = logging.getLogger(__name__)

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
RESIDENT_BYTES = 64 * 2**20
"""A training set this small moves to the device once and is sliced there; a larger one
stays where it is and each batch moves as it is used."""


@dataclass
class TrainConfig:
    """How every strategy trains; the grid's `train:` section."""

    epochs: int = param(1, "passes over each experience's training data")
    batch_size: int = param(
        32, "samples per forward pass (before any replayed samples); a step takes `accumulate`"
    )
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
    precision: Literal["fp32", "bf16", "fp16"] = param(
        "fp32",
        "fp32, or mixed precision under torch.autocast: bf16 (CPU and recent GPUs), fp16 "
        "(CUDA only, with a gradient scaler)",
    )
    accumulate: int = param(
        1, "batches whose gradients add up into one optimizer step (each loss scaled by 1/k)"
    )
    clip_norm: float | None = param(
        None, "clip the gradients' global L2 norm to this before each step (null: no clipping)"
    )
    num_workers: int = param(
        0,
        "DataLoader worker processes that gather (and augment) the batches of a training set "
        "too large to sit on the device (over 64 MiB); 0: the training process cuts them",
    )

    def validate(self, where: str) -> None:
        for name in ("epochs", "batch_size", "lr", "eval_batch_size", "accumulate", "clip_norm"):
            positive(getattr(self, name), f"{where}.{name}")
        if self.num_workers < 0:
            raise ConfigError(f"{where}.num_workers: must be >= 0, got {self.num_workers}")
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
        self.scaler = _grad_scaler(train.precision, model, self.device)
        at_scale = train.precision != "fp32" or train.accumulate > 1 or train.clip_norm is not None
        if at_scale and type(self).train is not Strategy.train:
            log.warning(
                "%s trains with its own loop: train.precision, accumulate and clip_norm do not "
                "apply to it", type(self).__name__,
            )  # fmt: skip
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
        cfg = self.train_config
        data = self.training_data(experience)
        resident = data.nbytes <= RESIDENT_BYTES
        if resident:
            data = data.to(self.device)
        loader = None
        if not resident and cfg.num_workers > 0:
            loader = data.loader(cfg.batch_size, cfg.num_workers, self.device.type == "cuda")
        self.model.train()
        batches = -(-len(data) // cfg.batch_size)
        step, steps = 0, cfg.epochs * -(-batches // cfg.accumulate)
        for epoch in range(cfg.epochs):
            total = torch.zeros((), device=self.device)
            for group in _groups(self._batches(data, loader), cfg.accumulate):
                self.optimizer.zero_grad(set_to_none=True)
                for batch in group:
                    batch = self.compose(batch)
                    if self.generation:
                        batch = trim_padding(batch)
                    with self.autocast():
                        loss = self.loss(batch)
                    # The mean over the group's batches: a step of k batches of b samples
                    # is a step on one batch of k * b.
                    scaled = loss / len(group) if len(group) > 1 else loss
                    self.scaler.scale(scaled).backward()
                    total += loss.detach()
                self.schedule_lr(step, steps)
                self.optimizer_step()
                step += 1
            # One device sync per epoch, not per step: a NaN survives to the sum.
            if not torch.isfinite(total):
                raise NonFiniteLoss(
                    f"loss became {total.item()} in epoch {epoch} of experience {experience.name!r}"
                    f" (lr={self.train_config.lr}); lower train.lr or check the data"
                )
        self.after_experience(experience)

    def _batches(self, data: Samples, loader: Iterable[Samples] | None) -> Iterator[Samples]:
        """One epoch's batches on the device, in a fresh random order: cut by index from
        `data` (on the device when it fits, else moved batch by batch), or drawn from a
        DataLoader's workers (train.num_workers, for a set that does not fit)."""
        if loader is not None:
            for batch in loader:
                yield batch.to(self.device, non_blocking=True)
            return
        order = torch.randperm(len(data), device=data.y.device)
        for first in range(0, len(data), self.train_config.batch_size):
            index = order[first : first + self.train_config.batch_size]
            yield data.subset(index).to(self.device)

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

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision for forward passes (training and scoring) under train.precision."""
        precision = self.train_config.precision
        if precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=AUTOCAST[precision])

    def optimizer_step(self) -> None:
        """Clip the gradients' global norm (train.clip_norm), then step; under fp16 the
        scaler unscales first and skips a step whose gradients overflowed."""
        if self.train_config.clip_norm is not None:
            self.scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.train_config.clip_norm)
        if self.scaler.is_enabled():
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

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
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}
        if self.scaler.is_enabled():
            state["grad_scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if "grad_scaler" in state:
            self.scaler.load_state_dict(state["grad_scaler"])


def _groups(batches: Iterator[Samples], size: int) -> Iterator[list[Samples]]:
    """Consecutive batches in lists of `size` (the last may be shorter): one optimizer
    step's worth under gradient accumulation."""
    while group := list(itertools.islice(batches, size)):
        yield group


def _grad_scaler(precision: str, model: nn.Module, device: torch.device) -> torch.amp.GradScaler:
    """A loss scaler for fp16 (an identity everywhere else); fp16 is refused where it
    cannot train: on a CPU (slow, and bf16 does the job there) and on fp16 weights,
    whose gradients a scaler cannot unscale."""
    if precision != "fp16":
        return torch.amp.GradScaler(device.type, enabled=False)
    if device.type != "cuda":
        raise ConfigError(
            f"train.precision: fp16 needs a CUDA device and this cell runs on {device.type}; "
            "use bf16 (torch.autocast supports it on CPU) or fp32"
        )
    if any(p.dtype == torch.float16 for p in model.parameters() if p.requires_grad):
        raise ConfigError(
            "train.precision: fp16 mixed precision keeps float32 master weights, but "
            "model.dtype is float16; use model.dtype: float32 (or bf16 with bfloat16 weights)"
        )
    return torch.amp.GradScaler(device.type)


STRATEGIES: Registry = Registry("strategy", "forgetless.strategies")
register_strategy = STRATEGIES.register
