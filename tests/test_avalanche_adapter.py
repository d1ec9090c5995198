"""avalanche-lib strategies run on forgetless streams, scored by forgetless."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from forgetless.core.schema import ConfigError
from forgetless.experiments.config import grid_from_dict
from forgetless.experiments.evaluate import evaluate
from forgetless.experiments.runner import build_cell

STRATEGIES = [
    ("Naive", {}),
    ("Replay", {"mem_size": 20}),
    ("EWC", {"ewc_lambda": 1.0}),
    ("LwF", {"alpha": 1.0, "temperature": 2.0}),
    ("SynapticIntelligence", {"si_lambda": 1.0}),
    ("GEM", {"patterns_per_exp": 20}),
    ("AGEM", {"patterns_per_exp": 20, "sample_size": 16}),
    ("GDumb", {"mem_size": 200}),
    ("DER", {"mem_size": 20}),
    ("Cumulative", {}),
]

# What each holds beyond the model after training on experiences 0..i, by hand. The mlp
# 64-32-10 has P = 64*32 + 32 + 32*10 + 10 = 2410 float32 parameters. A buffered digit costs
# what avalanche's dataset returns for it: 8x8 float32 input, then int64 target and task
# label: 64*4 + 8 + 8 = 272 bytes; a reservoir-sampled one 4 more (its float32 weight).
P = 64 * 32 + 32 + 32 * 10 + 10
SAMPLE = 64 * 4 + 8 + 8
MEMORY_BYTES = {
    "Naive": lambda i, seen: 0,
    "Replay": lambda i, seen: 20 * (SAMPLE + 4),  # mem_size 20, shared over experiences
    "EWC": lambda i, seen: (i + 1) * 2 * P * 4,  # importances and parameters per experience
    "LwF": lambda i, seen: P * 4,  # the previous model
    # parameters at the start of the experience and before each step, importances,
    # trajectory and its sum; its new_theta and grad are views of the model's own tensors
    "SynapticIntelligence": lambda i, seen: 5 * P * 4,
    # 20 patterns per experience, and G: one gradient row per earlier experience
    "GEM": lambda i, seen: (i + 1) * 20 * SAMPLE + i * P * 4,
    # 20 patterns per experience, and the reference gradient once it has a memory
    "AGEM": lambda i, seen: (i + 1) * 20 * SAMPLE + (P * 4 if i else 0),
    # 200 reservoir samples balanced over classes (each class has more than 100), and the
    # initial model it retrains from
    "GDumb": lambda i, seen: 200 * (SAMPLE + 4) + P * 4,
    "DER": lambda i, seen: 20 * (SAMPLE + 10 * 4 + 4),  # and 10 float32 logits each
    "Cumulative": lambda i, seen: seen * SAMPLE,  # every training sample so far
}


def cell_for(name: str, params: dict, epochs: int = 3):
    grid = grid_from_dict({
        "name": "avalanche-adapter",
        "streams": [{"name": "split_digits", "n_experiences": 5}],
        "model": {"name": "mlp", "hidden": [32]},
        "train": {"epochs": epochs, "batch_size": 32, "lr": 0.1, "momentum": 0.9},
        "strategies": [{"name": f"avalanche.{name}", **params}],
    })  # fmt: skip
    return grid.cells[0]


@pytest.mark.parametrize("name,params", STRATEGIES, ids=[s[0] for s in STRATEGIES])
def test_avalanche_strategy_learns_an_experience_on_a_forgetless_stream(name, params):
    stream, strategy = build_cell(cell_for(name, params), "cpu")
    first, second = stream.experiences[:2]
    strategy.train(first)
    assert (
        evaluate(strategy, first.test, "classification")["accuracy"] > 0.8
    )  # 2 classes: chance is 0.5
    strategy.train(second)  # the second experience exercises penalties and memories
    assert evaluate(strategy, second.test, "classification")["accuracy"] > 0.7
    assert not strategy.resumable


@pytest.mark.parametrize("name,params", STRATEGIES, ids=[s[0] for s in STRATEGIES])
def test_avalanche_memory_bytes_count_what_the_strategy_holds(name, params):
    stream, strategy = build_cell(cell_for(name, params, epochs=1), "cpu")
    assert strategy.memory_bytes() == 0  # nothing held before the first experience
    seen = 0
    for i, experience in enumerate(stream.experiences[:2]):
        strategy.train(experience)
        seen += len(experience.train)
        assert strategy.memory_bytes() == MEMORY_BYTES[name](i, seen), f"after experience {i}"


def test_avalanche_memory_that_cannot_be_counted_is_nan_not_zero():
    # MER keeps its buffer on the strategy object, in a class of its own we do not read.
    stream, strategy = build_cell(cell_for("MER", {"mem_size": 20}, epochs=1), "cpu")
    strategy.train(stream.experiences[0])
    assert math.isnan(strategy.memory_bytes())
    # A plugin holding something the count does not know how to measure: unknown too.
    stream, strategy = build_cell(cell_for("Replay", {"mem_size": 20}, epochs=1), "cpu")
    strategy.train(stream.experiences[0])
    strategy.inner.plugins[0].opaque = object()
    assert math.isnan(strategy.memory_bytes())


def test_synaptic_intelligence_importance_is_the_path_integral_of_its_step_by_hand():
    """One SGD step of size lr over the whole experience: the path integral is
    -g * (-lr * g), so avalanche's importance is clamp(lr g^2 / ((lr g)^2 + eps), 0.001).
    avalanche-lib 0.6.0 on the CPU alone gives 0 (its recorded weights are views of the
    live ones); the adapter's copies give the integral."""
    lr, eps = 1e-3, 10.0
    grid = grid_from_dict({
        "name": "avalanche-si",
        "streams": [{"name": "split_digits", "n_experiences": 5}],
        "model": {"name": "mlp", "hidden": [32]},
        "train": {"epochs": 1, "batch_size": 1000, "lr": lr, "momentum": 0.0},
        "strategies": [{"name": "avalanche.SynapticIntelligence", "si_lambda": 1.0, "eps": eps}],
    })  # fmt: skip
    stream, strategy = build_cell(grid.cells[0], "cpu")
    first = stream.experiences[0]
    start = copy.deepcopy(strategy.model)
    torch.nn.functional.cross_entropy(start(first.train.x), first.train.y).backward()
    strategy.train(first)
    (plugin,) = [p for p in strategy.inner.plugins if hasattr(p, "ewc_data")]
    anchor, importance = plugin.ewc_data
    for name, param in start.named_parameters():
        before, g = param.detach().flatten(), param.grad.flatten()
        step = (before - lr * g) - before  # in float32, as the optimizer moved it
        expected = torch.clamp(-g * step / (step**2 + eps), max=0.001)
        assert expected.max() > 0
        # g summed in another order than avalanche's batch: float32 rounding apart
        torch.testing.assert_close(importance[name].data, expected, rtol=2e-3, atol=1e-12)
        # the anchor is now the weights after the experience, a copy of them
        after = dict(strategy.model.named_parameters())[name]
        assert torch.equal(anchor[name].data, after.detach().flatten())
        assert anchor[name].data.data_ptr() != after.data_ptr()


def test_avalanche_parameters_are_validated_against_its_signature():
    with pytest.raises(ConfigError, match="ewc_lambda"):
        cell_for("EWC", {})
    with pytest.raises(ConfigError, match="allowed keys"):
        cell_for("EWC", {"ewc_lambda": 1.0, "lamda": 2})
    with pytest.raises(ConfigError, match='did you mean "EWC"'):
        cell_for("EWCC", {})


def test_a_task_incremental_stream_hands_avalanche_its_task_labels():
    """A multi-head model learns per head only if avalanche passes it the task labels, which
    it takes from experiences that declare them."""
    grid = grid_from_dict({
        "name": "avalanche-tasks",
        "streams": [{"name": "split_digits", "n_experiences": 5, "task_labels": True}],
        "model": {"name": "mlp_multihead", "hidden": [32]},
        "train": {"epochs": 3, "batch_size": 32, "lr": 0.1, "momentum": 0.9},
        "strategies": ["avalanche.Naive"],
    })  # fmt: skip
    stream, strategy = build_cell(grid.cells[0], "cpu")
    labels = [e.task_labels for e in strategy.benchmark.train_stream]
    assert labels == [[0], [1], [2], [3], [4]]
    seen = []
    forward = type(strategy.model).forward

    def recording(self, x, task_labels=None, *args, **kwargs):
        seen.append(None if task_labels is None else sorted(set(task_labels.tolist())))
        return forward(self, x, task_labels, *args, **kwargs)

    type(strategy.model).forward = recording
    try:
        strategy.train(stream.experiences[1])
    finally:
        type(strategy.model).forward = forward
    assert seen and all(s == [1] for s in seen)  # experience 1's head, on every batch
