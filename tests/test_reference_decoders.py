"""Our decoder against the reference decoders, on real captures.

Every capture in tests/data/captures is decoded three times: by our Frame Streams reader
and dnstap decoder (core.framestream.ReaderSession + core.message.decode), by dnstap-ldns
(`dnstap-ldns -r FILE -y`, YAML; and `-q`, one line a message) and by the Go tool
(`dnstap -r FILE -j`, JSON lines). All three must find the same messages, in the same
order, with the same fields.
"""

from __future__ import annotations

import functools
from collections import Counter

import pytest

import peers
from core.framestream import ReaderSession
from core.message import decode

pytestmark = pytest.mark.integration

CAPTURES = peers.captures()
# Fields compared message by message: (our key, reference key).
FIELDS = (
    "message",
    "identity",
    "version",
    "family",
    "protocol",
    "query-ip",
    "query-port",
    "response-ip",
    "response-port",
    "id",
    "opcode",
    "rcode",
    "qname",
    "rrtype",
    "qclass",
)
# What the unbound captures are known to hold (dnsperf: 1003 queries).
EXPECTED_COUNTS = {
    "unbound-unix.fstrm": {"CLIENT_QUERY": 1003, "CLIENT_RESPONSE": 1003},
    "unbound-tcp.fstrm": {"CLIENT_QUERY": 1003, "CLIENT_RESPONSE": 1003},
}


def test_captures_present():
    names = {path.name for path in CAPTURES}
    assert {"unbound-unix.fstrm", "unbound-tcp.fstrm", "named.fstrm"} <= names


@functools.lru_cache(maxsize=None)
def ours(path) -> tuple[dict, ...]:
    session = ReaderSession()
    frames: list[bytes] = []
    data = path.read_bytes()
    # Feed the file in odd-sized chunks, as a socket would deliver it.
    for start in range(0, len(data), 4093):
        assert session.receive(data[start : start + 4093], frames) == b""
    assert session.finished, "capture file does not end with STOP"
    assert session.pending == 0
    records = []
    for frame in frames:
        rec = dict(decode(frame))
        # "-" is our spelling of "absent"; the reference decoders print nothing.
        records.append({k: (None if v == "-" else v) for k, v in rec.items()})
    return tuple(records)


@functools.lru_cache(maxsize=None)
def reference(tool: str, path) -> tuple[dict, ...]:
    if tool == "dnstap-ldns":
        return tuple(peers.dnstap_ldns_decode(path))
    if tool == "dnstap-ldns-quiet":
        return tuple(peers.dnstap_ldns_decode(path, quiet=True))
    if tool == "dnstap-go":
        return tuple(peers.golang_dnstap_decode_json(path))
    raise ValueError(tool)


def _diff(a: list[dict], b: list[dict], fields, limit: int = 10) -> list[str]:
    out = []
    for index, (x, y) in enumerate(zip(a, b)):
        for field in fields:
            if x.get(field) != y.get(field):
                out.append(f"message {index}: {field}: ours {x.get(field)!r} != reference {y.get(field)!r}")
                if len(out) >= limit:
                    return out
    return out


@pytest.mark.parametrize("tool", ["dnstap-ldns", "dnstap-go"])
@pytest.mark.parametrize("capture", CAPTURES, ids=lambda p: p.name)
def test_fields_match_reference(capture, tool):
    mine = ours(capture)
    ref = reference(tool, capture)
    assert len(mine) == len(ref), f"{len(mine)} messages decoded, {tool} decodes {len(ref)}"
    # The reference output must really have been understood: no vacuous None == None.
    for field in ("message", "identity", "family", "protocol", "query-ip", "query-port", "id", "rcode", "qname", "rrtype"):
        missing = sum(1 for r in ref if r[field] is None)
        assert missing == 0, f"{tool}: {missing} messages without {field} (output format not understood?)"
    diffs = _diff(list(mine), list(ref), FIELDS)
    assert not diffs, "\n".join(diffs)


@pytest.mark.parametrize("tool", ["dnstap-ldns", "dnstap-go"])
@pytest.mark.parametrize("capture", CAPTURES, ids=lambda p: p.name)
def test_times_match_reference(capture, tool):
    """The message time (query time for queries, response time for responses);
    dnstap-ldns prints microseconds (truncated), the Go tool nanoseconds."""
    mine = ours(capture)
    ref = reference(tool, capture)
    assert len(mine) == len(ref)
    bad = [
        (i, m["timestamp"], r["time"])
        for i, (m, r) in enumerate(zip(mine, ref))
        if r["time"] is None or abs(m["timestamp"] - r["time"]) > 2e-6
    ]
    assert not bad, f"{len(bad)} timestamps differ, first: {bad[:5]}"


@pytest.mark.parametrize("capture", CAPTURES, ids=lambda p: p.name)
def test_quiet_lines_match_reference(capture):
    """`dnstap-ldns -q`: type mnemonic, protocol, DNS message length, qname, class, type."""
    mine = ours(capture)
    ref = reference("dnstap-ldns-quiet", capture)
    assert len(mine) == len(ref)
    diffs = _diff(list(mine), list(ref), ("message", "protocol", "length", "qname", "qclass", "rrtype"))
    assert not diffs, "\n".join(diffs)


@pytest.mark.parametrize("capture", CAPTURES, ids=lambda p: p.name)
def test_reference_decoders_agree(capture):
    """The two reference decoders (C/ldns and Go/miekg) agree with each other, which
    checks the parsing of their output in tests/peers.py."""
    ldns, go = reference("dnstap-ldns", capture), reference("dnstap-go", capture)
    assert len(ldns) == len(go)
    diffs = _diff(list(ldns), list(go), FIELDS)
    assert not diffs, "\n".join(diffs)


@pytest.mark.parametrize("capture", [c for c in CAPTURES if c.name in EXPECTED_COUNTS], ids=lambda p: p.name)
def test_known_capture_contents(capture):
    counts = Counter(rec["message"] for rec in ours(capture))
    assert counts == EXPECTED_COUNTS[capture.name]
    # Every response answers a query of the capture: same client port, DNS id and question.
    queries = Counter(
        (r["query-port"], r["id"], r["qname"], r["rrtype"]) for r in ours(capture) if r["type"] == "query"
    )
    responses = Counter(
        (r["query-port"], r["id"], r["qname"], r["rrtype"]) for r in ours(capture) if r["type"] == "response"
    )
    assert queries == responses
