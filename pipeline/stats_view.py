"""What the HTTP API reads: the live statistics store plus the receiver's own counters."""

from __future__ import annotations

from core import counters
from core.stats import StatsStore
from pipeline.dashboard import window_counts

__all__ = ["ReceiverStatsView"]


class ReceiverStatsView:
    """pipeline.http_api.StatsView over a StatsStore; every method is safe
    from the API's thread (the store takes its own snapshots)."""

    def __init__(self, store: StatsStore) -> None:
        self._store = store

    def streams(self) -> list[str]:
        return self._store.streams()

    def counters(self, stream: str | None = None) -> dict:
        return self._store.counters(stream)

    def tables(self, n: int, stream: str | None = None) -> dict:
        return self._store.tables(n, stream)

    def windows(self, last: int, stream: str | None = None) -> list[dict]:
        return self._store.windows(last, stream)

    def window_counts(self, last: int, streams: int) -> list[dict]:
        """The dashboard's history: counters only, of the busiest ``streams``."""
        return window_counts(self._store.view(), last, streams)

    def reset(self) -> None:
        self._store.reset()

    def receiver_counters(self) -> dict[str, dict]:
        return counters.snapshot()
