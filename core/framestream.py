"""Frame Streams (fstrm) codec: encoding helpers and a sans-IO reader session.

Wire format: a data frame is a 32-bit big-endian length followed by that many
bytes. A length of zero is an escape: a 32-bit control frame length and a
control frame follow (32-bit type, then fields of 32-bit type, 32-bit length,
value). The reader session below is transport-agnostic: the socket servers,
the TCP client and the capture file reader all feed it bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from core.errors import ContentTypeMismatch, FrameStreamError, FrameTooLarge, UnexpectedFrame

__all__ = [
    "ACCEPT",
    "CONTENT_TYPE_DNSTAP",
    "ControlFrame",
    "DEFAULT_MAX_FRAME_SIZE",
    "FINISH",
    "READY",
    "ReaderSession",
    "START",
    "STOP",
    "encode_control",
    "encode_data",
    "encode_stream",
    "parse_control",
]

ACCEPT = 0x01
START = 0x02
STOP = 0x03
READY = 0x04
FINISH = 0x05
CONTROL_NAMES = {ACCEPT: "ACCEPT", START: "START", STOP: "STOP", READY: "READY", FINISH: "FINISH"}

FIELD_CONTENT_TYPE = 0x01
CONTENT_TYPE_DNSTAP = b"protobuf:dnstap.Dnstap"

# libfstrm refuses control frames above 512 bytes; so do we, before buffering them.
MAX_CONTROL_FRAME_SIZE = 512
DEFAULT_MAX_FRAME_SIZE = 1024 * 1024

_U32 = struct.Struct(">I")
_U32_PAIR = struct.Struct(">II")


@dataclass(frozen=True)
class ControlFrame:
    type: int
    content_types: tuple[bytes, ...] = field(default=())

    @property
    def name(self) -> str:
        return CONTROL_NAMES.get(self.type, f"UNKNOWN({self.type})")


def encode_data(payload: bytes) -> bytes:
    """One data frame. An empty payload would read as an escape, so it is refused."""
    if not payload:
        raise ValueError("a Frame Streams data frame cannot be empty")
    return _U32.pack(len(payload)) + payload


def encode_control(ctype: int, content_types: tuple[bytes, ...] | list[bytes] = ()) -> bytes:
    body = _U32.pack(ctype) + b"".join(
        _U32_PAIR.pack(FIELD_CONTENT_TYPE, len(ct)) + ct for ct in content_types
    )
    return _U32_PAIR.pack(0, len(body)) + body


def encode_stream(payloads, content_type: bytes = CONTENT_TYPE_DNSTAP) -> bytes:
    """A complete unidirectional stream (the capture file layout): START, data, STOP."""
    return b"".join(
        [encode_control(START, (content_type,))]
        + [encode_data(p) for p in payloads]
        + [encode_control(STOP)]
    )


def parse_control(body: bytes) -> ControlFrame:
    """Parse a control frame body (without the escape and length words)."""
    if len(body) < 4:
        raise FrameStreamError(f"control frame of {len(body)} bytes is too short")
    (ctype,) = _U32.unpack_from(body, 0)
    pos, end = 4, len(body)
    types = []
    while pos < end:
        if end - pos < 8:
            raise FrameStreamError("truncated control frame field")
        ftype, flen = _U32_PAIR.unpack_from(body, pos)
        pos += 8
        if flen > end - pos:
            raise FrameStreamError("control frame field overruns the frame")
        if ftype == FIELD_CONTENT_TYPE:
            types.append(body[pos : pos + flen])
        pos += flen
    return ControlFrame(ctype, tuple(types))


class ReaderSession:
    """The receiving end of one Frame Streams connection, without any I/O.

    ``receive(chunk, frames)`` appends every complete data frame in ``chunk`` to
    ``frames`` and returns the bytes to write back to the sender (ACCEPT after
    READY, FINISH after STOP on a bidirectional stream). Protocol errors raise a
    :class:`FrameStreamError`; the caller drops the connection. Bytes of a frame
    not yet complete stay buffered here (bounded by the maximum frame size) and
    are reported by :attr:`pending` so that a disconnect can count them.
    """

    # States. WAIT_START: after ACCEPT (bidirectional) and before any data.
    HANDSHAKE, WAIT_START, DATA, DONE = range(4)

    def __init__(
        self,
        content_type: bytes = CONTENT_TYPE_DNSTAP,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    ) -> None:
        self.content_type = content_type
        self.max_frame_size = max_frame_size
        self.state = self.HANDSHAKE
        self.bidirectional = False
        self.ignored_controls = 0
        self._buf = b""

    @property
    def pending(self) -> int:
        """Bytes received but not yet part of a complete frame."""
        return len(self._buf)

    @property
    def finished(self) -> bool:
        return self.state == self.DONE

    def receive(self, chunk: bytes, frames: list) -> bytes:
        data = self._buf + chunk if self._buf else chunk
        pos, n = 0, len(data)
        reply = b""
        max_size = self.max_frame_size
        unpack_from = _U32.unpack_from
        append = frames.append
        while n - pos >= 4 and self.state != self.DONE:
            (length,) = unpack_from(data, pos)
            if length:
                if self.state != self.DATA:
                    raise UnexpectedFrame(f"data frame before START ({length} bytes)")
                if length > max_size:
                    raise FrameTooLarge(
                        f"frame of {length} bytes exceeds the maximum of {max_size} bytes"
                    )
                end = pos + 4 + length
                if end > n:
                    break
                append(data[pos + 4 : end])
                pos = end
                continue
            if n - pos < 8:
                break
            (clen,) = unpack_from(data, pos + 4)
            if clen > MAX_CONTROL_FRAME_SIZE:
                raise FrameTooLarge(
                    f"control frame of {clen} bytes exceeds {MAX_CONTROL_FRAME_SIZE} bytes"
                )
            end = pos + 8 + clen
            if end > n:
                break
            reply += self._on_control(parse_control(data[pos + 8 : end]))
            pos = end
        if pos < n and self.state == self.DONE:
            # Nothing may follow STOP; keeping it would buffer without bound.
            self._buf = b""
            raise UnexpectedFrame(f"{n - pos} bytes after STOP")
        self._buf = data[pos:] if pos < n else b""
        return reply

    def _on_control(self, frame: ControlFrame) -> bytes:
        state, ctype = self.state, frame.type
        if ctype == READY and state == self.HANDSHAKE:
            self._check_content_type(frame, "READY")
            self.bidirectional = True
            self.state = self.WAIT_START
            return encode_control(ACCEPT, (self.content_type,))
        if ctype == START and state in (self.HANDSHAKE, self.WAIT_START):
            # START may omit the content type; when it names one it must be ours.
            if frame.content_types:
                self._check_content_type(frame, "START")
            self.state = self.DATA
            return b""
        if ctype == STOP and state in (self.DATA, self.WAIT_START):
            self.state = self.DONE
            return encode_control(FINISH) if self.bidirectional else b""
        if ctype in CONTROL_NAMES:
            raise UnexpectedFrame(f"unexpected {frame.name} control frame")
        self.ignored_controls += 1
        return b""

    def _check_content_type(self, frame: ControlFrame, what: str) -> None:
        if self.content_type not in frame.content_types:
            offered = b", ".join(frame.content_types).decode("ascii", "replace") or "none"
            raise ContentTypeMismatch(
                f"{what} offers content type(s) {offered}; expected "
                f"{self.content_type.decode('ascii')}"
            )
