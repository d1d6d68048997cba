"""The one message value type: a decoded dnstap message as a flat record.

A record is a dict whose keys are the output field names (dnstap-receiver
4.7.0's names, plus the fields it lacked), so JSON/YAML outputs serialise it
as it is. Records are plain dicts: every later step reads fields, and a dict
subclass makes each lookup about twice as slow. When an output forwards
dnstap unchanged, ``decode(payload, keep_raw=True)`` returns a
``DnstapRecord`` instead, whose ``raw`` holds the original protobuf bytes
(they never appear in the formatted outputs).
"""

from __future__ import annotations

import socket
from datetime import datetime, timezone

from google.protobuf.message import DecodeError as _PbDecodeError

from core import dnstap_pb2, dnswire
from core.errors import ReceiverError

__all__ = ["FIELDS", "DnstapRecord", "UndecodableMessage", "decode", "is_query"]

UNKNOWN = "-"

MESSAGE_TYPES = {number: name for name, number in dnstap_pb2.Message.Type.items()}
FAMILIES = {number: name for name, number in dnstap_pb2.SocketFamily.items()}
PROTOCOLS = {number: name for name, number in dnstap_pb2.SocketProtocol.items()}
HTTP_PROTOCOLS = {number: name for name, number in dnstap_pb2.HttpProtocol.items()}
POLICY_ACTIONS = {number: name for name, number in dnstap_pb2.Policy.Action.items()}
POLICY_MATCHES = {number: name for name, number in dnstap_pb2.Policy.Match.items()}


class UndecodableMessage(ReceiverError):
    """The frame is not a dnstap protobuf message."""


class DnstapRecord(dict):
    """A decoded message that keeps the original dnstap protobuf bytes in ``raw``."""

    __slots__ = ("raw",)


# Every field with its default, in output order. "-" marks an unknown value in
# the fields 4.7.0 had (its convention); newer fields use null.
FIELDS: dict[str, object] = {
    "timestamp": 0.0,
    "datetime": UNKNOWN,
    "identity": UNKNOWN,
    "version": None,
    "message": UNKNOWN,
    "type": UNKNOWN,
    "family": UNKNOWN,
    "protocol": UNKNOWN,
    "query-ip": UNKNOWN,
    "query-port": UNKNOWN,
    "response-ip": UNKNOWN,
    "response-port": UNKNOWN,
    "length": 0,
    "id": UNKNOWN,
    "opcode": UNKNOWN,
    "rcode": UNKNOWN,
    "flags": UNKNOWN,
    "qname": UNKNOWN,
    "rrtype": UNKNOWN,
    "qclass": UNKNOWN,
    "qdcount": 0,
    "ancount": 0,
    "nscount": 0,
    "arcount": 0,
    "edns-udp-size": None,
    "edns-version": None,
    "edns-do": None,
    "edns-client-subnet": None,
    "latency": UNKNOWN,
    "malformed": False,
    "query-time": None,
    "response-time": None,
    "query-zone": None,
    "policy": None,
    "http-protocol": None,
    "extra": None,
}


def is_query(message_type: int) -> bool:
    """Odd dnstap message types are queries, even ones responses."""
    return message_type % 2 == 1


def _text(value: bytes) -> str:
    return value.decode("utf-8", "backslashreplace")


_ADDRESSES: dict[bytes, str] = {}
_ADDRESS_CACHE_SIZE = 65536


def _address(family: int, raw: bytes) -> str:
    """Text form of an address, cached: a server sees the same clients (and
    its own address) over and over."""
    key = b"\1" + raw if family == 1 and len(raw) == 16 else raw
    text = _ADDRESSES.get(key)
    if text is None:
        text = _address_text(family, raw)
        if len(_ADDRESSES) >= _ADDRESS_CACHE_SIZE:
            _ADDRESSES.clear()
        _ADDRESSES[key] = text
    return text


def _address_text(family: int, raw: bytes) -> str:
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw)
    if len(raw) == 16:
        # CoreDNS sends IPv4 addresses as 16 bytes with family INET.
        if family == 1:
            return socket.inet_ntop(socket.AF_INET, raw[12:])
        return socket.inet_ntop(socket.AF_INET6, raw)
    return UNKNOWN


def _wire_name(raw: bytes) -> str:
    try:
        labels, _ = dnswire.read_name(raw, 0)
    except (IndexError, ValueError):
        return _text(raw)
    return dnswire.name_to_text(labels)


def _policy(msg) -> dict:
    pol = msg.policy
    match = pol.match if pol.HasField("match") else None
    ptype = pol.type if pol.HasField("type") else None
    if isinstance(ptype, bytes):  # a string field that is not UTF-8 comes back as bytes
        ptype = _text(ptype)
    value = None
    if pol.HasField("value"):
        raw = pol.value
        if match in (2, 3, 5) and len(raw) in (4, 16):
            value = _address(2 if len(raw) == 16 else 1, raw)
        elif match in (1, 4):
            value = _wire_name(raw)
        else:
            value = _text(raw)
    return {
        "type": ptype,
        "rule": _wire_name(pol.rule) if pol.HasField("rule") else None,
        "action": POLICY_ACTIONS.get(pol.action) if pol.HasField("action") else None,
        "match": POLICY_MATCHES.get(match) if match is not None else None,
        "value": value,
    }


class _IsoSeconds:
    """ISO 8601 rendering with the whole-second part cached: consecutive
    messages almost always fall in the same second. The cache is one tuple,
    replaced whole, so threads decoding at once never pair a second with
    another second's text."""

    __slots__ = ("cached",)

    def __init__(self) -> None:
        self.cached: tuple[int, str] = (-1, "")

    def __call__(self, sec: int, nsec: int) -> str:
        if nsec >= 1_000_000_000:  # out of range: carry it, as the timestamp does
            sec, nsec = sec + nsec // 1_000_000_000, nsec % 1_000_000_000
        cached_sec, text = self.cached
        if sec != cached_sec:
            try:
                text = datetime.fromtimestamp(sec, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
            except (OverflowError, OSError, ValueError):  # past year 9999
                return UNKNOWN
            self.cached = (sec, text)
        return f"{text}.{nsec // 1000:06d}+00:00"


_iso = _IsoSeconds()


def decode(payload: bytes, keep_raw: bool = False) -> dict:
    """Decode one dnstap protobuf frame; raises UndecodableMessage. With
    ``keep_raw`` the record is a DnstapRecord carrying ``payload``."""
    tap = dnstap_pb2.Dnstap()
    try:
        tap.ParseFromString(payload)
    except (_PbDecodeError, RuntimeError, ValueError) as exc:
        raise UndecodableMessage(f"protobuf does not parse: {exc}") from None
    if not tap.HasField("message"):
        raise UndecodableMessage("dnstap frame carries no message")
    msg = tap.message
    if keep_raw:
        rec = DnstapRecord(FIELDS)
        rec.raw = payload
    else:
        rec = dict(FIELDS)
    if tap.identity:
        rec["identity"] = _text(tap.identity)
    if tap.version:
        rec["version"] = _text(tap.version)
    if tap.extra:
        rec["extra"] = _text(tap.extra)

    mtype = msg.type
    family = msg.socket_family
    rec["message"] = MESSAGE_TYPES.get(mtype, UNKNOWN)
    rec["family"] = FAMILIES.get(family, UNKNOWN)
    rec["protocol"] = PROTOCOLS.get(msg.socket_protocol, UNKNOWN)
    if msg.query_address:
        rec["query-ip"] = _address(family, msg.query_address)
    if msg.HasField("query_port"):
        rec["query-port"] = msg.query_port
    if msg.response_address:
        rec["response-ip"] = _address(family, msg.response_address)
    if msg.HasField("response_port"):
        rec["response-port"] = msg.response_port

    qsec, qnsec = msg.query_time_sec, msg.query_time_nsec
    rsec, rnsec = msg.response_time_sec, msg.response_time_nsec
    qtime = qsec + qnsec * 1e-9 if qsec else None
    rtime = rsec + rnsec * 1e-9 if rsec else None
    rec["query-time"] = qtime
    rec["response-time"] = rtime

    query = is_query(mtype)
    if query:
        rec["type"] = "query"
        wire = msg.query_message
        sec, nsec = (qsec, qnsec) if qsec else (rsec, rnsec)
    else:
        rec["type"] = "response"
        wire = msg.response_message
        sec, nsec = (rsec, rnsec) if rsec else (qsec, qnsec)
        if qtime is not None and rtime is not None:
            rec["latency"] = round((rsec - qsec) + (rnsec - qnsec) * 1e-9, 6)
    rec["timestamp"] = sec + nsec * 1e-9
    rec["datetime"] = _iso(sec, nsec)
    rec["length"] = len(wire)
    if wire and not dnswire.parse(wire, rec):
        rec["malformed"] = True

    if msg.query_zone:
        rec["query-zone"] = _wire_name(msg.query_zone)
    if msg.HasField("policy"):
        rec["policy"] = _policy(msg)
    if msg.HasField("http_protocol"):
        rec["http-protocol"] = HTTP_PROTOCOLS.get(msg.http_protocol, UNKNOWN)
    return rec
