"""Training at scale in the one loop: gradient accumulation, gradient clipping, mixed
precision (bf16 autocast on CPU; fp16 refused there), weights' dtype, activation
checkpointing, and training sets that stay off the device and move batch by batch."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from forgetless.core.schema import ConfigError, parse
from forgetless.experiments.config import grid_from_dict
from forgetless.models.causal_lm import LlamaTinyConfig, llama_tiny
from forgetless.strategies import TrainConfig, base
from forgetless.strategies.naive import Naive
from forgetless.streams import Example, Experience, Samples, Stream

TINY = LlamaTinyConfig(layers=2, hidden=32, heads=2, intermediate=64, context=64)


pytestmark = pytest.mark.usefixtures("offline", "one_thread")


def linear_stream(samples: int, seed: int = 0) -> tuple[Stream, Experience]:
    generator = torch.Generator().manual_seed(seed)
    data = Samples(torch.randn(samples, 5, generator=generator),
                   torch.randint(0, 3, (samples,), generator=generator))  # fmt: skip
    experience = Experience(0, "e0", data, data)
    return Stream("s", "class", [experience], num_classes=3), experience


def trained_linear(samples: int, **train) -> dict[str, torch.Tensor]:
    """Weights of a linear model after one experience of SGD (no momentum) from seed 0."""
    stream, experience = linear_stream(samples)
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    strategy = Naive(model, None, TrainConfig(lr=0.5, optimizer="sgd", **train), stream)
    strategy.train(experience)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


# --- gradient accumulation ------------------------------------------------------------------


def test_accumulating_k_batches_of_b_is_one_step_on_a_batch_of_k_times_b():
    # 24 samples: 6 batches of 4 in 2 steps of 3, or 2 batches of 12; same permutation.
    assert_same_weights(
        trained_linear(24, batch_size=4, accumulate=3, epochs=2),
        trained_linear(24, batch_size=12, epochs=2),
    )


def test_a_short_last_group_averages_over_its_own_batches():
    # 20 samples: batches of 4 grouped [3, 2] against batches [12, 8]: the second step is
    # the mean over its 8 samples either way, not 2/3 of it.
    assert_same_weights(
        trained_linear(20, batch_size=4, accumulate=3),
        trained_linear(20, batch_size=12),
    )


def test_accumulation_takes_one_optimizer_step_per_group():
    stream, experience = linear_stream(20)
    strategy = Naive(nn.Linear(5, 3), None, TrainConfig(batch_size=4, accumulate=3), stream)
    steps = []
    strategy.optimizer.register_step_pre_hook(lambda *_: steps.append(1))
    strategy.train(experience)
    assert len(steps) == 2  # 5 batches -> groups of 3 and 2


def test_accumulate_1_is_todays_loop():
    assert_same_weights(
        trained_linear(20, batch_size=4, accumulate=1), trained_linear(20, batch_size=4)
    )


# --- gradient clipping ------------------------------------------------------------------------


def grad_norms_at_each_step(clip_norm: float | None) -> list[float]:
    stream, experience = linear_stream(32)
    big = Samples(experience.train.x * 100, experience.train.y)  # large gradients
    experience = dataclasses.replace(experience, train=big)
    torch.manual_seed(0)
    config = TrainConfig(batch_size=8, lr=0.01, clip_norm=clip_norm)
    strategy = Naive(nn.Linear(5, 3), None, config, stream)
    norms = []

    def record(optimizer, *_):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"]]
        norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())

    strategy.optimizer.register_step_pre_hook(record)
    strategy.train(experience)
    return norms


def test_clip_norm_bounds_the_gradient_norm_at_every_step():
    unclipped = grad_norms_at_each_step(None)
    assert min(unclipped) > 1.0  # the bound below is not met by chance
    clipped = grad_norms_at_each_step(0.5)
    assert len(clipped) == 4
    assert max(clipped) == pytest.approx(0.5, rel=1e-4)
    assert all(n <= 0.5 * (1 + 1e-5) for n in clipped)


def test_clip_norm_must_be_positive():
    with pytest.raises(ConfigError, match=r"train\.clip_norm: must be greater than 0"):
        parse(TrainConfig, {"clip_norm": 0}, "train")
    with pytest.raises(ConfigError, match=r"train\.accumulate: must be greater than 0"):
        parse(TrainConfig, {"accumulate": 0}, "train")


# --- precision --------------------------------------------------------------------------------


def lm_stream(model) -> tuple[Stream, Experience]:
    examples = [Example(f"copy: {w}\n", w) for w in ("alpha", "beta", "gamma", "delta") * 4]
    samples = model.encode(examples)
    experience = Experience(0, "copy", samples, samples, kind="generation")
    return Stream("lm", "instruction", [experience]), experience


class RecordingNaive(Naive):
    """Naive that keeps the dtype of the logits and every loss it trains on."""

    def loss(self, batch: Samples) -> torch.Tensor:
        logits = self.logits(batch)
        self.logit_dtypes.append(logits.dtype)
        loss = self.criterion(logits, batch.y)
        self.losses.append(loss.item())
        return loss


def train_tiny_lm(precision: str, dtype: str = "float32", **model) -> RecordingNaive:
    torch.manual_seed(0)
    lm = llama_tiny(dataclasses.replace(TINY, dtype=dtype, **model), None)
    stream, experience = lm_stream(lm)
    config = TrainConfig(epochs=3, batch_size=4, lr=3e-3, optimizer="adamw", precision=precision)
    strategy = RecordingNaive(lm, None, config, stream)
    strategy.logit_dtypes, strategy.losses = [], []
    strategy.train(experience)
    return strategy


def test_bf16_autocast_trains_on_cpu_with_a_finite_loss_and_float32_weights():
    strategy = train_tiny_lm("bf16")
    assert set(strategy.logit_dtypes) == {torch.bfloat16}
    assert all(torch.isfinite(torch.tensor(strategy.losses)))
    assert strategy.losses[-1] < strategy.losses[0]
    assert {p.dtype for p in strategy.model.parameters()} == {torch.float32}


def test_bf16_loss_is_close_to_fp32_at_the_start():
    bf16, fp32 = train_tiny_lm("bf16"), train_tiny_lm("fp32")
    assert set(fp32.logit_dtypes) == {torch.float32}
    assert bf16.losses[0] == pytest.approx(fp32.losses[0], rel=0.02)


def test_fp16_is_refused_on_cpu_naming_the_field_and_the_fix():
    stream, _ = linear_stream(8)
    with pytest.raises(ConfigError, match="train.precision: fp16 needs a CUDA device") as error:
        Naive(nn.Linear(5, 3), None, TrainConfig(precision="fp16"), stream)
    assert "bf16" in str(error.value)


def test_fp32_keeps_no_grad_scaler_state_in_checkpoints():
    stream, _ = linear_stream(8)
    strategy = Naive(nn.Linear(5, 3), None, TrainConfig(), stream)
    assert set(strategy.state_dict()) == {"model", "optimizer"}


def test_model_dtype_gives_weights_of_that_dtype():
    lm = llama_tiny(dataclasses.replace(TINY, dtype="bfloat16"), None)
    assert {p.dtype for p in lm.parameters()} == {torch.bfloat16}
    strategy = train_tiny_lm("fp32", dtype="bfloat16")
    assert all(torch.isfinite(torch.tensor(strategy.losses)))


def test_gradient_checkpointing_changes_memory_not_the_update():
    plain = train_tiny_lm("fp32")
    checkpointed = train_tiny_lm("fp32", gradient_checkpointing=True)
    assert checkpointed.model.model.is_gradient_checkpointing
    assert not plain.model.model.is_gradient_checkpointing
    assert checkpointed.losses == pytest.approx(plain.losses, rel=1e-4)


def test_gradient_checkpointing_passes_gradients_past_frozen_embeddings():
    torch.manual_seed(0)
    lm = llama_tiny(dataclasses.replace(TINY, gradient_checkpointing=True), None)
    lm.model.get_input_embeddings().weight.requires_grad_(False)
    stream, experience = lm_stream(lm)
    Naive(lm, None, TrainConfig(batch_size=16, lr=1e-3, optimizer="adamw"), stream)
    lm.train()
    loss = base.lm_loss(lm(experience.train.x), experience.train.y)
    loss.backward()
    first_block = lm.model.model.layers[0].self_attn.q_proj.weight
    assert first_block.grad is not None and first_block.grad.abs().sum() > 0


# --- where the data lives ---------------------------------------------------------------------


def test_a_set_too_large_to_be_resident_trains_batch_by_batch_to_the_same_weights(monkeypatch):
    resident = trained_linear(20, batch_size=4, epochs=2)
    moved = []
    original = Samples.to

    def counting_to(self, device):
        moved.append(len(self))
        return original(self, device)

    monkeypatch.setattr(base, "RESIDENT_BYTES", 0)
    monkeypatch.setattr(Samples, "to", counting_to)
    batched = trained_linear(20, batch_size=4, epochs=2)
    assert_same_weights(resident, batched)
    assert moved and max(moved) == 4  # only batches moved, never the whole set


def test_new_train_fields_at_their_default_keep_every_cell_hash():
    grid = {"name": "g", "streams": ["split_digits"], "strategies": ["naive"]}
    plain = grid_from_dict(grid).cells[0].hash
    spelled = {**grid, "train": {"precision": "fp32", "accumulate": 1, "clip_norm": None}}
    assert grid_from_dict(spelled).cells[0].hash == plain
    assert grid_from_dict({**grid, "train": {"accumulate": 2}}).cells[0].hash != plain
