"""Strategies: HOW a stream is learned, one module per method.

`@register_strategy("name")` on a `Strategy` subclass registers a built-in; plugins
come from the entry-point group `forgetless.strategies` or from a
`package.module:Class` name written in the grid; `avalanche.<Name>` runs any
avalanche-lib strategy through one adapter.
"""

from __future__ import annotations

from forgetless.experiments.registry import Registry
from forgetless.strategies.base import NonFiniteLoss, NoParams, Strategy, TrainConfig

STRATEGIES: Registry = Registry("strategy", "forgetless.strategies")
register_strategy = STRATEGIES.register
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
    """The class registered (or plugged in) under `name`."""
    from forgetless.strategies import cumulative, naive, rehearsal  # noqa: F401

    if name.startswith(AVALANCHE_PREFIX):
        from forgetless.strategies.avalanche_adapter import avalanche_strategy

        return avalanche_strategy(name[len(AVALANCHE_PREFIX) :], where)
    cls = STRATEGIES.get(name, where)
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        from forgetless.experiments.schema import ConfigError

        raise ConfigError(f"{where}: {name!r} is {cls!r}, not a forgetless Strategy subclass")
    return cls
