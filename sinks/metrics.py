"""WriteMetrics: 4.7.0's metrics output, one summary line every ``interval`` seconds.

    2026-11-29 10:20:00,123 1003 QUERIES, 100.3 QPS, 408 DOMAINS, 1 CLIENTS, 1003 INET, 0 INET6, 1003 UDP, 0 TCP

The sink keeps a small accumulator of its own (query counts and two
HyperLogLogs), so it works with the statistics off and in batch replay alike.
``cumulative`` counts since start; otherwise each line covers its interval.
Lines go to stdout or to a size-rotated file.
"""

from __future__ import annotations

import time
from datetime import datetime

import apache_beam as beam

from core.sketches import HyperLogLog
from sinks.rotating import open_shared, release_shared
from sinks.stdout import StdoutWriter

__all__ = ["MetricsLine", "WriteMetrics"]


class MetricsLine:
    """The numbers of one metrics line, over the queries added."""

    def __init__(self) -> None:
        self.queries = self.inet = self.inet6 = self.udp = self.tcp = 0
        self.clients = HyperLogLog()
        self.domains = HyperLogLog()

    def add_batch(self, records) -> None:
        clients, domains = [], []
        for rec in records:
            if rec["type"] != "query":
                continue
            self.queries += 1
            family, protocol = rec["family"], rec["protocol"]
            if family == "INET":
                self.inet += 1
            elif family == "INET6":
                self.inet6 += 1
            if protocol == "UDP":
                self.udp += 1
            elif protocol == "TCP":
                self.tcp += 1
            if rec["query-ip"] != "-":
                clients.append(rec["query-ip"])
            if rec["qname"] != "-":
                domains.append(rec["qname"])
        self.clients.update(clients)
        self.domains.update(domains)

    def text(self, seconds: float) -> str:
        qps = self.queries / seconds if seconds > 0 else 0.0
        return (
            f"{self.queries} QUERIES, {qps:.1f} QPS, {self.domains.count()} DOMAINS, "
            f"{self.clients.count()} CLIENTS, {self.inet} INET, {self.inet6} INET6, "
            f"{self.udp} UDP, {self.tcp} TCP"
        )


def _stamp(now: float) -> str:
    """4.7.0's log time format: 2020-10-13 05:19:35,522 (local time)."""
    moment = datetime.fromtimestamp(now)
    return f"{moment:%Y-%m-%d %H:%M:%S},{moment.microsecond // 1000:03d}"


class _WriteMetricsFn(beam.DoFn):
    def __init__(self, interval: float, cumulative: bool, path: str | None, max_size: int, count: int) -> None:
        self._interval = interval
        self._cumulative = cumulative
        self._path = path
        self._max_size = max_size
        self._count = count

    def setup(self) -> None:
        self._writer = open_shared(self._path, self._max_size, self._count) if self._path else StdoutWriter()
        self._line = MetricsLine()
        self._since = self._last = time.time()

    def process(self, records):
        self._line.add_batch(records)
        self._maybe_write()

    def finish_bundle(self) -> None:
        self._maybe_write()  # live, bundles end about once a second even when idle

    def _maybe_write(self) -> None:
        now = time.time()
        if now - self._last < self._interval:
            return
        start = self._since if self._cumulative else self._last
        line = f"{_stamp(now)} {self._line.text(now - start)}".encode()
        writer = self._writer
        with writer.lock:
            writer.write_batch(line + writer.delimiter, lambda: [line])
            writer.flush()
        self._last = now
        if not self._cumulative:
            self._line = MetricsLine()

    def teardown(self) -> None:
        writer = getattr(self, "_writer", None)
        if writer is not None:
            release_shared(writer) if self._path else writer.close()
        self._writer = None


class WriteMetrics(beam.PTransform):
    """One metrics line every ``interval`` seconds, to ``path`` (rotated at
    ``max_size`` bytes, ``count`` files kept) or to stdout when ``path`` is None."""

    def __init__(
        self, *, interval: float, cumulative: bool = True, path: str | None = None,
        max_size: int = 10 << 20, count: int = 10,
    ) -> None:
        super().__init__()
        if interval <= 0:
            raise ValueError("interval must be > 0")
        self._fn = _WriteMetricsFn(interval, cumulative, path, max_size, count)

    def expand(self, batches):
        return batches | "Write" >> beam.ParDo(self._fn)
