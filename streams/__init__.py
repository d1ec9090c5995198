"""Streams: WHAT is learned, in which order.

A `Stream` is an ordered list of `Experience`s. Streams are built by factories
registered under a name (`@register_stream`), by installed plugins (entry-point
group `forgetless.streams`) or by a `package.module:function` written in the grid.
A factory takes its declared parameters (a dataclass) and the cell seed, which
fixes everything random about the stream, class order included.
"""

from __future__ import annotations

from typing import Any

from forgetless.streams import (  # noqa: F401  (the built-ins)
    digits,
    editing,
    image_files,
    instructions,
    mnist,
)
from forgetless.streams.base import (
    STREAMS,
    Example,
    Experience,
    Kind,
    Samples,
    Scenario,
    Stream,
    register_stream,
)

__all__ = [
    "STREAMS",
    "Example",
    "Experience",
    "Kind",
    "Samples",
    "Scenario",
    "Stream",
    "build_stream",
    "register_stream",
    "stream_factory",
]


def stream_factory(name: str, where: str):
    """The factory registered (or plugged in) under `name`."""
    if name.startswith("avalanche."):
        # Imported on demand: avalanche-lib takes seconds to import, and few grids use it.
        from forgetless.streams.avalanche_benchmarks import avalanche_stream_factory

        return avalanche_stream_factory(name, where)
    return STREAMS.get(name, where)


def build_stream(name: str, params: Any, seed: int) -> Stream:
    stream = stream_factory(name, name)(params, seed)
    stream.check_distinct()
    return stream
