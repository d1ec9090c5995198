"""Name -> class registries for streams, strategies and models, with plugins.

A name resolves, in order, to something registered in this package, to an entry
point of the group `forgetless.<kind>` of an installed distribution, or, when it
contains a colon, to `package.module:Name` imported because the user wrote it in
the grid. Nothing else is ever imported. An entry-point name that two installed
distributions both claim is refused, naming both: which one `importlib.metadata` lists
first depends on sys.path order, so a silent winner could change between machines.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points
from typing import Generic, TypeVar

from forgetless.core.schema import ConfigError, suggest

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, noun: str, group: str) -> None:
        self.kind = noun
        self.group = group
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            return obj

        return add

    def names(self) -> list[str]:
        """Registered names and installed entry points (plugins are not imported)."""
        return sorted(set(self._entries) | set(self._plugins()))

    def get(self, name: str, where: str) -> T:
        if name in self._entries:
            return self._entries[name]
        plugin = self._plugins(name, where).get(name)
        if plugin is not None:
            return plugin.load()
        if ":" in name:
            module_name, _, attr = name.partition(":")
            try:
                module = importlib.import_module(module_name)
            except ImportError as e:
                raise ConfigError(
                    f"{where}: cannot import module {module_name!r} for {self.kind} {name!r} "
                    f"({e}); install the package that provides it, or fix the name"
                ) from e
            if not hasattr(module, attr):
                raise ConfigError(f"{where}: module {module_name!r} has no {attr!r}")
            return getattr(module, attr)
        raise ConfigError(
            f"{where}: unknown {self.kind} {name!r}{suggest(name, self.names())}; "
            f"known: {', '.join(self.names())} (or a plugin as package.module:Class)"
        )

    def _plugins(self, name: str | None = None, where: str = "") -> dict[str, EntryPoint]:
        """Installed entry points of the group by name (only `name`'s when given); a name
        that entry points of two distributions share is a ConfigError naming both."""
        found: dict[str, list[EntryPoint]] = {}
        selected = entry_points(group=self.group, **({} if name is None else {"name": name}))
        for ep in selected:
            found.setdefault(ep.name, []).append(ep)
        for ep_name, eps in found.items():
            dists = sorted({ep.dist.name if ep.dist else f"? ({ep.value})" for ep in eps})
            if len(dists) > 1:
                raise ConfigError(
                    f"{where + ': ' if where else ''}{self.kind} {ep_name!r} is the "
                    f"{self.group} entry point of {len(dists)} installed distributions: "
                    f"{', '.join(dists)}; uninstall all but one (pip uninstall NAME), or name "
                    "the class you mean as package.module:Class"
                )
        return {ep_name: eps[0] for ep_name, eps in found.items()}
