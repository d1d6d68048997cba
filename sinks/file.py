"""WriteToFile: records as text/json/yaml lines in a size-rotated file."""

from __future__ import annotations

import apache_beam as beam

from sinks.lines import LineWriterFn
from sinks.rotating import open_shared, release_shared

__all__ = ["WriteToFile"]


class _WriteFileFn(LineWriterFn):
    NAME = "file"

    def __init__(self, path: str, fmt: str, max_size: int, count: int) -> None:
        super().__init__(fmt)
        self._path = path
        self._max_size = max_size
        self._count = count

    def open_writer(self):
        return open_shared(self._path, self._max_size, self._count)

    def close_writer(self, writer) -> None:
        release_shared(writer)


class WriteToFile(beam.PTransform):
    """Write batches of records to ``path``, rotated at ``max_size`` bytes
    (0: never) keeping ``count`` old files."""

    def __init__(self, path: str, *, format: str = "text", max_size: int = 0, count: int = 10) -> None:
        super().__init__()
        if max_size < 0 or (max_size and count < 1):
            raise ValueError("max_size must be >= 0 and count >= 1 when rotating")
        self._fn = _WriteFileFn(path, format, max_size, count)

    def expand(self, batches):
        return batches | "Write" >> beam.ParDo(self._fn)
