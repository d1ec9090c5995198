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

from forgetless.experiments.schema import ConfigError, param, parse, positive, suggest

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.-]+$")
SECTIONS = ("stream", "model", "train", "strategy")


@dataclass
class Resources:
    cpu: float = param(1.0, "CPUs per cell")
    gpu: float = param(0.0, "GPUs per cell; a fraction packs several cells on one GPU")

    def validate(self, where: str) -> None:
        positive(self.cpu, f"{where}.cpu")
        if self.gpu < 0:
            raise ConfigError(f"{where}.gpu: must be >= 0, got {self.gpu}")


@dataclass
class GridFile:
    """The top level of a grid YAML file."""

    name: str = param(help="the MLflow experiment; letters, digits, - _ .")
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
            raise ConfigError(f"name: {self.name!r} may only hold letters, digits, - _ .")
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

    @property
    def hash(self) -> str:
        """Identity of what changes results; resources and tracking are not part of it."""
        blob = json.dumps(self.config, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def stream(self) -> str:
        return self.config["stream"]["name"]

    @property
    def strategy(self) -> str:
        return self.config["strategy"]["name"]

    @property
    def variant(self) -> str:
        """The grid point without the seed: cells differing only by seed share it."""
        return ",".join(f"{k}={v}" for k, v in sorted(self.overrides.items()))

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
                config = _resolve(_apply(raw, overrides), where_strategy, f"streams[{i_stream}]")
                applied = {k: v for k, v in overrides.items() if _lookup(config, k) == v}
                for seed in top.seeds:
                    cell = Cell(top.name, seed, {**config, "seed": seed}, applied)
                    cells.setdefault(cell.hash, cell)
    _check_overrides_used(axes, cells.values())
    return Grid(top.name, list(cells.values()), top.resources, top.storage, data)


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


def _resolve(raw: dict[str, Any], where_strategy: str, where_stream: str) -> dict[str, Any]:
    """Parse every section against its declaration; return plain data with defaults filled."""
    from forgetless.models import DEFAULT_MODEL
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

    def section(name: str, cls: type, spec: dict, where: str) -> dict[str, Any]:
        return {"name": name, **dataclasses.asdict(parse(cls, spec, where))}

    resolved = {
        "stream": section(
            stream_name,
            _config_class("stream", stream_name, where_stream),
            stream_spec,
            where_stream,
        ),
        "model": section(
            model_name, _config_class("model", model_name, "model"), model_spec, "model"
        ),
        "train": dataclasses.asdict(parse(TrainConfig, raw["train"], "train")),
        "strategy": section(strategy_name, strategy.Config, strategy_spec, where_strategy),
    }
    if resolved["model"].get("tokenizer") == "bpe" and resolved["stream"].get("base") is None:
        raise ConfigError(
            f"model.tokenizer: bpe learns its vocabulary from the stream's base corpus and "
            f"{where_stream} ({stream_name}) pre-trains no base; use tokenizer: bytes"
        )
    return resolved


def build_params(cls: type, resolved: dict[str, Any], where: str) -> Any:
    """The dataclass instance for a resolved section (its `name` key dropped)."""
    return parse(cls, {k: v for k, v in resolved.items() if k != "name"}, where)
