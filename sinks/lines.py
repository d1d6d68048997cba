"""Shared machinery of the line-oriented sinks (stdout, file)."""

from __future__ import annotations

import logging

import apache_beam as beam
from apache_beam.metrics import Metrics

from core import counters
from core.formats import get_format
from core.ratelimit import RateLimitedLog

log = logging.getLogger("dnstap_receiver.output")



class LineWriterFn(beam.DoFn):
    """Formats each batch of records and hands the bytes to a writer with
    ``write_batch(data, units)``, ``flush()``, a ``delimiter`` and a ``lock``;
    flushes at every bundle end.

    A failing write (disk full, closed pipe) is logged and its lines counted as
    dropped; it never stops the receiver.
    """

    NAME = "lines"

    def __init__(self, fmt: str) -> None:
        get_format(fmt)  # validate at construction time
        self._fmt = fmt

    def open_writer(self):
        raise NotImplementedError

    def close_writer(self, writer) -> None:
        pass

    def setup(self) -> None:
        self._format = get_format(self._fmt)
        self._writer = self.open_writer()
        self._stats = counters.counter_group(f"output.{self.NAME}")
        self._lines = Metrics.counter("dnstap_receiver", f"output_{self.NAME}_lines")
        self._error_log = RateLimitedLog(log)

    def process(self, records):
        fmt = self._format
        writer = self._writer
        data = fmt.batch(records, writer.delimiter)
        try:
            with writer.lock:
                self._stats["bytes"] += writer.write_batch(data, lambda: [fmt.record(r) for r in records])
        except (OSError, ValueError) as exc:
            self._stats["dropped"] += len(records)
            self._log_error(exc, len(records))
            return
        self._stats["lines"] += len(records)
        self._lines.inc(len(records))

    def finish_bundle(self) -> None:
        try:
            with self._writer.lock:
                self._writer.flush()
        except (OSError, ValueError) as exc:
            self._log_error(exc, 0)

    def teardown(self) -> None:
        writer = getattr(self, "_writer", None)
        if writer is not None:
            self.finish_bundle()
            self.close_writer(writer)
            self._writer = None

    def _log_error(self, exc: Exception, lost: int) -> None:
        self._error_log(logging.ERROR, "output %s: write failed (%s); %d lines dropped", self.NAME, exc, lost)
