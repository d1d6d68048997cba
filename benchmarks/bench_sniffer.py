"""Packets per second the sniffer input sustains on the loopback interface.

    sudo .venv/bin/python benchmarks/bench_sniffer.py [--rates 50000,100000,0] [--seconds 5] [--senders 1] [--receiver]

A sender process blasts one pre-built DNS query (UDP, IPv4) at a port on
127.0.0.1 where a socket is bound but never read (no ICMP replies, the
kernel drops them at that socket), at each of ``--rates`` packets/s in turn
(0: as fast as ``--senders`` Python processes can send). The sniffer
(sources/sniffer.py: TPACKET_V3 ring, BPF filter, kernel timestamps,
PacketDecoder) captures on ``lo`` into a hub that only counts the dnstap
frames. For each rate it prints what was sent, what the sniffer decoded,
what the kernel dropped because the capture thread fell behind
(PACKET_STATISTICS), and the capture thread's CPU time: decoded/CPU-s is the
rate one core would sustain, whatever the senders take of this machine.
With ``--receiver`` the whole receiver runs instead (``python -m pipeline``,
the sniffer its only input, JSON file output, default transforms and
statistics), one rate per run: messages written per second, and what the
hub dropped because the pipeline was behind (``feed_dropped``). Needs
CAP_NET_RAW.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import dns.message  # noqa: E402
import yaml  # noqa: E402

from sources.sniffer import SnifferSpec  # noqa: E402


class CountingHub:
    """The part of ListenerHub a feeder uses; counts and drops the frames."""

    class spec:
        batch_size = 512

    def __init__(self) -> None:
        self.frames = 0

    def feed_threadsafe(self, frames: list[bytes]) -> None:
        self.frames += len(frames)


def send(port: int, rate: int, seconds: float, sent) -> None:
    wire = dns.message.make_query("www.example.test.", "A").to_wire()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect(("127.0.0.1", port))
    out = sock.send
    n, burst = 0, 64
    start = time.perf_counter()
    end = start + seconds
    while True:
        now = time.perf_counter()
        if now >= end:
            break
        if rate and n >= (now - start) * rate:
            time.sleep(min(0.001, burst / rate))
            continue
        for _ in range(burst):
            try:
                out(wire)
            except OSError:  # ENOBUFS and the like: not sent
                n -= 1
            n += 1
    sent.value = n


async def run(rates: list[int], seconds: float, senders: int) -> None:
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    port = sink.getsockname()[1]
    hub = CountingHub()
    capture = await SnifferSpec(interface="lo", local_ips=("127.0.0.1",), dns_ports=(port,)).open(hub)
    stats = capture.stats
    clock = time.pthread_getcpuclockid(capture._thread.ident)
    print(f"{'target/s':>10} {'sent/s':>10} {'decoded/s':>10} {'kernel drops':>13} {'decoded %':>9} "
          f"{'decoded/CPU-s':>13}")
    try:
        for rate in rates:
            await asyncio.sleep(0.5)
            before = (hub.frames, stats.kernel_drops, time.clock_gettime(clock))
            sent = await asyncio.to_thread(_send_all, port, rate, seconds, senders)
            await asyncio.sleep(0.5)  # the capture drains its ring
            frames, drops = hub.frames - before[0], stats.kernel_drops - before[1]
            cpu = time.clock_gettime(clock) - before[2]
            print(f"{rate or 'max':>10} {sent / seconds:>10,.0f} {frames / seconds:>10,.0f} "
                  f"{drops:>13,} {100 * frames / max(sent, 1):>8.1f}% {frames / cpu:>13,.0f}")
    finally:
        await capture.close()
        sink.close()


def _send_all(port: int, rate: int, seconds: float, senders: int) -> int:
    counts = [multiprocessing.Value("q", 0) for _ in range(senders)]
    procs = [multiprocessing.Process(target=send, args=(port, rate // senders, seconds, sent)) for sent in counts]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    return sum(c.value for c in counts)


def run_receiver(rates: list[int], seconds: float, senders: int) -> None:
    print(f"{'target/s':>10} {'sent/s':>10} {'written/s':>10} {'written %':>9} {'feed_dropped':>12} "
          f"{'kernel drops':>13}")
    for rate in rates:
        with tempfile.TemporaryDirectory(prefix="bench-sniffer-") as tmp, \
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:
            sink.bind(("127.0.0.1", 0))
            port = sink.getsockname()[1]
            out = Path(tmp) / "out.jsonl"
            conf = Path(tmp) / "c.yaml"
            conf.write_text(yaml.safe_dump({
                "trace": {"log-interval": 0},
                "web-api": {"enable": False},
                "input": {"tcp-socket": {"enable": False}, "sniffer": {
                    "enable": True, "eth-name": "lo", "eth-ip": ["127.0.0.1"], "dns-port": [port]}},
                "output": {"stdout": {"enable": False},
                           "file": {"enable": True, "format": "json", "file": str(out), "file-max-size": "100G"}},
            }))
            with open(Path(tmp) / "err", "w+") as err:
                proc = subprocess.Popen([sys.executable, "-m", "pipeline", "--runner=DirectRunner", "-c", str(conf)],
                                        cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)
                while "receiver started" not in Path(err.name).read_text():
                    if proc.poll() is not None:
                        raise SystemExit(Path(err.name).read_text())
                    time.sleep(0.1)
                time.sleep(1)
                sent = _send_all(port, rate, seconds, senders)
                time.sleep(2)
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)
                log = Path(err.name).read_text()
            with open(out, "rb") as lines:
                written = sum(1 for _ in lines)
            summary = log.rsplit("stopped; counters", 1)[-1]
            dropped = re.search(r"feed_dropped=(\d+)", summary)
            kernel = re.search(r"kernel_drops=(\d+)", summary)
            print(f"{rate or 'max':>10} {sent / seconds:>10,.0f} {written / seconds:>10,.0f} "
                  f"{100 * written / max(sent, 1):>8.1f}% {int(dropped.group(1)) if dropped else 0:>12,} "
                  f"{int(kernel.group(1)) if kernel else 0:>13,}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rates", default="25000,50000,100000,150000,0",
                   help="comma-separated packets/s to send, 0 for as fast as possible")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--senders", type=int, default=1, help="sending processes")
    p.add_argument("--receiver", action="store_true", help="run the whole receiver (python -m pipeline)")
    args = p.parse_args()
    rates = [int(r) for r in args.rates.split(",")]
    if args.receiver:
        run_receiver(rates, args.seconds, args.senders)
    else:
        asyncio.run(run(rates, args.seconds, args.senders))
    return 0


if __name__ == "__main__":
    sys.exit(main())
