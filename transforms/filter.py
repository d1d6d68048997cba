"""FilterMessages: batches of records -> the records the ``filter:`` section keeps."""

from __future__ import annotations

from typing import TYPE_CHECKING

import apache_beam as beam
from apache_beam.metrics import Metrics

from core import counters
from core.filters import MessageFilter
from transforms.batches import RecordBatch

if TYPE_CHECKING:  # pipeline.build imports this module; no import back into pipeline/
    from pipeline.config import FilterOptions

__all__ = ["FilterMessages"]

STATS = counters.counter_group("filter")  # reason -> messages dropped, plus "kept"


class _FilterFn(beam.DoFn):
    def __init__(self, options: FilterOptions) -> None:
        self._options = options  # the options travel, not the filter: lists can be large

    def setup(self) -> None:
        # Built per DoFn instance: downsampling counts the messages this instance sees.
        self._filter = MessageFilter.from_options(self._options)
        reasons = [step.name for step in self._filter.steps] + ["kept"]
        self._metrics = {r: Metrics.counter("dnstap_receiver", f"filter_{r}") for r in reasons}

    def process(self, batch):
        kept = self._filter.apply(batch)
        counts = self._filter.dropped
        for reason, n in counts.items():
            if n:
                STATS[reason] += n
                self._metrics[reason].inc(n)
        counts.clear()  # per batch: what is left in it was just reported
        if kept:
            yield kept


class FilterMessages(beam.PTransform):
    """Batches of DnstapRecord in, the kept records out (empty batches are not emitted)."""

    def __init__(self, options: FilterOptions) -> None:
        super().__init__()
        # Build once now so that a bad list file or value fails at pipeline
        # construction with a ConfigError, not later inside a worker.
        self.description = MessageFilter.from_options(options).describe()
        self._options = options

    def expand(self, batches):
        return batches | "Filter" >> beam.ParDo(_FilterFn(self._options)).with_output_types(RecordBatch)
