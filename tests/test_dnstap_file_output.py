"""output.dnstap-file: Frame Streams files the reference tools read back identically."""

from __future__ import annotations

import subprocess
import sys

import apache_beam as beam
import peers
import pytest
import yaml
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from conftest import BASE_CONFIG, REPO, merge, start_receiver
from fstrm_client import FstrmClient, capture_frames, free_tcp_port
from test_dnstap_output import read_stream

from core.message import decode
from pipeline.config import DnstapFileOutput
from sinks.dnstap_file import FrameStreamFile, WriteToDnstapFile
from transforms.batches import RecordBatch

CAPTURE = peers.CAPTURES / "unbound-tcp.fstrm"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def payloads(n: int) -> list[bytes]:
    return [b"payload-%05d" % i for i in range(n)]


def chain(path) -> list[bytes]:
    """The data frames of FILE.<n> ... FILE.1, FILE (oldest first); each must be a whole stream."""
    files = sorted(path.parent.glob(path.name + ".*"), key=lambda p: -int(p.suffix[1:])) + [path]
    frames = []
    for f in files:
        got, finished = read_stream(f.read_bytes())
        assert finished, f
        frames += got
    return frames


def test_one_stream_start_frames_stop(tmp_path):
    path = tmp_path / "out.fstrm"
    w = FrameStreamFile(str(path))
    w.write(payloads(3))
    w.close()
    frames, finished = read_stream(path.read_bytes())
    assert frames == payloads(3) and finished


def test_size_rotation_keeps_every_file_a_whole_stream(tmp_path):
    path = tmp_path / "out.fstrm"
    w = FrameStreamFile(str(path), max_size=200, count=50)
    for i in range(0, 100, 7):
        w.write(payloads(100)[i:i + 7])
    w.close()
    assert w.rotations > 5
    assert chain(path) == payloads(100)
    assert all(f.stat().st_size <= 200 for f in tmp_path.iterdir())


def test_time_rotation(tmp_path):
    clock = Clock()
    path = tmp_path / "out.fstrm"
    w = FrameStreamFile(str(path), count=5, interval=60, clock=clock)
    w.write(payloads(3))
    clock.now += 59
    w.rotate_if_due()
    assert w.rotations == 0
    clock.now += 1
    w.rotate_if_due()
    clock.now += 600
    w.rotate_if_due()  # nothing written since: no empty file
    assert w.rotations == 1
    w.write(payloads(5)[3:])
    w.close()
    assert read_stream((tmp_path / "out.fstrm.1").read_bytes()) == (payloads(3), True)
    assert read_stream(path.read_bytes()) == (payloads(5)[3:], True)


def test_an_earlier_file_is_rotated_away_not_appended_to(tmp_path):
    path = tmp_path / "out.fstrm"
    first = FrameStreamFile(str(path))
    first.write(payloads(2))
    first.close()
    second = FrameStreamFile(str(path))
    second.write(payloads(4)[2:])
    second.close()
    assert read_stream((tmp_path / "out.fstrm.1").read_bytes()) == (payloads(2), True)
    assert read_stream(path.read_bytes()) == (payloads(4)[2:], True)


def write_capture_through_beam(path) -> list[bytes]:
    frames = capture_frames()
    batches = [RecordBatch(decode(f, keep_raw=True) for f in frames[i:i + 300]) for i in range(0, len(frames), 300)]
    options = DnstapFileOutput(enable=True, file=str(path), file_max_size=0)
    with beam.Pipeline(runner=FnApiRunner()) as p:
        p | beam.Create(batches) | WriteToDnstapFile(options)
    return frames


def test_pipeline_writes_the_original_frames(tmp_path):
    path = tmp_path / "out.fstrm"
    frames = write_capture_through_beam(path)
    assert read_stream(path.read_bytes()) == (frames, True)


@pytest.mark.integration
def test_dnstap_ldns_reads_it_as_the_original(tmp_path):
    peers.require("dnstap-ldns")
    path = tmp_path / "out.fstrm"
    write_capture_through_beam(path)
    assert peers.dnstap_ldns_decode(path) == peers.dnstap_ldns_decode(CAPTURE)
    assert len(peers.dnstap_ldns_decode(path)) == 2006


@pytest.mark.integration
def test_go_dnstap_reads_it_as_the_original(tmp_path):
    peers.require("dnstap")
    path = tmp_path / "out.fstrm"
    write_capture_through_beam(path)
    assert peers.golang_dnstap_decode_json(path) == peers.golang_dnstap_decode_json(CAPTURE)


@pytest.mark.integration
def test_fstrm_dump_reads_it_as_the_original(tmp_path):
    program = peers.require("fstrm_dump")
    path = tmp_path / "out.fstrm"
    write_capture_through_beam(path)
    ours = subprocess.run([program, str(path)], capture_output=True, check=True)
    original = subprocess.run([program, str(CAPTURE)], capture_output=True, check=True)
    # stdout: one line per data frame; stderr: the control frames (START with its content type, STOP)
    assert ours.stdout == original.stdout and ours.stdout.count(b"\n") == 2006
    assert ours.stderr == original.stderr and b"FSTRM_CONTROL_STOP" in ours.stderr


def test_live_receiver_stores_what_it_receives(tmp_path):
    port = free_tcp_port()
    path = tmp_path / "live.fstrm"
    receiver = start_receiver(tmp_path / "rx", {
        "input": {"tcp-socket": {"enable": True, "local-address": "127.0.0.1", "local-port": port}},
        "output": {"dnstap-file": {"enable": True, "file": str(path)}},
    })
    frames = capture_frames()
    with FstrmClient.tcp("127.0.0.1", port) as client:
        client.handshake()
        client.send_frames(frames)
        client.stop()
    assert receiver.stop() == 0
    assert read_stream(path.read_bytes()) == (frames, True)


@pytest.mark.integration
def test_capture_live_unbound_then_replay_gives_the_same_messages(tmp_path):
    """unbound under dnsperf -> the receiver's dnstap-file (and JSON file)
    -> --replay of that capture -> the same messages, field for field."""
    for program in ("unbound", "dnsperf"):
        peers.require(program)
    port = free_tcp_port()
    live_json = tmp_path / "live.jsonl"
    capture = tmp_path / "live.fstrm"
    receiver = start_receiver(tmp_path / "rx", {
        "input": {"tcp-socket": {"enable": True, "local-address": "127.0.0.1", "local-port": port}},
        "latency": {"enable": False},
        "output": {"file": {"enable": True, "format": "json", "file": str(live_json)},
                   "dnstap-file": {"enable": True, "file": str(capture)}},
    })
    queries = tmp_path / "queries.txt"
    peers.write_queries(queries, 300)
    dns_port = peers.free_port(udp_too=True)
    unbound = peers.start_unbound(tmp_path / "unbound", dns_port, f"tcp:127.0.0.1:{port}")
    try:
        stats = peers.run_dnsperf(dns_port, queries, runs=1, qps=2000)
    finally:
        assert peers.stop_unbound(unbound) == 0
    assert stats["completed"] == 300
    assert receiver.stop() == 0
    live = sorted(live_json.read_bytes().splitlines())
    assert len(live) == 600

    replayed_json = tmp_path / "replayed.jsonl"
    conf = tmp_path / "replay.yaml"
    conf.write_text(yaml.safe_dump(merge(BASE_CONFIG, {
        "latency": {"enable": False},
        "output": {"file": {"enable": True, "format": "json", "file": str(replayed_json)}},
    })))
    proc = subprocess.run([sys.executable, "-m", "pipeline", "--runner=DirectRunner", "-c", str(conf),
                           "--replay", str(capture)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(replayed_json.read_bytes().splitlines()) == live
