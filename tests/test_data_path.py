"""A training set too large for the device is served by a DataLoader's worker processes
(`train.num_workers`): every sample once per epoch, batches on the device, augmented in the
workers, accumulated like any other batches, and the same weights from the same seed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from forgetless.core.schema import ConfigError
from forgetless.experiments.config import grid_from_dict
from forgetless.strategies import TrainConfig, base
from forgetless.strategies.naive import Naive
from forgetless.streams import Experience, Samples, Stream
from forgetless.streams.vision import AugmentedSamples, build_augment

pytestmark = pytest.mark.usefixtures("one_thread")


class Recording(Naive):
    """Naive training that keeps every batch it composes and counts optimizer steps."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.batches: list[Samples] = []
        self.steps = 0

    def compose(self, batch: Samples) -> Samples:
        self.batches.append(batch)
        return batch

    def optimizer_step(self) -> None:
        self.steps += 1
        super().optimizer_step()


class PixelLinear(nn.Module):
    """A linear classifier over uint8 or float pixels."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1).float())


def image_bytes(image: torch.Tensor) -> bytes:
    return image.numpy().tobytes()


def image_stream(samples: int, augment: bool) -> tuple[Stream, Experience]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (samples, 1, 8, 8), dtype=torch.uint8, generator=generator)
    y = torch.arange(samples) % 4
    data = Samples(x, y)
    if augment:
        flip = build_augment([{"name": "RandomHorizontalFlip"}, {"name": "ToDtype",
                              "dtype": torch.float32, "scale": True}], "augment")  # fmt: skip
        data = AugmentedSamples(x, y, transform=flip)
    experience = Experience(0, "e0", data, data)
    return Stream("s", "class", [experience], num_classes=4), experience


def train_off_device(monkeypatch, augment: bool = False, **train) -> Recording:
    monkeypatch.setattr(base, "RESIDENT_BYTES", 0)  # every set counts as too large
    stream, experience = image_stream(40, augment)
    torch.manual_seed(0)
    strategy = Recording(PixelLinear(), None, TrainConfig(lr=0.1, **train), stream)
    strategy.train(experience)
    return strategy


def test_workers_serve_every_sample_once_per_epoch_on_the_device(monkeypatch):
    strategy = train_off_device(monkeypatch, num_workers=2, batch_size=8, epochs=2)
    assert [len(b) for b in strategy.batches] == [8] * 10
    stored = image_stream(40, augment=False)[1].train
    for epoch in (strategy.batches[:5], strategy.batches[5:]):
        seen = torch.cat([b.x for b in epoch])
        assert sorted(map(image_bytes, seen)) == sorted(map(image_bytes, stored.x))
        assert sorted(torch.cat([b.y for b in epoch]).tolist()) == sorted(stored.y.tolist())
    assert all(b.x.device == strategy.device and b.task is None for b in strategy.batches)
    first, second = (torch.cat([b.y for b in e]) for e in (strategy.batches[:5],
                                                           strategy.batches[5:]))  # fmt: skip
    assert not torch.equal(first, second)  # shuffled anew each epoch


def test_workers_augment_the_batches_and_the_stored_set_stays_raw(monkeypatch):
    strategy = train_off_device(monkeypatch, augment=True, num_workers=2, batch_size=40)
    (batch,) = strategy.batches
    assert batch.x.dtype == torch.float32 and float(batch.x.max()) <= 1.0
    stored = image_stream(40, augment=False)[1].train.x
    flipped = stored.flip(-1)
    as_stored = stored.float() / 255
    for image, label in zip(batch.x, batch.y):
        candidates = torch.nonzero(torch.arange(40) % 4 == label).flatten()
        assert any(torch.allclose(image, as_stored[i]) or
                   torch.allclose(image, flipped[i].float() / 255) for i in candidates)  # fmt: skip


def test_the_same_seed_gives_the_same_weights_through_workers(monkeypatch):
    runs = [train_off_device(monkeypatch, num_workers=2, batch_size=8, epochs=2)
            for _ in range(2)]  # fmt: skip
    for a, b in zip(*(r.model.state_dict().values() for r in runs)):
        assert torch.equal(a, b)


def test_workers_batches_accumulate_into_one_step_per_group(monkeypatch):
    # 40 samples in batches of 8: 5 batches, in groups of 2: 3 steps per epoch
    strategy = train_off_device(monkeypatch, num_workers=1, batch_size=8, accumulate=2)
    assert strategy.steps == 3 and len(strategy.batches) == 5


def test_num_workers_below_zero_is_refused_naming_the_field():
    raw = {"name": "g", "streams": [{"name": "split_digits"}], "strategies": [{"name": "naive"}],
           "train": {"num_workers": -1}}  # fmt: skip
    with pytest.raises(ConfigError, match=r"train\.num_workers: must be >= 0, got -1"):
        grid_from_dict(raw)
