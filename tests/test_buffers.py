"""Replay buffers: hard budgets in samples and bytes, reservoir fairness, class balance."""

from __future__ import annotations

import io
import re
from collections import Counter

import pytest
import torch

from forgetless.core.schema import ConfigError, parse
from forgetless.strategies.buffers import BufferConfig, ReplayBuffer, class_balanced_keep
from forgetless.streams import Samples

# One digits-like sample: a float32 (1, 8, 8) image and an int64 label.
BYTES_PER_SAMPLE = 1 * 8 * 8 * 4 + 8
POLICIES = ["reservoir", "class_balanced"]


def samples(labels, first_id: int = 0, with_task: bool = False) -> Samples:
    """Samples whose image holds a unique id (first pixel), so tests can tell them apart."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    x = torch.zeros(len(labels), 1, 8, 8)
    x[:, 0, 0, 0] = torch.arange(first_id, first_id + len(labels), dtype=torch.float32)
    task = torch.zeros_like(labels) if with_task else None
    return Samples(x, labels, task)


def ids(buffer: ReplayBuffer) -> list[int]:
    return buffer.samples.x[:, 0, 0, 0].long().tolist()


# --- budgets -------------------------------------------------------------------------------

ADD_SIZES = [7, 30, 3, 50, 1, 12]


@pytest.mark.parametrize("policy", POLICIES)
def test_buffer_never_exceeds_budget_in_samples(policy):
    torch.manual_seed(0)
    buffer = ReplayBuffer(BufferConfig(size=10, policy=policy))
    offered = 0
    for size in ADD_SIZES:
        buffer.add(samples(torch.arange(size) % 4, first_id=offered))
        offered += size
        assert len(buffer) == min(10, offered)
        assert buffer.seen == offered
        assert len(set(ids(buffer))) == len(buffer)  # no sample stored twice
        assert set(ids(buffer)) <= set(range(offered))


@pytest.mark.parametrize("with_task", [False, True])
@pytest.mark.parametrize("policy", POLICIES)
def test_buffer_never_exceeds_budget_in_bytes(policy, with_task):
    torch.manual_seed(0)
    per_sample = BYTES_PER_SAMPLE + (8 if with_task else 0)
    budget = 10 * per_sample + per_sample - 1  # room for 10 samples and not quite 11
    buffer = ReplayBuffer(BufferConfig(bytes=budget, policy=policy))
    offered = 0
    for size in ADD_SIZES:
        buffer.add(samples(torch.arange(size) % 3, first_id=offered, with_task=with_task))
        offered += size
        assert buffer.nbytes <= budget
        assert len(buffer) == min(10, offered)  # and the budget is used, not wasted
    assert buffer.nbytes == 10 * per_sample


@pytest.mark.parametrize("policy", POLICIES)
def test_bytes_budget_smaller_than_one_sample_stores_nothing(policy):
    buffer = ReplayBuffer(BufferConfig(bytes=BYTES_PER_SAMPLE - 1, policy=policy))
    buffer.add(samples([0, 1, 2]))
    assert len(buffer) == 0 and buffer.nbytes == 0


def test_buffer_does_not_alias_the_experience_data():
    data = samples([0, 1, 2, 3])
    buffer = ReplayBuffer(BufferConfig(size=4))
    buffer.add(data)
    buffer.add(samples([5] * 50, first_id=100))  # overwrites slots in place
    assert data.x[:, 0, 0, 0].tolist() == [0.0, 1.0, 2.0, 3.0]


# --- reservoir: every sample seen is kept with equal probability --------------------------


def test_reservoir_keeps_every_seen_sample_with_equal_probability():
    """Vitter's algorithm R: after n samples each is stored with probability k / n.

    50 samples arrive in adds of 7, 13 and 30 into a buffer of 10, over 2,000 seeded trials.
    Each sample's count is Binomial(2000, 0.2): mean 400, sd 17.9; the bounds are 5 sd,
    and the first and the last add must be kept as often as each other.
    """
    torch.manual_seed(1234)
    capacity, trials, sizes = 10, 2000, [7, 13, 30]
    n = sum(sizes)
    kept = Counter()
    for _ in range(trials):
        buffer = ReplayBuffer(BufferConfig(size=capacity, policy="reservoir"))
        start = 0
        for size in sizes:
            buffer.add(samples(torch.zeros(size), first_id=start))
            start += size
        kept.update(ids(buffer))
    expected = trials * capacity / n
    counts = torch.tensor([kept[i] for i in range(n)], dtype=torch.float)
    assert counts.sum() == trials * capacity
    assert counts.min() > expected - 90 and counts.max() < expected + 90
    first_add, last_add = counts[: sizes[0]].mean(), counts[-sizes[-1] :].mean()
    assert abs(first_add - last_add) < 30  # sd of a mean of 7 counts is about 7


def test_reservoir_fills_in_arrival_order_until_full():
    buffer = ReplayBuffer(BufferConfig(size=5, policy="reservoir"))
    buffer.add(samples([0, 0, 0]))
    assert ids(buffer) == [0, 1, 2]
    buffer.add(samples([1, 1], first_id=3))
    assert ids(buffer) == [0, 1, 2, 3, 4]


# --- class_balanced: as even over classes as their counts allow ----------------------------


def test_class_balanced_gives_a_small_class_all_it_has_and_splits_the_rest():
    # capacity 10 over counts {0: 100, 1: 100, 2: 3}: class 2 keeps its 3; the 7 left
    # are split 3 / 4 between classes 0 and 1 (integer water-filling).
    torch.manual_seed(0)
    labels = torch.cat([torch.full((100,), 0), torch.full((100,), 1), torch.full((3,), 2)])
    keep = class_balanced_keep(labels, 10)
    per_class = Counter(labels[keep].tolist())
    assert per_class[2] == 3
    assert sorted([per_class[0], per_class[1]]) == [3, 4]
    assert len(keep) == 10 == len(set(keep.tolist()))
    assert keep.tolist() == sorted(keep.tolist())
    assert set(keep[labels[keep] == 2].tolist()) == {200, 201, 202}


def test_class_balanced_water_fills_from_the_smallest_class():
    # capacity 12 over counts {0: 2, 1: 5, 2: 9}: class 0 takes 2 (share 4), class 1 takes
    # 5 (share 10 // 2), class 2 the 5 left.
    labels = torch.tensor([2] * 9 + [0] * 2 + [1] * 5)
    keep = class_balanced_keep(labels, 12)
    assert Counter(labels[keep].tolist()) == {0: 2, 1: 5, 2: 5}


def test_class_balanced_keeps_everything_under_capacity():
    labels = torch.tensor([0, 1, 1, 2])
    assert class_balanced_keep(labels, 10).tolist() == [0, 1, 2, 3]


def test_class_balanced_buffer_gives_a_new_class_its_share():
    torch.manual_seed(0)
    buffer = ReplayBuffer(BufferConfig(size=12, policy="class_balanced"))
    buffer.add(samples([0] * 50 + [1] * 50))
    assert Counter(buffer.samples.y.tolist()) == {0: 6, 1: 6}
    buffer.add(samples([2] * 50 + [3] * 50, first_id=100))
    assert Counter(buffer.samples.y.tolist()) == {0: 3, 1: 3, 2: 3, 3: 3}
    assert all(i < 100 for i, y in zip(ids(buffer), buffer.samples.y.tolist()) if y < 2)


# --- compact storage: an image as an image file holds it ---------------------------------


@pytest.mark.parametrize("policy", POLICIES)
def test_compact_buffer_counts_a_digit_at_65_bytes_and_never_exceeds_its_budget(policy):
    torch.manual_seed(0)
    budget = 25 * 65 + 64  # 25 digits and not quite 26
    buffer = ReplayBuffer(BufferConfig(bytes=budget, policy=policy, compact=True))
    for first in range(0, 200, 40):
        x = torch.randint(0, 17, (40, 1, 8, 8)) / 16.0  # digits' pixel levels
        buffer.add(Samples(x, torch.arange(first, first + 40) % 10))
        assert buffer.nbytes <= budget
    assert len(buffer) == 25 and buffer.nbytes == 25 * 65
    assert buffer.samples.x.dtype == torch.uint8 and buffer.samples.y.dtype == torch.uint8


def test_compact_buffer_replays_float_images_within_half_a_level_and_int64_labels():
    x = torch.rand(30, 1, 8, 8)
    buffer = ReplayBuffer(BufferConfig(size=30, compact=True))
    buffer.add(Samples(x, torch.arange(30) % 10, torch.zeros(30, dtype=torch.long)))
    torch.manual_seed(0)
    drawn = buffer.sample(30)
    torch.manual_seed(0)
    index = torch.randint(30, (30,))
    assert drawn.x.dtype == torch.float32 and drawn.y.dtype == torch.long
    assert drawn.task.dtype == torch.long
    assert (drawn.x - x[index]).abs().max() <= 0.5 / 255 + 1e-7
    assert torch.equal(drawn.y, (torch.arange(30) % 10)[index])


def test_compact_buffer_refuses_inputs_outside_the_unit_range():
    buffer = ReplayBuffer(BufferConfig(size=3, compact=True))
    with pytest.raises(ValueError, match=r"compact.*\[0, 1\]"):
        buffer.add(Samples(torch.full((2, 4), 2.0), torch.tensor([0, 1])))


# --- checkpoints ---------------------------------------------------------------------------


@pytest.mark.parametrize("policy", POLICIES)
def test_buffer_state_dict_round_trips_through_weights_only_load(policy):
    torch.manual_seed(0)
    buffer = ReplayBuffer(BufferConfig(size=8, policy=policy))
    buffer.add(samples(torch.arange(20) % 4, with_task=True))
    blob = io.BytesIO()
    torch.save(buffer.state_dict(), blob)
    blob.seek(0)
    restored = ReplayBuffer(BufferConfig(size=8, policy=policy))
    restored.load_state_dict(torch.load(blob, weights_only=True))
    assert restored.seen == buffer.seen == 20
    assert torch.equal(restored.samples.x, buffer.samples.x)
    assert torch.equal(restored.samples.y, buffer.samples.y)
    assert torch.equal(restored.samples.task, buffer.samples.task)
    # Both continue identically from the same RNG state.
    more = samples(torch.arange(30) % 4 + 4, first_id=20, with_task=True)
    torch.manual_seed(1)
    buffer.add(more)
    torch.manual_seed(1)
    restored.add(more)
    assert ids(restored) == ids(buffer)


def test_empty_buffer_state_dict_round_trips():
    restored = ReplayBuffer(BufferConfig(size=3))
    restored.load_state_dict(ReplayBuffer(BufferConfig(size=3)).state_dict())
    assert len(restored) == 0 and restored.seen == 0 and restored.nbytes == 0


def test_sample_draws_only_stored_samples():
    torch.manual_seed(0)
    buffer = ReplayBuffer(BufferConfig(size=5))
    buffer.add(samples([0, 1, 2, 3, 4, 5, 6], first_id=10))
    drawn = buffer.sample(40)
    assert len(drawn) == 40
    assert set(drawn.x[:, 0, 0, 0].long().tolist()) <= set(ids(buffer))


# --- configuration -------------------------------------------------------------------------

WHERE = "strategies[0].buffer"
W = re.escape(WHERE)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"size": 10, "bytes": 1000}, rf"{W}: give exactly one of size \(samples\) or bytes"),
        ({}, rf"{W}: give exactly one of size \(samples\) or bytes"),
        ({"policy": "reservoir"}, r"give exactly one of size"),
        ({"size": 0}, rf"{W}\.size: must be greater than 0, got 0"),
        ({"size": -3}, rf"{W}\.size: must be greater than 0, got -3"),
        ({"bytes": 0}, rf"{W}\.bytes: must be greater than 0, got 0"),
        ({"bytes": -5}, rf"{W}\.bytes: must be greater than 0, got -5"),
        ({"size": "big"}, rf"{W}\.size: 'big' is not a valid int \| null"),
        ({"size": 10, "policy": "resevoir"}, r'policy.*did you mean "reservoir"'),
        ({"sise": 10}, r'unknown key .sise. \(did you mean "size"\?\); allowed keys: bytes'),
    ],
)
def test_buffer_config_refuses_bad_budgets_naming_the_field(data, message):
    with pytest.raises(ConfigError, match=message):
        parse(BufferConfig, data, WHERE)


@pytest.mark.parametrize(
    "data", [{"size": 1}, {"bytes": 1}, {"bytes": 4096, "policy": "class_balanced"}]
)
def test_buffer_config_accepts_one_positive_budget(data):
    config = parse(BufferConfig, data, WHERE)
    assert (config.size is None) != (config.bytes is None)


def test_rehearsal_per_task_keeps_that_many_of_each_finished_experience(write_grid):
    from forgetless.experiments.runner import build_cell

    torch.manual_seed(0)
    rehearsal = {"name": "rehearsal", "buffer": {"size": 40}, "per_task": 7}
    streams = [{"name": "split_digits", "n_experiences": 5, "fixed_class_order": list(range(10))}]
    cell = write_grid(strategies=[rehearsal], streams=streams).cells[0]
    stream, strategy = build_cell(cell, "cpu")
    for t, experience in enumerate(stream):
        strategy.after_experience(experience)
        per_experience = Counter((strategy.buffer.samples.y // 2).tolist())  # classes 2t, 2t+1
        assert per_experience == {i: 7 for i in range(t + 1)}
    with pytest.raises(ConfigError, match=r"strategies\[0\]\.per_task: must be greater than 0"):
        write_grid(strategies=[{**rehearsal, "per_task": 0}])
