"""The statistics in Beam: the live PublishStatistics step, the Beam-native
windowed CombineFn, and the equivalence of the two on the same records.

Pipelines run on the FnApiRunner, named explicitly (Beam's default runner
would try to download Prism first)."""

from __future__ import annotations

import itertools
import time

import apache_beam as beam
import pytest
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from stats_data import batches, capture_records, reference_counters, synthetic_records

from core.stats import StatsConfig, StatsSet, StatsStore
from transforms.batches import RecordBatch
from transforms.statistics import (
    CombineStatistics,
    PublishStatistics,
    SplitBatchesByWindow,
    StatsSpec,
    forget_store,
    get_store,
    window_stats,
)

T0 = 1_700_000_000.0

# Outputs of the pipelines, by run: the FnApiRunner runs the DoFns in this
# process, and _Collect is pickled by reference to this module.
_RESULTS: dict[str, list] = {}
_RUN = itertools.count()


class _Collect(beam.DoFn):
    def __init__(self, key: str) -> None:
        self._key = key

    def process(self, element, timestamp=beam.DoFn.TimestampParam):
        _RESULTS.setdefault(self._key, []).append((element, timestamp))


def _run(build) -> list:
    """Run ``build(pipeline) -> pcollection`` and return its elements."""
    key = f"run-{next(_RUN)}"
    with beam.Pipeline(runner=FnApiRunner()) as p:
        build(p) | f"Collect{key}" >> beam.ParDo(_Collect(key))
    return [element for element, _ in _RESULTS.pop(key, [])]


def _urns(pipeline: beam.Pipeline) -> set[str]:
    proto = pipeline.to_runner_api()
    return {t.spec.urn for t in proto.components.transforms.values()}


@pytest.fixture
def spec():
    spec = StatsSpec(window_seconds=10, keep_windows=10, top_capacity=1000, grace_seconds=1.0, max_identities=50)
    forget_store(spec)
    yield spec
    forget_store(spec)


# -- the live step ------------------------------------------------------------


def test_get_store_is_one_store_per_spec(spec):
    store = get_store(spec)
    assert get_store(StatsSpec(**spec.__dict__)) is store
    assert store.window_seconds == 10 and store.keep_windows == 10
    assert store.config == StatsConfig(top_capacity=1000, max_identities=50)
    forget_store(spec)
    assert get_store(spec) is not store


def test_publish_statistics_fills_the_store_and_passes_batches_on(spec):
    recs = synthetic_records(3000, seed=21, start=T0, rate=100.0)
    out = _run(lambda p: p | beam.Create(batches(recs, 250)) | PublishStatistics(spec))
    assert sorted(len(b) for b in out) == sorted(len(b) for b in batches(recs, 250))
    snap = get_store(spec).snapshot()
    ref = reference_counters(recs)
    c = snap.counters()
    assert (c["query"], c["response"], c["unanswered"]) == (ref["query"], ref["response"], ref["unanswered"])
    assert snap.streams() == ["ns1", "ns2", "ns3"]
    assert get_store(spec).store_counters()["records"] == len(recs)


def test_live_graph_has_no_group_by_key(spec):
    """The FnApiRunner runs the live receiver in batch mode: a GroupByKey would
    hold everything behind it until the source ends."""
    live = beam.Pipeline(runner=FnApiRunner())
    _ = live | beam.Create([RecordBatch()]) | PublishStatistics(spec)
    assert "beam:transform:group_by_key:v1" not in _urns(live)
    native = beam.Pipeline(runner=FnApiRunner())
    _ = window_stats(native | beam.Create([RecordBatch()]), 10)
    assert "beam:transform:group_by_key:v1" in _urns(native)  # the check sees one


# -- the Beam-native path -----------------------------------------------------


def test_combine_fn_protocol():
    recs = synthetic_records(1000, seed=22)
    fn = CombineStatistics(StatsConfig())
    a = fn.add_inputs(fn.create_accumulator(), batches(recs[:500], 100))
    b = fn.add_input(fn.create_accumulator(), recs[500:])
    merged = fn.extract_output(fn.merge_accumulators([a, b]))
    whole = StatsSet()
    whole.add_batch(recs)
    assert merged.total.counters() == whole.total.counters()
    assert merged.total.tables(50) == whole.total.tables(50)


def test_split_batches_by_window_stamps_window_starts():
    recs = [{"timestamp": t, "n": i} for i, t in enumerate([T0 + 9.5, T0 + 10.0, T0 + 3.0, T0 + 25.0])]

    def build(p):
        return (
            p
            | beam.Create([RecordBatch(recs)])
            | beam.ParDo(SplitBatchesByWindow(10))
            | beam.Map(lambda b, ts=beam.DoFn.TimestampParam: (ts.micros / 1e6, sorted(r["n"] for r in b)))
        )

    assert sorted(_run(build)) == [(T0, [0, 2]), (T0 + 10, [1]), (T0 + 20, [3])]


# -- the equivalence of the two paths ---------------------------------------


def _live_windows(recs, size: int, window: float, config: StatsConfig) -> dict:
    store = StatsStore(window_seconds=window, keep_windows=1000, config=config, grace_seconds=1.0)
    now = max(r["timestamp"] for r in recs)
    for batch in batches(recs, size):
        store.add_batch(batch, now=now)
    store.close_idle(time.time() + 1e6)
    assert store.store_counters()["late"] == 0
    return {w.start: w for w in store.snapshot().windows()}


def _beam_windows(recs, size: int, window: float, config: StatsConfig) -> dict:
    views = _run(lambda p: window_stats(p | beam.Create(batches(recs, size)), window, config))
    return {round(v.start, 6): v for v in views}


@pytest.mark.parametrize(
    "case",
    ["capture", "synthetic"],
)
def test_live_and_beam_give_the_same_windows(case):
    config = StatsConfig(top_capacity=1000)
    if case == "capture":
        # unbound's capture spans 0.6 s: 0.1 s windows, batches straddling them.
        recs, window, size = capture_records(), 0.1, 64
    else:
        # 3 identities, 50 s in 10 s windows, records out of order by up to
        # 0.5 s (less than the live store's grace), odd records included.
        recs = synthetic_records(20_000, seed=23, start=T0, rate=400.0, jitter=0.5)
        window, size = 10.0, 300
    live = _live_windows(recs, size, window, config)
    native = _beam_windows(recs, size, window, config)
    assert sorted(live) == sorted(native) and len(live) >= 5
    for start, lw in live.items():
        bw = native[start]
        assert (lw.start, lw.end) == (bw.start, bw.end)
        assert lw.streams() == bw.streams()
        for stream in [None, *lw.streams()]:
            # Counters equal, distinct counts included (HyperLogLog unions
            # are exact); tables equal too while they are exact.
            assert lw.counters(stream) == bw.counters(stream), (start, stream)
            assert lw.tables(1000, stream) == bw.tables(1000, stream), (start, stream)
        mine = [r for r in recs if lw.start <= r["timestamp"] < lw.end]
        assert lw.counters()["query"] == reference_counters(mine).get("query", 0)
