"""Messages/s through output.dnstap into a real Frame Streams reader on this machine.

    .venv/bin/python benchmarks/bench_dnstap_out.py [--messages 200000] [--transport unix|tcp]
        [--identity NAME] [--server fstrm_capture|dnstap]

Records decoded from tests/data/captures (all three, cycled) with their
original bytes (``keep_raw``, as the pipeline decodes when this output is on)
are encoded in batches of 512 as the pipeline does (identity rewrite included
when ``--identity``; timed too) and pushed through the output's Delivery and
FrameStreamWriter into fstrm_capture (libfstrm, Debian fstrm-bin) or the Go
``dnstap`` tool. The clock stops when the reader answers STOP with FINISH,
i.e. when it has read every frame; the capture file is then checked to hold
them all.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from fstrm_client import capture_frames, free_tcp_port

from core.framestream import CONTENT_TYPE_DNSTAP, ReaderSession
from sinks.delivery import Delivery
from sinks.dnstap import FrameStreamWriter, encode_frames, encode_identity
from transforms.decode import decode_batch

CAPTURES = ("unbound-tcp.fstrm", "unbound-unix.fstrm", "named.fstrm")


def wait_listening(transport: dict, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the reader exited with {proc.returncode}")
        family = socket.AF_UNIX if "sock_path" in transport else socket.AF_INET
        where = transport.get("sock_path") or (transport["address"], transport["port"])
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.connect(where)
                return
            except OSError:
                time.sleep(0.05)
    raise SystemExit("the reader does not listen")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=200_000)
    p.add_argument("--transport", default="unix", choices=["unix", "tcp"])
    p.add_argument("--identity", default=None, help="rewrite the dnstap identity (output.dnstap.dnstap-identity)")
    p.add_argument("--server", default="fstrm_capture", choices=["fstrm_capture", "dnstap"])
    args = p.parse_args()
    program = shutil.which(args.server)
    if program is None:
        raise SystemExit(f"{args.server} is not installed (fstrm-bin / dnstap-golang packages)")

    records = [r for name in CAPTURES for r in decode_batch(capture_frames(name), keep_raw=True)]
    batches = [[records[(i + j) % len(records)] for j in range(min(512, args.messages - i))]
               for i in range(0, args.messages, 512)]
    identity = None if args.identity is None else encode_identity(args.identity)

    with tempfile.TemporaryDirectory(prefix="bench-dnstap-") as tmp:
        out = Path(tmp) / "capture.fstrm"
        if args.transport == "unix":
            transport = {"sock_path": str(Path(tmp) / "r.sock")}
            listen = ["-u", transport["sock_path"]]
        else:
            transport = {"address": "127.0.0.1", "port": free_tcp_port()}
            listen = (["-a", "127.0.0.1", "-p", str(transport["port"])] if args.server == "fstrm_capture"
                      else ["-l", f"127.0.0.1:{transport['port']}"])
        if args.server == "fstrm_capture":
            cmd = [program, "-t", CONTENT_TYPE_DNSTAP.decode(), *listen, "-w", str(out)]
        else:
            cmd = [program, *listen, "-w", str(out)]
        server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_listening(transport, server)
            delivery = Delivery("bench-dnstap", FrameStreamWriter(**transport), retry=1.0,
                                buffer_size=args.messages, flush_timeout=120)
            started = time.perf_counter()
            for batch in batches:  # encoding included, as in the pipeline
                frames, _ = encode_frames(batch, identity)
                delivery.put(frames, len(frames))
            delivery.close()  # returns once every frame is written and FINISH came back
            elapsed = time.perf_counter() - started
            counts = delivery.snapshot()
        finally:
            if args.server == "fstrm_capture":
                server.send_signal(signal.SIGINT)  # flushes the file
            else:  # the Go tool flushes its file when it reopens it
                out.rename(out.with_suffix(".1"))
                server.send_signal(signal.SIGHUP)
                time.sleep(0.5)
                out = out.with_suffix(".1")
            server.wait(10) if args.server == "fstrm_capture" else server.kill()
        frames: list[bytes] = []
        ReaderSession().receive(out.read_bytes(), frames)
    print(f"dnstap ({args.transport}, {args.server}{', identity rewritten' if identity else ''}): "
          f"{args.messages:,} messages in {elapsed:.2f} s = {args.messages / elapsed:,.0f} msg/s; "
          f"delivered {counts['delivered']:,}, dropped {counts['dropped']:,}, in the capture file {len(frames):,}")
    return 0 if len(frames) == args.messages else 1


if __name__ == "__main__":
    sys.exit(main())
