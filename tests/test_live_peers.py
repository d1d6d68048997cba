"""The receiver against real dnstap senders, over unix sockets and TCP.

(a, b) a real unbound streams dnstap to the receiver while dnsperf sends it 1000 queries:
       every query and response arrives, with the qnames and qtypes of the query file;
(c)    fstrm_replay (libfstrm) sends each capture: the receiver's output equals what
       dnstap-ldns decodes from the same file;
(d)    the Go dnstap tool (-U / -T) sends each capture: same check;
(e)    unbound in one-way mode (``dnstap-bidirectional: no``: START, no handshake), as (a);
(f)    the receiver restarts while unbound runs on: unbound reconnects and nothing sent
       after the reconnection is lost.

The receiver runs as its users run it (``python -m pipeline -c FILE``, see conftest.py),
writes JSON lines to a file, and must exit 0 on SIGTERM.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest

import peers
from conftest import ReceiverProcess, wait_for_lines

pytestmark = pytest.mark.integration

TRANSPORTS = ("unix", "tcp")
N_QUERIES = 1000
DELIVERY_TIMEOUT = 30.0
# Fields compared with the reference decoder (receiver key == normalised reference key).
FIELDS = ("message", "identity", "family", "protocol", "query-ip", "query-port", "id", "qname", "rrtype", "rcode")


def start_listening(receiver, tmp_path: Path, transport: str) -> tuple[ReceiverProcess, str, Path]:
    """A receiver with one input of ``transport`` and a JSON lines file output; returns it,
    the sender target (``unix:/path`` / ``tcp:127.0.0.1:PORT``) and the output file."""
    out = tmp_path / "dnstap.json"
    config: dict = {
        "output": {"file": {"enable": True, "format": "json", "file": str(out), "file-max-size": "1G"}},
    }
    if transport == "unix":
        sock = peers.short_socket_dir(tmp_path) / "dnstap.sock"
        config["input"] = {"unix-socket": {"enable": True, "path": str(sock)}}
        target = f"unix:{sock}"
    else:
        port = peers.free_port()
        config["input"] = {"tcp-socket": {"enable": True, "local-address": "127.0.0.1", "local-port": port}}
        target = f"tcp:127.0.0.1:{port}"
    rx = receiver(tmp_path / "receiver", config)
    return rx, target, out


def stop_and_read(rx: ReceiverProcess, out: Path, expected: int) -> list[dict]:
    """Wait for ``expected`` lines, stop the receiver (exit code 0) and read its output."""
    seen = wait_for_lines(out, expected, DELIVERY_TIMEOUT, rx)
    code = rx.stop()
    assert code == 0, f"receiver exit code {code} after SIGTERM (had {seen} lines)\n{rx.logs()}"
    assert "Traceback" not in peers.file_tail(rx.stderr_path, 10**6), rx.logs()
    records = rx.output_lines(out) if out.exists() else []
    assert len(records) == expected, (
        f"{len(records)} messages written, {expected} expected ({seen} seen before SIGTERM)\n{rx.logs()}"
    )
    return records


def _norm(value):
    return None if value == "-" else value


def field_multiset(records, fields=FIELDS) -> Counter:
    return Counter(tuple(_norm(rec.get(f)) for f in fields) for rec in records)


def assert_same_messages(received: list[dict], reference: list[dict]) -> None:
    """Same messages as the reference decoder, as multisets of field tuples (the pipeline
    need not keep the order)."""
    got, want = field_multiset(received), field_multiset(reference)
    missing, extra = want - got, got - want
    assert not missing and not extra, (
        f"{sum(missing.values())} reference messages missing, {sum(extra.values())} unexpected\n"
        f"fields {FIELDS}\nmissing (first 5): {list(missing.items())[:5]}\n"
        f"unexpected (first 5): {list(extra.items())[:5]}"
    )


# --------------------------------------------------------------------------- (a), (b) unbound + dnsperf


UNBOUND_MODES = {
    "bidirectional": (),
    "one-way": ("dnstap-bidirectional: no",),
}


@pytest.mark.parametrize("mode", list(UNBOUND_MODES))
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_unbound_under_dnsperf(transport, mode, tmp_path, receiver):
    for program in ("unbound", "dnsperf", "dig"):
        peers.require(program)
    rx, target, out = start_listening(receiver, tmp_path, transport)

    queries_file = tmp_path / "queries.txt"
    queries = peers.write_queries(queries_file, N_QUERIES)
    dns_port = peers.free_port(udp_too=True)
    unbound = peers.start_unbound(tmp_path / "unbound", dns_port, target, dnstap_options=UNBOUND_MODES[mode])
    try:
        stats = peers.run_dnsperf(dns_port, queries_file, runs=1, qps=2000)
    finally:
        unbound_code = peers.stop_unbound(unbound)
    assert stats["sent"] == N_QUERIES, stats["output"]
    assert stats["completed"] == stats["sent"], stats["output"]
    assert unbound_code == 0, peers.file_tail(unbound.log)

    records = stop_and_read(rx, out, 2 * stats["completed"])
    by_type = Counter(rec["message"] for rec in records)
    assert by_type == {"CLIENT_QUERY": N_QUERIES, "CLIENT_RESPONSE": N_QUERIES}

    asked = Counter(queries)
    for message in ("CLIENT_QUERY", "CLIENT_RESPONSE"):
        seen = Counter((rec["qname"], rec["rrtype"]) for rec in records if rec["message"] == message)
        assert seen == asked, f"{message}: missing {asked - seen}, unexpected {seen - asked}"

    for rec in records:
        assert rec["identity"] == "unbound-probe"
        assert rec["family"] == "INET" and rec["protocol"] == "UDP"
        assert rec["query-ip"] == "127.0.0.1"
        assert rec["response-port"] == dns_port
        assert rec["type"] == ("query" if rec["message"] == "CLIENT_QUERY" else "response")

    # Each response pairs with a query: same client port and DNS id.
    pairs = lambda kind: Counter((r["query-port"], r["id"]) for r in records if r["message"] == kind)  # noqa: E731
    assert pairs("CLIENT_QUERY") == pairs("CLIENT_RESPONSE")

    nx_names = {name + "." for name in peers.NXDOMAIN_NAMES}
    rcodes = Counter(
        (rec["qname"] in nx_names, rec["rcode"]) for rec in records if rec["message"] == "CLIENT_RESPONSE"
    )
    assert set(rcodes) <= {(True, "NXDOMAIN"), (False, "NOERROR")}, rcodes


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_unbound_reconnects_after_receiver_restart(transport, tmp_path, receiver):
    """SIGTERM the receiver while unbound stays connected (exit 0, what arrived is written),
    start a new one on the same socket path / port: unbound reconnects (it retries on a
    timer) and every message sent once it is connected again arrives."""
    for program in ("unbound", "dnsperf", "dig"):
        peers.require(program)
    rx, target, out = start_listening(receiver, tmp_path / "first", transport)
    queries_file = tmp_path / "queries.txt"
    queries = peers.write_queries(queries_file, 200)
    dns_port = peers.free_port(udp_too=True)
    unbound = peers.start_unbound(tmp_path / "unbound", dns_port, target)
    try:
        stats = peers.run_dnsperf(dns_port, queries_file)
        assert stats["completed"] == len(queries), stats["output"]
        wait_for_lines(out, 2 * len(queries), DELIVERY_TIMEOUT, rx)
        # unbound is still connected: the receiver must close it and exit cleanly.
        code = rx.stop()
        assert code == 0, rx.logs()
        assert len(rx.output_lines(out)) == 2 * len(queries), rx.logs()

        # Same socket path / port: the old receiver must have released it.
        second = dict(rx.config)
        out2 = tmp_path / "second.json"
        second["output"] = {"file": {"enable": True, "format": "json", "file": str(out2), "file-max-size": "1G"}}
        second["input"] = {k: v for k, v in rx.config["input"].items() if isinstance(v, dict) and v.get("enable")}
        rx2 = receiver(tmp_path / "second", second)
        probe = "reconnect-probe.example.test"
        deadline = time.monotonic() + 30
        while wait_for_lines(out2, 1, 1.0, rx2) == 0:
            assert time.monotonic() < deadline, f"unbound did not reconnect in 30 s\n{rx2.logs()}"
            peers.dig(dns_port, probe, "A")
        stats = peers.run_dnsperf(dns_port, queries_file)
        assert stats["completed"] == len(queries), stats["output"]
    finally:
        peers.stop_unbound(unbound)
    wait_for_lines(out2, 2 * len(queries) + 2, DELIVERY_TIMEOUT, rx2)
    code = rx2.stop()
    assert code == 0, rx2.logs()
    records = [r for r in rx2.output_lines(out2) if r["qname"] != probe + "."]
    assert Counter((r["message"], r["qname"], r["rrtype"]) for r in records) == (
        Counter(("CLIENT_QUERY", q, t) for q, t in queries) + Counter(("CLIENT_RESPONSE", q, t) for q, t in queries)
    )


# --------------------------------------------------------------------------- (c) fstrm_replay, (d) Go dnstap


SENDERS = {
    "fstrm_replay": ("fstrm_replay", peers.fstrm_replay),
    "dnstap-go": ("dnstap", peers.golang_dnstap_send),
}


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("capture", peers.captures(), ids=lambda p: p.name)
@pytest.mark.parametrize("sender", list(SENDERS))
def test_capture_replay(sender, capture, transport, tmp_path, receiver):
    program, send = SENDERS[sender]
    peers.require(program)
    reference = peers.dnstap_ldns_decode(capture)
    assert reference, f"dnstap-ldns decodes nothing from {capture}"

    rx, target, out = start_listening(receiver, tmp_path, transport)
    result = send(capture, target)
    assert result.returncode == 0, f"{sender} failed ({result.returncode}): {result.stdout}{result.stderr}\n{rx.logs()}"

    records = stop_and_read(rx, out, len(reference))
    assert_same_messages(records, reference)
