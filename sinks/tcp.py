"""WriteToTcp: records as text/json/yaml lines to a remote TCP server
(4.7.0's ``output.tcp-socket``), and ``TcpStream``, the plain TCP client
transport it sends with.

A TCP stream has no acknowledgements: ``TcpStream.confirms`` is False, so the
Delivery keeps what it wrote in flight for a few seconds and resends it if the
connection fails meanwhile (see sinks/delivery.py). Before each write the
socket is polled: a server that closed the connection (or died) is noticed
there, before more is written into the void.
"""

from __future__ import annotations

import fcntl
import select
import socket
import struct
import termios
import time

import apache_beam as beam

from sinks.network import DeliverFn

__all__ = ["TcpStream", "WriteToTcp"]

CONNECT_TIMEOUT = 5.0
DRAIN_TIMEOUT = 5.0  # graceful close: how long the send queue may take to empty


class TcpStream:
    """A client TCP connection sending byte chunks (see Transport)."""

    confirms = False

    def __init__(self, host: str, port: int, timeout: float = CONNECT_TIMEOUT) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self._sock: socket.socket | None = None

    def connect(self) -> None:
        sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.settimeout(30.0)  # a server that stops reading fails the send, not the thread
        self._sock = sock

    def send(self, chunks: list[bytes]) -> None:
        sock = self._sock
        if sock is None:
            raise ConnectionError("not connected")
        self.check_open()
        sock.sendall(b"".join(chunks))

    def check_open(self) -> None:
        """Raise if the server closed the connection (EOF or a reset waiting
        on the socket); bytes the server sent are read and ignored."""
        sock = self._sock
        while select.select([sock], [], [], 0)[0]:
            if not sock.recv(65536, socket.MSG_DONTWAIT):
                raise ConnectionError("closed by the server")

    def close(self, graceful: bool) -> bool:
        sock, self._sock = self._sock, None
        if sock is None:
            return False
        drained = False
        try:
            if graceful:
                sock.shutdown(socket.SHUT_WR)
                drained = _wait_drained(sock, DRAIN_TIMEOUT)
        except OSError:
            drained = False
        finally:
            sock.close()
        return drained


def _wait_drained(sock: socket.socket, timeout: float) -> bool:
    """Wait until the kernel's send queue is empty: everything written was
    acknowledged by the server's TCP stack."""
    deadline = time.monotonic() + timeout
    buf = bytearray(4)
    while True:
        fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, buf)
        if struct.unpack("i", buf)[0] == 0:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)


class _WriteTcpFn(DeliverFn):
    NAME = "tcp-socket"

    def __init__(self, host: str, port: int, fmt: str, delimiter: bytes, options) -> None:
        super().__init__(options, describe=f"tcp://{host}:{port}", fmt=fmt)
        self._host, self._port = host, port
        self._delimiter = delimiter

    def make_transport(self) -> TcpStream:
        return TcpStream(self._host, self._port)

    def encode(self, records):
        if not records:
            return None
        return self._format.batch(records, self._delimiter), len(records)


class WriteToTcp(beam.PTransform):
    """Send batches of records to ``options.remote_address``:``remote_port``
    as ``options.format`` lines ended by ``options.delimiter``
    (a pipeline.config.TcpSocketOutput)."""

    def __init__(self, options) -> None:
        super().__init__()
        self._fn = _WriteTcpFn(
            options.remote_address,
            options.remote_port,
            options.format,
            options.delimiter.encode("utf-8"),
            options.delivery(),
        )

    def expand(self, batches):
        return batches | "Write" >> beam.ParDo(self._fn)
