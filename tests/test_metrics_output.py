"""output.metrics: 4.7.0's periodic summary line."""

from __future__ import annotations

import re
import time

from core.message import decode
from fstrm_client import FstrmClient, capture_frames, free_tcp_port
from sinks.metrics import MetricsLine

LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (\d+) QUERIES, ([\d.]+) QPS, (\d+) DOMAINS, (\d+) CLIENTS, "
    r"(\d+) INET, (\d+) INET6, (\d+) UDP, (\d+) TCP$"
)


def test_line_counts_the_queries_of_the_capture():
    records = [decode(f) for f in capture_frames("unbound-tcp.fstrm")]
    line = MetricsLine()
    line.add_batch(records[:1000])
    line.add_batch(records[1000:])
    distinct = len({r["qname"] for r in records if r["type"] == "query"})
    m = LINE.match("2026-01-01 00:00:00,000 " + line.text(10.0))
    assert m, line.text(10.0)
    queries, qps, domains, clients, inet, inet6, udp, tcp = m.groups()
    assert (queries, qps, clients, inet, inet6, udp, tcp) == ("1003", "100.3", "1", "1003", "0", "1003", "0")
    assert abs(int(domains) - distinct) <= 0.02 * distinct  # a HyperLogLog estimate


def test_empty_line():
    assert MetricsLine().text(0) == "0 QUERIES, 0.0 QPS, 0 DOMAINS, 0 CLIENTS, 0 INET, 0 INET6, 0 UDP, 0 TCP"


def _wait_lines(path, n, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            lines = path.read_text().splitlines()
            if len(lines) >= n:
                return lines
        time.sleep(0.2)
    raise AssertionError(f"{path}: fewer than {n} lines after {timeout} s")


def test_receiver_writes_a_line_per_interval(receiver, tmp_path):
    port = free_tcp_port()
    out = tmp_path / "metrics.log"
    rx = receiver(
        tmp_path,
        {
            "input": {"tcp-socket": {"enable": True, "local-address": "127.0.0.1", "local-port": port}},
            "output": {"metrics": {"enable": True, "interval": 1, "cumulative": True, "file": str(out)}},
        },
    )
    with FstrmClient.tcp("127.0.0.1", port) as client:
        client.handshake()
        client.send_frames(capture_frames("unbound-tcp.fstrm"))
        client.stop()
    deadline = time.monotonic() + 20
    while True:  # cumulative: the count reaches the capture's 1003 queries and stays there
        matches = [LINE.match(line) for line in _wait_lines(out, 1)]
        assert all(matches), out.read_text()
        if int(matches[-1].group(1)) == 1003:
            break
        assert time.monotonic() < deadline, out.read_text()
        time.sleep(0.3)
    last = matches[-1]
    assert (last.group(4), last.group(5), last.group(6), last.group(7)) == ("1", "1003", "0", "1003")
    assert rx.stop() == 0, rx.logs()
