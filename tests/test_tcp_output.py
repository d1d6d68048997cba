"""output.tcp-socket: lines to a remote TCP server, through outages."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections import Counter

import orjson
import pytest

from conftest import REPO, start_receiver, wait_for_lines
from fstrm_client import FstrmClient, capture_frames, free_tcp_port
from sinks.delivery import Delivery
from sinks.tcp import TcpStream

SERVER = REPO / "tests" / "line_server.py"


class LineServer:
    def __init__(self, port: int, path) -> None:
        self.port, self.path = port, path
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(SERVER), str(self.port), str(self.path)],
                                     stdout=subprocess.PIPE)
        assert self.proc.stdout.readline() == b"listening\n"

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def lines(self) -> list[bytes]:
        try:
            return [line for line in self.path.read_bytes().split(b"\n") if line]
        except FileNotFoundError:
            return []


@pytest.fixture
def server(tmp_path):
    s = LineServer(free_tcp_port(), tmp_path / "received.txt")
    s.start()
    yield s
    if s.proc.poll() is None:
        s.kill()


def wait_until(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_receiver_forwards_every_message_as_json_lines(server, tmp_path):
    port = free_tcp_port()
    receiver = start_receiver(tmp_path / "rx", {
        "input": {"tcp-socket": {"enable": True, "local-address": "127.0.0.1", "local-port": port}},
        "output": {
            "file": {"enable": True, "format": "json", "file": str(tmp_path / "file.jsonl")},
            "tcp-socket": {"enable": True, "format": "json", "remote-address": "127.0.0.1",
                           "remote-port": server.port},
        },
    })
    frames = capture_frames()
    with FstrmClient.tcp("127.0.0.1", port) as client:
        client.handshake()
        client.send_frames(frames)
        client.stop()
    wait_for_lines(tmp_path / "file.jsonl", len(frames), receiver=receiver)
    wait_until(lambda: len(server.lines()) >= len(frames))
    assert receiver.stop() == 0
    sent = sorted(server.lines())
    written = sorted(line for line in (tmp_path / "file.jsonl").read_bytes().split(b"\n") if line)
    assert len(sent) == len(frames) == 2006
    assert sent == written  # the same JSON lines as the file output
    assert Counter(orjson.loads(x)["message"] for x in sent) == {"CLIENT_QUERY": 1003, "CLIENT_RESPONSE": 1003}


def test_server_killed_and_restarted_nothing_unaccounted(server):
    """Every line is delivered at least once or counted dropped; TCP has no
    acknowledgements, so what was in flight at the kill may arrive twice."""
    d = Delivery("tcp-kill-test", TcpStream("127.0.0.1", server.port), retry=0.2, buffer_size=50_000)
    total = 30_000
    for i in range(0, total, 100):
        if i == 10_000:
            wait_until(lambda: len(server.lines()) >= 9_000)
            server.kill()
        if i == 15_000:
            time.sleep(0.5)
            server.start()
        d.put(b"".join(b"line-%d\n" % n for n in range(i, i + 100)), 100)
        time.sleep(0.01)  # a steady 10,000 lines/s
    d.close()
    lines = server.lines()
    unique = set(lines)
    counts = d.counts
    assert counts["send_errors"] >= 1 and counts["connects"] == 2
    assert len(unique) + counts["dropped"] == total, (len(unique), counts)
    assert counts["delivered"] + counts["dropped"] == total
    assert unique <= {b"line-%d" % n for n in range(total)}
    duplicates = len(lines) - len(unique)
    assert duplicates <= counts["resent"]  # only what was in flight came twice
    print(f"tcp kill/restart: {len(unique)} delivered, {counts['dropped']} dropped, {duplicates} twice")


def test_no_server_buffer_overflows_then_delivery_resumes(tmp_path):
    port = free_tcp_port()
    d = Delivery("tcp-down-test", TcpStream("127.0.0.1", port), retry=0.1, buffer_size=1_000)
    started = time.monotonic()
    for i in range(0, 5_000, 100):
        d.put(b"".join(b"x-%d\n" % n for n in range(i, i + 100)), 100)
    assert time.monotonic() - started < 1.0
    assert d.counts["dropped"] == 4_000
    server = LineServer(port, tmp_path / "late.txt")
    server.start()
    try:
        wait_until(lambda: len(server.lines()) == 1_000)
        d.close()
        assert server.lines()[0] == b"x-4000" and server.lines()[-1] == b"x-4999"
        assert d.counts["delivered"] == 1_000
    finally:
        server.kill()


def test_dead_server_costs_only_its_own_copy(tmp_path):
    """With the TCP output's server down and a tiny buffer, the file output
    still gets every message; the TCP output counts its drops and says so."""
    port, dead = free_tcp_port(), free_tcp_port()
    receiver = start_receiver(tmp_path / "rx", {
        "input": {"tcp-socket": {"enable": True, "local-address": "127.0.0.1", "local-port": port}},
        "output": {
            "file": {"enable": True, "format": "json", "file": str(tmp_path / "file.jsonl")},
            "tcp-socket": {"enable": True, "remote-address": "127.0.0.1", "remote-port": dead,
                           "retry": 0.2, "buffer-size": 100, "flush-timeout": 0.5},
        },
    })
    frames = capture_frames()
    with FstrmClient.tcp("127.0.0.1", port) as client:
        client.handshake()
        client.send_frames(frames)
        client.stop()
    assert wait_for_lines(tmp_path / "file.jsonl", len(frames), receiver=receiver) == len(frames)
    assert receiver.stop() == 0
    logs = receiver.stderr_path.read_text() + receiver.stdout_path.read_text()
    assert "output tcp-socket: cannot connect to tcp://127.0.0.1:%d" % dead in logs
    assert logs.count("output tcp-socket: cannot connect") == 1  # once per outage, not per retry
    final = [line for line in logs.splitlines() if "stopped; counters" in line][-1]
    assert "output.tcp-socket: queued=2006, dropped=2006" in final
