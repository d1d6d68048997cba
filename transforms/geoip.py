"""EnrichGeoIP: batches of records -> the same batches with GeoIP fields added."""

from __future__ import annotations

from typing import TYPE_CHECKING

import apache_beam as beam

from core import counters
from core.geoip import GeoIPEnricher
from transforms.batches import RecordBatch

if TYPE_CHECKING:
    from pipeline.config import GeoipOptions

__all__ = ["EnrichGeoIP"]

STATS = counters.counter_group("geoip")


class _EnrichFn(beam.DoFn):
    # Holds only the (picklable) options: database readers wrap an mmap and a C
    # object that cannot be pickled, so each worker opens its own in setup().
    def __init__(self, options: GeoipOptions) -> None:
        self._options = options
        self._enricher: GeoIPEnricher | None = None

    def setup(self) -> None:
        self._enricher = GeoIPEnricher.from_options(self._options, stats=STATS)

    def process(self, records: RecordBatch):
        self._enricher.enrich(records)
        yield records

    def teardown(self) -> None:
        if self._enricher is not None:
            self._enricher.close()
            self._enricher = None


class EnrichGeoIP(beam.PTransform):
    """Adds country/city (and asn/as-org) to every record of each batch, in place.

    The databases are opened once here so that a missing or invalid file fails
    at pipeline construction (ConfigError naming the key and path), not later
    on a worker.
    """

    def __init__(self, options: GeoipOptions, label: str | None = None) -> None:
        super().__init__(label)
        GeoIPEnricher.from_options(options).close()
        self._options = options

    def expand(self, batches):
        fn = _EnrichFn(self._options)
        return batches | "GeoIP" >> beam.ParDo(fn).with_output_types(RecordBatch)
