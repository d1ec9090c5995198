"""Latent replay and REMIND: replay compressed mid-network features instead of inputs.

A lower network G learns on the stream's first (base) experience, as a classifier with
the upper network F or as an autoencoder without labels, and is then frozen; F learns
from G's latents of new data mixed with latents replayed from a class-balanced memory
under a byte budget, augmented in latent space (random resized crops, mixup). `remind`
stores each latent as product-quantization codes (faiss, codebook learnt on the base
latents), so the same bytes hold many more samples; `latent_replay` stores float16
latents on the same code path, so the effect of compression is measured apart from the
effect of freezing G. Hayes et al., "REMIND Your Neural Network to Prevent Catastrophic
Forgetting", ECCV 2020 (sec. 3; their code: github.com/tyler-hayes/REMIND).

Deviations: the codebook is kept in float16 and counted in the byte budget, and codes are
bit-packed; by default an experience joins the memory when it ends and trains for
`train.epochs` (`streaming: true` is the paper's online protocol); `score_decoded: false`
scores test inputs on G's latents where the paper scores them through the codec.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from forgetless.core.schema import ConfigError, param, positive
from forgetless.models import split_model, split_points
from forgetless.strategies.base import NoParams, Strategy, register_strategy
from forgetless.strategies.buffers import BufferConfig, ReplayBuffer, label_dtype
from forgetless.strategies.quantize import (
    MAX_POINTS_PER_CENTROID,
    Float16Codec,
    ProductQuantizer,
    to_vectors,
)
from forgetless.streams import Experience, Samples, Stream


@dataclass
class LatentReplayConfig:
    bytes: int = param(help="memory budget in bytes: stored latents or codes, labels, codebook")
    split: str | None = param(
        None, "first block of the upper network F (default: the model's; latent_cnn: head)"
    )
    base: Literal["classifier", "autoencoder"] = param(
        "classifier",
        "how G learns on the base (first) experience: with F as a classifier (REMIND), or as "
        "an autoencoder without labels",
    )
    base_epochs: int = param(10, "epochs of G's training on the base experience")
    base_lr: float | None = param(None, "learning rate of G's training (default: train.lr)")
    replay_batch_size: int | None = param(None, "replayed latents per step (default: batch_size)")
    streaming: bool = param(
        False,
        "REMIND's online protocol: a batch's latents join the memory right after its step "
        "(use train.epochs: 1 and a small batch_size); otherwise after the experience",
    )
    crop_min_scale: float = param(
        1.0,
        "random resized crops of the latent maps trained on: the smallest share of a map's "
        "area a crop keeps (REMIND: 2/7 of 7x7); 1 = no crops",
    )
    mixup_alpha: float = param(
        0.0, "mixup of pairs of replayed latents, weight ~ Beta(alpha, alpha) (REMIND: 0.1)"
    )
    score_decoded: bool = param(
        True,
        "score test inputs on their decoded latents, as REMIND does; false scores G's latents "
        "as they are (the codec then shapes only what is stored)",
    )

    def validate(self, where: str) -> None:
        for name in ("bytes", "base_epochs", "base_lr", "replay_batch_size"):
            positive(getattr(self, name), f"{where}.{name}")
        if not 0 < self.crop_min_scale <= 1:
            raise ConfigError(
                f"{where}.crop_min_scale: must be in (0, 1], got {self.crop_min_scale}"
            )
        if self.mixup_alpha < 0:
            raise ConfigError(f"{where}.mixup_alpha: must be >= 0, got {self.mixup_alpha}")


@dataclass
class RemindConfig(LatentReplayConfig):
    subquantizers: int = param(32, "M: sub-quantizers per location; must divide the channels")
    bits: int = param(8, "bits per code: 2**bits centroids per sub-quantizer")

    def validate(self, where: str) -> None:
        super().validate(where)
        positive(self.subquantizers, f"{where}.subquantizers")
        if not 1 <= self.bits <= 16:
            raise ConfigError(f"{where}.bits: must be between 1 and 16, got {self.bits}")
        smallest = 2 * self.subquantizers * 2**self.bits  # float16, one value a sub-vector
        if self.bytes < smallest:
            raise ConfigError(
                f"{where}.bytes: {self.bytes} bytes cannot hold the codebook, at least "
                f"{smallest} bytes for {self.subquantizers} sub-quantizers of 2**{self.bits} "
                "float16 centroids; raise bytes or lower bits"
            )


class LatentModel(nn.Module):
    """F(G(x)), or F(Q(G(x))) when scoring through the codec Q; G stops learning once frozen."""

    def __init__(self, lower: nn.Module, upper: nn.Module) -> None:
        super().__init__()
        self.lower, self.upper = lower, upper
        self.frozen = False
        self.codec: Float16Codec | ProductQuantizer | None = None  # scoring decodes through it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        latents = self.lower(x)
        if self.codec is not None:
            latents = self.codec.decode(self.codec.encode(latents)).to(x.device)
        return self.upper(latents)

    def train(self, mode: bool = True) -> LatentModel:
        super().train(mode)
        if self.frozen:
            self.lower.eval()  # frozen G keeps the BatchNorm statistics of its base training
        return self


class Autoencoding(Strategy):
    """G and a decoder learn to reconstruct the base experience's inputs, without labels."""

    def loss(self, batch: Samples) -> torch.Tensor:
        return F.mse_loss(self.model(batch.x), batch.x)


def mlp_decoder(latent_shape: tuple[int, ...], input_shape: tuple[int, ...]) -> nn.Module:
    """A decoder for any latent and input shape; it exists only while G trains."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(latent_shape), 256),
        nn.ReLU(),
        nn.Linear(256, math.prod(input_shape)),
        nn.Unflatten(1, input_shape),
    )


def random_resized_crop(latents: torch.Tensor, min_scale: float) -> torch.Tensor:
    """Each map cropped to a random box (area in [min_scale, 1] of the map, aspect ratio in
    [3/4, 4/3]) and resized back bilinearly: REMIND's RandomResizeCrop, on a continuous grid."""
    n = len(latents)
    area = torch.empty(n).uniform_(min_scale, 1.0)
    ratio = torch.empty(n).uniform_(math.log(3 / 4), math.log(4 / 3)).exp()
    width, height = (area * ratio).sqrt().clamp(max=1), (area / ratio).sqrt().clamp(max=1)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = width, height
    theta[:, 0, 2] = (2 * torch.rand(n) - 1) * (1 - width)  # box centre, inside the map
    theta[:, 1, 2] = (2 * torch.rand(n) - 1) * (1 - height)
    grid = F.affine_grid(theta.to(latents.device), list(latents.shape), align_corners=False)
    return F.grid_sample(latents, grid, padding_mode="border", align_corners=False)


@register_strategy("latent_replay")
class LatentReplay(Strategy):
    Config = LatentReplayConfig

    def __init__(self, model: nn.Module, config, train, stream: Stream) -> None:
        super().__init__(model, config, train, stream)
        split = config.split or getattr(model, "latent_split", None)
        if split is None:
            raise ConfigError(
                "strategy.split: the model has no default split point; name the first block "
                f"of F, one of {', '.join(split_points(model)) or '(none)'}"
            )
        self.model = LatentModel(*split_model(model, split, "strategy.split"))
        self.split, self.stream = split, stream
        with torch.no_grad():
            self.model.lower.eval()
            probe = torch.zeros(1, *stream.input_shape, device=self.device)
            self.latent_shape = tuple(self.model.lower(probe).shape[1:])
            self.model.lower.train()
        self.codec = self.make_codec()
        self.label_dtype = label_dtype(stream.num_classes)
        self.task_dtype = label_dtype(len(stream.task_classes or [0]))
        self.check(stream)
        budget = config.bytes - self.codec.codebook_bytes
        self.memory = ReplayBuffer(BufferConfig(bytes=budget, policy="class_balanced"), "cpu")
        self.replay_batch_size = config.replay_batch_size or train.batch_size
        self.pending: Samples | None = None  # the experience's codes, until they are stored

    def make_codec(self) -> Float16Codec | ProductQuantizer:
        return Float16Codec(self.latent_shape)

    @property
    def sample_bytes(self) -> int:
        """Bytes one stored sample costs: its latent (or codes), label and task label."""
        tasks = self.task_dtype.itemsize if self.stream.task_classes else 0
        return self.codec.code_bytes() + self.label_dtype.itemsize + tasks

    @property
    def capacity(self) -> int:
        """Samples the budget holds once the codebook is paid for."""
        return max(0, self.config.bytes - self.codec.codebook_bytes) // self.sample_bytes

    def check(self, stream: Stream) -> None:
        """Bad combinations of parameters, model and stream, refused before any training."""
        cfg, shape = self.config, "x".join(map(str, self.latent_shape))
        if self.capacity < 1:
            raise ConfigError(
                f"strategy.bytes: {cfg.bytes} bytes hold no sample: the codebook takes "
                f"{self.codec.codebook_bytes} bytes and one sample {self.sample_bytes} "
                f"(a {shape} latent at split {self.split!r} and its label); raise bytes"
            )
        if cfg.streaming and self.train_config.epochs != 1:
            raise ConfigError(
                f"strategy.streaming: one pass over the stream; set train.epochs to 1, "
                f"got {self.train_config.epochs}"
            )
        if cfg.mixup_alpha > 0 and stream.task_classes is not None:
            raise ConfigError(
                "strategy.mixup_alpha: mixup blends samples of different tasks, which a "
                "task-incremental stream scores apart; set mixup_alpha: 0"
            )
        if cfg.crop_min_scale < 1 and len(self.latent_shape) != 3:
            raise ConfigError(
                f"strategy.crop_min_scale: crops need a spatial latent (C x H x W), the split "
                f"at {self.split!r} gives {shape}; set crop_min_scale: 1"
            )

    # --- the hooks ------------------------------------------------------------------------
    def before_experience(self, experience: Experience) -> None:
        super().before_experience(experience)
        if not self.model.frozen:
            self.train_base(experience)

    def training_data(self, experience: Experience) -> Samples:
        """The experience as the memory keeps it: codes (or float16 latents) and labels."""
        data = experience.train
        self.pending = Samples(self.encode(data.x), data.y, data.task)
        return self.pending

    def compose(self, batch: Samples) -> Samples:
        """Decode the new batch's codes with replayed ones; crop the maps, mix the replayed."""
        mixing = self.config.mixup_alpha > 0 and len(self.memory) > 0
        parts = [batch.to("cpu")]
        if len(self.memory):
            replay = self.memory.sample(self.replay_batch_size * (2 if mixing else 1))
            task = None if replay.task is None else replay.task.long()
            parts.append(Samples(replay.x, replay.y.long(), task))
        if self.config.streaming:
            self.memory.add(self.stored(parts[0]))  # after drawing: no batch replays itself
        both = Samples.concat(parts)
        latents = self.codec.decode(both.x).to(self.device)
        if self.config.crop_min_scale < 1:
            latents = random_resized_crop(latents, self.config.crop_min_scale)
        composed = Samples(latents, both.y, both.task).to(self.device)
        return self.mixup(composed, len(batch)) if mixing else composed

    def loss(self, batch: Samples) -> torch.Tensor:
        return self.criterion(self.mask_to_task(self.model.upper(batch.x), batch.task), batch.y)

    def after_experience(self, experience: Experience) -> None:
        if not self.config.streaming:
            self.memory.add(self.stored(self.pending))
        self.pending = None

    # --- pieces -----------------------------------------------------------------------------
    def train_base(self, experience: Experience) -> None:
        """REMIND's base initialisation: G learns on the first experience, through the same
        training loop, then is frozen, and the codec learns from G's latents of that data."""
        cfg = self.config
        train = dataclasses.replace(
            self.train_config, epochs=cfg.base_epochs, lr=cfg.base_lr or self.train_config.lr
        )
        if cfg.base == "classifier":
            Strategy(self.model, NoParams(), train, self.stream).train(experience)
        else:
            decoder = mlp_decoder(self.latent_shape, self.stream.input_shape).to(self.device)
            autoencoder = nn.Sequential(self.model.lower, decoder)
            Autoencoding(autoencoder, NoParams(), train, self.stream).train(experience)
        self.freeze_lower()
        if not self.codec.fitted:
            self.codec.fit(self.codebook_vectors(experience.train.x))

    def freeze_lower(self) -> None:
        """G stops learning: no gradient, BatchNorm in eval mode, the optimizer holds only F."""
        self.model.lower.requires_grad_(False)
        self.model.frozen = True
        self.model.codec = self.codec if self.config.score_decoded else None
        self.model.train()
        self.optimizer = self.make_optimizer()

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Codes of G's latents, computed in batches (G is frozen and in eval mode)."""
        size = self.train_config.eval_batch_size
        return torch.cat(
            [self.codec.encode(self.model.lower(x[i : i + size].to(self.device)))
             for i in range(0, len(x), size)]
        )  # fmt: skip

    @torch.no_grad()
    def codebook_vectors(self, x: torch.Tensor) -> np.ndarray:
        """Every location's latent vector, sampled down to what faiss trains on anyway."""
        assert isinstance(self.codec, ProductQuantizer)
        locations = self.codec.locations
        keep = min(1.0, MAX_POINTS_PER_CENTROID * self.codec.pq.ksub / (len(x) * locations))
        size, vectors = self.train_config.eval_batch_size, []
        for i in range(0, len(x), size):
            chunk = to_vectors(self.model.lower(x[i : i + size].to(self.device)))
            if keep < 1:
                chunk = chunk[(torch.rand(len(chunk)) < keep).numpy()]
            vectors.append(chunk)
        return np.concatenate(vectors)

    def stored(self, samples: Samples) -> Samples:
        """Labels and task labels in their smallest integer type, as the memory keeps them."""
        task = None if samples.task is None else samples.task.to(self.task_dtype)
        return Samples(samples.x, samples.y.to(self.label_dtype), task)

    def mixup(self, batch: Samples, n_new: int) -> Samples:
        """Blend the two halves of the replayed part with one weight ~ Beta(alpha, alpha), as
        REMIND does; targets become the same blend of one-hot labels (the new ones stay)."""
        alpha = self.config.mixup_alpha
        weight = float(torch.distributions.Beta(alpha, alpha).sample())
        targets = F.one_hot(batch.y, self.stream.num_classes).float()
        half = (len(batch) - n_new) // 2
        first, second = slice(n_new, n_new + half), slice(n_new + half, None)
        x = torch.cat([batch.x[:n_new], weight * batch.x[first] + (1 - weight) * batch.x[second]])
        y = torch.cat([targets[:n_new], weight * targets[first] + (1 - weight) * targets[second]])
        return Samples(x, y)

    def memory_bytes(self) -> int:
        return self.memory.nbytes + (self.codec.codebook_bytes if self.codec.fitted else 0)

    def state_dict(self) -> dict:
        return {
            **super().state_dict(),
            "memory": self.memory.state_dict(),
            "codec": self.codec.state_dict(),
            "frozen": self.model.frozen,
        }

    def load_state_dict(self, state: dict) -> None:
        self.codec.load_state_dict(state["codec"])
        if state["frozen"]:
            self.freeze_lower()  # the optimizer must hold F alone before its state loads
        super().load_state_dict(state)
        self.memory.load_state_dict(state["memory"])


@register_strategy("remind")
class Remind(LatentReplay):
    Config = RemindConfig

    def make_codec(self) -> ProductQuantizer:
        cfg, channels = self.config, self.latent_shape[0]
        if channels % cfg.subquantizers:
            divisors = [m for m in range(1, channels + 1) if channels % m == 0]
            raise ConfigError(
                f"strategy.subquantizers: {cfg.subquantizers} does not divide the {channels} "
                f"channels of the latent ({'x'.join(map(str, self.latent_shape))} at split "
                f"{self.split!r}); use one of {divisors}"
            )
        return ProductQuantizer(self.latent_shape, cfg.subquantizers, cfg.bits)

    def check(self, stream: Stream) -> None:
        if self.config.bytes < self.codec.codebook_bytes:
            raise ConfigError(
                f"strategy.bytes: the budget of {self.config.bytes} bytes is smaller than the "
                f"codebook of {self.codec.codebook_bytes} bytes ({self.latent_shape[0]} channels"
                f" x 2**{self.config.bits} float16 centroids); raise bytes or lower bits"
            )
        super().check(stream)
        base = stream.experiences[0]
        vectors = len(base.train) * self.codec.locations
        if vectors < self.codec.pq.ksub:
            raise ConfigError(
                f"strategy.bits: the base experience {base.name!r} gives {vectors} latent "
                f"vectors ({len(base.train)} samples x {self.codec.locations} locations), fewer "
                f"than the 2**{self.config.bits} centroids to train; use bits <= "
                f"{int(math.log2(vectors)) if vectors else 0} or a larger base experience"
            )
