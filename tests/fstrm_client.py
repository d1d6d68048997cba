"""A blocking Frame Streams sender for the tests (no receiver code involved).

``FstrmClient`` speaks the sender side of Frame Streams over TCP, TLS or a unix
socket: READY/ACCEPT/START for a bidirectional stream, START alone for a
unidirectional one, data frames, STOP and (bidirectional) FINISH. Every blocking
call has a timeout, so a test that waits for the receiver cannot hang.
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
import time
from pathlib import Path

from core.framestream import (
    ACCEPT,
    CONTENT_TYPE_DNSTAP,
    FINISH,
    READY,
    START,
    STOP,
    ControlFrame,
    ReaderSession,
    encode_control,
    encode_data,
    parse_control,
)

CAPTURES = Path(__file__).resolve().parent / "data" / "captures"
IO_TIMEOUT = 10.0


def capture_frames(name: str = "unbound-tcp.fstrm") -> list[bytes]:
    """The dnstap payloads of a capture file, in order."""
    frames: list[bytes] = []
    session = ReaderSession()
    session.receive((CAPTURES / name).read_bytes(), frames)
    assert session.finished, f"{name}: capture does not end with STOP"
    return frames


def free_tcp_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def data_stream(payloads) -> bytes:
    return b"".join(encode_data(p) for p in payloads)


class ConnectionClosed(Exception):
    """The receiver closed (or reset) the connection."""


class FstrmClient:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(IO_TIMEOUT)

    # -- connecting -----------------------------------------------------------------

    @classmethod
    def tcp(cls, host: str, port: int, *, sndbuf: int | None = None) -> "FstrmClient":
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        if sndbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        sock.settimeout(IO_TIMEOUT)
        sock.connect((host, port))
        return cls(sock)

    @classmethod
    def tls(cls, host: str, port: int) -> "FstrmClient":
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        raw = socket.create_connection((host, port), timeout=IO_TIMEOUT)
        return cls(ctx.wrap_socket(raw, server_hostname=host))

    @classmethod
    def unix(cls, path: str | os.PathLike) -> "FstrmClient":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(IO_TIMEOUT)
        sock.connect(os.fspath(path))
        return cls(sock)

    # -- protocol ---------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            try:
                chunk = self.sock.recv(n - len(buf))
            except (ConnectionResetError, ssl.SSLError) as exc:
                raise ConnectionClosed(str(exc)) from None
            if not chunk:
                raise ConnectionClosed(f"closed after {len(buf)} of {n} bytes")
            buf += chunk
        return buf

    def read_control(self) -> ControlFrame:
        escape, length = struct.unpack(">II", self.read_exact(8))
        assert escape == 0, f"expected a control frame, got a data frame of {escape} bytes"
        return parse_control(self.read_exact(length))

    def handshake(self, content_types=(CONTENT_TYPE_DNSTAP,)) -> ControlFrame:
        """Bidirectional: READY, read ACCEPT, START. Returns the ACCEPT frame."""
        self.send(encode_control(READY, tuple(content_types)))
        accept = self.read_control()
        assert accept.type == ACCEPT, f"expected ACCEPT, got {accept.name}"
        self.send(encode_control(START, (CONTENT_TYPE_DNSTAP,)))
        return accept

    def start_unidirectional(self) -> None:
        self.send(encode_control(START, (CONTENT_TYPE_DNSTAP,)))

    def send_frames(self, payloads) -> None:
        self.send(data_stream(payloads))

    def stop(self, bidirectional: bool = True) -> None:
        """STOP; on a bidirectional stream, wait for FINISH."""
        self.send(encode_control(STOP))
        if bidirectional:
            finish = self.read_control()
            assert finish.type == FINISH, f"expected FINISH, got {finish.name}"

    def read_finish(self) -> None:
        frame = self.read_control()
        assert frame.type == FINISH, f"expected FINISH, got {frame.name}"

    def wait_closed(self, timeout: float = IO_TIMEOUT) -> bytes:
        """Read until the receiver closes the connection; returns the bytes read
        meanwhile. Raises AssertionError if it is still open after ``timeout``."""
        deadline = time.monotonic() + timeout
        got = b""
        while True:
            left = deadline - time.monotonic()
            assert left > 0, "the receiver did not close the connection"
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                return got
            except ssl.SSLError:
                return got
            except socket.timeout:
                continue
            if not chunk:
                return got
            got += chunk

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> "FstrmClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
