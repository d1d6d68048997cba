"""WriteToStdout: records as text/json/yaml lines on standard output."""

from __future__ import annotations

import fcntl
import os
import sys
import threading

import apache_beam as beam

from sinks.lines import LineWriterFn
from sinks.rotating import write_all

__all__ = ["STDOUT_LOCK_ENV", "StdoutWriter", "WriteToStdout"]

STDOUT_LOCK_ENV = "DNSTAP_RECEIVER_STDOUT_LOCK"


class StdoutWriter:
    """Each batch is one write. Worker processes of a replay share standard
    output (a pipe, where writes past PIPE_BUF bytes could interleave), and
    through one open file description, so a ``flock`` on it would not exclude
    them: they order their writes with a ``flock`` on the lock file named by
    ``STDOUT_LOCK_ENV``, which each process opens for itself."""

    lock = threading.Lock()  # the threads of this process
    delimiter = b"\n"

    def __init__(self) -> None:
        path = os.environ.get(STDOUT_LOCK_ENV)
        self._lock_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC) if path else -1

    def write_batch(self, data: bytes, units) -> int:
        fd = sys.stdout.fileno()
        if self._lock_fd < 0:
            write_all(fd, data)
            return len(data)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            write_all(fd, data)
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        return len(data)

    def flush(self) -> None:
        """Nothing is buffered here."""

    def close(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


class _WriteStdoutFn(LineWriterFn):
    NAME = "stdout"

    def open_writer(self):
        return StdoutWriter()

    def close_writer(self, writer) -> None:
        writer.close()


class WriteToStdout(beam.PTransform):
    def __init__(self, *, format: str = "text") -> None:
        super().__init__()
        self._fn = _WriteStdoutFn(format)

    def expand(self, batches):
        return batches | "Write" >> beam.ParDo(self._fn)
