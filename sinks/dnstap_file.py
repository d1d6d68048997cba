"""WriteToDnstapFile: the original dnstap messages in Frame Streams files
(``output.dnstap-file``), as ``fstrm_capture``, ``dnstap -w`` and the DNS
servers' own file outputs write them: START (content type
``protobuf:dnstap.Dnstap``), data frames, STOP. ``dnstap-ldns -r``,
``dnstap -r`` and ``fstrm_dump`` read them, and ``--replay`` replays them.

Rotation by size (``file-max-size``, between two frames) and by time
(``rotate-interval`` seconds, checked at each write and at each bundle end,
about once a second): the current file gets its STOP and becomes ``FILE.1``
(``FILE.1`` becomes ``FILE.2``... up to ``FILE.<file-count>``, as the text
file output), and a new ``FILE`` starts with START. Every file is a complete
stream on its own. A file left by an earlier run is rotated away at start
rather than appended to: a second stream after a STOP would be invisible to
the readers.

Records must carry ``raw`` (the pipeline decodes with ``keep_raw=True`` when
this output is on); a record without it is counted (``no_raw``) and skipped.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import apache_beam as beam
from apache_beam.metrics import Metrics

from core import counters
from core.framestream import CONTENT_TYPE_DNSTAP, START, STOP, encode_control
from sinks.dnstap import encode_frames
from sinks.rotating import shift_backups
from sinks.shared import SharedRegistry

__all__ = ["FrameStreamFile", "WriteToDnstapFile"]

log = logging.getLogger("dnstap_receiver.output")

_START = encode_control(START, [CONTENT_TYPE_DNSTAP])
_STOP = encode_control(STOP)
_BUFFER = 1 << 20


class FrameStreamFile:
    """A size- and time-rotated Frame Streams file (one writer at a time:
    callers hold ``lock``)."""

    def __init__(self, path: str, max_size: int = 0, count: int = 10, interval: float = 0.0, clock=time.time) -> None:
        if (max_size > 0 or interval > 0) and count < 1:
            raise ValueError("file-count must be at least 1 when rotating")
        self.path = path
        self.max_size = max_size
        self.count = count
        self.interval = interval
        self.clock = clock
        self.lock = threading.Lock()
        self.rotations = 0
        if os.path.exists(path) and os.path.getsize(path) > 0:
            shift_backups(path, max(count, 1))
        self._open()

    def _open(self) -> None:
        self._file = open(self.path, "wb", buffering=_BUFFER)
        self._file.write(_START)
        self._size = len(_START)
        self._frames = 0
        self._opened = self.clock()

    def write(self, frames: list[bytes]) -> int:
        """Append the frames as data frames; returns bytes written."""
        self.rotate_if_due()
        written = 0
        out = self._file
        limit = self.max_size - len(_STOP) if self.max_size else 0
        for payload in frames:
            size = len(payload) + 4
            if limit and self._frames and self._size + size > limit:
                self._rotate()
                out = self._file
            out.write(len(payload).to_bytes(4, "big"))
            out.write(payload)
            self._size += size
            self._frames += 1
            written += size
        return written

    def rotate_if_due(self) -> None:
        if self.interval and self._frames and self.clock() - self._opened >= self.interval:
            self._rotate()

    def _rotate(self) -> None:
        self._finish()
        shift_backups(self.path, self.count)
        self._open()
        self.rotations += 1

    def _finish(self) -> None:
        self._file.write(_STOP)
        self._file.close()

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._finish()


_OPEN = SharedRegistry()


def _acquire(path: str, max_size: int, count: int, interval: float) -> FrameStreamFile:
    return _OPEN.acquire(os.path.abspath(path), lambda: FrameStreamFile(path, max_size, count, interval))


def _release(writer: FrameStreamFile) -> None:
    last = _OPEN.release(os.path.abspath(writer.path))
    if last is not None:
        with last.lock:
            last.close()


class _WriteDnstapFileFn(beam.DoFn):
    def __init__(self, path: str, max_size: int, count: int, interval: float) -> None:
        self._path = path
        self._max_size = max_size
        self._count = count
        self._interval = interval

    def setup(self) -> None:
        self._writer = _acquire(self._path, self._max_size, self._count, self._interval)
        self._stats = counters.counter_group("output.dnstap-file")
        self._frames = Metrics.counter("dnstap_receiver", "output_dnstap_file_frames")

    def process(self, records):
        frames, missing = encode_frames(records, None)
        if missing:
            self._stats["no_raw"] += missing
        if not frames:
            return
        try:
            with self._writer.lock:
                self._stats["bytes"] += self._writer.write(frames)
        except OSError as exc:
            self._stats["dropped"] += len(frames)
            log.error("output dnstap-file: writing %s failed (%s); %d messages dropped", self._path, exc, len(frames))
            return
        self._stats["frames"] += len(frames)
        self._frames.inc(len(frames))

    def finish_bundle(self) -> None:
        try:
            with self._writer.lock:
                self._writer.rotate_if_due()
                self._writer.flush()
        except OSError as exc:
            log.error("output dnstap-file: writing %s failed (%s)", self._path, exc)

    def teardown(self) -> None:
        writer = getattr(self, "_writer", None)
        if writer is not None:
            self._writer = None
            _release(writer)


class WriteToDnstapFile(beam.PTransform):
    """Write the original dnstap messages of the records to Frame Streams
    files at ``options.file`` (a pipeline.config.DnstapFileOutput)."""

    def __init__(self, options) -> None:
        super().__init__()
        self._fn = _WriteDnstapFileFn(options.file, options.file_max_size, options.file_count,
                                      options.rotate_interval)

    def expand(self, batches):
        return batches | "Write" >> beam.ParDo(self._fn)
