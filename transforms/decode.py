"""DecodeDnstap: batches of raw dnstap frames -> batches of records."""

from __future__ import annotations

import logging

import apache_beam as beam
from apache_beam.metrics import Metrics

from core import counters
from core.message import UndecodableMessage, decode
from core.ratelimit import RateLimitedLog
from transforms.batches import RecordBatch

__all__ = ["DecodeDnstap", "decode_batch"]

log = logging.getLogger("dnstap_receiver.decode")

STATS = counters.counter_group("decode")
_warn = RateLimitedLog(log)  # about undecodable frames


def decode_batch(frames: list[bytes], keep_raw: bool = False) -> RecordBatch:
    """Decode every frame; undecodable ones are counted, logged and skipped.
    ``keep_raw``: see core.message.decode."""
    records = RecordBatch()
    append = records.append
    malformed = 0
    for frame in frames:
        try:
            rec = decode(frame, keep_raw)
        except UndecodableMessage as exc:
            STATS["undecodable"] += 1
            _warn(logging.WARNING, "skipping a frame of %d bytes: %s", len(frame), exc)
            continue
        if rec["malformed"]:
            malformed += 1
        append(rec)
    STATS["decoded"] += len(records)
    if malformed:
        STATS["malformed"] += malformed
    return records


class _DecodeFn(beam.DoFn):
    def __init__(self, keep_raw: bool) -> None:
        self._keep_raw = keep_raw

    def setup(self) -> None:
        self._decoded = Metrics.counter("dnstap_receiver", "decoded")
        self._skipped = Metrics.counter("dnstap_receiver", "undecodable")

    def process(self, frames):
        records = decode_batch(frames, self._keep_raw)
        self._decoded.inc(len(records))
        if len(records) != len(frames):
            self._skipped.inc(len(frames) - len(records))
        if records:
            yield records


class DecodeDnstap(beam.PTransform):
    """Batches of dnstap protobuf frames in, batches of records out; with
    ``keep_raw`` (an output forwards dnstap) each keeps its frame in ``raw``."""

    def __init__(self, keep_raw: bool = False, label: str | None = None) -> None:
        super().__init__(label)
        self._keep_raw = keep_raw

    def expand(self, frames):
        return frames | "Decode" >> beam.ParDo(_DecodeFn(self._keep_raw)).with_output_types(RecordBatch)
