"""A Frame Streams sender that listens: the remote end of ``input.tcp-client``.

``FstrmSender`` listens on a loopback address (IPv4 or IPv6, optionally TLS)
and, from a thread per connection, streams a list of dnstap payloads to every
reader that connects: bidirectionally (READY, expects ACCEPT, START, data,
STOP, expects FINISH) or unidirectionally (START, data, STOP). Each connection
is recorded as a :class:`Session` (frames sent, the ACCEPT, whether FINISH
came, any error) so that a test can check what the reader answered. Options
reproduce what a reader must survive: a remote that closes in the middle of a
frame, one that offers another content type, one that streams slowly and keeps
the stream open until the reader says FINISH (a receiver shutting down).
``close()`` is the remote going down: it stops listening and drops its
connections; a new sender on the same port is the remote coming back.

No receiver code is involved but the Frame Streams encoders of core.framestream.
"""

from __future__ import annotations

import select
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass, field

from core.framestream import (
    ACCEPT,
    CONTENT_TYPE_DNSTAP,
    FINISH,
    READY,
    START,
    STOP,
    ControlFrame,
    encode_control,
    encode_data,
    parse_control,
)

IO_TIMEOUT = 10.0


@dataclass
class Session:
    """One connection a reader made to the sender."""

    frames_sent: int = 0
    accept: ControlFrame | None = None
    finished: bool = False  # the reader sent FINISH
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)


class FstrmSender:
    """Listens on ``host:port`` (0: a free port) and streams ``frames`` to each reader.

    ``bidirectional``: READY/ACCEPT handshake and FINISH, else START only.
    ``cut_after``: send that many frames and half of the next, then close.
    ``hold_open``: after the frames, send no STOP; wait for the reader's FINISH.
    ``pause``: seconds between chunks of ``chunk`` frames (a slow stream); a
    FINISH that arrives meanwhile ends the session (the reader is shutting down).
    ``max_sessions``: stop listening after that many connections.
    ``tls``: (certificate, key) files to serve TLS with.
    """

    def __init__(
        self,
        frames: list[bytes],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        bidirectional: bool = True,
        content_type: bytes = CONTENT_TYPE_DNSTAP,
        cut_after: int | None = None,
        hold_open: bool = False,
        chunk: int = 256,
        pause: float = 0.0,
        max_sessions: int | None = None,
        tls: tuple[str, str] | None = None,
    ) -> None:
        self.frames = frames
        self.bidirectional = bidirectional
        self.content_type = content_type
        self.cut_after = cut_after
        self.hold_open = hold_open
        self.chunk = chunk
        self.pause = pause
        self.max_sessions = max_sessions
        self.sessions: list[Session] = []
        self._tls = None
        if tls is not None:
            self._tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self._tls.load_cert_chain(*tls)
        self._stop = threading.Event()
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((host, port))
        self._listener.listen(8)
        self._listener.settimeout(0.05)
        self.port = self._listener.getsockname()[1]
        self._threads = [threading.Thread(target=self._accept_loop, daemon=True)]
        self._threads[0].start()

    # -- control (test thread) ------------------------------------------------------

    def wait_sessions(self, n: int, timeout: float = IO_TIMEOUT) -> list[Session]:
        """The first ``n`` sessions, once each has ended (AssertionError on timeout)."""
        deadline = time.monotonic() + timeout
        while len(self.sessions) < n:
            assert time.monotonic() < deadline, f"{len(self.sessions)} of {n} readers connected within {timeout} s"
            time.sleep(0.01)
        for session in self.sessions[:n]:
            assert session.done.wait(max(0.0, deadline - time.monotonic())), "a session did not end"
        return self.sessions[:n]

    def close(self) -> None:
        """The remote goes down: stop listening, drop every connection."""
        self._stop.set()
        for thread in self._threads[:1]:
            thread.join(IO_TIMEOUT)
        self._listener.close()
        with self._lock:
            for sock in self._socks:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        for thread in self._threads[1:]:
            thread.join(IO_TIMEOUT)

    def __enter__(self) -> FstrmSender:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- sender threads -------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _addr = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            session = Session()
            self.sessions.append(session)
            with self._lock:
                self._socks.append(sock)
            thread = threading.Thread(target=self._serve, args=(sock, session), daemon=True)
            self._threads.append(thread)
            thread.start()
            if self.max_sessions is not None and len(self.sessions) >= self.max_sessions:
                # Stop listening at once: later attempts are refused, not queued in the backlog.
                self._listener.close()
                return

    def _serve(self, raw: socket.socket, session: Session) -> None:
        sock = raw
        try:
            raw.settimeout(IO_TIMEOUT)
            if self._tls is not None:
                sock = self._tls.wrap_socket(raw, server_side=True)
            self._stream(sock, session)
        except Exception as exc:  # noqa: BLE001  recorded for the test to assert on
            session.error = f"{type(exc).__name__}: {exc}"
        finally:
            try:
                sock.close()
            except OSError:
                pass
            session.done.set()

    def _stream(self, sock: socket.socket, session: Session) -> None:
        if self.bidirectional:
            sock.sendall(encode_control(READY, (self.content_type,)))
            session.accept = _read_control(sock)
            if session.accept.type != ACCEPT:
                raise AssertionError(f"expected ACCEPT, got {session.accept.name}")
        sock.sendall(encode_control(START, (self.content_type,)))
        frames = self.frames if self.cut_after is None else self.frames[: self.cut_after]
        for i in range(0, len(frames), self.chunk):
            part = frames[i : i + self.chunk]
            sock.sendall(b"".join(encode_data(p) for p in part))
            session.frames_sent += len(part)
            if self.pause and self._finish_within(sock, self.pause):
                session.finished = True
                return
        if self.cut_after is not None:
            half = encode_data(self.frames[self.cut_after])
            sock.sendall(half[: len(half) // 2])
            return
        if self.hold_open:
            session.finished = self._finish_within(sock, IO_TIMEOUT)
            return
        sock.sendall(encode_control(STOP))
        if self.bidirectional:
            finish = _read_control(sock)
            if finish.type != FINISH:
                raise AssertionError(f"expected FINISH, got {finish.name}")
            session.finished = True
        # The reader closes after STOP; closing first could reset what it has not read.
        while sock.recv(4096):
            pass

    def _finish_within(self, sock: socket.socket, timeout: float) -> bool:
        """True if the reader sends FINISH within ``timeout`` seconds."""
        pending = sock.pending() if isinstance(sock, ssl.SSLSocket) else 0
        if not pending and not select.select([sock], [], [], timeout)[0]:
            return False
        frame = _read_control(sock)
        if frame.type != FINISH:
            raise AssertionError(f"expected FINISH, got {frame.name}")
        return True


def _read_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"the reader closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def _read_control(sock: socket.socket) -> ControlFrame:
    escape, length = struct.unpack(">II", _read_exact(sock, 8))
    if escape != 0:
        raise AssertionError(f"expected a control frame, got a data frame of {escape} bytes")
    return parse_control(_read_exact(sock, length))
