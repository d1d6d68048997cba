"""Objects shared by every DoFn instance of a process that names the same key
(an output file, a network output's delivery): a runner creates and tears
down DoFn instances as it likes, and several may overlap, but one file needs
one writer and one output one buffer. The last instance to let go closes it."""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Any

__all__ = ["SharedRegistry"]


class SharedRegistry:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[Hashable, list] = {}  # key -> [object, users]

    def acquire(self, key: Hashable, create: Callable[[], Any], stale: Callable[[Any], bool] | None = None) -> Any:
        """The object for ``key``, made by ``create()`` on first use (or when
        ``stale(object)`` says the one registered can no longer serve)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or (stale is not None and stale(entry[0])):
                entry = self._entries[key] = [create(), 0]
            entry[1] += 1
            return entry[0]

    def release(self, key: Hashable) -> Any | None:
        """Give ``key``'s object back; returns it when this was its last user
        (the caller closes it, outside the registry's lock), else None."""
        with self._lock:
            entry = self._entries[key]
            entry[1] -= 1
            if entry[1] > 0:
                return None
            del self._entries[key]
            return entry[0]
