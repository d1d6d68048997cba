"""Statistics in the pipeline, two ways over the same accumulators (core/stats.py).

- Live (``PublishStatistics``): the receiver runs on the FnApiRunner in batch
  mode, where nothing behind a GroupByKey runs while the source is open, so
  the aggregation happens inside a DoFn fused with the source: it adds each
  batch to the process's ``StatsStore`` (cumulative + tumbling windows of
  event time), which the HTTP API reads. The store is found by its spec in a
  process-level registry, like the listener hub (sources/listener.py).
- Beam-native (``WindowStatistics`` / ``window_stats``): for batch replays
  and streaming runners, batches are split by window, stamped with their
  window's start, put in ``FixedWindows`` and combined by
  ``CombineStatistics``, a CombineFn whose accumulator is a ``StatsSet``.

Both assign a record to window floor(timestamp / window) (core.stats.
split_by_window) and add and merge the same way, so on the same records they
give the same counters per window (tests/test_statistics_beam.py), and the
same top tables while those are exact.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import apache_beam as beam
from apache_beam.transforms.window import FixedWindows, TimestampedValue
from apache_beam.utils.timestamp import Duration, Timestamp

from core import counters
from core.stats import StatsConfig, StatsSet, StatsStore, WindowView, split_by_window
from transforms.batches import RecordBatch

__all__ = [
    "CombineStatistics",
    "PublishStatistics",
    "SplitBatchesByWindow",
    "StatsSpec",
    "WindowStatistics",
    "forget_store",
    "get_store",
    "window_stats",
]


@dataclass(frozen=True)
class StatsSpec:
    """Everything that identifies a store: equal specs share one store.

    window_seconds  length of the tumbling windows (4.7.0 has none; the
                    issue's ``statistics.window``)
    keep_windows    closed windows kept for readers
    top_capacity    entries per top-N table (see core.stats.StatsConfig)
    max_identities  streams tracked one by one, later ones fold into "other"
    hll_precision   HyperLogLog p (error 1.04 / sqrt(2**p))
    qname_lowercase 4.7.0's statistics.qname-lowercase
    grace_seconds   how long past its end a window waits for stragglers
    """

    window_seconds: float = 10.0
    keep_windows: int = 6
    top_capacity: int = 1000
    max_identities: int = 100
    hll_precision: int = 14
    qname_lowercase: bool = False
    grace_seconds: float = 1.0

    def config(self) -> StatsConfig:
        return StatsConfig(
            top_capacity=self.top_capacity,
            hll_precision=self.hll_precision,
            max_identities=self.max_identities,
            qname_lowercase=self.qname_lowercase,
        )


_STORES: dict[StatsSpec, StatsStore] = {}
_STORES_LOCK = threading.Lock()


def get_store(spec: StatsSpec) -> StatsStore:
    """The process's store for ``spec``, created on first use (by the
    pipeline's DoFn or by the HTTP API, whichever comes first)."""
    with _STORES_LOCK:
        store = _STORES.get(spec)
        if store is None:
            store = _STORES[spec] = StatsStore(
                window_seconds=spec.window_seconds,
                keep_windows=spec.keep_windows,
                config=spec.config(),
                grace_seconds=spec.grace_seconds,
            )
            # The counters line: records, windows_closed, late, future.
            counters.register("statistics", store.store_counters)
    return store


def forget_store(spec: StatsSpec) -> None:
    """Drop a store from the registry (tests run several in one process)."""
    with _STORES_LOCK:
        if _STORES.pop(spec, None) is not None:
            counters.unregister("statistics")


# -- live ---------------------------------------------------------------------


class _PublishFn(beam.DoFn):
    def __init__(self, spec: StatsSpec) -> None:
        self._spec = spec  # the spec travels; the store is per process

    def setup(self) -> None:
        self._store = get_store(self._spec)

    def process(self, records: RecordBatch):
        self._store.add_batch(records)
        yield records

    def finish_bundle(self) -> None:
        # About once a second live: closes the windows an idle receiver has
        # passed (the event clock moves on with the wall clock while no
        # record comes in).
        self._store.close_idle(time.time())


class PublishStatistics(beam.PTransform):
    """Adds every batch to the process's StatsStore for ``spec`` and passes
    the batches on unchanged (records are read, never modified), so it can
    sit inline or as a branch. No GroupByKey: safe in the live graph."""

    def __init__(self, spec: StatsSpec, label: str | None = None) -> None:
        super().__init__(label)
        self._spec = spec

    def expand(self, batches):
        return batches | "PublishStatistics" >> beam.ParDo(_PublishFn(self._spec)).with_output_types(RecordBatch)


# -- Beam-native ----------------------------------------------------------------


class CombineStatistics(beam.CombineFn):
    """Batches of records -> the StatsSet of all of them (per identity and
    total). Accumulators merge like the live store's windows do."""

    def __init__(self, config: StatsConfig | None = None) -> None:
        super().__init__()
        self._config = config or StatsConfig()

    def create_accumulator(self) -> StatsSet:
        return StatsSet(self._config)

    def add_input(self, accumulator: StatsSet, batch) -> StatsSet:
        accumulator.add_batch(batch)
        return accumulator

    def add_inputs(self, accumulator: StatsSet, batches) -> StatsSet:
        for batch in batches:
            accumulator.add_batch(batch)
        return accumulator

    def merge_accumulators(self, accumulators) -> StatsSet:
        it = iter(accumulators)
        merged = next(it)  # Beam lets the first accumulator be modified
        for other in it:
            merged.merge(other)
        return merged

    def extract_output(self, accumulator: StatsSet) -> StatsSet:
        return accumulator


class SplitBatchesByWindow(beam.DoFn):
    """One batch per window its records fall in, stamped with that window's
    start, so that FixedWindows(window_seconds) puts each record in the
    window the live store gives it (a batch can straddle a boundary)."""

    def __init__(self, window_seconds: float) -> None:
        self._window = float(window_seconds)
        self._size_micros = Duration.of(window_seconds).micros  # as FixedWindows rounds it

    def process(self, batch):
        for index, records in split_by_window(batch, self._window):
            if not isinstance(records, RecordBatch):
                records = RecordBatch(records)
            yield TimestampedValue(records, Timestamp(micros=index * self._size_micros))


class _AttachWindow(beam.DoFn):
    def process(self, stats: StatsSet, window=beam.DoFn.WindowParam):
        yield WindowView(window.start.micros / 1e6, window.end.micros / 1e6, True, stats)


class WindowStatistics(beam.PTransform):
    """Batches of records -> one ``core.stats.WindowView`` (start, end,
    StatsSet) per tumbling window of event time that holds records. Uses a
    GroupByKey (inside CombineGlobally): for batch replays and streaming
    runners, not the live FnApiRunner graph (see PublishStatistics)."""

    def __init__(self, window_seconds: float, config: StatsConfig | None = None, label: str | None = None) -> None:
        super().__init__(label)
        if not window_seconds > 0:
            raise ValueError(f"window_seconds must be > 0, got {window_seconds!r}")
        self._window = window_seconds
        self._config = config or StatsConfig()

    def expand(self, batches):
        return (
            batches
            | "SplitByWindow" >> beam.ParDo(SplitBatchesByWindow(self._window)).with_output_types(RecordBatch)
            | "FixedWindows" >> beam.WindowInto(FixedWindows(self._window))
            | "Combine" >> beam.CombineGlobally(CombineStatistics(self._config)).without_defaults()
            | "AttachWindow" >> beam.ParDo(_AttachWindow())
        )


def window_stats(batches, window_seconds: float, config: StatsConfig | None = None):
    """``batches | WindowStatistics(window_seconds, config)``."""
    return batches | "WindowStatistics" >> WindowStatistics(window_seconds, config)
