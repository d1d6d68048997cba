"""The Frame Streams socket servers (sources/listener.py), without Beam.

Each test starts a ListenerHub (through ``get_hub``) on ports the OS picks, talks to
it with a plain blocking Frame Streams sender (tests/fstrm_client.py) and consumes
``hub.queue`` in the test thread, as the Beam source would. Every hub is shut down,
drained to END and forgotten after its test.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import stat
import struct
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from core.errors import ConfigError
from core.framestream import CONTENT_TYPE_DNSTAP, READY, encode_control, encode_data
from fstrm_client import FstrmClient, data_stream
from sources.listener import END, HubSpec, ListenerHub, TcpServerSpec, UnixServerSpec, forget_hub, get_hub

WAIT = 10.0  # seconds any single wait of a test may take


def wait_until(predicate, timeout: float = WAIT, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def close_hub(hub: ListenerHub, timeout: float = 15.0) -> list[bytes]:
    """Shut ``hub`` down, take every batch up to END; returns the frames taken."""
    hub.shutdown()
    frames: list[bytes] = []
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0, "the hub did not put END on its queue"
        try:
            item = hub.queue.get(timeout=min(left, 1.0))
        except TimeoutError:
            continue
        if item is END:
            break
        frames.extend(item)
    assert hub.stopped.wait(timeout), "the hub's loop thread did not stop"
    return frames


@pytest.fixture
def hubs():
    """``make(**HubSpec fields)`` -> a started hub; all are shut down and forgotten after the test."""
    made: list[tuple[HubSpec, ListenerHub]] = []

    def make(**kwargs) -> ListenerHub:
        kwargs.setdefault("tcp", (TcpServerSpec(addresses=("127.0.0.1",), port=0),))
        spec = HubSpec(**kwargs)
        try:
            hub = get_hub(spec)
        except BaseException:
            forget_hub(spec)
            raise
        made.append((spec, hub))
        return hub

    yield make
    try:
        for _spec, hub in made:
            if not hub.stopped.is_set():
                close_hub(hub)
    finally:
        for spec, _hub in made:
            forget_hub(spec)


def tcp_address(hub: ListenerHub, index: int = 0) -> tuple[str, int]:
    where = hub.addresses[index]
    host, port = where.rsplit(":", 1)
    return host.strip("[]"), int(port)


def collect(hub: ListenerHub, n: int, timeout: float = WAIT) -> list[bytes]:
    """Exactly the next ``n`` frames from the queue (fails on timeout, END, or more)."""
    frames: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(frames) < n:
        left = deadline - time.monotonic()
        assert left > 0, f"only {len(frames)} of {n} frames arrived within {timeout} s"
        try:
            batch = hub.queue.get(timeout=min(left, 0.5))
        except TimeoutError:
            continue
        assert batch is not END, f"END after {len(frames)} of {n} frames"
        frames.extend(batch)
    assert len(frames) == n, f"{len(frames)} frames arrived, {n} expected"
    return frames


def assert_queue_empty(hub: ListenerHub, wait: float = 0.3) -> None:
    with pytest.raises(TimeoutError):
        hub.queue.get(timeout=wait)


def payloads(n: int, tag: str = "f", size: int = 0) -> list[bytes]:
    out = []
    for i in range(n):
        p = f"{tag}:{i:07d}".encode()
        out.append(p + b"x" * max(0, size - len(p)))
    return out


# --------------------------------------------------------------------------- streams


def test_bidirectional_tcp_handshake(hubs):
    hub = hubs()
    sent = payloads(300)
    with FstrmClient.tcp(*tcp_address(hub)) as client:
        accept = client.handshake()
        assert accept.content_types == (CONTENT_TYPE_DNSTAP,)
        client.send_frames(sent)
        client.stop()  # asserts FINISH comes back after STOP
        assert client.wait_closed() == b"", "nothing may follow FINISH"
    assert collect(hub, len(sent)) == sent
    wait_until(lambda: hub.stats.active == 0, what="the connection to end")
    stats = hub.stats
    assert (stats.connections, stats.frames, stats.protocol_errors) == (1, 300, 0)
    assert stats.closed_without_stop == 0 and stats.partial_frames_dropped == 0
    assert_queue_empty(hub)


def test_unidirectional_stream(hubs):
    hub = hubs()
    sent = payloads(120, "uni")
    with FstrmClient.tcp(*tcp_address(hub)) as client:
        client.start_unidirectional()
        client.send_frames(sent)
        client.stop(bidirectional=False)
        # No ACCEPT and no FINISH on a unidirectional stream; the receiver closes it.
        assert client.wait_closed() == b""
    assert collect(hub, len(sent)) == sent
    wait_until(lambda: hub.stats.active == 0, what="the connection to end")
    assert hub.stats.closed_without_stop == 0
    assert hub.stats.protocol_errors == 0


def test_frames_split_at_every_byte_boundary(hubs):
    """Frames sent one byte at a time are reassembled."""
    hub = hubs()
    sent = payloads(5, "tiny")
    with FstrmClient.tcp(*tcp_address(hub)) as client:
        client.handshake()
        for byte in data_stream(sent):
            client.send(bytes([byte]))
        client.stop()
    assert collect(hub, len(sent)) == sent


def test_concurrent_connections_keep_per_connection_order(hubs):
    hub = hubs(batch_size=64)
    host, port = tcp_address(hub)
    n_conns, n_frames, step = 8, 3000, 25
    barrier = threading.Barrier(n_conns)
    errors: list[BaseException] = []

    def sender(c: int) -> None:
        try:
            with FstrmClient.tcp(host, port) as client:
                client.handshake()
                mine = payloads(n_frames, f"c{c}")
                barrier.wait(WAIT)
                for i in range(0, n_frames, step):
                    client.send_frames(mine[i : i + step])
                    if i % (step * 8) == 0:
                        time.sleep(0.001)  # let the other senders interleave
                client.stop()
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)

    threads = [threading.Thread(target=sender, args=(c,), daemon=True) for c in range(n_conns)]
    for t in threads:
        t.start()
    frames = collect(hub, n_conns * n_frames, timeout=30)
    for t in threads:
        t.join(WAIT)
        assert not t.is_alive()
    assert not errors, errors
    by_conn: dict[str, list[int]] = {}
    for f in frames:
        tag, num = f.decode().split(":")
        by_conn.setdefault(tag, []).append(int(num))
    assert sorted(by_conn) == [f"c{c}" for c in range(n_conns)]
    for tag, nums in by_conn.items():
        assert nums == list(range(n_frames)), f"{tag}: frames lost, duplicated or reordered"
    # The connections really were interleaved in the queue, not one after the other.
    first_tags = {f.split(b":")[0] for f in frames[: len(frames) // 2]}
    assert len(first_tags) > 1
    wait_until(lambda: hub.stats.active == 0, what="all connections to end")
    assert hub.stats.connections == n_conns
    assert hub.stats.protocol_errors == 0
    assert_queue_empty(hub)


# --------------------------------------------------------------------------- transports


@pytest.fixture
def sock_dir(tmp_path):
    """A directory for unix sockets whose paths fit in sun_path."""
    if len(os.fsencode(tmp_path)) <= 80:
        yield tmp_path
        return
    short = Path(tempfile.mkdtemp(prefix="dnstap-sock-", dir="/tmp"))
    try:
        yield short
    finally:
        shutil.rmtree(short, ignore_errors=True)


def test_unix_socket_mode_and_stale_socket(hubs, sock_dir):
    path = sock_dir / "dnstap.sock"
    # A stale socket left by a receiver that died: the file exists, nobody listens.
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    assert stat.S_ISSOCK(os.lstat(path).st_mode)

    hub = hubs(tcp=(), unix=(UnixServerSpec(path=str(path), mode=0o600),))
    st = os.lstat(path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert hub.addresses == [f"unix:{path}"]

    sent = payloads(200, "unix")
    with FstrmClient.unix(path) as client:
        client.handshake()
        client.send_frames(sent)
        client.stop()
    assert collect(hub, len(sent)) == sent
    assert close_hub(hub) == []
    assert not path.exists(), "the socket file is removed at shutdown"


def test_unix_socket_other_mode(hubs, sock_dir):
    path = sock_dir / "other.sock"
    hubs(tcp=(), unix=(UnixServerSpec(path=str(path), mode=0o666),))
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o666


def test_unix_socket_path_is_a_regular_file(sock_dir):
    path = sock_dir / "not-a-socket"
    path.write_text("precious data\n")
    spec = HubSpec(unix=(UnixServerSpec(path=str(path)),))
    try:
        with pytest.raises(ConfigError, match="not a socket"):
            get_hub(spec)
    finally:
        forget_hub(spec)
    assert path.read_text() == "precious data\n", "a regular file is never removed"


def test_ipv6_loopback(hubs):
    hub = hubs(tcp=(TcpServerSpec(addresses=("::1",), port=0),))
    assert hub.addresses[0].startswith("[::1]:")
    host, port = tcp_address(hub)
    sent = payloads(50, "v6")
    with FstrmClient.tcp(host, port) as client:
        client.handshake()
        client.send_frames(sent)
        client.stop()
    assert collect(hub, len(sent)) == sent


def test_access_control_list_refuses_loopback(hubs):
    hub = hubs(tcp=(TcpServerSpec(addresses=("127.0.0.1",), port=0, access_control_list=("192.0.2.0/24", "::/0")),))
    with FstrmClient.tcp(*tcp_address(hub)) as client:
        assert client.wait_closed(5) == b"", "a refused sender gets no ACCEPT"
    wait_until(lambda: hub.stats.refused == 1, what="the refusal to be counted")
    assert hub.stats.connections == 0
    assert hub.stats.active == 0
    assert_queue_empty(hub)


def test_access_control_list_allows_listed_network(hubs):
    hub = hubs(tcp=(TcpServerSpec(addresses=("127.0.0.1",), port=0, access_control_list=("127.0.0.0/8",)),))
    sent = payloads(10, "acl")
    with FstrmClient.tcp(*tcp_address(hub)) as client:
        client.handshake()
        client.send_frames(sent)
        client.stop()
    assert collect(hub, len(sent)) == sent
    assert hub.stats.refused == 0


def test_tls(hubs, tls_files):
    cert, key = tls_files
    hub = hubs(tcp=(TcpServerSpec(addresses=("127.0.0.1",), port=0, tls_cert=cert, tls_key=key),))
    sent = payloads(2000, "tls", size=100)
    with FstrmClient.tls(*tcp_address(hub)) as client:
        accept = client.handshake()
        assert accept.content_types == (CONTENT_TYPE_DNSTAP,)
        client.send_frames(sent)
        client.stop()
    assert collect(hub, len(sent)) == sent
    assert hub.stats.protocol_errors == 0


def test_tls_bad_certificate_path(tmp_path, tls_files):
    _cert, key = tls_files
    spec = HubSpec(tcp=(TcpServerSpec(addresses=("127.0.0.1",), port=0,
                                      tls_cert=str(tmp_path / "missing.pem"), tls_key=key),))
    hub = ListenerHub(spec)
    with pytest.raises(ConfigError, match="missing.pem"):
        hub.start()
    assert hub._thread is None and hub.addresses == []
    forget_hub(spec)


def test_tls_key_is_not_a_key(tmp_path, tls_files):
    cert, _key = tls_files
    bogus = tmp_path / "bogus.key"
    bogus.write_text("not a key\n")
    hub = ListenerHub(HubSpec(tcp=(TcpServerSpec(addresses=("127.0.0.1",), port=0, tls_cert=cert, tls_key=str(bogus)),)))
    with pytest.raises(ConfigError, match="TLS"):
        hub.start()
    forget_hub(hub.spec)


# --------------------------------------------------------------------------- bad senders


def test_wrong_content_type_does_not_disturb_other_connections(hubs):
    hub = hubs()
    addr = tcp_address(hub)
    first, second = payloads(100, "good"), payloads(100, "good2")
    with FstrmClient.tcp(*addr) as good:
        good.handshake()
        good.send_frames(first)
        wait_until(lambda: hub.stats.frames == 100, what="the good frames")
        with FstrmClient.tcp(*addr) as bad:
            bad.send(encode_control(READY, (b"protobuf:not.Dnstap",)))
            assert bad.wait_closed(5) == b"", "no ACCEPT for a foreign content type"
        wait_until(lambda: hub.stats.protocol_errors == 1, what="the protocol error")
        assert hub.stats.errors_by_reason["ContentTypeMismatch"] == 1
        good.send_frames(second)
        good.stop()
    assert collect(hub, 200) == first + second
    assert hub.stats.connections == 2


def test_oversized_frame_closes_without_waiting_for_body(hubs):
    hub = hubs(max_frame_size=4096)
    with FstrmClient.tcp(*tcp_address(hub)) as client:
        client.handshake()
        client.send_frames(payloads(5, "ok"))
        wait_until(lambda: hub.stats.frames == 5, what="the frames before the big one")
        started = time.monotonic()
        client.send(struct.pack(">I", 1_000_000))  # the length only: the body never comes
        client.wait_closed(5)
        assert time.monotonic() - started < 3.0
    assert collect(hub, 5) == payloads(5, "ok")
    wait_until(lambda: hub.stats.protocol_errors == 1, what="the protocol error")
    assert hub.stats.errors_by_reason["FrameTooLarge"] == 1
    assert hub.stats.partial_frames_dropped == 0  # a failed connection is counted once, as an error
    assert_queue_empty(hub)


def test_frame_at_max_size_is_accepted(hubs):
    hub = hubs(max_frame_size=4096)
    big = b"B" * 4096
    with FstrmClient.tcp(*tcp_address(hub)) as client:
        client.handshake()
        client.send_frames([big])
        client.stop()
    assert collect(hub, 1) == [big]


GARBAGE = {
    "http": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "random": bytes((i * 131 + 7) % 256 for i in range(4096)),
    "huge-control": b"\x00\x00\x00\x00\xff\xff\xff\xff",
    "truncated-control-field": b"\x00\x00\x00\x00\x00\x00\x00\x06\x00\x00\x00\x02\x00\x01",
    "data-before-start": encode_data(b"early"),
}


@pytest.mark.parametrize("garbage", list(GARBAGE), ids=list(GARBAGE))
def test_garbage_closes_connection(hubs, garbage):
    hub = hubs()
    with FstrmClient.tcp(*tcp_address(hub)) as client:
        client.send(GARBAGE[garbage])
        assert client.wait_closed(5) == b""
    wait_until(lambda: hub.stats.protocol_errors == 1, what="the protocol error")
    assert hub.stats.active == 0
    assert close_hub(hub) == []


def test_half_frame_then_disconnect(hubs):
    hub = hubs()
    whole = payloads(3, "whole")
    with FstrmClient.tcp(*tcp_address(hub)) as client:
        client.handshake()
        client.send_frames(whole)
        client.send(struct.pack(">I", 100) + b"p" * 40)  # 40 of 100 bytes
        wait_until(lambda: hub.stats.bytes >= 40 + len(data_stream(whole)), what="the bytes to be read")
    wait_until(lambda: hub.stats.active == 0, what="the disconnect")
    assert hub.stats.partial_frames_dropped == 1
    assert hub.stats.closed_without_stop == 1
    assert hub.stats.protocol_errors == 0
    frames = close_hub(hub)
    assert frames == whole, "only the complete frames are handed over"


def test_close_without_stop(hubs):
    hub = hubs()
    sent = payloads(10, "nostop")
    with FstrmClient.tcp(*tcp_address(hub)) as client:
        client.handshake()
        client.send_frames(sent)
    wait_until(lambda: hub.stats.closed_without_stop == 1, what="the close to be counted")
    assert hub.stats.partial_frames_dropped == 0
    assert collect(hub, len(sent)) == sent


def test_unknown_control_frame_is_ignored(hubs):
    hub = hubs()
    first, second = payloads(5, "a"), payloads(5, "b")
    with FstrmClient.tcp(*tcp_address(hub)) as client:
        client.handshake()
        client.send_frames(first)
        client.send(encode_control(0x42, (b"whatever",)))
        client.send_frames(second)
        client.stop()
        client.wait_closed()
    assert collect(hub, 10) == first + second
    wait_until(lambda: hub.stats.ignored_controls == 1, what="the ignored control to be counted")
    assert hub.stats.protocol_errors == 0


def test_port_in_use(hubs):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        hub = ListenerHub(HubSpec(tcp=(TcpServerSpec(addresses=("127.0.0.1",), port=port),)))
        with pytest.raises(ConfigError, match=f"127.0.0.1:{port}"):
            hub.start()
    # Also against another hub of this process.
    first = hubs()
    port = tcp_address(first)[1]
    spec = HubSpec(tcp=(TcpServerSpec(addresses=("127.0.0.1",), port=port),))
    try:
        with pytest.raises(ConfigError, match="cannot listen"):
            get_hub(spec)
    finally:
        forget_hub(spec)


def test_get_hub_returns_the_same_hub(hubs):
    hub = hubs(batch_size=7)
    assert get_hub(hub.spec) is hub
    assert get_hub(HubSpec(**{**hub.spec.__dict__})) is hub


# --------------------------------------------------------------------------- back-pressure


def test_backpressure_bounds_memory_and_loses_nothing(hubs):
    batch_size, queue_size, n, size = 10, 2, 200_000, 120
    hub = hubs(batch_size=batch_size, queue_size=queue_size)
    sent = payloads(n, "bp", size=size)
    stream = data_stream(sent)
    # One read of the selector transport is at most 256 KiB: the hub may hold that
    # many frames on top of a batch when it pauses the sockets.
    bound = batch_size + (256 * 1024) // (4 + size) + 1

    client = FstrmClient.tcp(*tcp_address(hub), sndbuf=64 * 1024)
    client.handshake()
    sender_error: list[BaseException] = []

    def send_all() -> None:
        try:
            client.sock.settimeout(60)
            client.send(stream)
        except BaseException as exc:  # noqa: BLE001
            sender_error.append(exc)

    sender = threading.Thread(target=send_all, daemon=True)
    try:
        sender.start()
        wait_until(lambda: hub.stats.blocked_episodes >= 1, what="the hub to block")
        # Blocked: nothing more is read, however long we wait.
        wait_until(lambda: len(hub.queue) == queue_size, what="the queue to fill")
        read = hub.stats.bytes
        for _ in range(40):
            time.sleep(0.025)
            assert len(hub.queue) <= queue_size
            assert len(hub.batch) <= bound
        assert hub.stats.bytes == read, "the hub kept reading while the queue was full"
        assert hub.blocked
        assert sender.is_alive(), "sendall finished: the receiver did not push back"
        assert read < len(stream)

        got: list[bytes] = []
        deadline = time.monotonic() + 60
        while len(got) < n:
            assert time.monotonic() < deadline, f"only {len(got)} of {n} frames within 60 s"
            assert len(hub.batch) <= bound
            try:
                batch = hub.queue.get(timeout=0.5)
            except TimeoutError:
                continue
            assert batch is not END
            got.extend(batch)
        sender.join(WAIT)
        assert not sender.is_alive() and not sender_error, sender_error
        assert len(got) == n
        assert got == sent, "frames lost, duplicated or reordered"
        client.stop()
    finally:
        client.close()
    wait_until(lambda: hub.stats.active == 0, what="the connection to end")
    assert hub.stats.blocked_episodes >= 1
    assert hub.stats.blocked_seconds > 0
    assert hub.stats.frames == n
    assert close_hub(hub) == []


def test_new_connection_while_blocked_is_paused(hubs):
    """A sender that connects while the queue is full is not read either."""
    hub = hubs(batch_size=1, queue_size=1)
    addr = tcp_address(hub)
    sent = payloads(2, "first")
    with FstrmClient.tcp(*addr) as first:
        first.handshake()
        first.send_frames(sent[:1])
        wait_until(lambda: len(hub.queue) == 1, what="the queue to fill")
        first.send_frames(sent[1:])
        wait_until(lambda: hub.blocked, what="the hub to block")
        with FstrmClient.tcp(*addr) as second:
            wait_until(lambda: hub.stats.connections == 2, what="the second connection")
            second.send(encode_control(READY, (CONTENT_TYPE_DNSTAP,)))
            second.sock.settimeout(0.5)
            with pytest.raises(socket.timeout):
                second.sock.recv(100)  # no ACCEPT: its READY is not read yet
            second.sock.settimeout(WAIT)
            frames = collect(hub, 2)
            accept = second.read_control()  # read once there is room again
            assert accept.content_types == (CONTENT_TYPE_DNSTAP,)
        first.stop()
    assert frames == sent


# --------------------------------------------------------------------------- shutdown


def test_shutdown_finishes_open_streams_and_ends_queue(hubs):
    hub = hubs(shutdown_grace=5.0)
    host, port = tcp_address(hub)
    sent = payloads(50, "open")
    client = FstrmClient.tcp(host, port)
    try:
        client.handshake()
        client.send_frames(sent)
        wait_until(lambda: hub.stats.frames == 50, what="the frames to be read")
        started = time.monotonic()
        hub.shutdown()
        hub.shutdown()  # idempotent
        client.read_finish()  # the receiver tells the open stream it is done
        assert time.monotonic() - started < 3.0
    finally:
        client.close()
    frames = []
    deadline = time.monotonic() + WAIT
    while True:
        assert time.monotonic() < deadline
        item = hub.queue.get(timeout=WAIT)
        if item is END:
            break
        frames.extend(item)
    assert frames == sent
    for _ in range(3):  # END stays: every later get sees it at once
        assert hub.queue.get(timeout=0.1) is END
    assert hub.stopped.wait(WAIT)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host, port), timeout=2).close()


def test_shutdown_closes_unidirectional_stream_after_grace(hubs):
    hub = hubs(shutdown_grace=0.3)
    sent = payloads(4, "uni-open")
    with FstrmClient.tcp(*tcp_address(hub)) as client:
        client.start_unidirectional()
        client.send_frames(sent)
        wait_until(lambda: hub.stats.frames == 4, what="the frames to be read")
        hub.shutdown()
        assert client.wait_closed(5) == b"", "no FINISH on a unidirectional stream"
    assert close_hub(hub) == sent


def test_shutdown_while_blocked_hands_over_what_was_read(hubs):
    hub = hubs(batch_size=2, queue_size=1, shutdown_grace=0.2)
    sent = payloads(6, "full")
    with FstrmClient.tcp(*tcp_address(hub)) as client:
        client.handshake()
        client.send_frames(sent[:2])
        wait_until(lambda: len(hub.queue) == 1, what="the queue to fill")
        client.send_frames(sent[2:4])
        wait_until(lambda: hub.blocked, what="the hub to block")
        client.send_frames(sent[4:])  # not read: the sockets are paused
        hub.shutdown()
        client.read_finish()
        assert close_hub(hub) == sent[:4]
    assert hub.stats.frames == 4


def test_shutdown_hands_over_the_unflushed_batch(hubs):
    """Frames still in the hub's current batch (not yet flushed to the queue) are not lost."""
    hub = hubs(batch_size=1000, flush_interval=60.0)
    sent = payloads(50, "pending")
    with FstrmClient.tcp(*tcp_address(hub)) as client:
        client.handshake()
        client.send_frames(sent)
        client.stop()
    wait_until(lambda: hub.stats.frames == 50, what="the frames to be read")
    assert len(hub.batch) == 50 and len(hub.queue) == 0  # nothing flushed yet
    assert close_hub(hub) == sent


def test_shutdown_closes_a_sender_that_ignores_finish(hubs):
    """A bidirectional sender that neither stops nor closes: closed after the grace,
    its complete frames handed over, its partial frame counted as dropped."""
    hub = hubs(shutdown_grace=0.3)
    sent = payloads(20, "stubborn")
    with FstrmClient.tcp(*tcp_address(hub)) as client:
        client.handshake()
        client.send_frames(sent)
        client.send(struct.pack(">I", 64) + b"half")
        wait_until(lambda: hub.stats.bytes >= len(data_stream(sent)) + 8, what="the bytes to be read")
        hub.shutdown()
        client.read_finish()
        assert client.wait_closed(5) == b""
    assert close_hub(hub) == sent
    assert hub.stats.active == 0
    assert hub.stats.partial_frames_dropped == 1


# --------------------------------------------------------------------------- feeders


@dataclass(frozen=True)
class ThreadFeeder:
    """A feeder that sends ``count`` frames from its own thread, in chunks."""

    count: int
    chunk: int = 100
    fail: bool = False

    async def open(self, hub: ListenerHub):
        if self.fail:
            raise ConfigError("feeder: cannot open")
        return _ThreadFeed(hub, self)


class _ThreadFeed:
    def __init__(self, hub: ListenerHub, spec: ThreadFeeder) -> None:
        self.closed = False
        frames = payloads(spec.count, "feed")
        chunks = [frames[i:i + spec.chunk] for i in range(0, len(frames), spec.chunk)]
        self.thread = threading.Thread(target=lambda: [hub.feed_threadsafe(c) for c in chunks])
        self.thread.start()

    async def close(self) -> None:
        self.thread.join()
        self.closed = True


def test_feeder_frames_reach_the_queue_in_order(hubs):
    hub = hubs(tcp=(), feeders=(ThreadFeeder(1_000),), batch_size=64)
    assert collect(hub, 1_000) == payloads(1_000, "feed")
    assert hub.stats.frames == 1_000 and hub.stats.feed_dropped == 0
    assert close_hub(hub) == []


def test_feeder_is_closed_before_the_last_batch(hubs):
    """Frames fed until close() returns are handed over before END."""
    hub = hubs(tcp=(), feeders=(ThreadFeeder(5_000, chunk=7),), batch_size=10_000, queue_size=4)
    assert close_hub(hub) == payloads(5_000, "feed")


def test_feeder_drops_and_counts_while_the_pipeline_is_behind(hubs, caplog):
    caplog.set_level(logging.WARNING, logger="dnstap_receiver.input")
    hub = hubs(tcp=(), feeders=(ThreadFeeder(20_000, chunk=10),), batch_size=10, queue_size=2)
    wait_until(lambda: hub.stats.frames + hub.stats.feed_dropped == 20_000, what="all frames fed")
    assert hub.stats.feed_dropped > 0
    taken = close_hub(hub)
    assert len(taken) == hub.stats.frames
    assert len(taken) + hub.stats.feed_dropped == 20_000
    assert taken == sorted(taken), "frames reordered"
    # The drops are reported (they were only counted), even after a short stall.
    (line,) = [r.getMessage() for r in caplog.records if "fell behind" in r.getMessage()]
    dropped = hub.stats.feed_dropped
    assert f"{dropped} frames from capture threads were dropped since the last report" in line
    assert line.endswith(f"{dropped} frames in total)")


def test_feeder_open_error_stops_the_start(hubs):
    with pytest.raises(ConfigError, match="cannot open"):
        hubs(feeders=(ThreadFeeder(1, fail=True),))
