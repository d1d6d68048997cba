"""A size-rotated output file shared by every writer of the same path in the process.

Rotation follows logging.handlers.RotatingFileHandler's naming (``FILE`` is
the current file, ``FILE.1`` the newest backup, up to ``FILE.<count>``), but
only ever happens between two whole lines, so no line is split or lost.
"""

from __future__ import annotations

import os
import threading

from sinks.shared import SharedRegistry

__all__ = ["RotatingFile", "open_shared", "shift_backups"]

_BUFFER = 1 << 20


class RotatingFile:
    def __init__(self, path: str, max_size: int = 0, count: int = 10, delimiter: bytes = b"\n") -> None:
        if max_size > 0 and count < 1:
            raise ValueError("file-count must be at least 1 when file-max-size is set")
        self.path = path
        self.max_size = max_size
        self.count = count
        self.delimiter = delimiter
        self.rotations = 0
        self.lock = threading.Lock()
        self._file = open(path, "ab", buffering=_BUFFER)
        self._size = self._file.tell()

    def write_batch(self, data: bytes, units) -> int:
        """Write ``data``: whole units (lines, YAML documents), each followed by
        the delimiter. ``units()`` returns them one by one; it is called only
        when this batch crosses a rotation, to cut it between two units."""
        if not data:
            return 0
        if not self.max_size or self._size + len(data) <= self.max_size:
            self._file.write(data)
            self._size += len(data)
            return len(data)
        return self.write_lines(units())

    def write_lines(self, lines: list[bytes]) -> int:
        """Write each line followed by the delimiter; returns bytes written."""
        if not lines:
            return 0  # else the no-rotation path below would write an empty line
        delim = self.delimiter
        if not self.max_size:
            data = delim.join(lines) + delim
            self._file.write(data)
            self._size += len(data)
            return len(data)
        written = 0
        start = 0
        size = self._size
        extra = len(delim)
        for i, line in enumerate(lines):
            step = len(line) + extra
            if size + step > self.max_size and size > 0:
                if i > start:
                    written += self._write(lines[start:i])
                self._rotate()
                start = i
                size = 0
            size += step
        if start < len(lines):
            written += self._write(lines[start:])
        return written

    def _write(self, lines: list[bytes]) -> int:
        data = self.delimiter.join(lines) + self.delimiter
        self._file.write(data)
        self._size += len(data)
        return len(data)

    def _rotate(self) -> None:
        self._file.close()
        shift_backups(self.path, self.count)
        self._file = open(self.path, "ab", buffering=_BUFFER)
        self._size = 0
        self.rotations += 1

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


def shift_backups(path: str, count: int) -> None:
    """``path`` becomes ``path.1``, ``path.1`` becomes ``path.2``... up to
    ``path.<count>`` (the oldest beyond is overwritten)."""
    for i in range(count - 1, 0, -1):
        src = f"{path}.{i}"
        if os.path.exists(src):
            os.replace(src, f"{path}.{i + 1}")
    try:
        os.replace(path, f"{path}.1")
    except FileNotFoundError:  # removed behind our back: nothing to keep, go on
        pass


_OPEN = SharedRegistry()


def open_shared(path: str, max_size: int, count: int) -> RotatingFile:
    """The process's writer for ``path``: DoFn instances come and go (and may
    overlap) on a runner, but one file must have one size count and one rotation."""
    return _OPEN.acquire(
        os.path.abspath(path), lambda: RotatingFile(path, max_size, count), stale=lambda rf: rf._file.closed
    )


def release_shared(rf: RotatingFile) -> None:
    last = _OPEN.release(os.path.abspath(rf.path))
    if last is not None:
        with last.lock:
            last.close()
