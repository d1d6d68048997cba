"""dnstap protobuf -> flat record (core/message.py)."""

from __future__ import annotations

import calendar
import copy
import math
import pickle
import re
import socket
import struct
from collections import Counter
from datetime import datetime
from fractions import Fraction
from pathlib import Path

import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core import dnstap_pb2
from core.errors import ReceiverError
from core.framestream import ReaderSession
from core.message import FIELDS, DnstapRecord, UndecodableMessage, decode, is_query

CAPTURES = Path(__file__).parent / "data" / "captures"

MESSAGE_TYPES = [
    "AUTH_QUERY", "AUTH_RESPONSE", "RESOLVER_QUERY", "RESOLVER_RESPONSE",
    "CLIENT_QUERY", "CLIENT_RESPONSE", "FORWARDER_QUERY", "FORWARDER_RESPONSE",
    "STUB_QUERY", "STUB_RESPONSE", "TOOL_QUERY", "TOOL_RESPONSE",
    "UPDATE_QUERY", "UPDATE_RESPONSE",
]
PROTOCOLS = ["UDP", "TCP", "DOT", "DOH", "DNSCryptUDP", "DNSCryptTCP", "DOQ"]

QUERY_WIRE = dns.message.make_query("www.example.com.", "AAAA", id=4242, use_edns=0).to_wire()
_resp = dns.message.make_response(dns.message.from_wire(QUERY_WIRE))
_resp.set_rcode(dns.rcode.NXDOMAIN)
RESPONSE_WIRE = _resp.to_wire()


def frames_of(path: Path) -> list[bytes]:
    session = ReaderSession()
    frames: list = []
    session.receive(path.read_bytes(), frames)
    assert session.finished and session.pending == 0
    return frames


def tap(mtype: int = 5, *, identity=None, version=None, extra=None, **fields) -> bytes:
    """A serialized Dnstap frame whose Message has ``fields``."""
    d = dnstap_pb2.Dnstap(type=dnstap_pb2.Dnstap.MESSAGE)
    if identity is not None:
        d.identity = identity
    if version is not None:
        d.version = version
    if extra is not None:
        d.extra = extra
    m = d.message
    m.type = mtype
    policy = fields.pop("policy", None)
    for key, value in fields.items():
        setattr(m, key, value)
    if policy is not None:
        for key, value in policy.items():
            setattr(m.policy, key, value)
        m.policy.SetInParent()
    return d.SerializeToString()


# --------------------------------------------------------------------------
# Real captures
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, identity, version, counts",
    [
        ("unbound-tcp.fstrm", "unbound-probe", "unbound-1.17-probe",
         {"CLIENT_QUERY": 1003, "CLIENT_RESPONSE": 1003}),
        ("unbound-unix.fstrm", "unbound-probe", "unbound-1.17-probe",
         {"CLIENT_QUERY": 1003, "CLIENT_RESPONSE": 1003}),
        ("named.fstrm", "named-probe", "bind-9.18-probe",
         {"AUTH_QUERY": 50, "CLIENT_RESPONSE": 50}),
    ],
)
def test_decode_captures(name, identity, version, counts):
    frames = frames_of(CAPTURES / name)
    records = [decode(frame, keep_raw=True) for frame in frames]
    assert Counter(r["message"] for r in records) == counts
    for frame, rec in zip(frames, records):
        assert rec.raw == frame
        assert list(rec) == list(FIELDS)
        assert decode(frame) == rec
        assert rec["identity"] == identity
        assert rec["version"] == version
        assert rec["malformed"] is False
        assert rec["qname"].endswith(".")
        assert rec["family"] == "INET" and rec["protocol"] == "UDP"
        assert rec["query-ip"] == "127.0.0.1" and isinstance(rec["query-port"], int)
        assert rec["datetime"].endswith("+00:00")
        assert abs(datetime.fromisoformat(rec["datetime"]).timestamp() - rec["timestamp"]) < 1e-5
        # The DNS fields agree with dnspython's full parse of the same payload.
        pb = dnstap_pb2.Dnstap.FromString(frame).message
        query = rec["type"] == "query"
        assert query is rec["message"].endswith("_QUERY")
        wire = pb.query_message if query else pb.response_message
        assert rec["length"] == len(wire) > 0
        msg = dns.message.from_wire(wire)
        assert rec["id"] == msg.id
        assert rec["qname"] == msg.question[0].name.to_text()
        assert rec["rrtype"] == dns.rdatatype.to_text(msg.question[0].rdtype)
        assert rec["qclass"] == dns.rdataclass.to_text(msg.question[0].rdclass)
        assert rec["rcode"] == dns.rcode.to_text(msg.rcode())
        assert rec["opcode"] == dns.opcode.to_text(msg.opcode())
        assert rec["flags"] == dns.flags.to_text(msg.flags)
        assert ("QR" in rec["flags"].split()) is not query
        assert rec["ancount"] == sum(len(r) for r in msg.answer)
        assert rec["edns-udp-size"] == (msg.payload if msg.edns >= 0 else None)


def test_unbound_query_and_response_carry_the_same_id():
    records = [decode(f) for f in frames_of(CAPTURES / "unbound-tcp.fstrm")]
    queries = Counter((r["id"], r["qname"]) for r in records if r["type"] == "query")
    responses = Counter((r["id"], r["qname"]) for r in records if r["type"] == "response")
    assert queries == responses


# --------------------------------------------------------------------------
# Message types, families, protocols
# --------------------------------------------------------------------------


@pytest.mark.parametrize("number, name", list(enumerate(MESSAGE_TYPES, start=1)))
def test_every_message_type(number, name):
    rec = decode(tap(number, query_message=QUERY_WIRE, response_message=RESPONSE_WIRE))
    assert rec["message"] == name
    if number % 2:
        assert is_query(number)
        assert rec["type"] == "query"
        assert rec["length"] == len(QUERY_WIRE)
        assert rec["rcode"] == "NOERROR" and "QR" not in rec["flags"].split()
    else:
        assert not is_query(number)
        assert rec["type"] == "response"
        assert rec["length"] == len(RESPONSE_WIRE)
        assert rec["rcode"] == "NXDOMAIN" and "QR" in rec["flags"].split()
    assert rec["qname"] == "www.example.com." and rec["rrtype"] == "AAAA"
    assert rec["id"] == 4242


def test_message_type_table_is_complete():
    assert [name for name, _ in sorted(dnstap_pb2.Message.Type.items(), key=lambda kv: kv[1])] == MESSAGE_TYPES


def test_query_type_without_query_message():
    rec = decode(tap(5, response_message=RESPONSE_WIRE))
    assert rec["length"] == 0 and rec["qname"] == "-" and rec["malformed"] is False


@pytest.mark.parametrize("number, name", list(enumerate(PROTOCOLS, start=1)))
def test_every_socket_protocol(number, name):
    assert decode(tap(socket_protocol=number))["protocol"] == name


def test_absent_socket_fields():
    rec = decode(tap())
    for key in ("query-ip", "query-port", "response-ip", "response-port"):
        assert rec[key] == "-"
    # proto2 enum defaults, as 4.7.0 reported them: the first value of each enum.
    assert (rec["family"], rec["protocol"]) == ("INET", "UDP")


def test_ipv4_addresses():
    rec = decode(tap(socket_family=1, query_address=bytes([192, 0, 2, 1]), query_port=53000,
                     response_address=bytes([198, 51, 100, 7]), response_port=53))
    assert rec["family"] == "INET"
    assert (rec["query-ip"], rec["query-port"]) == ("192.0.2.1", 53000)
    assert (rec["response-ip"], rec["response-port"]) == ("198.51.100.7", 53)


def test_ipv6_addresses():
    q = socket.inet_pton(socket.AF_INET6, "2001:db8::1")
    r = socket.inet_pton(socket.AF_INET6, "2001:db8:0:1::53")
    rec = decode(tap(socket_family=2, query_address=q, response_address=r, query_port=0))
    assert rec["family"] == "INET6"
    assert rec["query-ip"] == "2001:db8::1" and rec["response-ip"] == "2001:db8:0:1::53"
    assert rec["query-port"] == 0  # present, even though zero


def test_coredns_sends_ipv4_as_16_bytes_with_family_inet():
    mapped = socket.inet_pton(socket.AF_INET6, "::ffff:10.1.2.3")
    rec = decode(tap(socket_family=1, query_address=mapped, response_address=bytes(12) + b"\x7f\0\0\1"))
    assert rec["query-ip"] == "10.1.2.3"
    assert rec["response-ip"] == "127.0.0.1"


def test_address_of_unexpected_length():
    rec = decode(tap(socket_family=1, query_address=b"\x01\x02\x03", response_address=bytes(5)))
    assert rec["query-ip"] == "-" and rec["response-ip"] == "-"


# --------------------------------------------------------------------------
# Times and latency
# --------------------------------------------------------------------------


def test_query_time_gives_datetime():
    rec = decode(tap(5, query_time_sec=1600282313, query_time_nsec=547352123))
    assert rec["datetime"] == "2020-09-16T18:51:53.547352+00:00"
    assert rec["timestamp"] == pytest.approx(1600282313.547352123, abs=1e-6)
    assert rec["query-time"] == pytest.approx(1600282313.547352123, abs=1e-6)
    assert rec["response-time"] is None
    assert rec["latency"] == "-"


def test_response_latency():
    rec = decode(tap(6, query_time_sec=1600282313, query_time_nsec=999_000_000,
                     response_time_sec=1600282314, response_time_nsec=1_250_700))
    assert rec["datetime"] == "2020-09-16T18:51:54.001250+00:00"  # the response time
    assert rec["latency"] == 0.002251
    assert rec["query-time"] == pytest.approx(1600282313.999, abs=1e-6)
    assert rec["response-time"] == pytest.approx(1600282314.0012507, abs=1e-6)


def test_latency_only_for_responses_with_both_times():
    both = dict(query_time_sec=100, query_time_nsec=0, response_time_sec=101, response_time_nsec=0)
    assert decode(tap(5, **both))["latency"] == "-"  # a query has no latency
    assert decode(tap(6, **both))["latency"] == 1.0
    assert decode(tap(6, response_time_sec=101))["latency"] == "-"
    only_query = decode(tap(6, query_time_sec=100, query_time_nsec=5000))
    assert only_query["latency"] == "-"
    assert only_query["datetime"] == "1970-01-01T00:01:40.000005+00:00"  # falls back to the query time


def test_query_falls_back_to_response_time():
    rec = decode(tap(5, response_time_sec=1600282313, response_time_nsec=1000))
    assert rec["datetime"] == "2020-09-16T18:51:53.000001+00:00"


@settings(max_examples=300, deadline=None)
@given(
    qsec=st.integers(1, 2**40), qnsec=st.integers(0, 999_999_999),
    dsec=st.integers(-5, 5), rnsec=st.integers(0, 999_999_999),
)
def test_latency_is_the_difference_rounded_to_microseconds(qsec, qnsec, dsec, rnsec):
    rsec = max(qsec + dsec, 1)
    rec = decode(tap(4, query_time_sec=qsec, query_time_nsec=qnsec,
                     response_time_sec=rsec, response_time_nsec=rnsec))
    exact = Fraction(rsec - qsec) + Fraction(rnsec - qnsec, 10**9)
    assert isinstance(rec["latency"], float)
    assert abs(Fraction(rec["latency"]) - exact) <= Fraction(1, 2 * 10**6) + Fraction(1, 10**12)
    assert rec["latency"] == round(rec["latency"], 6)


_ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00")


@settings(max_examples=300, deadline=None)
@given(sec=st.integers(1, 253402300799), nsec=st.integers(0, 2**32 - 1), mtype=st.integers(1, 14))
def test_datetime_agrees_with_timestamp(sec, nsec, mtype):
    field = "query" if mtype % 2 else "response"
    rec = decode(tap(mtype, **{f"{field}_time_sec": sec, f"{field}_time_nsec": nsec}))
    whole, micros = sec + nsec // 10**9, (nsec % 10**9) // 1000  # nsec past 1e9 carries
    text = rec["datetime"]
    if whole > 253402300799:  # past 9999-12-31T23:59:59
        assert text == "-"
        return
    assert _ISO.fullmatch(text), text
    parsed = datetime.fromisoformat(text)
    assert calendar.timegm(parsed.utctimetuple()) == whole
    assert parsed.microsecond == micros
    assert abs(rec["timestamp"] - (sec + nsec / 1e9)) <= 4 * math.ulp(rec["timestamp"])


@pytest.mark.parametrize("sec", [253402300800, 10**12, 2**63, 2**64 - 1])
def test_times_past_year_9999_do_not_break_decoding(sec):
    rec = decode(tap(5, query_time_sec=sec, query_time_nsec=1))
    assert rec["datetime"] == "-"
    assert rec["timestamp"] == pytest.approx(sec, rel=1e-9)
    # ... nor the next message in the same second, nor a normal one after it
    assert decode(tap(5, query_time_sec=sec))["datetime"] == "-"
    ok = decode(tap(5, query_time_sec=1600282313, query_time_nsec=0))
    assert ok["datetime"] == "2020-09-16T18:51:53.000000+00:00"


def test_nanoseconds_out_of_range_carry_into_seconds():
    rec = decode(tap(5, query_time_sec=1600282313, query_time_nsec=2_500_000_000))
    assert rec["datetime"] == "2020-09-16T18:51:55.500000+00:00"
    assert rec["timestamp"] == pytest.approx(1600282315.5)


# --------------------------------------------------------------------------
# Zone, policy, HTTP protocol, identity/version/extra
# --------------------------------------------------------------------------


def test_query_zone_wire_name_to_text():
    assert decode(tap(query_zone=b"\x07example\x03com\x00"))["query-zone"] == "example.com."
    assert decode(tap(query_zone=b"\x00"))["query-zone"] == "."
    assert decode(tap(query_zone=b"\x03a.b\x00"))["query-zone"] == "a\\.b."
    assert decode(tap())["query-zone"] is None


@pytest.mark.parametrize(
    "raw, text",
    [
        (b"\xc0\x00", "\\xc0\x00"),  # a compression pointer loop
        (b"\x05ab", "\x05ab"),  # label overruns
        (b"\x45xyz", "Exyz"),  # reserved label type
        (b"\x01a", "\x01a"),  # no root label
    ],
)
def test_malformed_query_zone_falls_back_to_text(raw, text):
    assert decode(tap(query_zone=raw))["query-zone"] == text


ACTIONS = ["NXDOMAIN", "NODATA", "PASS", "DROP", "TRUNCATE", "LOCAL_DATA"]
MATCHES = ["QNAME", "CLIENT_IP", "RESPONSE_IP", "NS_NAME", "NS_IP"]


@pytest.mark.parametrize("number, name", list(enumerate(ACTIONS, start=1)))
def test_policy_actions(number, name):
    rec = decode(tap(6, policy={"type": "RPZ", "rule": b"\x03rpz\x07example\x00", "action": number}))
    assert rec["policy"] == {"type": "RPZ", "rule": "rpz.example.", "action": name,
                             "match": None, "value": None}


@pytest.mark.parametrize(
    "match, value, expected",
    [
        (1, b"\x03bad\x07example\x00", "bad.example."),
        (2, bytes([192, 0, 2, 9]), "192.0.2.9"),
        (3, socket.inet_pton(socket.AF_INET6, "2001:db8::9"), "2001:db8::9"),
        (4, b"\x02ns\x04evil\x00", "ns.evil."),
        (5, bytes([203, 0, 113, 5]), "203.0.113.5"),
        (2, b"not-an-address", "not-an-address"),  # wrong length: kept as text
    ],
)
def test_policy_matches_and_values(match, value, expected):
    rec = decode(tap(6, policy={"match": match, "value": value}))
    assert rec["policy"]["match"] == MATCHES[match - 1]
    assert rec["policy"]["value"] == expected
    assert rec["policy"]["type"] is None and rec["policy"]["rule"] is None


def test_policy_value_without_match_is_text():
    assert decode(tap(policy={"value": b"free text"}))["policy"]["value"] == "free text"


def test_empty_policy():
    rec = decode(tap(policy={}))
    assert rec["policy"] == {"type": None, "rule": None, "action": None, "match": None, "value": None}
    assert decode(tap())["policy"] is None


@pytest.mark.parametrize("number, name", [(1, "HTTP1"), (2, "HTTP2"), (3, "HTTP3")])
def test_http_protocol(number, name):
    assert decode(tap(socket_protocol=4, http_protocol=number))["http-protocol"] == name
    assert decode(tap(socket_protocol=4))["http-protocol"] is None


def test_identity_version_extra():
    rec = decode(tap(identity=b"lb1", version=b"unbound 1.19", extra=b"x=1"))
    assert (rec["identity"], rec["version"], rec["extra"]) == ("lb1", "unbound 1.19", "x=1")
    rec = decode(tap())
    assert (rec["identity"], rec["version"], rec["extra"]) == ("-", None, None)
    rec = decode(tap(identity="rés".encode(), extra=b"\xff\xfe"))
    assert rec["identity"] == "rés"
    assert rec["extra"] == "\\xff\\xfe"  # not UTF-8: escaped, never an exception


# --------------------------------------------------------------------------
# Malformed input
# --------------------------------------------------------------------------


def test_malformed_dns_payload_keeps_the_header_fields():
    broken = QUERY_WIRE[:20]  # header and part of the question name
    rec = decode(tap(5, query_message=broken))
    assert rec["malformed"] is True
    assert rec["length"] == 20
    assert rec["id"] == 4242 and rec["opcode"] == "QUERY" and rec["flags"] == "RD"
    assert rec["qdcount"] == 1 and rec["arcount"] == 1
    assert rec["qname"] == "-" and rec["rrtype"] == "-"


def test_dns_payload_shorter_than_a_header():
    rec = decode(tap(6, response_message=b"\x01\x02\x03"))
    assert rec["malformed"] is True
    assert rec["id"] == "-" and rec["rcode"] == "-" and rec["length"] == 3


@pytest.mark.parametrize(
    "payload",
    [
        b"",  # no message field: proto2 required 'type' missing
        b"\xff\xff\xff",
        b"\x0a\x05abc",  # identity overruns the frame
        dnstap_pb2.Dnstap(type=1, identity=b"x").SerializeToString(),  # no message
    ],
)
def test_undecodable_frames(payload):
    with pytest.raises(UndecodableMessage):
        decode(payload)
    assert issubclass(UndecodableMessage, ReceiverError)


def test_invalid_utf8_in_policy_type_gives_text():
    frame = tap(6, policy={"type": "RPZ"}).replace(b"RPZ", b"R\xffZ")
    rec = decode(frame)
    assert rec["policy"]["type"] == "R\\xffZ"
    orjson.dumps(rec)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, value) -> bytes:
    if isinstance(value, bytes):
        return _varint(number << 3 | 2) + _varint(len(value)) + value
    if isinstance(value, tuple):  # fixed32
        return _varint(number << 3 | 5) + struct.pack("<I", value[0])
    return _varint(number << 3) + _varint(value)


_u64 = st.integers(0, 2**64 - 1)
_fixed32 = st.integers(0, 2**32 - 1).map(lambda n: (n,))
_message_fields = st.fixed_dictionaries(
    {"1": st.integers(1, 14)},
    optional={
        "2": st.integers(0, 5), "3": st.integers(0, 9),
        "4": st.binary(max_size=17), "5": st.binary(max_size=17),
        "6": st.integers(0, 2**32 - 1), "7": st.integers(0, 2**32 - 1),
        "8": _u64, "9": _fixed32, "12": _u64, "13": _fixed32,
        "10": st.binary(max_size=80) | st.just(QUERY_WIRE),
        "14": st.binary(max_size=80) | st.just(RESPONSE_WIRE),
        "11": st.binary(max_size=20),
        "15": st.fixed_dictionaries({}, optional={
            "1": st.binary(max_size=10), "2": st.binary(max_size=20), "3": st.integers(0, 9),
            "4": st.integers(0, 9), "5": st.binary(max_size=20)}),
        "16": st.integers(0, 5),
    },
)


def _encode(fields: dict) -> bytes:
    out = b""
    for key, value in fields.items():
        if isinstance(value, dict):
            value = _encode(value)
        out += _field(int(key), value)
    return out


_JSON_TYPES = (str, int, float, bool, type(None))


@settings(max_examples=400, deadline=None)
@given(
    message=_message_fields,
    identity=st.none() | st.binary(max_size=12),
    extra=st.none() | st.binary(max_size=12),
)
def test_any_well_typed_frame_decodes_to_plain_values(message, identity, extra):
    frame = _field(15, 1) + _field(14, _encode(message))
    if identity is not None:
        frame += _field(1, identity)
    if extra is not None:
        frame += _field(3, extra)
    rec = decode(frame)
    assert type(rec) is dict
    assert list(rec) == list(FIELDS)
    for key, value in rec.items():
        if key == "policy" and value is not None:
            assert all(isinstance(v, (str, type(None))) for v in value.values())
        else:
            assert isinstance(value, _JSON_TYPES), (key, value)
    assert orjson.loads(orjson.dumps(rec)) == rec
    assert rec["type"] == ("query" if message["1"] % 2 else "response")


@settings(max_examples=500, deadline=None)
@given(payload=st.binary(max_size=300))
def test_arbitrary_bytes_decode_or_raise_undecodable(payload):
    try:
        rec = decode(payload, keep_raw=True)
    except UndecodableMessage:
        return
    assert isinstance(rec, DnstapRecord) and rec.raw is payload


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_mutated_real_frames_decode_or_raise_undecodable(data):
    frames = _capture_frames()
    frame = bytearray(data.draw(st.sampled_from(frames)))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(frame) - 1))
        frame[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(frame)))
    payload = bytes(frame[:cut])
    try:
        rec = decode(payload, keep_raw=True)
    except UndecodableMessage:
        return
    assert rec.raw == payload
    assert decode(payload) == rec
    orjson.dumps(rec)


_FRAMES: list[bytes] = []


def _capture_frames() -> list[bytes]:
    if not _FRAMES:
        _FRAMES.extend(frames_of(CAPTURES / "named.fstrm")[:20])
        _FRAMES.extend(frames_of(CAPTURES / "unbound-unix.fstrm")[:20])
    return _FRAMES


# --------------------------------------------------------------------------
# The record type
# --------------------------------------------------------------------------


def test_record_raw_is_the_input():
    frame = tap(5, query_message=QUERY_WIRE, identity=b"x")
    rec = decode(frame, keep_raw=True)
    assert rec.raw is frame
    assert "raw" not in rec  # never a formatted field
    assert not hasattr(rec, "__dict__")


@pytest.mark.parametrize("protocol", range(2, pickle.HIGHEST_PROTOCOL + 1))
def test_record_pickles_with_raw(protocol):
    frame = tap(6, response_message=RESPONSE_WIRE, identity=b"lb1",
                policy={"type": "RPZ", "action": 1})
    rec = decode(frame, keep_raw=True)
    back = pickle.loads(pickle.dumps(rec, protocol=protocol))
    assert type(back) is DnstapRecord
    assert back == rec
    assert back.raw == frame
    assert list(back) == list(rec)


def test_record_copies_with_raw():
    rec = decode(tap(5, query_message=QUERY_WIRE), keep_raw=True)
    for clone in (copy.copy(rec), copy.deepcopy(rec)):
        assert clone == rec and clone.raw == rec.raw and type(clone) is DnstapRecord


def test_records_are_independent():
    a = decode(tap(5, query_message=QUERY_WIRE))
    b = decode(tap(6, response_message=RESPONSE_WIRE))
    a["qname"] = "changed."
    assert b["qname"] == "www.example.com."
    assert FIELDS["qname"] == "-"
