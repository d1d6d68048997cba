"""MatchLatency: batches of records -> the same batches, responses' latency set
by query/response matching (in place), plus unanswered queries (optional).

The live graph has no GroupByKey, so the step is fused with the source and the
matcher (core/latency.py) lives in the DoFn instance. The source is one
restriction that is never split, so one instance sees the whole stream in
arrival order; were the stream spread over several workers, a query and its
response taken by different workers would not meet (counted late and
unanswered). Queries still waiting when the pipeline ends are not reported:
Beam has no output after the last bundle."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import Timestamp
from apache_beam.utils.windowed_value import WindowedValue

from core import counters
from core.latency import COUNTER_NAMES, LatencyMatcher
from transforms.batches import RecordBatch

if TYPE_CHECKING:  # the options type only; transforms do not depend on pipeline/
    from pipeline.config import LatencyOptions

__all__ = ["WALL_CLOCK_SLACK", "MatchLatency"]

STATS = counters.counter_group("latency")

# While the receiver is idle no record advances the event clock, so waiting
# queries are also expired by wall clock at the end of each bundle (about once
# a second live). Only when the newest event time is this close behind the
# wall clock (seconds): live, message times follow wall time; replaying an old
# capture, wall time is far ahead and would expire every query before its
# response is read.
WALL_CLOCK_SLACK = 300.0


class _MatchLatencyFn(beam.DoFn):
    def __init__(self, options: LatencyOptions) -> None:
        self._options = options

    def setup(self) -> None:
        o = self._options
        self._matcher = LatencyMatcher(o.timeout, o.max_entries, o.unanswered)
        self._metrics = {
            name: Metrics.counter("dnstap_receiver", f"latency_{name}") for name in COUNTER_NAMES
        }
        self._reported = dict.fromkeys(COUNTER_NAMES, 0)

    def _report(self) -> None:
        """Pass the matcher's new counts on to the process group and Beam."""
        current = self._matcher.counters
        reported = self._reported
        for name in COUNTER_NAMES:
            delta = current[name] - reported[name]
            if delta:
                reported[name] += delta
                STATS[name] += delta
                self._metrics[name].inc(delta)

    def process(self, records):
        out = self._matcher.process(records)
        self._report()
        if out:
            yield out

    def finish_bundle(self):
        now = time.time()
        if 0.0 < now - self._matcher.newest <= WALL_CLOCK_SLACK:
            unanswered = self._matcher.flush(now)
            self._report()
            if unanswered:
                # finish_bundle has no input element to inherit a window from.
                yield WindowedValue(unanswered, Timestamp.of(now), [GlobalWindow()])


class MatchLatency(beam.PTransform):
    """Batches of DnstapRecord in and out; a pass-through when disabled."""

    def __init__(self, options: LatencyOptions) -> None:
        super().__init__()
        self._options = options

    def expand(self, records):
        if not self._options.enable:
            return records
        return records | "MatchLatency" >> beam.ParDo(_MatchLatencyFn(self._options)).with_output_types(
            RecordBatch
        )
