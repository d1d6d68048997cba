"""Output formats (core/formats.py): text line, JSON lines, YAML documents."""

from __future__ import annotations

import json
from pathlib import Path

import dns.message
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from core import dnstap_pb2
from core.errors import ConfigError
from core.formats import FORMATS, format_json, format_text, format_yaml, get_format
from core.framestream import ReaderSession
from core.message import FIELDS, decode

CAPTURES = Path(__file__).parent / "data" / "captures"


def _frames(name: str) -> list[bytes]:
    frames: list = []
    ReaderSession().receive((CAPTURES / name).read_bytes(), frames)
    return frames


def _client_query(**extra) -> bytes:
    d = dnstap_pb2.Dnstap(type=1, identity=b"lb1")
    m = d.message
    m.type = 5  # CLIENT_QUERY
    m.socket_family = 1
    m.socket_protocol = 1
    m.query_address = bytes([192, 0, 2, 1])
    m.query_port = 42222
    m.query_time_sec = 1600282313
    m.query_time_nsec = 547352000
    m.query_message = dns.message.make_query("www.google.com.", "A", use_edns=0).to_wire()
    for key, value in extra.items():
        setattr(m, key, value)
    return d.SerializeToString()


# --------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------


def test_text_line_layout():
    rec = decode(_client_query())
    assert rec["length"] == 43
    assert format_text(rec) == (
        b"2020-09-16T18:51:53.547352+00:00 lb1 CLIENT_QUERY NOERROR 192.0.2.1 42222 "
        b"INET UDP 43b www.google.com. A -"
    )


def test_text_line_of_a_response_with_latency():
    d = dnstap_pb2.Dnstap(type=1, identity=b"ns1")
    m = d.message
    m.type = 6
    m.socket_family = 2
    m.socket_protocol = 2
    m.query_address = bytes(15) + b"\x01"
    m.query_port = 5353
    m.query_time_sec, m.query_time_nsec = 1600282313, 500_000_000
    m.response_time_sec, m.response_time_nsec = 1600282313, 512_345_678
    query = dns.message.make_query("example.org.", "MX")
    response = dns.message.make_response(query)
    response.set_rcode(3)
    m.response_message = response.to_wire()
    rec = decode(d.SerializeToString())
    assert format_text(rec) == (
        b"2020-09-16T18:51:53.512345+00:00 ns1 CLIENT_RESPONSE NXDOMAIN ::1 5353 INET6 TCP "
        + str(len(m.response_message)).encode()
        + b"b example.org. MX 0.012346"
    )


def test_text_of_an_empty_record():
    assert format_text(dict(FIELDS)) == b"- - - - - - - - 0b - - -"


def test_text_with_geoip_fields():
    rec = decode(_client_query())
    rec["country"] = "Netherlands"
    rec["city"] = "Amsterdam"
    assert format_text(rec).endswith(b" www.google.com. A - Netherlands Amsterdam")


def test_text_is_utf8_and_never_fails():
    rec = dict(FIELDS, identity="r\u00e9solveur", qname="\udcff.")  # a lone surrogate
    line = format_text(rec)
    assert "résolveur".encode() in line
    assert b"\\udcff." in line
    assert b"\n" not in format_text(decode(_client_query()))


def test_text_for_every_capture_record():
    for frame in _frames("named.fstrm"):
        rec = decode(frame)
        fields = format_text(rec).decode().split(" ")
        assert len(fields) == 12
        assert fields[0] == rec["datetime"] and fields[2] == rec["message"]
        assert fields[8] == f"{rec['length']}b" and fields[9] == rec["qname"]


# --------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------


def test_json_round_trip_of_capture_records():
    for name in ("named.fstrm", "unbound-unix.fstrm"):
        for frame in _frames(name):
            rec = decode(frame)
            text = format_json(rec)
            assert b"\n" not in text
            assert json.loads(text) == rec
            assert list(json.loads(text)) == list(FIELDS)  # field order kept


def test_json_of_policy_and_raw():
    rec = decode(_client_query())
    rec["policy"] = {"type": "RPZ", "rule": "rpz.", "action": "NXDOMAIN", "match": "QNAME", "value": "x."}
    out = json.loads(format_json(rec))
    assert out["policy"]["action"] == "NXDOMAIN"
    assert "raw" not in out  # the protobuf bytes never reach the outputs


# --------------------------------------------------------------------------
# YAML
# --------------------------------------------------------------------------

AWKWARD = [
    "", " ", "  leading", "trailing ", "a: b", "key: value # comment", "#not a comment",
    "- item", "? q", "'single'", '"double"', "back\\slash", "yes", "no", "on", "off",
    "true", "False", "null", "~", "Null", "NULL", "123", "0x1F", "1e3", "1.5", ".inf", "-.inf",
    ".nan", "0o17", "012", "1_000", "12:30:45", "2020-09-16", "2020-09-16T18:51:53Z", "@at",
    "`tick`", "%percent", "&anchor", "*alias", "!tag", "|", ">", "{a: 1}", "[1, 2]", "---",
    "...", "\t", "line\nbreak", "\r\n", "\x00", "\x07", "\x1b[0m", "\x7f", "\x85", "\x9f",
    "\xa0", "\u2028", "\u2029", "\ufeff", "\ufffe", "\uffff", "é", "日本", "\U0001f600",
    "\\xff\\xfe", "www.example.com.", "a\\.b.",
]

text_st = st.one_of(
    st.sampled_from(AWKWARD),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30),
    st.lists(st.sampled_from(AWKWARD), max_size=4).map("".join),
)
float_st = st.floats(allow_nan=False, allow_infinity=False)
scalar_st = st.one_of(
    text_st, st.integers(-(2**63), 2**64 - 1), float_st, st.booleans(), st.none(),
    st.sampled_from([1e16, 1e-9, 5e-324, -1e22, 1.5e-7, 0.0, -0.0, 1e-5, 1795936653.0288982]),
)
policy_st = st.none() | st.fixed_dictionaries(
    {k: st.none() | text_st for k in ("type", "rule", "action", "match", "value")}
)


@st.composite
def records(draw):
    rec = {}
    for key in FIELDS:
        rec[key] = draw(policy_st) if key == "policy" else draw(scalar_st)
    if draw(st.booleans()):
        rec["country"] = draw(text_st)
        rec["city"] = draw(text_st)
    return rec


@settings(max_examples=200, deadline=None)
@given(rec=records())
def test_yaml_round_trip(rec):
    doc = format_yaml(rec)
    assert doc.startswith(b"---\n") and not doc.endswith(b"\n")
    back = yaml.safe_load(doc)
    assert back == rec
    assert list(back) == list(rec)


@settings(max_examples=200, deadline=None)
@given(rec=records())
def test_json_round_trip(rec):
    assert json.loads(format_json(rec)) == rec


@settings(max_examples=30, deadline=None)
@given(recs=st.lists(records(), min_size=1, max_size=5))
def test_yaml_documents_joined_with_newlines(recs):
    stream = b"\n".join(format_yaml(rec) for rec in recs)
    assert list(yaml.safe_load_all(stream)) == recs


@pytest.mark.parametrize("value", [1e16, 1e-9, 5e-324, -1e22, 2.0**70, 1.5e-7, 1e-5])
def test_yaml_floats_read_back_as_floats(value):
    back = yaml.safe_load(format_yaml({"latency": value}))["latency"]
    assert type(back) is float and back == value


@pytest.mark.parametrize("char", ["\x7f", "\x80", "\x85", "\x9f", "\u2028", "\u2029", "\ufffe", "\uffff"])
def test_yaml_escapes_characters_yaml_reads_differently(char):
    rec = {"identity": f"a{char}b", "policy": {"value": char}}
    doc = format_yaml(rec)
    assert char.encode() not in doc
    assert yaml.safe_load(doc) == rec


def test_yaml_of_capture_records():
    frames = _frames("named.fstrm") + _frames("unbound-tcp.fstrm")[:100]
    recs = [decode(frame) for frame in frames]
    stream = b"\n".join(format_yaml(rec) for rec in recs)
    assert list(yaml.safe_load_all(stream)) == recs


def test_yaml_layout():
    assert format_yaml({"qname": "a.", "length": 3, "edns-do": None, "malformed": False}) == (
        b'---\nqname: "a."\nlength: 3\nedns-do: null\nmalformed: false'
    )


# --------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------


def test_get_format():
    assert get_format("text").record is format_text
    assert get_format("json").record is format_json
    assert get_format("yaml").record is format_yaml
    assert set(FORMATS) == {"text", "json", "yaml"}
    assert all(fmt.name == name for name, fmt in FORMATS.items())


@pytest.mark.parametrize("name", ["xml", "", "JSON", "text "])
def test_unknown_format_is_a_config_error(name):
    with pytest.raises(ConfigError) as info:
        get_format(name)
    assert repr(name) in str(info.value)
    assert "text, json, yaml" in str(info.value)


# --------------------------------------------------------------------------
# Batches: what the writers use
# --------------------------------------------------------------------------

_awkward_text = st.one_of(
    st.text(max_size=30),
    st.sampled_from(['},{"timestamp":', '"},{"timestamp":1}', "\\", "\n", '{"a":[{"timestamp":1}]}']),
)


@st.composite
def _records(draw):
    recs = []
    for _ in range(draw(st.integers(0, 8))):
        rec = decode(_client_query())
        rec["identity"] = draw(_awkward_text)
        rec["qname"] = draw(_awkward_text)
        if draw(st.booleans()):
            rec["policy"] = {"timestamp": draw(_awkward_text), "rule": draw(_awkward_text)}
        if draw(st.booleans()):
            rec["extra"] = [{"timestamp": 1}, {"timestamp": draw(_awkward_text)}]
        recs.append(rec)
    return recs


@given(recs=_records(), name=st.sampled_from(sorted(FORMATS)), delimiter=st.sampled_from([b"\n", b"\0", b"\r\n"]))
@settings(max_examples=300, deadline=None)
def test_batch_equals_records_each_followed_by_the_delimiter(recs, name, delimiter):
    fmt = FORMATS[name]
    expected = b"".join(fmt.record(rec) + delimiter for rec in recs)
    assert fmt.batch(recs, delimiter) == expected


def test_json_batch_of_records_not_starting_with_timestamp():
    recs = [{"a": 1}, {"timestamp": 2, "b": '},{"timestamp":'}, {"c": [{"timestamp": 3}]}]
    lines = FORMATS["json"].batch(recs).split(b"\n")
    assert lines[-1] == b""
    assert [json.loads(line) for line in lines[:-1]] == recs


def test_json_batch_of_capture_records_is_json_lines():
    recs = [decode(f) for f in _frames("unbound-tcp.fstrm")]
    lines = FORMATS["json"].batch(recs).split(b"\n")
    assert lines[-1] == b""
    assert [json.loads(line) for line in lines[:-1]] == [dict(r) for r in recs]


def test_text_line_break_in_identity_cannot_forge_a_line():
    rec = decode(_client_query())
    rec["identity"] = "evil\n2020-01-01T00:00:00+00:00 forged\r"
    line = format_text(rec)
    assert b"\n" not in line and b"\r" not in line
    assert line.split(b" ")[1] == b"evil\\n2020-01-01T00:00:00+00:00"


def test_text_latency_is_written_in_seconds_without_exponent():
    rec = decode(_client_query())
    rec["latency"] = 2.8e-05
    assert format_text(rec).endswith(b" 0.000028")
    rec["latency"] = 0.048
    assert format_text(rec).endswith(b" 0.048000")
