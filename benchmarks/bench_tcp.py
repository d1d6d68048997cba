"""Messages/s through output.tcp-socket into a real TCP server on this machine.

    .venv/bin/python benchmarks/bench_tcp.py [--messages 200000] [--format json]

Records decoded from tests/data/captures/unbound-tcp.fstrm (cycled) are
formatted in batches of 512 as the pipeline does (timed too) and pushed through the
output's Delivery and TcpStream into tests/line_server.py (a separate process
that appends what it receives to a file); the clock stops when the server has
written every line.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from core.formats import get_format  # noqa: E402
from fstrm_client import capture_frames, free_tcp_port  # noqa: E402
from sinks.delivery import Delivery  # noqa: E402
from sinks.tcp import TcpStream  # noqa: E402
from transforms.decode import decode_batch  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=200_000)
    p.add_argument("--format", default="json", choices=["text", "json", "yaml"])
    args = p.parse_args()
    records = decode_batch(capture_frames())
    fmt = get_format(args.format)
    batches = [[records[(i + j) % len(records)] for j in range(min(512, args.messages - i))]
               for i in range(0, args.messages, 512)]
    expected = sum(len(fmt.batch(batch, b"\n")) for batch in batches)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "received.txt"
        port = free_tcp_port()
        server = subprocess.Popen([sys.executable, str(REPO / "tests" / "line_server.py"), str(port), str(out)],
                                  stdout=subprocess.PIPE)
        server.stdout.readline()
        try:
            delivery = Delivery("bench-tcp", TcpStream("127.0.0.1", port), retry=1.0, buffer_size=args.messages)
            started = time.perf_counter()
            for batch in batches:  # formatting included, as in the pipeline
                delivery.put(fmt.batch(batch, b"\n"), len(batch))
            while not out.exists() or out.stat().st_size < expected:
                time.sleep(0.005)
            elapsed = time.perf_counter() - started
            delivery.close()
        finally:
            server.kill()
    print(f"tcp-socket ({args.format}): {args.messages:,} messages in {elapsed:.2f} s = "
          f"{args.messages / elapsed:,.0f} msg/s, dropped {delivery.counts['dropped']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
