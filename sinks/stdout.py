"""WriteToStdout: records as text/json/yaml lines on standard output."""

from __future__ import annotations

import sys
import threading

import apache_beam as beam

from sinks.lines import LineWriterFn

__all__ = ["StdoutWriter", "WriteToStdout"]


class StdoutWriter:
    lock = threading.Lock()
    delimiter = b"\n"

    def write_batch(self, data: bytes, units) -> int:
        sys.stdout.buffer.write(data)
        return len(data)

    def flush(self) -> None:
        sys.stdout.buffer.flush()


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
