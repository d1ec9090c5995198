"""Grid files: every bad input is refused before a run, naming the field and the fix;
good grids expand into cells whose hashes identify what changes results."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from forgetless.core.schema import ConfigError
from forgetless.experiments.config import Grid, load_grid

BASE = {
    "name": "tiny",
    "seeds": [0],
    "streams": [{"name": "split_digits", "n_experiences": 2}],
    "strategies": ["naive"],
}


@pytest.fixture
def grid_file(tmp_path: Path):
    """grid_file(text or mapping) -> path of a YAML grid written under tmp_path."""
    count = iter(range(1000))

    def write(content: str | dict) -> Path:
        path = tmp_path / f"grid_{next(count)}.yaml"
        path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
        return path

    return write


@pytest.fixture
def load(grid_file):
    """load(**fields) -> Grid from BASE with fields replaced."""

    def run(**fields) -> Grid:
        return load_grid(grid_file({**BASE, **fields}))

    return run


def refuses(load, message: str, **fields) -> str:
    """Load BASE with `fields`, expect ConfigError containing `message` (a literal)."""
    with pytest.raises(ConfigError, match=re.escape(message)) as error:
        load(**fields)
    return str(error.value)


# --- malformed files ------------------------------------------------------------------------


def test_malformed_yaml_names_file_line_and_column(grid_file):
    path = grid_file("name: tiny\nseeds: [0, 1\nstreams:\n  - split_digits\n")
    with pytest.raises(ConfigError, match=r"malformed YAML at line 3, column \d+") as error:
        load_grid(path)
    assert str(path) in str(error.value)


def test_bad_indentation_reports_its_line(grid_file):
    path = grid_file("name: tiny\nstreams:\n  - split_digits\n strategies: [naive]\n")
    with pytest.raises(ConfigError, match=r"malformed YAML at line 4"):
        load_grid(path)


def test_missing_grid_file_is_named(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=re.escape(f"grid file {str(missing)!r} does not exist")):
        load_grid(missing)


def test_grid_that_is_not_a_mapping_is_refused(grid_file):
    with pytest.raises(ConfigError, match="a grid is a mapping with keys name, streams"):
        load_grid(grid_file("- naive\n- rehearsal\n"))


# --- unknown keys and names -----------------------------------------------------------------


def test_unknown_top_level_key_lists_the_allowed_keys(grid_file):
    data = {k: v for k, v in BASE.items() if k != "strategies"}
    with pytest.raises(ConfigError) as error:
        load_grid(grid_file({**data, "strategy": ["naive"]}))
    message = str(error.value)
    assert "unknown key 'strategy'" in message
    assert 'did you mean "strategies"?' in message
    assert (
        "allowed keys: grid, model, name, resources, seeds, storage, strategies, streams, train"
        in message
    )


def test_missing_required_top_level_key_is_named(grid_file):
    data = {k: v for k, v in BASE.items() if k != "strategies"}
    with pytest.raises(ConfigError, match="missing required key 'strategies'"):
        load_grid(grid_file(data))


def test_unknown_key_inside_a_strategy_suggests_the_declared_one(load):
    message = refuses(
        load,
        "strategies[0]: unknown key 'bufer' (did you mean \"buffer\"?)",
        strategies=[{"name": "rehearsal", "bufer": {"size": 10}}],
    )
    assert "allowed keys: buffer, per_task, replay_batch_size" in message


def test_unknown_key_inside_a_nested_parameter_is_named_by_its_path(load):
    refuses(
        load,
        "strategies[1].buffer: unknown key 'sise' (did you mean \"size\"?)",
        strategies=["naive", {"name": "rehearsal", "buffer": {"sise": 10}}],
    )


def test_unknown_strategy_name_suggests_the_closest(load):
    message = refuses(
        load,
        "strategies[0].name: unknown strategy 'rehersal' (did you mean \"rehearsal\"?)",
        strategies=["rehersal"],
    )
    assert "known: " in message and "naive" in message


def test_unknown_stream_name_suggests_the_closest(load):
    message = refuses(
        load,
        "streams[0].name: unknown stream 'split_digit' (did you mean \"split_digits\"?)",
        streams=["split_digit"],
    )
    assert "permuted_digits" in message and "rotated_digits" in message


def test_unknown_train_key_lists_the_allowed_keys(load):
    refuses(
        load,
        "train: unknown key 'learning_rate'; allowed keys: accumulate, batch_size, clip_norm, "
        "decay, epochs, eval_batch_size, lr, momentum, num_workers, optimizer, precision, "
        "warmup_steps, weight_decay",
        train={"learning_rate": 0.1},
    )


def test_unknown_optimizer_suggests_the_closest(load):
    refuses(load, "train.optimizer: 'adm' is not one of", train={"optimizer": "adm"})
    refuses(load, 'did you mean "adam"?', train={"optimizer": "adm"})


# --- wrong types and values -----------------------------------------------------------------


def test_non_numeric_learning_rate_is_refused(load):
    refuses(load, "train.lr: expected a number, got 'fast'", train={"lr": "fast"})


def test_fractional_epochs_are_refused(load):
    refuses(load, "train.epochs: expected an integer, got 1.5", train={"epochs": 1.5})


def test_seeds_given_as_a_string_are_refused(load):
    refuses(load, "seeds: expected a list, got '0'", seeds="0")


def test_seeds_holding_a_non_integer_are_refused(load):
    refuses(load, "seeds[1]: expected an integer, got 'one'", seeds=[0, "one"])


def test_repeated_seed_is_refused(load):
    refuses(load, "seeds: [0, 0] repeats a seed", seeds=[0, 0])


def test_empty_strategy_list_is_refused(load):
    refuses(load, "strategies: list at least one", strategies=[])


def test_strategy_entry_without_a_name_is_refused(load):
    refuses(
        load,
        "strategies[0]: expected a name or a mapping with a 'name' key",
        strategies=[{"buffer": {"size": 10}}],
    )


@pytest.mark.parametrize(
    ("buffer", "message"),
    [
        ({"size": 0}, "strategies[0].buffer.size: must be greater than 0, got 0"),
        ({"bytes": -5}, "strategies[0].buffer.bytes: must be greater than 0, got -5"),
        ({"size": 10, "bytes": 1000}, "strategies[0].buffer: give exactly one of size"),
    ],
)
def test_bad_buffer_budget_is_refused(load, buffer, message):
    refuses(load, message, strategies=[{"name": "rehearsal", "buffer": buffer}])


def test_zero_cpu_per_cell_is_refused(load):
    refuses(load, "resources.cpu: must be greater than 0, got 0.0", resources={"cpu": 0})


def test_n_experiences_not_dividing_the_classes_lists_valid_divisors(load):
    refuses(
        load,
        "streams[0].n_experiences: 3 does not divide the 10 classes; use one of [1, 2, 5, 10]",
        streams=[{"name": "split_digits", "n_experiences": 3}],
    )


@pytest.mark.parametrize("name", ["my grid", "grid!", "a/b", "", "..", ".", ".hidden", "-x",
                                  "n" * 101])  # fmt: skip
def test_bad_grid_name_is_refused(load, name):
    """A name becomes a folder under storage: '..' would write outside it, and a long one
    fails the file system only when the first checkpoint is written."""
    refuses(load, f"name: {name!r} is not a grid name; use 1 to 100 letters, digits", name=name)


def test_empty_storage_is_refused_rather_than_writing_at_the_root(load):
    refuses(load, "storage: empty; give a folder", storage="")
    refuses(load, "storage: empty; give a folder", storage="  ")


def test_good_grid_name_characters_are_accepted(load):
    assert load(name="Exp-1_v2.0").name == "Exp-1_v2.0"


# --- grid keys ------------------------------------------------------------------------------


def test_grid_key_that_no_component_declares_is_refused(load):
    refuses(
        load,
        "grid.strategy.alpha: no stream, model or strategy of this grid declares this parameter",
        strategies=["naive", {"name": "rehearsal", "buffer": {"size": 10}}],
        grid={"strategy.alpha": [0.1, 0.5]},
    )


@pytest.mark.parametrize("key", ["optim.lr", "lr"])
def test_grid_key_outside_the_sections_is_refused(load, key):
    refuses(
        load,
        f"grid.{key}: a grid key is a dotted path starting with one of "
        "stream, model, train, strategy",
        grid={key: [0.1, 0.05]},
    )


def test_grid_key_with_a_misspelled_section_suggests_the_closest(load):
    refuses(load, 'did you mean "train"?', grid={"trian.lr": [0.1, 0.05]})


def test_grid_values_must_be_a_non_empty_list(load):
    refuses(load, "grid.train.lr: expected a non-empty list of values", grid={"train.lr": 0.1})
    refuses(load, "grid.train.lr: expected a non-empty list of values", grid={"train.lr": []})


def test_grid_value_of_the_wrong_type_is_refused(load):
    refuses(load, "train.lr: expected a number, got 'fast'", grid={"train.lr": [0.1, "fast"]})


# --- avalanche strategies -------------------------------------------------------------------


def test_avalanche_ewc_without_its_required_ewc_lambda_is_refused(load):
    refuses(load, "strategies[0]: missing required key 'ewc_lambda'", strategies=["avalanche.EWC"])


def test_avalanche_ewc_with_ewc_lambda_expands(load):
    grid = load(strategies=[{"name": "avalanche.EWC", "ewc_lambda": 0.4}])
    (cell,) = grid.cells
    assert cell.strategy == "avalanche.EWC"
    assert cell.config["strategy"]["ewc_lambda"] == 0.4


def test_avalanche_strategy_typo_suggests_the_closest(load):
    refuses(
        load,
        "avalanche-lib has no strategy 'EWCC' (did you mean \"EWC\"?)",
        strategies=[{"name": "avalanche.EWCC", "ewc_lambda": 1.0}],
    )


# --- expansion and cell identity ------------------------------------------------------------


def test_cell_count_is_streams_times_strategies_times_seeds_times_grid_points(load):
    grid = load(
        streams=[{"name": "split_digits", "n_experiences": 2}, "permuted_digits"],
        strategies=["naive", "cumulative", {"name": "rehearsal", "buffer": {"size": 20}}],
        seeds=[0, 1, 2],
        grid={"train.lr": [0.1, 0.05], "train.epochs": [1, 2]},
    )
    assert len(grid.cells) == 2 * 3 * 3 * (2 * 2)
    assert len({c.hash for c in grid.cells}) == len(grid.cells)
    assert {c.config["train"]["lr"] for c in grid.cells} == {0.1, 0.05}


def test_buffer_size_axis_multiplies_only_rehearsal_cells(load):
    grid = load(
        streams=[{"name": "split_digits", "n_experiences": 2}, "permuted_digits"],
        strategies=["naive", "rehearsal"],
        seeds=[0, 1],
        grid={"train.lr": [0.1, 0.05], "strategy.buffer.size": [50, 100]},
    )
    naive = [c for c in grid.cells if c.strategy == "naive"]
    rehearsal = [c for c in grid.cells if c.strategy == "rehearsal"]
    assert len(naive) == 2 * 2 * 2  # streams x seeds x lr
    assert len(rehearsal) == 2 * 2 * 2 * 2  # ... x buffer sizes
    assert {c.config["strategy"]["buffer"]["size"] for c in rehearsal} == {50, 100}
    assert all("strategy.buffer.size" not in c.overrides for c in naive)
    assert all("strategy.buffer.size" in c.overrides for c in rehearsal)


def test_stream_axis_applies_only_to_streams_declaring_it(load):
    grid = load(
        streams=[{"name": "split_digits", "n_experiences": 2}, "rotated_digits"],
        grid={"stream.max_angle": [90.0, 180.0]},
    )
    assert sorted(c.stream for c in grid.cells) == [
        "rotated_digits",
        "rotated_digits",
        "split_digits",
    ]


def test_cell_hashes_are_stable_across_loads(load):
    fields = {"strategies": ["naive", "rehearsal"], "seeds": [0, 1], "grid": {"train.lr": [0.1]}}
    first, second = load(**fields), load(**fields)
    assert [c.hash for c in first.cells] == [c.hash for c in second.cells]
    assert all(re.fullmatch(r"[0-9a-f]{16}", c.hash) for c in first.cells)


def test_cell_hash_is_of_the_resolved_config_not_its_spelling(grid_file):
    spelled_out = {
        "seeds": [0],
        "strategies": [{"name": "naive"}],
        "streams": [{"n_experiences": 2, "task_labels": False, "name": "split_digits"}],
        "train": {"lr": 0.1, "epochs": 1},  # the defaults, written out
        "name": "other-name",
    }
    short = load_grid(grid_file(BASE)).cells[0]
    assert load_grid(grid_file(spelled_out)).cells[0].hash == short.hash


def test_cell_hash_changes_with_learning_rate(load):
    assert load(train={"lr": 0.1}).cells[0].hash != load(train={"lr": 0.05}).cells[0].hash


def test_cell_hash_changes_with_seed_stream_and_strategy(load):
    base = load().cells[0].hash
    assert load(seeds=[1]).cells[0].hash != base
    assert load(streams=["permuted_digits"]).cells[0].hash != base
    assert load(strategies=["cumulative"]).cells[0].hash != base


def test_cell_hash_ignores_resources_and_storage(load, tmp_path):
    base = load().cells[0].hash
    assert load(resources={"cpu": 4, "gpu": 0.25}).cells[0].hash == base
    assert load(storage=str(tmp_path / "elsewhere")).cells[0].hash == base


# Hashes of finished cells in users' stores: a change here reruns every such cell. Change
# them only on purpose (HASH_VERSION), with a line in CHANGELOG.md.
PINNED_HASHES = {
    "naive": "a51989ce51739ba3",
    "rehearsal": "5c36779f590ef3bf",
    "ewc": "adc7ac0c2f75c57e",
}


def test_cell_hashes_are_pinned(load):
    grid = load(strategies=["naive", {"name": "rehearsal", "buffer": {"size": 20}},
                            {"name": "avalanche.EWC", "ewc_lambda": 0.4}],
                train={"lr": 0.05})  # fmt: skip
    assert dict(zip(PINNED_HASHES, (c.hash for c in grid.cells))) == PINNED_HASHES


def test_a_new_field_at_its_default_keeps_every_hash(load, monkeypatch):
    """Upgrading forgetless must not rerun finished cells because a field was added."""
    import dataclasses

    import forgetless.strategies as strategies

    before = [c.hash for c in load(strategies=["naive", "rehearsal"]).cells]
    extended = dataclasses.make_dataclass(
        "TrainConfig", [("warmup_fraction", float, dataclasses.field(default=0.0))],
        bases=(strategies.TrainConfig,),
    )  # fmt: skip
    monkeypatch.setattr(strategies, "TrainConfig", extended)
    grid = load(strategies=["naive", "rehearsal"])
    assert grid.cells[0].config["train"]["warmup_fraction"] == 0.0  # the field is there
    assert [c.hash for c in grid.cells] == before
    assert load(strategies=["naive"], train={"warmup_fraction": 0.1}).cells[0].hash != before[0]


def test_one_strategy_listed_twice_gives_two_labelled_variants(load):
    grid = load(
        strategies=[{"name": "rehearsal", "buffer": {"size": 20}},
                    {"name": "rehearsal", "buffer": {"size": 50}}, "naive"],
        seeds=[0, 1],
    )  # fmt: skip
    variants = {(c.strategy, c.variant) for c in grid.cells}
    assert variants == {("rehearsal", "strategy.buffer.size=20"),
                        ("rehearsal", "strategy.buffer.size=50"), ("naive", "")}  # fmt: skip
    assert len(grid.cells) == 6


def test_variant_names_the_grid_point(load):
    grid = load(strategies=["naive"], grid={"train.lr": [0.1, 0.05]})
    assert sorted(c.variant for c in grid.cells) == ["train.lr=0.05", "train.lr=0.1"]


def test_resolved_cell_config_fills_every_default(load):
    (cell,) = load().cells
    assert set(cell.config) == {"stream", "model", "train", "strategy", "seed"}
    assert cell.config["model"] == {"name": "mlp", "hidden": [128], "dropout": 0.0}
    assert cell.config["train"]["optimizer"] == "sgd"
    assert cell.config["stream"]["task_labels"] is False


def test_top_level_errors_start_with_the_field_name(load):
    with pytest.raises(ConfigError) as error:
        load(seeds="0")
    assert str(error.value).startswith("seeds: ")
