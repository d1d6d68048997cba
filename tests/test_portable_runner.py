"""The same pipelines through Beam's portable runner API (job service embedded,
SDK worker in LOOPBACK mode): the graph is serialised and runs through the Fn
API as it would on Flink or Spark, with nothing downloaded."""

from __future__ import annotations

import subprocess
import sys

import orjson
import yaml
from conftest import BASE_CONFIG, REPO, merge, start_receiver, wait_for_lines
from fstrm_client import FstrmClient, capture_frames, free_tcp_port

PORTABLE = ("--runner=PortableRunner", "--job_endpoint=embed", "--environment_type=LOOPBACK")


def test_replay_on_the_portable_runner(tmp_path):
    out = tmp_path / "out.jsonl"
    windows = tmp_path / "windows.jsonl"
    conf = tmp_path / "c.yaml"
    conf.write_text(yaml.safe_dump(merge(BASE_CONFIG, {
        "latency": {"enable": False},
        "output": {"file": {"enable": True, "format": "json", "file": str(out)}},
    })))
    capture = REPO / "tests" / "data" / "captures" / "unbound-tcp.fstrm"
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", *PORTABLE, "-c", str(conf), "--replay", str(capture),
         "--replay-windows", str(windows)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "replay summary: 1/1 files, 2006 messages" in proc.stderr
    assert "file(s) on PortableRunner" in proc.stderr
    lines = [orjson.loads(x) for x in out.read_bytes().splitlines()]
    assert len(lines) == 2006
    counted = sum(w["counters"]["query"] + w["counters"]["response"]
                  for w in map(orjson.loads, windows.read_bytes().splitlines()))
    assert counted == 2006


def test_live_session_on_the_portable_runner(tmp_path):
    port = free_tcp_port()
    out = tmp_path / "live.jsonl"
    receiver = start_receiver(tmp_path / "rx", {
        "input": {"tcp-socket": {"enable": True, "local-address": "127.0.0.1", "local-port": port}},
        "output": {"file": {"enable": True, "format": "json", "file": str(out)}},
    }, extra_args=PORTABLE, timeout=90)
    frames = capture_frames()
    with FstrmClient.tcp("127.0.0.1", port) as client:
        client.handshake()
        client.send_frames(frames)
        client.stop()
    assert wait_for_lines(out, len(frames), timeout=60, receiver=receiver) == len(frames)
    assert receiver.stop(timeout=60) == 0
    assert len(out.read_bytes().splitlines()) == 2006
    assert "runner: PortableRunner" in receiver.stderr_path.read_text()
