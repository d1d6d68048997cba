"""Frame Streams socket servers that feed the pipeline through a bounded queue.

The servers run on an asyncio loop in a daemon thread of the receiver process
(one ``ListenerHub`` per process and spec, found again by the Beam source via
:func:`get_hub`). Every connection runs a sans-IO :class:`ReaderSession`;
complete data frames from all connections are gathered into batches of up to
``batch_size`` frames, and batches go into a :class:`BatchQueue` of at most
``queue_size`` batches. When the queue is full the hub stops reading every
socket (TCP pushes back on the DNS servers) until the pipeline takes a batch:
memory stays bounded and nothing received is dropped.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
import os
import socket
import ssl
import stat
import threading
import time
from dataclasses import dataclass, field

from core.batches import FrameBatch
from core.errors import ConfigError, FrameStreamError
from core.framestream import DEFAULT_MAX_FRAME_SIZE, FINISH, ReaderSession, encode_control

__all__ = [
    "END",
    "BatchQueue",
    "HubSpec",
    "ListenerHub",
    "ListenerStats",
    "ReaderProtocol",
    "TcpServerSpec",
    "UnixServerSpec",
    "get_hub",
    "host_port",
]

log = logging.getLogger("dnstap_receiver.input")

# Back-pressure is reported once it has added up to BLOCKED_LOG_THRESHOLD
# seconds, at most every BLOCKED_LOG_EVERY seconds.
BLOCKED_LOG_THRESHOLD = 1.0
BLOCKED_LOG_EVERY = 60.0

END = None  # queue sentinel: the hub has shut down and every batch was handed over


@dataclass(frozen=True)
class TcpServerSpec:
    addresses: tuple[str, ...] = ("0.0.0.0",)
    port: int = 6000
    access_control_list: tuple[str, ...] = ("0.0.0.0/0", "::/0")
    tls_cert: str | None = None
    tls_key: str | None = None


@dataclass(frozen=True)
class UnixServerSpec:
    path: str
    mode: int = 0o660


@dataclass(frozen=True)
class HubSpec:
    """Everything that identifies one set of live inputs in a process.

    ``feeders`` are the inputs that are not servers (a TCP client, the
    sniffer): frozen specs with ``async open(hub)``, awaited on the hub's loop
    when it starts (it may raise ConfigError), returning a handle whose
    ``async close()`` the hub awaits at shutdown before it hands over its last
    batch. A feeder delivers frames either through :class:`ReaderProtocol`
    connections or from its own thread with :meth:`ListenerHub.feed_threadsafe`.
    """

    tcp: tuple[TcpServerSpec, ...] = ()
    unix: tuple[UnixServerSpec, ...] = ()
    feeders: tuple = ()
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    batch_size: int = 512
    queue_size: int = 64
    flush_interval: float = 0.05
    shutdown_grace: float = 1.0


@dataclass
class ListenerStats:
    """Counters of the input side; written by the loop thread only."""

    connections: int = 0
    active: int = 0
    refused: int = 0
    frames: int = 0
    bytes: int = 0
    batches: int = 0
    protocol_errors: int = 0
    partial_frames_dropped: int = 0
    closed_without_stop: int = 0
    ignored_controls: int = 0
    blocked_seconds: float = 0.0
    blocked_episodes: int = 0
    feed_dropped: int = 0  # frames fed from a thread while the pipeline was behind
    # input.tcp-client: connections tried, made, and failed (refused, timeout, TLS, name)
    client_attempts: int = 0
    client_connects: int = 0
    client_connect_errors: int = 0
    errors_by_reason: dict = field(default_factory=collections.Counter)

    def snapshot(self) -> dict:
        data = {k: v for k, v in self.__dict__.items() if k != "errors_by_reason"}
        data["errors_by_reason"] = dict(self.errors_by_reason)
        return data


class BatchQueue:
    """Bounded hand-over from the loop thread (producer) to the pipeline.

    The producer never blocks: :meth:`try_put` says whether there was room, and
    the consumer wakes the producer through ``on_space`` once it takes a batch.
    """

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._items: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._producer_waiting = False
        self.on_space = None  # set by the hub: thread-safe callback

    def __len__(self) -> int:
        return len(self._items)

    def try_put(self, item) -> bool:
        with self._cond:
            if len(self._items) >= self.maxsize:
                self._producer_waiting = True
                return False
            self._items.append(item)
            self._cond.notify()
            return True

    def put_end(self) -> None:
        with self._cond:
            self._items.append(END)
            self._cond.notify_all()

    def get(self, timeout: float):
        """Next batch, END, or raise TimeoutError after ``timeout`` seconds."""
        with self._cond:
            if not self._items and not self._cond.wait_for(lambda: self._items, timeout):
                raise TimeoutError
            item = self._items[0]
            if item is not END:  # END stays so that every later get sees it
                self._items.popleft()
            wake = self._producer_waiting
            self._producer_waiting = False
        if wake and self.on_space is not None:
            self.on_space()
        return item


def host_port(host: str, port: int) -> str:
    """``host:port``, an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _peer_ip(peername) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not isinstance(peername, tuple):
        return None  # unix socket
    ip = ipaddress.ip_address(peername[0].split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class ReaderProtocol(asyncio.Protocol):
    """One Frame Streams sender, on a connection we accepted or made."""

    def __init__(self, hub: "ListenerHub", label: str, acl) -> None:
        self.hub = hub
        self.label = label
        self.acl = acl
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.session = ReaderSession(max_frame_size=hub.spec.max_frame_size)
        self.frames = 0
        self.received = 0
        self.failed = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        peername = transport.get_extra_info("peername")
        self.peer = f"{peername[0]}:{peername[1]}" if isinstance(peername, tuple) else self.label
        stats = self.hub.stats
        if self.acl is not None:
            ip = _peer_ip(peername)
            if ip is None or not any(ip in net for net in self.acl):
                stats.refused += 1
                log.warning("%s: refused connection from %s (access-control-list)", self.label, self.peer)
                self.failed = True
                transport.abort()
                return
        stats.connections += 1
        stats.active += 1
        self.hub.connections.add(self)
        if self.hub.blocked:
            transport.pause_reading()
        self.log_opened()

    def log_opened(self) -> None:
        log.info("%s: connection from %s", self.label, self.peer)

    def data_received(self, data: bytes) -> None:
        if self.failed:
            return
        hub = self.hub
        batch = hub.batch
        before = len(batch)
        try:
            reply = self.session.receive(data, batch)
        except FrameStreamError as exc:
            self._fail(exc)
            return
        finally:
            got = len(batch) - before
            self.frames += got
            hub.stats.frames += got
            hub.stats.bytes += len(data)
            self.received += len(data)
        if reply:
            self.transport.write(reply)
        if self.session.finished:
            log.info("%s: %s sent STOP after %d frames", self.label, self.peer, self.frames)
            self.transport.close()
        if len(batch) >= hub.spec.batch_size:
            hub.hand_over()

    def _fail(self, exc: FrameStreamError) -> None:
        self.failed = True
        stats = self.hub.stats
        stats.protocol_errors += 1
        stats.errors_by_reason[type(exc).__name__] += 1
        self.log_failure(exc)
        self.transport.abort()

    def log_failure(self, exc: FrameStreamError) -> None:
        # A subclass that reconnects by itself (sources/tcp_client.py) rate-limits these.
        log.warning("%s: dropping the stream of %s: %s", self.label, self.peer, exc)

    def connection_lost(self, exc: Exception | None) -> None:
        hub = self.hub
        if self not in hub.connections:
            return
        hub.connections.discard(self)
        hub.stats.active -= 1
        hub.stats.ignored_controls += self.session.ignored_controls
        if self.session.pending and not self.failed:
            hub.stats.partial_frames_dropped += 1
            log.warning(
                "%s: %s disconnected in the middle of a frame; %d bytes dropped",
                self.label,
                self.peer,
                self.session.pending,
            )
        if not self.received and not self.failed:
            # Port probes and health checks: nothing to count.
            log.debug("%s: %s closed without sending anything", self.label, self.peer)
        elif not self.session.finished and not self.failed:
            hub.stats.closed_without_stop += 1
            log.info("%s: %s closed without STOP after %d frames", self.label, self.peer, self.frames)

    def finish(self) -> None:
        """Shutdown: tell a bidirectional sender that we are done reading."""
        if self.failed or self.session.finished or self.transport.is_closing():
            return
        if self.session.bidirectional:
            self.transport.write(encode_control(FINISH))


class ListenerHub:
    """All listening inputs of one spec in this process, and their queue."""

    def __init__(self, spec: HubSpec) -> None:
        self.spec = spec
        self.stats = ListenerStats()
        self.queue = BatchQueue(spec.queue_size)
        self.batch = FrameBatch()
        self.blocked = False
        self.connections: set[ReaderProtocol] = set()
        self.addresses: list[str] = []
        self._blocked_since = 0.0
        self._blocked_pending = 0.0  # blocked seconds not reported in a log line yet
        self._next_blocked_log = 0.0
        self._dropped_reported = 0  # feed_dropped as of the last log line
        self._servers: list[asyncio.AbstractServer] = []
        self._feeders: list = []  # handles returned by the feeders' open()
        self._unix_paths: list[str] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._lock = threading.Lock()
        self.stopped = threading.Event()

    # -- life cycle (any thread) -------------------------------------------------

    def start(self) -> "ListenerHub":
        """Bind every server; raises ConfigError (bind, TLS, path problems)."""
        with self._lock:
            if self._thread is not None:
                return self
            # Set first: feeders opened below may call feed_threadsafe at once
            # (the calls wait for the loop thread).
            loop = self._loop = asyncio.new_event_loop()
            try:
                loop.run_until_complete(self._open_servers())
            except BaseException:
                loop.run_until_complete(self._close_servers())
                loop.close()
                self._loop = None
                raise
            self.queue.on_space = self._wake
            self._thread = threading.Thread(target=self._run, name="dnstap-listener", daemon=True)
            self._thread.start()
        return self

    def shutdown(self) -> None:
        """Stop accepting, answer open streams, hand over what was received,
        then put END on the queue. Safe from a signal handler; returns at once."""
        loop = self._loop
        if loop is None or self._stopping:
            return
        self._stopping = True
        loop.call_soon_threadsafe(lambda: loop.create_task(self._shutdown()))

    # -- loop thread -------------------------------------------------------------

    def _run(self) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        loop.call_later(self.spec.flush_interval, self._tick)
        try:
            loop.run_forever()
        finally:
            loop.close()
            self.stopped.set()

    async def _open_servers(self) -> None:
        loop = asyncio.get_running_loop()
        for tcp in self.spec.tcp:
            acl = tuple(ipaddress.ip_network(c, strict=False) for c in tcp.access_control_list)
            ctx = _tls_context(tcp) if tcp.tls_cert else None
            label = "tls-socket" if ctx else "tcp-socket"
            for host in tcp.addresses:
                try:
                    server = await loop.create_server(
                        lambda lbl=label, a=acl: ReaderProtocol(self, lbl, a),
                        host=host,
                        port=tcp.port,
                        ssl=ctx,
                        reuse_address=True,
                    )
                except OSError as exc:
                    raise ConfigError(f"cannot listen on {host}:{tcp.port}: {exc.strerror or exc}") from None
                self._servers.append(server)
                for sock in server.sockets:
                    addr = sock.getsockname()
                    where = host_port(addr[0], addr[1])
                    self.addresses.append(where)
                    log.info("%s input listening on %s", label, where)
        for unix in self.spec.unix:
            _remove_stale_socket(unix.path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                # Bound but not yet listening: nobody can connect before the mode is set.
                sock.bind(unix.path)
                os.chmod(unix.path, unix.mode)
                server = await loop.create_unix_server(
                    lambda: ReaderProtocol(self, "unix-socket", None), sock=sock
                )
            except OSError as exc:
                sock.close()
                raise ConfigError(f"cannot listen on unix socket {unix.path}: {exc.strerror or exc}") from None
            self._servers.append(server)
            self._unix_paths.append(unix.path)
            self.addresses.append(f"unix:{unix.path}")
            log.info("unix-socket input listening on %s (mode %o)", unix.path, unix.mode)
        for feeder in self.spec.feeders:
            self._feeders.append(await feeder.open(self))

    async def _close_servers(self) -> None:
        for server in self._servers:
            server.close()
        for handle in self._feeders:
            await handle.close()
        self._feeders.clear()
        await asyncio.sleep(0)  # run the feed_threadsafe calls the feeders left
        for path in self._unix_paths:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self._servers.clear()

    def _tick(self) -> None:
        if self.batch and not self.blocked:
            self.hand_over()
        if not self._stopping:
            self._loop.call_later(self.spec.flush_interval, self._tick)

    def hand_over(self) -> None:
        """Move the current batch to the queue, or stop reading until there is room."""
        if self.queue.try_put(self.batch):
            self.batch = FrameBatch()
            self.stats.batches += 1
            return
        if not self.blocked:
            self.blocked = True
            self._blocked_since = time.monotonic()
            self.stats.blocked_episodes += 1
            for conn in self.connections:
                conn.transport.pause_reading()

    def feed_threadsafe(self, frames: list[bytes]) -> None:
        """Add frames from another thread. A thread cannot be paused like a
        socket: while the pipeline is behind its frames are dropped and
        counted (``feed_dropped``), so memory stays bounded."""
        try:
            self._loop.call_soon_threadsafe(self._feed, frames)
        except RuntimeError:
            self.stats.feed_dropped += len(frames)  # the loop has closed: shutdown

    def _feed(self, frames: list[bytes]) -> None:
        if self.blocked:
            self.stats.feed_dropped += len(frames)
            return
        self.batch.extend(frames)
        self.stats.frames += len(frames)
        if len(self.batch) >= self.spec.batch_size:
            self.hand_over()

    def _wake(self) -> None:
        # Called from the pipeline thread; the loop may have just closed at shutdown.
        try:
            self._loop.call_soon_threadsafe(self._on_space)
        except RuntimeError:
            pass

    def _on_space(self) -> None:
        if not self.blocked:
            return
        if not self.queue.try_put(self.batch):
            return
        self.batch = FrameBatch()
        self.stats.batches += 1
        self.blocked = False
        self._count_blocked()
        if not self._stopping:
            for conn in self.connections:
                if not conn.transport.is_closing():
                    conn.transport.resume_reading()

    def _count_blocked(self) -> None:
        now = time.monotonic()
        self.stats.blocked_seconds += now - self._blocked_since
        self._blocked_pending += now - self._blocked_since
        dropped = self.stats.feed_dropped - self._dropped_reported
        if now >= self._next_blocked_log and (self._blocked_pending >= BLOCKED_LOG_THRESHOLD or dropped):
            log.warning(
                "input: the pipeline fell behind; sockets were not read for %.1f s and %d frames "
                "from capture threads were dropped since the last report (%.1f s and %d frames in total)",
                self._blocked_pending,
                dropped,
                self.stats.blocked_seconds,
                self.stats.feed_dropped,
            )
            self._blocked_pending = 0.0
            self._dropped_reported = self.stats.feed_dropped
            self._next_blocked_log = now + BLOCKED_LOG_EVERY

    async def _shutdown(self) -> None:
        log.info("input: shutting down, %d open connection(s)", len(self.connections))
        await self._close_servers()
        for conn in list(self.connections):
            conn.finish()
        # Let senders that see FINISH close by themselves, keeping what they send meanwhile.
        deadline = time.monotonic() + self.spec.shutdown_grace
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for conn in list(self.connections):
            conn.transport.close()
        # close() only schedules the socket close (connection_lost); run it before
        # the loop stops, and abort what close() left waiting (unsent data, TLS).
        await asyncio.sleep(0)
        for conn in list(self.connections):
            conn.transport.abort()
        await asyncio.sleep(0)
        while self.batch:
            if self.queue.try_put(self.batch):
                self.batch = FrameBatch()
                self.stats.batches += 1
            else:
                await asyncio.sleep(0.005)
        if self.blocked:
            self.blocked = False
            self._count_blocked()
        self.queue.put_end()
        self._loop.stop()


def _tls_context(tcp: TcpServerSpec) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(tcp.tls_cert, tcp.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"input.tcp-socket: cannot load TLS certificate {tcp.tls_cert} / key {tcp.tls_key}: {exc}"
        ) from None
    return ctx


def _remove_stale_socket(path: str) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigError(f"input.unix-socket.path: {path} exists and is not a socket")
    os.unlink(path)
    log.info("unix-socket input: removed stale socket %s", path)


_HUBS: dict[HubSpec, ListenerHub] = {}
_HUBS_LOCK = threading.Lock()


def get_hub(spec: HubSpec) -> ListenerHub:
    """The process's hub for ``spec``, created and started on first use."""
    with _HUBS_LOCK:
        hub = _HUBS.get(spec)
        if hub is None:
            hub = _HUBS[spec] = ListenerHub(spec)
    return hub.start()


def forget_hub(spec: HubSpec) -> None:
    """Drop a stopped hub from the registry (tests run several in one process)."""
    with _HUBS_LOCK:
        _HUBS.pop(spec, None)
