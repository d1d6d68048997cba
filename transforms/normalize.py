"""NormalizeQnames: batches of records -> the same batches, qnames normalised."""

from __future__ import annotations

from typing import TYPE_CHECKING

import apache_beam as beam

from core import counters
from core.normalize import QnameNormalizer
from transforms.batches import RecordBatch

if TYPE_CHECKING:  # pipeline.build imports this module; no import back into pipeline/
    from pipeline.config import NormalizeOptions

__all__ = ["NormalizeQnames"]

STATS = counters.counter_group("normalize")  # "records": messages normalised


class _NormalizeFn(beam.DoFn):
    def __init__(self, options: NormalizeOptions) -> None:
        self._options = options  # the options travel; the suffix list is parsed per worker

    def setup(self) -> None:
        self._normalizer = QnameNormalizer.from_options(self._options)

    def process(self, records: RecordBatch):
        self._normalizer.apply(records)
        STATS["records"] += len(records)
        yield records


class NormalizeQnames(beam.PTransform):
    """Lowercases qnames, drops their trailing dot and adds "tld" and
    "registrable-domain", as configured, in place in each batch."""

    def __init__(self, options: NormalizeOptions, label: str | None = None) -> None:
        super().__init__(label)
        self._options = options

    def expand(self, batches):
        fn = _NormalizeFn(self._options)
        return batches | "Normalize" >> beam.ParDo(fn).with_output_types(RecordBatch)
