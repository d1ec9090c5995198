"""avalanche-lib strategies run on forgetless streams, scored by forgetless."""

from __future__ import annotations

import pytest

from forgetless.experiments.config import grid_from_dict
from forgetless.experiments.evaluate import evaluate
from forgetless.experiments.runner import build_cell
from forgetless.experiments.schema import ConfigError

STRATEGIES = [
    ("Naive", {}),
    ("Replay", {"mem_size": 50}),
    ("EWC", {"ewc_lambda": 1.0}),
    ("LwF", {"alpha": 1.0, "temperature": 2.0}),
    ("SynapticIntelligence", {"si_lambda": 1.0}),
    ("GEM", {"patterns_per_exp": 20}),
    ("AGEM", {"patterns_per_exp": 20, "sample_size": 16}),
    ("GDumb", {"mem_size": 500}),
]
HOLDS_MEMORY = {"Replay", "EWC", "LwF", "SynapticIntelligence", "GEM", "AGEM", "GDumb"}


def cell_for(name: str, params: dict):
    grid = grid_from_dict({
        "name": "avalanche-adapter",
        "streams": [{"name": "split_digits", "n_experiences": 5}],
        "model": {"name": "mlp", "hidden": [32]},
        "train": {"epochs": 3, "batch_size": 32, "lr": 0.1, "momentum": 0.9},
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
    if name in HOLDS_MEMORY:
        assert strategy.memory_bytes() > 0
    assert not strategy.resumable


def test_avalanche_parameters_are_validated_against_its_signature():
    with pytest.raises(ConfigError, match="ewc_lambda"):
        cell_for("EWC", {})
    with pytest.raises(ConfigError, match="allowed keys"):
        cell_for("EWC", {"ewc_lambda": 1.0, "lamda": 2})
    with pytest.raises(ConfigError, match='did you mean "EWC"'):
        cell_for("EWCC", {})
