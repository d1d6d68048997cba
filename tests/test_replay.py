"""``--replay``: the receiver's pipeline over capture files, run as users run it
(``python -m pipeline --runner=DirectRunner --replay ... -c FILE``), plus the
ReadFromCaptures source on the in-process runner."""

from __future__ import annotations

import gzip
import os
import pty
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import apache_beam as beam
import orjson
import pytest
import yaml
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.util import assert_that
from conftest import BASE_CONFIG, REPO, merge
from fstrm_client import capture_frames, free_tcp_port
from test_cli import run_cli

from core.batches import FrameBatch
from core.formats import get_format
from core.framestream import encode_stream
from core.message import decode
from sources.capture_io import NoCaptureMatch, ReadFromCaptures, expand_patterns

CAPTURES = REPO / "tests" / "data" / "captures"
RUN_TIMEOUT = 60.0
WINDOW = 10.0


def write_config(tmp_path: Path, **over) -> tuple[Path, Path]:
    out = tmp_path / "out.json"
    data = merge(BASE_CONFIG, {
        # MatchLatency rewrites latencies: off, so output equals plain decoding.
        "latency": {"enable": False},
        "statistics": {"window": WINDOW},
        "output": {"file": {"enable": True, "format": "json", "file": str(out), "file-max-size": "1G"}},
    })
    data = merge(data, over)
    path = tmp_path / "replay.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path, out


def run_replay(tmp_path: Path, *args: str, **over) -> tuple[subprocess.CompletedProcess, Path]:
    conf, out = write_config(tmp_path, **over)
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "--runner=DirectRunner", *args, "-c", str(conf)],
        cwd=REPO, capture_output=True, text=True, check=False, timeout=RUN_TIMEOUT,
        stdin=subprocess.DEVNULL, env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    return proc, out


def as_output(frames: list[bytes]) -> Counter:
    """What the json file output writes for ``frames``, as a multiset of lines."""
    fmt = get_format("json")
    return Counter(orjson.dumps(orjson.loads(fmt.record(decode(f))), option=orjson.OPT_SORT_KEYS) for f in frames)


def output(path: Path) -> Counter:
    with open(path, "rb") as fh:
        return Counter(orjson.dumps(orjson.loads(line), option=orjson.OPT_SORT_KEYS) for line in fh if line.strip())


def truncated_copy(tmp_path: Path, name: str, keep_frames: int) -> tuple[Path, int]:
    """``name`` cut 10 bytes into its data frame number ``keep_frames`` (0-based):
    the path and the offset where that frame starts."""
    data = (CAPTURES / name).read_bytes()
    frames = capture_frames(name)
    start = len(data) - 12 - sum(4 + len(f) for f in frames)  # after START (STOP is 12 bytes)
    offset = start + sum(4 + len(f) for f in frames[:keep_frames])
    path = tmp_path / f"cut-{name}"
    path.write_bytes(data[: offset + 10])
    return path, offset


def test_two_patterns_and_a_glob_output_exactly_the_captures(tmp_path):
    proc, out = run_replay(
        tmp_path, "--replay", str(CAPTURES / "unbound-*.fstrm"), "--replay", str(CAPTURES / "named.fstrm")
    )
    assert proc.returncode == 0, proc.stderr
    frames = capture_frames("unbound-tcp.fstrm") + capture_frames("unbound-unix.fstrm") + capture_frames("named.fstrm")
    assert len(frames) == 4112
    assert output(out) == as_output(frames)
    assert re.search(r"replay summary: 3/3 files, 4112 messages \(4112 decoded\) in [\d.]+ s "
                     r"\(\d+ messages/s\), 0 damaged", proc.stderr), proc.stderr


def test_gzip_plus_truncated_file_exits_1_and_keeps_every_complete_frame(tmp_path):
    gz = tmp_path / "tcp-capture.fstrm"  # gzip, though not named so
    gz.write_bytes(gzip.compress((CAPTURES / "unbound-tcp.fstrm").read_bytes()))
    cut, offset = truncated_copy(tmp_path, "named.fstrm", 37)
    proc, out = run_replay(tmp_path, "--replay", str(gz), "--replay", str(cut))
    assert proc.returncode == 1, proc.stderr
    expected = capture_frames("unbound-tcp.fstrm") + capture_frames("named.fstrm")[:37]
    assert output(out) == as_output(expected)
    assert f"replay summary: damaged: {cut} at offset {offset}: truncated frame" in proc.stderr, proc.stderr
    assert re.search(r"replay summary: 2/2 files, 2043 messages .* 1 damaged", proc.stderr), proc.stderr


def test_a_pattern_matching_nothing_is_a_usage_error(tmp_path):
    missing = str(tmp_path / "none-*.fstrm")
    proc, out = run_replay(tmp_path, "--replay", str(CAPTURES / "named.fstrm"), "--replay", missing)
    assert proc.returncode == 2
    assert f"--replay {missing}: no file matches" in proc.stderr
    assert not out.exists()


def test_not_a_capture_is_damage_not_a_crash(tmp_path):
    junk = tmp_path / "junk.fstrm"
    junk.write_bytes(b"\x00\x00\x01\x00" + b"x" * 300)
    proc, out = run_replay(tmp_path, "--replay", str(junk), "--replay", str(CAPTURES / "named.fstrm"))
    assert proc.returncode == 1, proc.stderr
    assert output(out) == as_output(capture_frames("named.fstrm"))
    assert f"damaged: {junk} at offset 0: missing START" in proc.stderr


def test_gzip_damaged_in_its_first_block_is_damage_not_a_crash(tmp_path):
    """The format is told by the first decompressed bytes: a gzip file cut or
    corrupt before them used to stop the whole run with a traceback."""
    cut = tmp_path / "cut.fstrm.gz"
    cut.write_bytes(b"\x1f\x8b")
    corrupt = tmp_path / "corrupt.fstrm.gz"
    corrupt.write_bytes(b"\x1f\x8b\x08\x00" + b"garbage" * 5)
    proc, out = run_replay(tmp_path, "--replay", str(cut), "--replay", str(corrupt),
                           "--replay", str(CAPTURES / "named.fstrm"))
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert output(out) == as_output(capture_frames("named.fstrm"))
    assert f"damaged: {cut} at offset 0: unreadable (EOFError: compressed file ended" in proc.stderr
    assert f"damaged: {corrupt} at offset 0: unreadable (corrupt gzip data: " in proc.stderr
    assert re.search(r"replay summary: 3/3 files, 100 messages .* 2 damaged", proc.stderr), proc.stderr


def test_replay_windows_json_lines(tmp_path):
    windows = tmp_path / "windows.jsonl"
    proc, out = run_replay(
        tmp_path, "--replay", str(CAPTURES / "unbound-tcp.fstrm"), "--replay", str(CAPTURES / "named.fstrm"),
        "--replay-windows", str(windows),
    )
    assert proc.returncode == 0, proc.stderr
    assert sum(output(out).values()) == 2106  # the outputs still get every message
    lines = [orjson.loads(line) for line in windows.read_bytes().splitlines()]
    records = [decode(f) for f in capture_frames("unbound-tcp.fstrm") + capture_frames("named.fstrm")]
    assert lines and [w["start"] for w in lines] == sorted(w["start"] for w in lines)
    for w in lines:
        assert set(w) == {"start", "end", "counters", "streams", "tables"}
        assert w["start"] % WINDOW == 0 and w["end"] - w["start"] == WINDOW
        # the streams add up to the total
        for key in ("query", "response"):
            assert sum(s[key] for s in w["streams"].values()) == w["counters"][key]
    assert sum(w["counters"]["query"] + w["counters"]["response"] for w in lines) == len(records)
    # each window counts the messages whose timestamp falls in it
    per_window = Counter(int(r["timestamp"] // WINDOW) * WINDOW for r in records)
    assert {w["start"]: w["counters"]["query"] + w["counters"]["response"] for w in lines} == per_window
    identities = {r["identity"] for r in records}
    assert set().union(*(w["streams"] for w in lines)) == identities


# -- the source on the in-process runner -------------------------------------------


def test_read_from_captures_batches_and_metrics(tmp_path):
    cut, offset = truncated_copy(tmp_path, "named.fstrm", 5)
    expected = capture_frames("unbound-tcp.fstrm") + capture_frames("named.fstrm")[:5]

    def check(batches):
        assert all(isinstance(b, FrameBatch) and 1 <= len(b) <= 100 for b in batches)
        assert Counter(f for b in batches for f in b) == Counter(expected)

    p = beam.Pipeline(runner=FnApiRunner())
    batches = p | ReadFromCaptures([str(CAPTURES / "unbound-t*.fstrm"), str(cut)], batch_size=100)
    assert_that(batches, check)
    result = p.run()
    result.wait_until_finish()
    metrics = result.metrics().query(MetricsFilter().with_namespace("replay"))
    counts = {m.key.metric.name: m.committed for m in metrics["counters"]}
    assert counts == {"files": 2, "frames": len(expected), "damaged_files": 1}
    damage = set().union(*(m.committed for m in metrics["string_sets"]))
    assert damage == {f"{cut}\t{offset}\ttruncated frame (10 bytes at end of file)"}


def test_expand_patterns(tmp_path):
    for name in ("b.fstrm", "a.fstrm", "c.txt"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "d.fstrm").mkdir()
    a, b = str(tmp_path / "a.fstrm"), str(tmp_path / "b.fstrm")
    assert expand_patterns([str(tmp_path / "*.fstrm")]) == [a, b]  # sorted, directories left out
    assert expand_patterns([b, str(tmp_path / "*.fstrm")]) == [b, a]  # each file once, first pattern first
    with pytest.raises(NoCaptureMatch, match=r"--replay .*/d\.fstrm: no file matches"):
        expand_patterns([a, str(tmp_path / "d.fstrm")])


def test_replay_windows_without_replay_is_a_usage_error():
    proc = run_cli("--replay-windows", "/tmp/windows.jsonl")
    assert proc.returncode == 2
    assert "--replay-windows needs --replay" in proc.stderr


def test_pcap_replay_gives_the_dns_exchanges(tmp_path):
    """A real tcpdump capture of dig asking unbound (7 exchanges, 3 over TCP;
    tests/data/pcap/README.md) replays as CLIENT_QUERY/CLIENT_RESPONSE records."""
    pcap = REPO / "tests" / "data" / "pcap" / "unbound-dig.pcap"
    gz = tmp_path / "capture.pcap.gz"
    gz.write_bytes(gzip.compress(pcap.read_bytes()))
    out = tmp_path / "out.jsonl"
    conf = tmp_path / "c.yaml"
    conf.write_text(yaml.safe_dump(merge(BASE_CONFIG, {
        "input": {"sniffer": {"dns-port": [5399], "dnstap-identity": "lab-capture"}},
        "output": {"file": {"enable": True, "format": "json", "file": str(out)}},
    })))
    proc = subprocess.run([sys.executable, "-m", "pipeline", "--runner=DirectRunner", "-c", str(conf),
                           "--replay", str(gz)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [orjson.loads(x) for x in out.read_bytes().splitlines()]
    assert Counter(r["message"] for r in records) == {"CLIENT_QUERY": 7, "CLIENT_RESPONSE": 7}
    assert Counter(r["protocol"] for r in records) == {"UDP": 8, "TCP": 6}
    assert all(r["identity"] == "lab-capture" for r in records)
    responses = [r for r in records if r["type"] == "response"]
    assert all(isinstance(r["latency"], float) and r["latency"] >= 0 for r in responses)  # matched to their queries


def test_progress_line_on_a_terminal_only(tmp_path):
    """Two files, two worker processes: the line counts what the workers read."""
    capture = REPO / "tests" / "data" / "captures" / "unbound-tcp.fstrm"
    frames = capture_frames() * 150  # long enough to be seen running
    for name in ("big-1.fstrm", "big-2.fstrm"):
        (tmp_path / name).write_bytes(encode_stream(frames))
    conf = tmp_path / "c.yaml"
    conf.write_text(yaml.safe_dump(merge(BASE_CONFIG, {
        "output": {"file": {"enable": True, "format": "json", "file": str(tmp_path / "out.jsonl")}},
    })))
    cmd = [sys.executable, "-m", "pipeline", "--runner=DirectRunner", "-c", str(conf),
           "--replay", str(tmp_path / "big-*.fstrm"), "--replay-workers", "2"]
    scratch = tmp_path / "tmp"  # where the progress board is made, and removed
    scratch.mkdir()
    primary, secondary = pty.openpty()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=secondary,
                            env=dict(os.environ, TMPDIR=str(scratch)))
    os.close(secondary)
    seen = b""
    while True:
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    assert proc.wait(120) == 0
    os.close(primary)
    assert b"on 2 worker processes" in seen
    assert re.search(rb"\rreplay: [012]/2 files, [1-9][\d,]* messages, [\d,]+ messages/s", seen), seen[-2000:]
    piped = subprocess.run(cmd, cwd=REPO, capture_output=True, timeout=120)
    assert piped.returncode == 0 and b"\r" not in piped.stderr
    assert capture.exists()
    assert list(scratch.iterdir()) == []


# -- worker processes ----------------------------------------------------------------


def test_worker_processes_give_the_results_of_one_process(tmp_path):
    """The same files through 1 and 2 worker processes: the same output lines
    (one file written by both workers), the same windows, the same summary."""
    files = ("--replay", str(CAPTURES / "unbound-*.fstrm"), "--replay", str(CAPTURES / "named.fstrm"))
    runs = {}
    for workers in ("1", "2"):
        run_dir = tmp_path / workers
        run_dir.mkdir()
        windows = run_dir / "windows.jsonl"
        proc, _ = run_replay(run_dir, *files, "--replay-workers", workers, "--replay-windows", str(windows),
                             output={"file": {"file-max-size": "64k", "file-count": 1000}})
        assert proc.returncode == 0, proc.stderr
        lines = Counter()
        for name in sorted(run_dir.glob("out.json*")):
            lines += output(name)
        runs[workers] = (proc.stderr, lines, windows.read_bytes())
    one, two = runs["1"], runs["2"]
    assert "on FnApiRunner" in one[0] and "on 2 worker processes" in two[0], two[0]
    frames = capture_frames("unbound-tcp.fstrm") + capture_frames("unbound-unix.fstrm") + capture_frames("named.fstrm")
    assert one[1] == two[1] == as_output(frames)
    assert [orjson.loads(w) for w in one[2].splitlines()] == [orjson.loads(w) for w in two[2].splitlines()]
    summary = re.compile(r"replay summary: 3/3 files, 4112 messages \(4112 decoded\)")
    assert summary.search(one[0]) and summary.search(two[0]), two[0]
    # The workers log in the receiver's format, once, without Beam's harness chatter.
    assert two[0].count(f"INFO replay: {CAPTURES / 'named.fstrm'}: 100 frames") == 1, two[0]
    assert "Worker: " not in two[0] and "INFO:" not in two[0] and "WARNING:" not in two[0], two[0]


def test_damage_is_reported_from_worker_processes(tmp_path):
    cut, offset = truncated_copy(tmp_path, "named.fstrm", 37)
    proc, out = run_replay(tmp_path, "--replay", str(CAPTURES / "unbound-tcp.fstrm"), "--replay", str(cut),
                           "--replay-workers", "2")
    assert proc.returncode == 1, proc.stderr
    assert "on 2 worker processes" in proc.stderr
    assert output(out) == as_output(capture_frames("unbound-tcp.fstrm") + capture_frames("named.fstrm")[:37])
    assert f"replay summary: damaged: {cut} at offset {offset}: truncated frame" in proc.stderr, proc.stderr


def test_damage_found_by_each_worker_process_is_in_the_summary(tmp_path):
    """The FnApiRunner keeps one value per metric key across bundles: with one
    shared key, the damage one worker found was lost from the summary."""
    cuts = [truncated_copy(tmp_path, "named.fstrm", 37), truncated_copy(tmp_path, "unbound-tcp.fstrm", 5)]
    proc, _ = run_replay(tmp_path, "--replay", str(cuts[0][0]), "--replay", str(cuts[1][0]), "--replay-workers", "2")
    assert proc.returncode == 1, proc.stderr
    assert "on 2 worker processes" in proc.stderr
    for cut, offset in cuts:
        assert f"replay summary: damaged: {cut} at offset {offset}: truncated frame" in proc.stderr, proc.stderr
    assert re.search(r"replay summary: 2/2 files, 42 messages .* 2 damaged", proc.stderr), proc.stderr


def test_an_output_that_cannot_be_shared_keeps_one_process(tmp_path):
    proc, out = run_replay(tmp_path, "--replay", str(CAPTURES / "unbound-*.fstrm"), "--replay-workers", "2",
                           output={"dnstap-file": {"enable": True, "file": str(tmp_path / "copy.fstrm")}})
    assert proc.returncode == 0, proc.stderr
    assert "output.dnstap-file writes one Frame Streams stream per file: replaying in one process" in proc.stderr
    assert "on FnApiRunner" in proc.stderr
    assert sum(output(out).values()) == 4012


@pytest.mark.parametrize("args", [["--replay-workers", "0"], ["--replay-workers", "x"]])
def test_replay_workers_must_be_a_positive_number(tmp_path, args):
    proc, _ = run_replay(tmp_path, "--replay", str(CAPTURES / "named.fstrm"), *args)
    assert proc.returncode == 2
    assert "--replay-workers: expected a whole number >= 1" in proc.stderr


def test_replay_workers_without_replay_is_a_usage_error():
    proc = run_cli("--replay-workers", "2")
    assert proc.returncode == 2
    assert "--replay-workers needs --replay" in proc.stderr


def test_worker_processes_flush_network_outputs_before_the_end(tmp_path):
    """Each worker process has its own connection and buffer: all delivered
    when the replay exits."""
    from test_tcp_output import LineServer

    server = LineServer(free_tcp_port(), tmp_path / "received.txt")
    server.start()
    try:
        proc, out = run_replay(tmp_path, "--replay", str(CAPTURES / "unbound-*.fstrm"), "--replay-workers", "2",
                               output={"tcp-socket": {"enable": True, "remote-address": "127.0.0.1",
                                                      "remote-port": server.port, "format": "json"}})
        assert proc.returncode == 0, proc.stderr
        assert "on 2 worker processes" in proc.stderr
        received = Counter(orjson.dumps(orjson.loads(line), option=orjson.OPT_SORT_KEYS) for line in server.lines())
        assert received == output(out) == as_output(capture_frames("unbound-tcp.fstrm")
                                                    + capture_frames("unbound-unix.fstrm"))
    finally:
        server.kill()


def test_worker_processes_share_standard_output_line_by_line(tmp_path):
    """Both workers write batches far larger than a pipe's atomic write
    (PIPE_BUF) to the same pipe: every line arrives whole."""
    conf, _ = write_config(tmp_path, output={"stdout": {"enable": True, "format": "json"},
                                             "file": {"enable": False}})
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "--runner=DirectRunner", "-c", str(conf), "--replay-workers", "2",
         "--replay", str(CAPTURES / "unbound-*.fstrm")],
        cwd=REPO, capture_output=True, timeout=RUN_TIMEOUT, check=False, stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert b"on 2 worker processes" in proc.stderr
    lines = Counter(orjson.dumps(orjson.loads(line), option=orjson.OPT_SORT_KEYS)
                    for line in proc.stdout.splitlines())
    assert lines == as_output(capture_frames("unbound-tcp.fstrm") + capture_frames("unbound-unix.fstrm"))
