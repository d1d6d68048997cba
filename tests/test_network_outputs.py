"""Several network outputs at once in the live receiver: each gets every message."""

from __future__ import annotations

import signal
import subprocess
import time

import orjson
import peers
import pytest
from conftest import start_receiver, wait_for_lines
from fstrm_client import FstrmClient, capture_frames, free_tcp_port
from rsyslog_server import Rsyslog
from test_dnstap_output import read_stream
from test_tcp_output import LineServer

pytestmark = pytest.mark.integration


def wait_until(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_file_tcp_syslog_and_dnstap_together(tmp_path):
    capture = peers.require("fstrm_capture")
    lines = LineServer(free_tcp_port(), tmp_path / "tcp.txt")
    sock = tmp_path / "forward.sock"
    forwarded = tmp_path / "forward.fstrm"
    rsyslog = Rsyslog(tmp_path / "rsyslog")
    fstrm = None
    try:  # every server is stopped whatever fails
        lines.start()
        fstrm = subprocess.Popen([capture, "-t", "protobuf:dnstap.Dnstap", "-u", str(sock), "-w", str(forwarded)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        rsyslog.start()
        wait_until(sock.exists)
        port = free_tcp_port()
        receiver = start_receiver(tmp_path / "rx", {
            "input": {"tcp-socket": {"enable": True, "local-address": "127.0.0.1", "local-port": port}},
            "output": {
                "file": {"enable": True, "format": "json", "file": str(tmp_path / "file.jsonl")},
                "tcp-socket": {"enable": True, "format": "json", "remote-address": "127.0.0.1",
                               "remote-port": lines.port},
                "syslog": {"enable": True, "transport": "tcp", "format": "json",
                           "remote-address": "127.0.0.1", "remote-port": rsyslog.port},
                "dnstap": {"enable": True, "sock-path": str(sock), "dnstap-identity": "relay"},
            },
        })
        frames = capture_frames()
        with FstrmClient.tcp("127.0.0.1", port) as client:
            client.handshake()
            client.send_frames(frames)
            client.stop()
        n = len(frames)
        assert wait_for_lines(tmp_path / "file.jsonl", n, receiver=receiver) == n
        wait_until(lambda: len(lines.lines()) >= n)
        assert rsyslog.wait_lines(n) == n
        assert receiver.stop() == 0  # the dnstap output ends its stream with STOP/FINISH
    finally:
        if fstrm is not None:
            fstrm.send_signal(signal.SIGINT)
            fstrm.wait(10)
        if lines.proc is not None and lines.proc.poll() is None:
            lines.kill()
        if rsyslog.running():
            rsyslog.stop()
    file_records = sorted(orjson.loads(x)["id"] for x in (tmp_path / "file.jsonl").read_bytes().splitlines() if x)
    assert sorted(orjson.loads(x)["id"] for x in lines.lines()) == file_records
    assert sorted(orjson.loads(line.msg)["id"] for line in rsyslog.lines()) == file_records
    got, finished = read_stream(forwarded.read_bytes())
    assert finished and len(got) == n
    logs = receiver.stderr_path.read_text() + receiver.stdout_path.read_text()
    final = [line for line in logs.splitlines() if "stopped; counters" in line][-1]
    for name in ("tcp-socket", "syslog", "dnstap"):
        assert f"output.{name}: queued={n}, delivered={n}" in final
