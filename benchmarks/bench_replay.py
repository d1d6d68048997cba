"""Batch replay speed: decode + statistics + JSON output of N messages from a
capture file, against dnstap-receiver 4.7.0 fed the same messages live.

    .venv/bin/python benchmarks/bench_replay.py [--messages 2000000] [--files 1] [--with-4.7] [-- BEAM_ARGS]

The messages are bench_e2e.py's workload (same generator, same bytes) written
as Frame Streams capture files (START, data frames, STOP): one, or the
messages dealt into ``--files`` files of equal size. Ours runs
``python -m pipeline --replay FILE --replay-windows W -c CONF`` (JSON file
output, statistics through Beam's windowing); the clock covers the whole
process, start-up included, and the pipeline's own time is read from its
summary line. ``--with-4.7`` also runs 4.7.0 live on the same messages, as
bench_e2e.py does.
"""

from __future__ import annotations

import argparse
import struct
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

import bench_e2e  # noqa: E402
import yaml  # noqa: E402

from core.framestream import CONTENT_TYPE_DNSTAP, START, STOP, encode_control  # noqa: E402


def split_frames(data: bytes, parts: int) -> list[bytes]:
    """``data`` (length-prefixed frames) cut at frame boundaries into ``parts`` near-equal pieces."""
    cuts, pos, step = [0], 0, len(data) / parts
    unpack = struct.Struct(">I").unpack_from
    while pos < len(data):
        pos += 4 + unpack(data, pos)[0]
        if pos >= step * len(cuts) and len(cuts) < parts:
            cuts.append(pos)
    cuts.append(len(data))
    return [data[a:b] for a, b in zip(cuts, cuts[1:]) if b > a]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=2_000_000)
    p.add_argument("--files", type=int, default=1, help="capture files the messages are split into")
    p.add_argument("--with-4.7", dest="with_ref", action="store_true", help="also run 4.7.0 live on the same messages")
    p.add_argument("beam_args", nargs="*", help="after --: extra arguments for python -m pipeline")
    args = p.parse_args()
    workload = bench_e2e.build_workload(args.messages, 4096, 300, 1)
    with tempfile.TemporaryDirectory(prefix="bench-replay-") as tmp:
        tmp = Path(tmp)
        captures = []
        for i, part in enumerate(split_frames(workload.data, args.files)):
            captures.append(tmp / f"capture-{i:03d}.fstrm")
            with open(captures[-1], "wb") as out:
                out.write(encode_control(START, [CONTENT_TYPE_DNSTAP]))
                out.write(part)
                out.write(encode_control(STOP))
        output, windows = tmp / "out.jsonl", tmp / "windows.jsonl"
        conf = tmp / "c.yaml"
        conf.write_text(yaml.safe_dump({
            "web-api": {"enable": False},
            "input": {"tcp-socket": {"enable": False}},
            "output": {"stdout": {"enable": False},
                       "file": {"enable": True, "format": "json", "file": str(output), "file-max-size": "100G"}},
        }))
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pipeline", "--runner=DirectRunner", "-c", str(conf),
                               "--replay", str(tmp / "capture-*.fstrm"), "--replay-windows", str(windows),
                               *args.beam_args],
                              cwd=REPO, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if proc.returncode != 0:
            print(proc.stderr[-3000:])
            return 1
        lines = sum(1 for _ in open(output, "rb"))
        inner = re.search(r"messages \(\d+ decoded\) in ([\d.]+) s", proc.stderr)
        print(f"ours --replay: {lines:,} messages, {sum(1 for _ in open(windows, 'rb'))} windows, "
              f"{wall:.2f} s wall = {lines / wall:,.0f} msg/s"
              + (f" ({lines / float(inner.group(1)):,.0f} msg/s inside the pipeline)" if inner else ""))
    if args.with_ref:
        bench_e2e.ensure_ref_venv()
        ref_args = bench_e2e.parse_args(["--only", bench_e2e.REF, "--messages", str(args.messages)])
        r = bench_e2e.run_receiver(bench_e2e.RECEIVERS[bench_e2e.REF], workload, ref_args)
        print(f"4.7.0 live: {r.get('lines_written'):,} messages at {r.get('messages_per_second'):,.0f} msg/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
