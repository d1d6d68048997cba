"""ApplyPrivacy: batches of records -> the same batches, addresses anonymised or
hashed and qnames minimised."""

from __future__ import annotations

from typing import TYPE_CHECKING

import apache_beam as beam

from core import counters
from core.privacy import Privacy
from transforms.batches import RecordBatch

if TYPE_CHECKING:  # pipeline.build imports this module; no import back into pipeline/
    from pipeline.config import PrivacyOptions

__all__ = ["ApplyPrivacy"]

# "records": messages processed; "invalid-address": address fields that were
# not an IP address and were replaced by "-".
STATS = counters.counter_group("privacy")


class _PrivacyFn(beam.DoFn):
    def __init__(self, options: PrivacyOptions) -> None:
        self._options = options  # the options travel; the suffix list is parsed per worker

    def setup(self) -> None:
        self._privacy = Privacy.from_options(self._options)

    def process(self, records: RecordBatch):
        invalid = self._privacy.apply(records)
        STATS["records"] += len(records)
        if invalid:
            STATS["invalid-address"] += invalid
        yield records


class ApplyPrivacy(beam.PTransform):
    """Anonymises or hashes "query-ip"/"response-ip" and minimises the qname,
    as configured, in place in each batch."""

    def __init__(self, options: PrivacyOptions, label: str | None = None) -> None:
        super().__init__(label)
        Privacy.from_options(options)  # a bad combination fails at construction, not on a worker
        self._options = options

    def expand(self, batches):
        fn = _PrivacyFn(self._options)
        return batches | "Privacy" >> beam.ParDo(fn).with_output_types(RecordBatch)
