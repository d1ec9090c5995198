"""Strategies: HOW a stream is learned, one module per method.

`@register_strategy("name")` on a `Strategy` subclass registers a built-in; plugins
come from the entry-point group `forgetless.strategies` or from a
`package.module:Class` name written in the grid; `avalanche.<Name>` runs any
avalanche-lib strategy through one adapter.
"""

from __future__ import annotations

import dataclasses
import functools
import typing

from forgetless.core.schema import ConfigError
from forgetless.strategies import (  # noqa: F401  (the built-ins register themselves)
    cumulative,
    ft_l,
    grace,
    hft,
    larimar,
    lora,
    naive,
    rehearsal,
    remind,
    ssr,
    wise,
)
from forgetless.strategies.base import (
    STRATEGIES,
    NonFiniteLoss,
    NoParams,
    Strategy,
    TrainConfig,
    register_strategy,
)

AVALANCHE_PREFIX = "avalanche."

__all__ = [
    "NoParams",
    "NonFiniteLoss",
    "STRATEGIES",
    "Strategy",
    "TrainConfig",
    "register_strategy",
    "strategy_class",
]


def strategy_class(name: str, where: str) -> type[Strategy]:
    """The class registered (or plugged in) under `name`; `a+b` combines two methods."""
    if "+" in name:
        parts = name.split("+")
        return combine(tuple(strategy_class(p.strip(), where) for p in parts), where)
    if name.startswith(AVALANCHE_PREFIX):
        # Imported on demand: avalanche-lib takes seconds to import, and few grids use it.
        from forgetless.strategies.avalanche_adapter import avalanche_strategy

        return avalanche_strategy(name[len(AVALANCHE_PREFIX) :], where)
    cls = STRATEGIES.get(name, where)
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise ConfigError(f"{where}: {name!r} is {cls!r}, not a forgetless Strategy subclass")
    return cls


@functools.cache
def combine(classes: tuple[type[Strategy], ...], where: str) -> type[Strategy]:
    """One class whose hooks chain through `super()` in the order written (`hft+rehearsal`:
    HFT's before_experience, rehearsal's compose and after_experience, both state_dicts).

    Each method keeps its own hooks and reads its own parameters; the parameters of all
    are declared together, so the grid writes `{name: hft+rehearsal, buffer: {size: 50}}`.
    """
    fields, owner = [], {}
    for cls in classes:
        if not cls.resumable or cls.train is not Strategy.train:
            raise ConfigError(
                f"{where}: {cls.__name__} replaces the training loop and cannot be combined"
            )
        hints = typing.get_type_hints(cls.Config)
        for f in dataclasses.fields(cls.Config):
            if f.name in owner:
                raise ConfigError(
                    f"{where}: {owner[f.name]} and {cls.__name__} both take {f.name!r}; "
                    "they cannot be combined"
                )
            owner[f.name] = cls.__name__
            fields.append((f.name, hints[f.name], f))
    names = "+".join(c.__name__ for c in classes)
    supports = tuple(k for k in classes[0].supports if all(k in c.supports for c in classes))
    config = dataclasses.make_dataclass(f"{names}Config", fields)
    return type(names, classes, {"Config": config, "supports": supports})
