"""Frame Streams capture files (``fstrm_capture``, ``dnstap -w``): reading, no engine.

A capture file is one unidirectional stream: a START control frame (content
type ``protobuf:dnstap.Dnstap``), data frames, a STOP control frame. It may be
gzip-compressed (detected by its magic bytes, whatever its name).

``read_frames(stream, path)`` yields the data frame payloads in batches and,
once exhausted, tells whether the file was clean (STOP seen, nothing after it)
or damaged: ``reader.damage`` is then a :class:`CaptureDamage` with the byte
offset of the first frame that could not be read (an offset in the
uncompressed stream for gzip files). Every complete frame before the damage
is yielded; damage never raises. The parser is separate from
core.framestream.ReaderSession because a file needs exact offsets and must
not raise halfway through a batch.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from core.batches import FrameBatch
from core.errors import FrameStreamError
from core.framestream import (
    CONTENT_TYPE_DNSTAP,
    CONTROL_NAMES,
    MAX_CONTROL_FRAME_SIZE,
    START,
    STOP,
    parse_control,
)

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "MAX_CAPTURE_FRAME_SIZE",
    "CaptureDamage",
    "CaptureReader",
    "Damaged",
    "open_capture",
    "read_frames",
]

GZIP_MAGIC = b"\x1f\x8b"
DEFAULT_BATCH_SIZE = 512
# Far above any dnstap message; a length above it means the file is corrupt,
# and it bounds what one bad length word can make us buffer.
MAX_CAPTURE_FRAME_SIZE = 16 * 1024 * 1024
READ_SIZE = 256 * 1024

_U32 = struct.Struct(">I")


@dataclass(frozen=True)
class CaptureDamage:
    """Why reading ``path`` stopped early; ``offset``: where (see module doc)."""

    path: str
    offset: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: offset {self.offset}: {self.reason}"


class Damaged(Exception):
    """Raised inside a file reader (this module's and core/pcap.py's) at the
    first thing it cannot read; the reader turns it into its CaptureDamage."""

    def __init__(self, offset: int, reason: str) -> None:
        super().__init__(reason)
        self.offset = offset
        self.reason = reason

    @classmethod
    def unreadable(cls, offset: int, exc: BaseException) -> Damaged:
        """The file could not be read (or decompressed) past ``offset``."""
        kind = "corrupt gzip data" if isinstance(exc, zlib.error) else type(exc).__name__
        return cls(offset, f"unreadable ({kind}: {exc})")


def open_capture(path: str) -> BinaryIO:
    """``path`` opened for reading, decompressed if it starts with the gzip
    magic bytes. OSError if it cannot be opened. Either kind of stream has
    ``peek(n)``: the first bytes, to tell the file's format, without
    consuming them (it may raise what ``read`` raises)."""
    raw = open(path, "rb")  # noqa: SIM115  returned open
    try:
        magic = raw.read(2)
        raw.seek(0)
    except OSError:
        raw.close()
        raise
    if magic == GZIP_MAGIC:
        return _GzipStream(raw)  # type: ignore[return-value]
    return raw


class _GzipStream:
    """Decompressing reader that, unlike gzip.GzipFile, hands out everything
    decompressed before a truncation or corruption and only then raises
    (EOFError for a truncated stream, zlib.error for corrupt data).
    Concatenated gzip members are read one after the other."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._d = zlib.decompressobj(wbits=31)
        self._tail = b""  # compressed bytes not yet fed to the decompressor
        self._ahead = b""  # decompressed by peek, not yet read

    def peek(self, size: int = 1) -> bytes:
        """At least ``size`` bytes ahead (fewer at the end), not consumed."""
        while len(self._ahead) < size:
            more = self._decompress(size - len(self._ahead))
            if not more:
                break
            self._ahead += more
        return self._ahead

    def read(self, size: int = READ_SIZE) -> bytes:
        size = size if size and size > 0 else READ_SIZE
        if self._ahead:
            out, self._ahead = self._ahead[:size], self._ahead[size:]
            return out
        return self._decompress(size)

    def _decompress(self, size: int) -> bytes:
        while True:
            if self._d.eof:
                rest = self._d.unused_data or self._raw.read(READ_SIZE)
                if not rest:
                    return b""  # clean end after a complete member
                self._d = zlib.decompressobj(wbits=31)
                self._tail = rest
            data = self._tail or self._raw.read(READ_SIZE)
            if not data:
                raise EOFError("compressed file ended before the end-of-stream marker was reached")
            out = self._d.decompress(data, size)
            self._tail = self._d.unconsumed_tail
            if out:
                return out

    def close(self) -> None:
        self._raw.close()

    def __enter__(self) -> _GzipStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class CaptureReader:
    """Iterator over batches (FrameBatch, at most ``batch_size`` payloads) of
    one capture. After it is exhausted: ``clean`` (STOP seen), ``damage``
    (None when clean), ``frames`` (data frames yielded), ``offset`` (bytes
    consumed)."""

    # States
    WAIT_START, DATA, DONE = range(3)

    def __init__(
        self,
        stream: BinaryIO,
        path: str,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_frame_size: int = MAX_CAPTURE_FRAME_SIZE,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        self.path = path
        self.batch_size = batch_size
        self.max_frame_size = max_frame_size
        self.damage: CaptureDamage | None = None
        self.frames = 0
        self.offset = 0  # absolute offset of the first unparsed byte
        self.ignored_controls = 0
        self._stream = stream
        self._state = self.WAIT_START
        self._iter = self._run()

    @property
    def clean(self) -> bool:
        return self._state == self.DONE and self.damage is None

    def __iter__(self) -> Iterator[FrameBatch]:
        return self

    def __next__(self) -> FrameBatch:
        return next(self._iter)

    def _run(self) -> Iterator[FrameBatch]:
        batch = FrameBatch()
        buf = b""
        eof = False
        read_error = None
        while True:
            try:
                pos = self._parse(buf, batch)
            except Damaged as exc:
                if batch:
                    yield batch
                self._set_damage(exc)
                return
            if pos:
                self.offset += pos
                buf = buf[pos:]
            if len(batch) >= self.batch_size:
                yield batch
                batch = FrameBatch()
                continue
            if eof or self._state == self.DONE:
                break
            # Read only once the buffer holds no complete frame: it stays
            # about one read (or one frame) long.
            try:
                chunk = self._stream.read(READ_SIZE)
            except (OSError, EOFError, zlib.error) as exc:
                # Damaged compression: the frames decompressed so far still count.
                chunk, read_error = b"", exc
            eof = not chunk
            buf = buf + chunk if buf else chunk
        if batch:
            yield batch
        if read_error is not None:
            self._set_damage(Damaged.unreadable(self.offset, read_error))
        elif self._state == self.DONE:
            if buf or self._read_more():
                self._set_damage(Damaged(self.offset, "data after STOP"))
        elif buf:
            self._set_damage(Damaged(self.offset, f"truncated frame ({len(buf)} bytes at end of file)"))
        elif self._state == self.WAIT_START:
            self._set_damage(Damaged(self.offset, "missing START (empty file)" if not self.offset else "missing START"))
        else:
            self._set_damage(Damaged(self.offset, f"missing STOP (file ends after {self.frames} frames)"))

    def _read_more(self) -> bool:
        try:
            return bool(self._stream.read(1))
        except (OSError, EOFError, zlib.error):
            return True

    def _set_damage(self, exc: Damaged) -> None:
        if self.damage is None:
            self.damage = CaptureDamage(self.path, exc.offset, exc.reason)

    def _parse(self, data: bytes, batch: FrameBatch) -> int:
        """Append complete data frames of ``data`` to ``batch``; the position
        after the last complete frame. Stops at STOP (the rest is checked by
        the caller) and after ``batch_size`` frames (keeps batches bounded)."""
        pos, n = 0, len(data)
        unpack_from = _U32.unpack_from
        append = batch.append
        limit = self.batch_size
        base = self.offset
        while n - pos >= 4 and self._state != self.DONE and len(batch) < limit:
            (length,) = unpack_from(data, pos)
            if length:
                if self._state != self.DATA:
                    raise Damaged(base + pos, f"missing START (data frame of {length} bytes first)")
                if length > self.max_frame_size:
                    raise Damaged(base + pos, f"frame of {length} bytes exceeds the limit of "
                                               f"{self.max_frame_size} bytes")
                end = pos + 4 + length
                if end > n:
                    break
                append(data[pos + 4 : end])
                self.frames += 1
                pos = end
                continue
            if n - pos < 8:
                break
            (clen,) = unpack_from(data, pos + 4)
            if clen > MAX_CONTROL_FRAME_SIZE:
                raise Damaged(base + pos, f"bad control frame: length {clen} exceeds "
                                           f"{MAX_CONTROL_FRAME_SIZE} bytes")
            end = pos + 8 + clen
            if end > n:
                break
            self._on_control(data[pos + 8 : end], base + pos)
            pos = end
        return pos

    def _on_control(self, body: bytes, offset: int) -> None:
        try:
            frame = parse_control(body)
        except FrameStreamError as exc:
            raise Damaged(offset, f"bad control frame: {exc}") from None
        if frame.type == START and self._state == self.WAIT_START:
            # The spec lets START omit the content type; when named it must be dnstap.
            if frame.content_types and CONTENT_TYPE_DNSTAP not in frame.content_types:
                offered = b", ".join(frame.content_types).decode("ascii", "replace")
                raise Damaged(offset, f"wrong content type {offered} (expected "
                                       f"{CONTENT_TYPE_DNSTAP.decode()})")
            self._state = self.DATA
        elif frame.type == STOP and self._state == self.DATA:
            self._state = self.DONE
        elif frame.type in CONTROL_NAMES:
            where = "before START" if self._state == self.WAIT_START else "in the data"
            raise Damaged(offset, f"bad control frame: unexpected {frame.name} {where}")
        elif self._state == self.WAIT_START:
            raise Damaged(offset, f"missing START ({frame.name} control frame first)")
        else:
            self.ignored_controls += 1  # unknown control types are skipped, as fstrm does


def read_frames(
    stream: BinaryIO | bytes,
    path: str,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_frame_size: int = MAX_CAPTURE_FRAME_SIZE,
) -> CaptureReader:
    """Batches of the data frame payloads of the capture in ``stream`` (a
    binary file object, or bytes); see :class:`CaptureReader`."""
    if isinstance(stream, (bytes, bytearray, memoryview)):
        stream = io.BytesIO(bytes(stream))
    return CaptureReader(stream, path, batch_size, max_frame_size)
