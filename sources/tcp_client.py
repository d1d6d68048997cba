"""The tcp-client input: the receiver connects to a dnstap sender that listens.

Usually the DNS server connects to the receiver; some setups turn that around
(the DNS server's network lets connections in but not out, or a relay listens
and streams to whoever connects). Here the receiver makes the
connection, optionally over TLS, and then plays the reader's part of Frame
Streams exactly as on an accepted connection: the connection runs a
:class:`sources.listener.ReaderProtocol`, so ACCEPT answers READY, FINISH
answers STOP, unidirectional streams work, and frames join the hub's batches
with the same back-pressure and counters.

A reconnect loop runs on the hub's asyncio loop: connect, read until the remote
closes or stops the stream, wait ``retry`` seconds, connect again. While the
remote is down every attempt fails the same way, so the outage is logged once
(and again only when its reason changes), and the first stream afterwards is
logged with the number of failed attempts. A remote that accepts connections
but never starts a stream (it closes at once, offers another content type, or
sends nothing for ``connect_timeout`` seconds: the connection is then
aborted) counts as an outage too, instead of logging a connection and a
failure every ``retry`` seconds. A name with several addresses is tried the
Happy Eyeballs way (RFC 8305: the next address after HAPPY_EYEBALLS_DELAY
without an answer), so an address that drops SYNs does not use up the
timeout of the others. At shutdown the loop stops; an open stream is answered with
FINISH by the hub like any other connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import ssl
from dataclasses import dataclass

from core.errors import ConfigError, FrameStreamError
from core.framestream import ReaderSession
from sources.listener import ListenerHub, ReaderProtocol, host_port

__all__ = ["TcpClientSpec"]

log = logging.getLogger("dnstap_receiver.input")

LABEL = "tcp-client"
# A remote that drops SYNs would otherwise hold an attempt for the OS's
# connect timeout (about two minutes on Linux); one that accepts and sends
# nothing would hold it for ever. Both count as an outage after this long.
CONNECT_TIMEOUT = 10.0
HAPPY_EYEBALLS_DELAY = 0.25  # RFC 8305's recommended connection attempt delay
# A remote host that is gone is noticed after 60 s idle + 3 probes 10 s apart.
KEEPALIVE_IDLE = 60
KEEPALIVE_INTERVAL = 10
KEEPALIVE_COUNT = 3


@dataclass(frozen=True)
class TcpClientSpec:
    """``input.tcp-client``: where to connect, how often, and TLS."""

    address: str
    port: int
    retry: float = 1.0
    tls: bool = False
    tls_ca_file: str | None = None  # None: the system's CAs
    tls_insecure: bool = False  # no certificate or host name verification
    connect_timeout: float = CONNECT_TIMEOUT

    @property
    def where(self) -> str:
        return host_port(self.address, self.port)

    async def open(self, hub: ListenerHub) -> TcpClient:
        """Start the reconnect loop (feeder interface of ``HubSpec.feeders``)."""
        context = self._tls_context() if self.tls else None
        log.info(
            "%s input connecting to %s%s (retry every %g s)",
            LABEL, self.where, " over TLS" if context else "", self.retry,
        )
        return TcpClient(hub, self, context)

    def _tls_context(self) -> ssl.SSLContext:
        try:
            context = ssl.create_default_context(cafile=self.tls_ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"input.tcp-client.tls-ca-file: cannot load {self.tls_ca_file}: {exc}") from None
        if self.tls_insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context


class TcpClient:
    """The reconnect loop of one :class:`TcpClientSpec`; lives on the hub's loop."""

    def __init__(self, hub: ListenerHub, spec: TcpClientSpec, context: ssl.SSLContext | None) -> None:
        self.hub = hub
        self.spec = spec
        self._context = context
        self._outage: str | None = None  # what the current outage looks like, as logged
        self._failed = 0  # failed attempts since the last stream started
        # The last attempt connected but no stream started: do not log the next
        # connection before its stream starts (a flapping remote would flood).
        self._quiet_connect = False
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"{LABEL} {spec.where}")

    async def close(self) -> None:
        """Stop reconnecting. An open connection stays in ``hub.connections``
        for the hub's shutdown (FINISH, grace, close)."""
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        spec = self.spec
        stats = self.hub.stats
        loop = asyncio.get_running_loop()
        while True:
            stats.client_attempts += 1
            try:
                async with asyncio.timeout(spec.connect_timeout):
                    _transport, conn = await loop.create_connection(
                        lambda: _ClientProtocol(self),
                        spec.address,
                        spec.port,
                        ssl=self._context,
                        server_hostname=spec.address if self._context else None,
                        happy_eyeballs_delay=HAPPY_EYEBALLS_DELAY,
                    )
            except Exception as exc:  # refused, unreachable, name, TLS, timeout: never end the loop
                stats.client_connect_errors += 1
                self._down(f"unreachable: {_reason(exc, spec)}", quiet_connect=False)
            else:
                stats.client_connects += 1
                try:
                    async with asyncio.timeout(spec.connect_timeout):
                        await conn.settled
                except TimeoutError:
                    conn.failure = f"started no stream within {spec.connect_timeout:g} s"
                    conn.transport.abort()
                await conn.ended
                if not conn.started:
                    self._down(conn.failure or "closed the connection before starting a stream", quiet_connect=True)
            await asyncio.sleep(spec.retry)

    # -- state changes, logged once each -----------------------------------------

    def _down(self, outage: str, *, quiet_connect: bool) -> None:
        self._failed += 1
        self._quiet_connect = quiet_connect
        if outage != self._outage:
            self._outage = outage
            log.warning("%s: %s %s; retrying every %g s", LABEL, self.spec.where, outage, self.spec.retry)

    def _connected(self, conn: _ClientProtocol) -> None:
        where = self.spec.where
        if not _is_ip(self.spec.address):
            where += f" ({conn.peer})"
        after = f" after {self._failed} failed attempt{'s' if self._failed != 1 else ''}" if self._failed else ""
        log.info("%s: connected to %s%s", LABEL, where, after)

    def _started(self, conn: _ClientProtocol) -> None:
        if self._quiet_connect:
            self._connected(conn)
        kind = "bidirectional" if conn.session.bidirectional else "unidirectional"
        log.debug("%s: %s started a %s stream", LABEL, self.spec.where, kind)
        self._outage = None
        self._failed = 0
        self._quiet_connect = False


class _ClientProtocol(ReaderProtocol):
    """A ReaderProtocol that tells its :class:`TcpClient` when the stream
    starts and when the connection ends."""

    def __init__(self, client: TcpClient) -> None:
        super().__init__(client.hub, LABEL, None)
        self.client = client
        loop = asyncio.get_running_loop()
        self.settled = loop.create_future()  # the stream started, or the connection ended
        self.ended = loop.create_future()
        self.started = False
        self.failure: str | None = None  # protocol error before the stream started

    def connection_made(self, transport) -> None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # A DNS server may send nothing for minutes: only keepalive probes
            # tell an idle stream from a remote host that vanished without a reset.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)
        super().connection_made(transport)

    def log_opened(self) -> None:
        if not self.client._quiet_connect:
            self.client._connected(self)

    def log_failure(self, exc: FrameStreamError) -> None:
        if self.started:
            super().log_failure(exc)
        else:  # the client logs it as an outage, once
            self.failure = f"sent no usable stream: {exc}"

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if not self.started and not self.failed and self.session.state in (ReaderSession.DATA, ReaderSession.DONE):
            self.started = True
            self.settled.set_result(None)
            self.client._started(self)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        for future in (self.settled, self.ended):
            if not future.done():
                future.set_result(None)


def _is_ip(address: str) -> bool:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True


def _reason(exc: Exception, spec: TcpClientSpec) -> str:
    """A short, stable reason for a failed connection (stable: equal reasons
    are logged once)."""
    if isinstance(exc, TimeoutError):
        return f"no answer within {spec.connect_timeout:g} s"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate not accepted: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed: {exc.reason or exc}"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve {spec.address}: {exc.strerror}"
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
