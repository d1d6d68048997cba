"""A progress board shared by the processes of one replay.

The replay's worker processes (pipeline/replay.py) each read some of the
files; the process that draws the progress line cannot see their counters.
The board is a small file of one 16-byte slot per input file (frames read so
far, done flag), each slot written only by the process reading that file, so
no locking is needed: the reader of the board sums the slots. A worker on
another host cannot open the file and simply does not report (the line then
shows the time only, as before).
"""

from __future__ import annotations

import mmap
import os
import struct

__all__ = ["ProgressBoard"]

_SLOT = struct.Struct("=QQ")  # frames, done


class ProgressBoard:
    def __init__(self, path: str, slots: int, create: bool = False) -> None:
        self.path = path
        self.slots = slots
        size = max(1, slots) * _SLOT.size
        if create:
            with open(path, "wb") as fh:
                fh.truncate(size)
        fd = os.open(path, os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)

    @classmethod
    def attach(cls, path: str | None, slots: int) -> ProgressBoard | None:
        """The board at ``path`` for a writer, or None if there is none here."""
        if not path:
            return None
        try:
            return cls(path, slots)
        except (OSError, ValueError):
            return None

    def report(self, slot: int, frames: int, done: bool = False) -> None:
        _SLOT.pack_into(self._map, slot * _SLOT.size, frames, int(done))

    def totals(self) -> tuple[int, int]:
        """(files done, frames read) over all slots."""
        files = frames = 0
        for slot in range(self.slots):
            n, done = _SLOT.unpack_from(self._map, slot * _SLOT.size)
            frames += n
            files += done
        return files, frames

    def close(self) -> None:
        self._map.close()
