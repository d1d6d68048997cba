"""Process-wide registry of counter groups, read by the periodic log line
(and later by the statistics API).

Each component owns its counters and registers a function returning a
snapshot of them under one name, e.g. "input", "decode", "output.file".
Counters are written by one thread each, so no locking is needed to read a
consistent-enough snapshot for logging.
"""

from __future__ import annotations

import collections
from typing import Callable

__all__ = ["counter_group", "register", "snapshot", "unregister"]

_PROVIDERS: dict[str, Callable[[], dict]] = {}
_GROUP_OBJECTS: dict[str, collections.Counter] = {}


def register(name: str, provider: Callable[[], dict]) -> None:
    _PROVIDERS[name] = provider


def unregister(name: str) -> None:
    _PROVIDERS.pop(name, None)


def counter_group(name: str) -> collections.Counter:
    """A plain Counter registered under ``name`` (created once per process)."""
    existing = _GROUP_OBJECTS.get(name)
    if existing is None:
        existing = _GROUP_OBJECTS[name] = collections.Counter()
        register(name, lambda: dict(existing))
    return existing


def snapshot() -> dict[str, dict]:
    return {name: provider() for name, provider in sorted(_PROVIDERS.items())}
