"""The grid file: load, validate, expand into cells with a stable hash.

Everything here runs before any cell starts, so a bad grid fails in the terminal
with the field, the bad value and the fix, not an hour later on a worker.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from forgetless.core.schema import ConfigError, defaults, param, parse, positive, suggest

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$")
NAME_RULE = "1 to 100 letters, digits, - _ . not starting with . or -"
SECTIONS = ("stream", "model", "train", "strategy")
# Part of every cell hash. Bump it only when a change gives an existing configuration a
# new meaning (a default's value, what a parameter does), so that finished cells run
# again on purpose; say so in CHANGELOG.md. Adding a field whose default keeps the old
# behaviour needs no bump: fields at their default are not hashed.
HASH_VERSION = 2


@dataclass
class Resources:
    cpu: float = param(1.0, "CPUs per cell")
    gpu: float = param(0.0, "GPUs per cell; a fraction packs several cells on one GPU")
    gpu_memory_gb: float | None = param(
        None,
        "memory of one GPU, to check that a cell's share holds it (default: "
        "$FORGETLESS_GPU_MEMORY_GB, else 80)",
    )

    def validate(self, where: str) -> None:
        positive(self.cpu, f"{where}.cpu")
        positive(self.gpu_memory_gb, f"{where}.gpu_memory_gb")
        if self.gpu < 0:
            raise ConfigError(f"{where}.gpu: must be >= 0, got {self.gpu}")


@dataclass
class GridFile:
    """The top level of a grid YAML file."""

    name: str = param(help=f"the MLflow experiment and the checkpoint folder; {NAME_RULE}")
    strategies: list[Any] = param(help="strategy names, or {name: ..., <param>: ...} mappings")
    streams: list[Any] = param(help="stream names, or {name: ..., <param>: ...} mappings")
    seeds: list[int] = param([0], "one cell per seed; the seed drives every RNG")
    model: Any = param(None, "{name: ..., <param>: ...}; default: the stream kind's model")
    train: dict[str, Any] = param({}, "epochs, batch_size, lr, optimizer, ...")
    grid: dict[str, Any] = param({}, "dotted path -> list of values, e.g. train.lr: [0.1, 0.01]")
    resources: Resources = param(Resources(), "per cell: {cpu: 1, gpu: 0.25}")
    storage: str = param("forgetless_runs", "folder for cell checkpoints")

    def validate(self, where: str) -> None:
        if not NAME_PATTERN.match(self.name):
            raise ConfigError(f"name: {self.name[:120]!r} is not a grid name; use {NAME_RULE}")
        if not self.storage.strip():
            raise ConfigError(
                "storage: empty; give a folder (default forgetless_runs) or a URI the workers "
                "can reach (e.g. s3://bucket/forgetless)"
            )
        for key in ("strategies", "streams", "seeds"):
            if not getattr(self, key):
                raise ConfigError(f"{key}: list at least one")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds: {self.seeds} repeats a seed")


@dataclass
class Cell:
    """One (stream, strategy, seed, point of `grid:`), fully resolved."""

    grid: str
    seed: int
    config: dict[str, Any]
    """{'stream': {...}, 'model': {...}, 'train': {...}, 'strategy': {...}, 'seed': n}"""
    overrides: dict[str, Any] = field(default_factory=dict)
    identity: dict[str, Any] | None = None
    """`config` without the fields at their declared default: what `hash` is taken of."""
    variant: str = ""
    """What sets this cell apart from the other cells of its stream and strategy name
    (grid points, or one strategy listed twice with other parameters), seed aside."""

    @property
    def hash(self) -> str:
        """Identity of what changes results; resources and tracking are not part of it.

        Fields at their default are left out, so a new field whose default keeps the old
        behaviour leaves every finished cell's hash as it was."""
        identity = self.config if self.identity is None else self.identity
        blob = json.dumps({"v": HASH_VERSION, **identity}, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def stream(self) -> str:
        return self.config["stream"]["name"]

    @property
    def strategy(self) -> str:
        return self.config["strategy"]["name"]

    def label(self) -> str:
        extra = f" [{self.variant}]" if self.variant else ""
        return f"{self.stream}/{self.strategy}{extra} seed={self.seed}"


@dataclass
class Grid:
    name: str
    cells: list[Cell]
    resources: Resources
    storage: str
    source: dict[str, Any]


def load_grid(path: str | Path) -> Grid:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"grid file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{path}: malformed YAML{where}: {problem}") from e
    return grid_from_dict(data, where=str(path))


def grid_from_dict(data: Any, where: str = "grid") -> Grid:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: a grid is a mapping with keys name, streams, strategies, ...")
    top = parse(GridFile, data, where="")
    axes = _grid_axes(top.grid)
    cells: dict[str, Cell] = {}
    for i_stream, stream_spec in enumerate(top.streams):
        for i_strategy, strategy_spec in enumerate(top.strategies):
            raw = {
                "stream": _component(stream_spec, f"streams[{i_stream}]"),
                "model": None if top.model is None else _component(top.model, "model"),
                "train": dict(top.train),
                "strategy": _component(strategy_spec, f"strategies[{i_strategy}]"),
            }
            where_strategy = f"strategies[{i_strategy}]"
            for point in itertools.product(*axes.values()) if axes else [()]:
                overrides = dict(zip(axes, point))
                config, defaults = _resolve(
                    _apply(raw, overrides), where_strategy, f"streams[{i_stream}]"
                )
                applied = {k: v for k, v in overrides.items() if _lookup(config, k) == v}
                identity = _without_defaults(config, defaults)
                for seed in top.seeds:
                    cell = Cell(top.name, seed, {**config, "seed": seed}, applied,
                                {**identity, "seed": seed})  # fmt: skip
                    cells.setdefault(cell.hash, cell)
    _check_overrides_used(axes, cells.values())
    _label_variants(list(cells.values()))
    return Grid(top.name, list(cells.values()), top.resources, top.storage, data)


def _label_variants(cells: list[Cell]) -> None:
    """Name each cell by the dotted values that differ among the cells of its stream and
    strategy name, so two configurations of one strategy never share a row or a group."""
    by_name: dict[tuple[str, str], list[Cell]] = {}
    for cell in cells:
        by_name.setdefault((cell.stream, cell.strategy), []).append(cell)
    for group in by_name.values():
        flat = [flatten({k: v for k, v in c.config.items() if k != "seed"}) for c in group]
        keys = sorted({k for f in flat for k in f})
        differing = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True)
                                              for f in flat}) > 1]  # fmt: skip
        for cell, values in zip(group, flat):
            cell.variant = ",".join(f"{k}={_text(values.get(k))}" for k in differing)


def _text(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) or value is None else str(value)


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 0.1}} -> {'train.lr': 0.1}; lists and empty mappings stay values."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _without_defaults(config: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """`config` with every value equal to its default in `defaults` dropped, recursively."""
    out = {}
    for key, value in config.items():
        if key in defaults and value == defaults[key]:
            continue
        if isinstance(value, dict) and isinstance(defaults.get(key), dict):
            value = _without_defaults(value, defaults[key])
        out[key] = value
    return out


def without_defaults(values: dict[str, Any], cls: type) -> dict[str, Any]:
    """A resolved section of dataclass `cls` without the fields at their declared default."""
    return _without_defaults(values, _defaults(cls))


def _defaults(cls: type) -> dict[str, Any]:
    """The declared defaults of `cls`, as plain data like a resolved section."""
    return {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
            for k, v in defaults(cls).items()}  # fmt: skip


def _component(spec: Any, where: str) -> dict[str, Any]:
    """`name` or `{name: ..., k: v}` -> {'name': ..., k: v}."""
    if isinstance(spec, str):
        return {"name": spec}
    if isinstance(spec, dict) and isinstance(spec.get("name"), str):
        return copy.deepcopy(spec)
    raise ConfigError(f"{where}: expected a name or a mapping with a 'name' key, got {spec!r}")


def _grid_axes(grid: dict[str, Any]) -> dict[str, list]:
    axes = {}
    for key, values in grid.items():
        section = key.split(".")[0]
        if section not in SECTIONS or "." not in key:
            raise ConfigError(
                f"grid.{key}: a grid key is a dotted path starting with one of "
                f"{', '.join(SECTIONS)}{suggest(section, SECTIONS)}, e.g. train.lr"
            )
        if not isinstance(values, list) or not values:
            raise ConfigError(f"grid.{key}: expected a non-empty list of values, got {values!r}")
        axes[key] = values
    return axes


def _apply(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set each dotted override; a strategy/stream/model key applies only where declared."""
    out = copy.deepcopy(raw)
    for key, value in overrides.items():
        section, *path = key.split(".")
        if out[section] is None:
            out[section] = {"name": None}
        if section != "train" and not _declares(section, out[section]["name"], path[0]):
            continue
        target = out[section]
        for part in path[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(f"grid.{key}: {part!r} is not a mapping in this cell")
        target[path[-1]] = value
    return out


def _declares(section: str, name: str | None, key: str) -> bool:
    if name is None:
        return True
    try:
        return key in {f.name for f in dataclasses.fields(_config_class(section, name, "grid"))}
    except ConfigError:
        return False


def _check_overrides_used(axes: dict[str, list], cells) -> None:
    used = {k for cell in cells for k in cell.overrides}
    for key in axes:
        if key not in used:
            raise ConfigError(
                f"grid.{key}: no stream, model or strategy of this grid declares this parameter;"
                " check the spelling (`forgetless strategies` lists each one's parameters)"
            )


def _lookup(config: dict[str, Any], dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return object()
        value = value[part]
    return value


def _config_class(section: str, name: str, where: str) -> type:
    if section == "stream":
        from forgetless.streams import stream_factory

        return typing.get_type_hints(stream_factory(name, where))["config"]
    if section == "model":
        from forgetless.models import model_factory

        return typing.get_type_hints(model_factory(name, where))["config"]
    from forgetless.strategies import strategy_class

    return strategy_class(name, where).Config


def _resolve(
    raw: dict[str, Any], where_strategy: str, where_stream: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Parse every section against its declaration: plain data with defaults filled, and
    the defaults themselves (per section, for the cell hash)."""
    from forgetless.models import DEFAULT_MODEL, check_model
    from forgetless.strategies import TrainConfig, strategy_class
    from forgetless.streams import stream_factory

    stream_spec = dict(raw["stream"])
    stream_name = stream_spec.pop("name")
    kind = stream_factory(stream_name, f"{where_stream}.name").kind
    strategy_spec = dict(raw["strategy"])
    strategy_name = strategy_spec.pop("name")
    strategy = strategy_class(strategy_name, f"{where_strategy}.name")
    if kind not in strategy.supports:
        raise ConfigError(
            f"{where_strategy}: strategy {strategy_name!r} supports {', '.join(strategy.supports)}"
            f" streams, but stream {stream_name!r} is {kind}; pair it with a {kind} strategy"
        )
    if stream_spec.get("forget_after") and not hasattr(strategy, "forget"):
        raise ConfigError(
            f"{where_stream}.forget_after: strategy {strategy_name!r} cannot forget an edit (it "
            "has no forget method; larimar has); drop forget_after or pair it with larimar"
        )
    model_spec = dict(raw["model"] or {"name": DEFAULT_MODEL[kind]})
    model_name = model_spec.pop("name") or DEFAULT_MODEL[kind]

    classes = {
        "stream": (stream_name, _config_class("stream", stream_name, where_stream), stream_spec,
                   where_stream),
        "model": (model_name, _config_class("model", model_name, "model"), model_spec, "model"),
        "train": (None, TrainConfig, raw["train"], "train"),
        "strategy": (strategy_name, strategy.Config, strategy_spec, where_strategy),
    }  # fmt: skip
    resolved, defaults = {}, {}
    for key, (name, cls, spec, where) in classes.items():
        values = dataclasses.asdict(parse(cls, spec, where))
        resolved[key] = values if name is None else {"name": name, **values}
        defaults[key] = _defaults(cls)
    if resolved["model"].get("tokenizer") == "bpe" and resolved["stream"].get("base") is None:
        raise ConfigError(
            f"model.tokenizer: bpe learns its vocabulary from the stream's base corpus and "
            f"{where_stream} ({stream_name}) pre-trains no base; use tokenizer: bytes"
        )
    # The matrices a method reaches into (an editor's down_proj, LoRA's targets) must exist
    # in the model's family (models/families.py), and the model must be there to be had.
    needs = getattr(strategy, "model_roles", lambda config: ())
    roles = tuple(needs(build_params(strategy.Config, resolved["strategy"], where_strategy)))
    positions = getattr(strategy, "reads_positions", False)
    check_model(model_name, roles, f"{where_strategy} ({strategy_name})", positions)
    return resolved, defaults


def build_params(cls: type, resolved: dict[str, Any], where: str) -> Any:
    """The dataclass instance for a resolved section (its `name` key dropped)."""
    return parse(cls, {k: v for k, v in resolved.items() if k != "name"}, where)
