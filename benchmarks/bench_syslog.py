"""Messages/s through output.syslog into a real rsyslogd on this machine.

    .venv/bin/python benchmarks/bench_syslog.py [--messages 200000] [--transport tcp|udp]
        [--format text|json] [--rfc 5424|3164] [--framing octet-counted|non-transparent]

Records decoded from tests/data/captures/unbound-tcp.fstrm (cycled) are
encoded in batches of 512 as the output's DoFn does (timed too: header,
formatting, framing) and pushed through its Delivery and transport into
rsyslogd (tests/rsyslog_server.py, one omfile action writing the parsed
fields). The clock stops when rsyslog has written every message, or, over UDP
(which loses datagrams when rsyslog falls behind), when its file stops growing
for two seconds; the lost ones are reported.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from fstrm_client import capture_frames  # noqa: E402
from rsyslog_server import Rsyslog  # noqa: E402
from sinks.delivery import Delivery  # noqa: E402
from sinks.syslog import FRAMINGS, SyslogEncoder, SyslogUdp, truncate  # noqa: E402
from sinks.tcp import TcpStream  # noqa: E402
from transforms.decode import decode_batch  # noqa: E402


class LineCounter:
    """Counts the lines of a growing file, reading only the new bytes."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.lines = path, 0, 0

    def __call__(self) -> int:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except FileNotFoundError:
            return 0
        self.offset += len(data)
        self.lines += data.count(b"\n")
        return self.lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=200_000)
    p.add_argument("--transport", default="tcp", choices=["tcp", "udp"])
    p.add_argument("--format", default="text", choices=["text", "json"])
    p.add_argument("--rfc", default="5424", choices=["5424", "3164"])
    p.add_argument("--framing", default="octet-counted", choices=list(FRAMINGS))
    args = p.parse_args()
    records = decode_batch(capture_frames())
    batches = [[records[(i + j) % len(records)] for j in range(min(512, args.messages - i))]
               for i in range(0, args.messages, 512)]
    encoder = SyslogEncoder(rfc=args.rfc, format=args.format, hostname="bench")
    frame = FRAMINGS[args.framing]
    with tempfile.TemporaryDirectory() as tmp:
        server = Rsyslog(tmp, raw=False).start()
        count = LineCounter(server.fields_path)
        try:
            transport = (SyslogUdp("127.0.0.1", server.port) if args.transport == "udp"
                         else TcpStream("127.0.0.1", server.port))
            delivery = Delivery("bench-syslog", transport, retry=1.0, buffer_size=args.messages)
            started = time.perf_counter()
            for batch in batches:  # encoding included, as in the pipeline
                messages = encoder.messages(batch)
                if args.transport == "udp":
                    truncate(messages)
                    delivery.put(messages, len(messages))
                else:
                    delivery.put(frame(messages), len(messages))
            last, last_change = 0, time.perf_counter()
            while (written := count()) < args.messages:
                now = time.perf_counter()
                if written != last:
                    last, last_change = written, now
                elif now - last_change > 2.0:
                    break
                time.sleep(0.005)
            elapsed = (last_change if written < args.messages else time.perf_counter()) - started
            delivery.close()
        finally:
            server.stop(signal.SIGKILL)
    label = f"syslog {args.transport} rfc{args.rfc} {args.format}"
    if args.transport == "tcp":
        label += f" {args.framing}"
    print(f"{label}: {written:,} of {args.messages:,} messages written by rsyslogd in {elapsed:.2f} s = "
          f"{written / elapsed:,.0f} msg/s; dropped {delivery.counts['dropped']}, "
          f"lost {args.messages - written - delivery.counts['dropped']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
