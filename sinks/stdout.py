"""WriteToStdout: records as text/json/yaml lines on standard output."""

from __future__ import annotations

import fcntl
import sys
import threading

import apache_beam as beam

from sinks.lines import LineWriterFn
from sinks.rotating import write_all

__all__ = ["StdoutWriter", "WriteToStdout"]


class StdoutWriter:
    """Each batch is one locked write: worker processes of a replay share the
    same standard output (a pipe, where writes past PIPE_BUF bytes could
    interleave), and ``flock`` on it orders them as it does for files."""

    lock = threading.Lock()
    delimiter = b"\n"

    def write_batch(self, data: bytes, units) -> int:
        fd = sys.stdout.fileno()
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            write_all(fd, data)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
        return len(data)

    def flush(self) -> None:
        """Nothing is buffered here."""


class _WriteStdoutFn(LineWriterFn):
    NAME = "stdout"

    def open_writer(self):
        return StdoutWriter()


class WriteToStdout(beam.PTransform):
    def __init__(self, *, format: str = "text") -> None:
        super().__init__()
        self._fn = _WriteStdoutFn(format)

    def expand(self, batches):
        return batches | "Write" >> beam.ParDo(self._fn)
