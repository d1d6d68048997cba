"""A size-rotated output file, safe to share between threads and processes.

Rotation follows logging.handlers.RotatingFileHandler's naming (``FILE`` is
the current file, ``FILE.1`` the newest backup, up to ``FILE.<count>``), but
only ever happens between two whole lines, so no line is split or lost.

Several processes may write the same path (a replay spread over worker
processes, see pipeline/replay.py): every batch is one ``write`` to a file
opened with O_APPEND, made while holding an exclusive ``flock`` on the
current file. Under the lock the writer checks that its descriptor is still
the file at ``path`` (another process may have rotated it: reopen) and takes
the size from the file itself, so one process's rotation is seen by all and
two processes never rotate the same file. There is no userspace buffer to
interleave: a batch is already hundreds of lines, one system call.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Iterator

from sinks.shared import SharedRegistry

__all__ = ["RotatingFile", "open_shared", "shift_backups", "write_all"]

_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC


def write_all(fd: int, data: bytes) -> None:
    """``os.write`` until all of ``data`` is written (a write may be partial)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class RotatingFile:
    def __init__(self, path: str, max_size: int = 0, count: int = 10, delimiter: bytes = b"\n") -> None:
        if max_size > 0 and count < 1:
            raise ValueError("file-count must be at least 1 when file-max-size is set")
        self.path = path
        self.max_size = max_size
        self.count = count
        self.delimiter = delimiter
        self.rotations = 0
        self.lock = threading.Lock()  # the threads of this process; flock orders the processes
        self._closed = False
        self._fd = os.open(path, _FLAGS, 0o644)

    @property
    def closed(self) -> bool:
        return self._closed

    def write_batch(self, data: bytes, units) -> int:
        """Write ``data``: whole units (lines, YAML documents), each followed by
        the delimiter. ``units()`` returns them one by one; it is called only
        when this batch crosses a rotation, to cut it between two units."""
        if not data:
            return 0
        with self._locked() as size:
            if not self.max_size or size + len(data) <= self.max_size:
                write_all(self._fd, data)
                return len(data)
            return self._write_lines(units(), size)

    def write_lines(self, lines: list[bytes]) -> int:
        """Write each line followed by the delimiter; returns bytes written."""
        if not lines:
            return 0  # else the no-rotation path below would write an empty line
        with self._locked() as size:
            return self._write_lines(lines, size)

    def _write_lines(self, lines: list[bytes], size: int) -> int:
        if not self.max_size:
            return self._write(lines)
        written = 0
        start = 0
        extra = len(self.delimiter)
        for i, line in enumerate(lines):
            step = len(line) + extra
            if size + step > self.max_size and size > 0:
                if i > start:
                    written += self._write(lines[start:i])
                start = i
                # Another process may have filled the new file between our
                # rename and our lock: rotate until the line fits.
                size = self._rotate()
                while size + step > self.max_size and size > 0:
                    size = self._rotate()
            size += step
        if start < len(lines):
            written += self._write(lines[start:])
        return written

    def _write(self, lines: list[bytes]) -> int:
        data = self.delimiter.join(lines) + self.delimiter
        write_all(self._fd, data)
        return len(data)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[int]:
        """Holds the lock of the file at ``path`` (reopened if another process
        rotated or removed it); gives its size."""
        if self._closed:
            raise ValueError(f"{self.path}: write to a closed file")
        size = self._lock_current()
        try:
            yield size
        finally:
            if self._fd >= 0:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _lock_current(self) -> int:
        while True:
            if self._fd < 0:  # rotated or removed, or a reopen failed (directory gone, no descriptors left)
                self._fd = os.open(self.path, _FLAGS, 0o644)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            mine = os.fstat(self._fd)
            try:
                at_path = os.stat(self.path)
            except FileNotFoundError:
                at_path = None
            if at_path is not None and (at_path.st_ino, at_path.st_dev) == (mine.st_ino, mine.st_dev):
                return mine.st_size
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = -1

    def _rotate(self) -> int:
        """Called holding the lock of the current file, so no other process
        rotates it; returns the size of the new current file, which another
        process may have created and written between the rename and here."""
        shift_backups(self.path, self.count)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        self.rotations += 1
        return self._lock_current()

    def flush(self) -> None:
        """Nothing is buffered here (see the module docstring)."""

    def close(self) -> None:
        self._closed = True
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


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
        os.path.abspath(path), lambda: RotatingFile(path, max_size, count), stale=lambda rf: rf.closed
    )


def release_shared(rf: RotatingFile) -> None:
    last = _OPEN.release(os.path.abspath(rf.path))
    if last is not None:
        with last.lock:
            last.close()
