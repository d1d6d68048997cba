"""Direct DNS wire parser (core/dnswire.py), checked field by field against dnspython."""

from __future__ import annotations

import ipaddress
import struct

import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core import dnswire
from core.dnswire import flags_text, name_to_text, parse, qclass_text, rcode_text, rrtype_text

# --------------------------------------------------------------------------
# Strategies: messages built with dnspython
# --------------------------------------------------------------------------

# Bytes a presentation name must escape, plus plain ones, NUL and high bytes.
_AWKWARD = list(b'.\\"();@$ \t') + [0, 0x7F, 0x80, 0xC3, 0xA9, 0xFF] + list(b"az09-_*")
label_st = st.one_of(
    st.binary(min_size=1, max_size=20),
    st.lists(st.sampled_from(_AWKWARD), min_size=1, max_size=12).map(bytes),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=63).map(
        str.encode
    ),
)


def _name(labels: list[bytes]) -> dns.name.Name:
    return dns.name.Name(labels + [b""])


name_st = (
    st.lists(label_st, max_size=6)
    .filter(lambda labels: sum(len(label) + 1 for label in labels) + 1 <= 255)
    .map(_name)
)

FLAG_BITS = [dns.flags.QR, dns.flags.AA, dns.flags.TC, dns.flags.RD, dns.flags.RA,
             dns.flags.AD, dns.flags.CD, 0x0040]  # 0x0040 is the Z bit: never reported


@st.composite
def ecs_st(draw):
    if draw(st.booleans()):
        address = str(draw(st.ip_addresses(v=4)))
        srclen = draw(st.integers(0, 32))
    else:
        address = str(draw(st.ip_addresses(v=6)))
        srclen = draw(st.integers(0, 128))
    scopelen = draw(st.integers(0, srclen))
    return dns.edns.ECSOption(address, srclen, scopelen)


@st.composite
def rrsets_st(draw, names):
    """A few A/TXT rrsets, owned by the qname (compressed) or by other names."""
    out = []
    for _ in range(draw(st.integers(0, 3))):
        owner = draw(st.sampled_from(names)) if names else draw(name_st)
        if draw(st.booleans()):
            addrs = draw(st.lists(st.ip_addresses(v=4).map(str), min_size=1, max_size=3, unique=True))
            out.append(dns.rrset.from_text(owner, draw(st.integers(0, 2**31 - 1)), "IN", "A", *addrs))
        else:
            words = draw(st.lists(st.text(alphabet="abc xyz", min_size=0, max_size=30), min_size=1, max_size=2, unique=True))
            out.append(dns.rrset.from_text(owner, 60, "IN", "TXT", *[f'"{w}"' for w in words]))
    return out


@st.composite
def messages(draw):
    qname = draw(name_st)
    rdtype = draw(st.one_of(st.sampled_from([1, 2, 5, 6, 12, 15, 16, 28, 33, 41, 43, 46, 48, 65, 251, 252, 255, 256]),
                            st.integers(0, 65535)))
    rdclass = draw(st.one_of(st.sampled_from([0, 1, 2, 3, 4, 254, 255]), st.integers(0, 65535)))
    query = dns.message.make_query(qname, rdtype, rdclass, id=draw(st.integers(0, 65535)),
                                   use_edns=False)
    msg = dns.message.make_response(query) if draw(st.booleans()) else query
    msg.use_edns(False)

    flags = 0
    for bit in FLAG_BITS:
        if draw(st.booleans()):
            flags |= bit
    msg.flags = flags
    msg.set_opcode(draw(st.integers(0, 15)))

    edns = draw(st.booleans())
    if edns:
        options = []
        if draw(st.booleans()):
            options.append(dns.edns.GenericOption(draw(st.integers(9, 65000)), draw(st.binary(max_size=10))))
        ecs = draw(st.none() | ecs_st())
        if ecs is not None:
            options.append(ecs)
        if draw(st.booleans()):
            options.append(dns.edns.GenericOption(10, draw(st.binary(min_size=8, max_size=8))))  # cookie
        msg.use_edns(
            draw(st.integers(0, 255)),
            dns.flags.DO if draw(st.booleans()) else 0,
            draw(st.integers(0, 65535)),
            options=options,
        )
        msg.set_rcode(draw(st.one_of(st.integers(0, 23), st.integers(0, 4095))))
    else:
        msg.set_rcode(draw(st.integers(0, 15)))

    names = [qname]
    msg.answer.extend(draw(rrsets_st(names)))
    msg.authority.extend(draw(rrsets_st(names)))
    msg.additional.extend(draw(rrsets_st(names)))
    if draw(st.integers(0, 9)) == 0:
        msg.question = []  # e.g. a FORMERR or BADVERS answer without a question
    return msg


def _count(section) -> int:
    return sum(len(rrset) for rrset in section)


def _ecs_option(msg):
    for option in msg.options:
        if isinstance(option, dns.edns.ECSOption):
            return option
    return None


def _check_against_dnspython(msg, wire: bytes, rec: dict) -> None:
    assert rec["id"] == msg.id
    assert rec["opcode"] == dns.opcode.to_text(msg.opcode())
    assert rec["rcode"] == dns.rcode.to_text(msg.rcode())
    assert set(rec["flags"].split()) == set(dns.flags.to_text(msg.flags).split())
    assert rec["flags"] == dns.flags.to_text(msg.flags)  # same order, too
    assert rec["qdcount"] == len(msg.question)
    assert rec["ancount"] == _count(msg.answer)
    assert rec["nscount"] == _count(msg.authority)
    assert rec["arcount"] == _count(msg.additional) + (1 if msg.edns >= 0 else 0)
    if msg.question:
        question = msg.question[0]
        assert rec["qname"] == question.name.to_text()
        assert rec["rrtype"] == dns.rdatatype.to_text(question.rdtype)
        assert rec["qclass"] == dns.rdataclass.to_text(question.rdclass)
    else:
        assert "qname" not in rec and "rrtype" not in rec and "qclass" not in rec
    if msg.edns >= 0:
        assert rec["edns-udp-size"] == msg.payload
        assert rec["edns-version"] == msg.edns
        assert rec["edns-do"] is bool(msg.ednsflags & dns.flags.DO)
        ecs = _ecs_option(msg)
        if ecs is None:
            assert "edns-client-subnet" not in rec
        else:
            text, _, prefix = rec["edns-client-subnet"].rpartition("/")
            expected = ipaddress.ip_network(f"{ecs.address}/{ecs.srclen}", strict=False)
            assert int(prefix) == ecs.srclen
            assert ipaddress.ip_address(text) == expected.network_address
    else:
        for key in ("edns-udp-size", "edns-version", "edns-do", "edns-client-subnet"):
            assert key not in rec


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(msg=messages())
def test_agrees_with_dnspython(msg):
    wire = msg.to_wire()
    rec: dict = {}
    assert parse(wire, rec) is True
    _check_against_dnspython(msg, wire, rec)


def _question_end(wire: bytes) -> int:
    if struct.unpack_from("!H", wire, 4)[0] == 0:
        return dnswire.HEADER_SIZE
    _, pos = dnswire.read_name(wire, dnswire.HEADER_SIZE)
    return pos + 4


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(msg=messages())
def test_every_truncation_is_handled(msg):
    wire = msg.to_wire()
    arcount = struct.unpack_from("!H", wire, 10)[0]
    qend = _question_end(wire)
    for length in range(len(wire)):
        rec: dict = {}
        ok = parse(wire[:length], rec)
        assert ok is True or ok is False
        if length < dnswire.HEADER_SIZE:
            assert ok is False and rec == {}
        elif length < qend or arcount:
            # The question is cut, or the additional section (where EDNS is
            # looked for) runs past the end of what is left.
            assert ok is False
            assert rec["id"] == msg.id
        else:
            assert ok is True


@settings(max_examples=500, deadline=None)
@given(data=st.binary(max_size=600))
def test_arbitrary_bytes_never_raise(data):
    rec: dict = {}
    ok = parse(data, rec)
    assert ok is True or ok is False
    if len(data) < 12:
        assert ok is False


@settings(max_examples=500, deadline=None)
@given(
    counts=st.tuples(*[st.integers(0, 4)] * 4),
    body=st.binary(max_size=300),
    word=st.integers(0, 65535),
)
def test_arbitrary_bodies_behind_a_plausible_header_never_raise(counts, body, word):
    wire = struct.pack("!6H", 1, word, *counts) + body
    rec: dict = {}
    ok = parse(wire, rec)
    assert ok is True or ok is False
    assert rec["qdcount"] == counts[0] and rec["arcount"] == counts[3]
    assert isinstance(rec["rcode"], str) and isinstance(rec["flags"], str)


# --------------------------------------------------------------------------
# Hand-made wire: malformed messages, compression
# --------------------------------------------------------------------------


def _header(qd=1, an=0, ns=0, ar=0, msg_id=0x1234, word=0x0100) -> bytes:
    return struct.pack("!6H", msg_id, word, qd, an, ns, ar)


def test_short_header_is_malformed_and_leaves_record_alone():
    rec = {"qname": "-"}
    assert parse(b"\x12\x34\x01\x00\x00", rec) is False
    assert rec == {"qname": "-"}


def test_header_fields_read_even_if_question_is_missing():
    rec: dict = {}
    assert parse(_header(word=0x8583), rec) is False  # qdcount=1, no question bytes
    assert rec["id"] == 0x1234
    assert rec["flags"] == "QR AA RD RA"
    assert rec["rcode"] == "NXDOMAIN"
    assert rec["opcode"] == "QUERY"
    assert "qname" not in rec


def test_self_referencing_pointer_is_a_loop():
    wire = _header() + b"\xc0\x0c" + b"\x00\x01\x00\x01"
    rec: dict = {}
    assert parse(wire, rec) is False
    with pytest.raises(ValueError):
        dnswire.read_name(wire, 12)


def test_two_pointers_pointing_at_each_other():
    wire = _header() + b"\xc0\x0e\xc0\x0c" + b"\x00\x01\x00\x01"
    assert parse(wire, {}) is False


def test_label_then_pointer_back_to_itself():
    wire = _header() + b"\x01a\xc0\x0c" + b"\x00\x01\x00\x01"
    assert parse(wire, {}) is False


def test_long_pointer_chain_is_refused():
    # 200 pointers each pointing at the previous one: far more hops than a name needs.
    chain = bytearray(b"\x00")  # offset 12: the root
    for i in range(200):
        target = 12 + (0 if i == 0 else 1 + 2 * (i - 1))
        chain += struct.pack("!H", 0xC000 | target)
    wire = _header(qd=0) + bytes(chain)
    with pytest.raises(ValueError):
        dnswire.read_name(wire, 12 + len(chain) - 2)
    labels, end = dnswire.read_name(wire, 12 + 1 + 2 * 10)  # 11 hops: fine
    assert labels == [] and end == 12 + 1 + 2 * 10 + 2


def test_pointer_outside_the_message():
    assert parse(_header() + b"\xc0\xff\x00\x01\x00\x01", {}) is False
    assert parse(_header() + b"\xc0", {}) is False  # half a pointer


def test_valid_backward_pointer():
    # The question name "a.example." then, in the answer, a pointer to it.
    wire = (
        _header(an=1, ar=1)
        + b"\x01a\x07example\x00\x00\x01\x00\x01"
        + b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04\x7f\x00\x00\x01"
        + b"\x00\x00\x29\x04\xd0\x00\x00\x80\x00\x00\x00"
    )
    rec: dict = {}
    assert parse(wire, rec) is True
    assert rec["qname"] == "a.example."
    assert rec["edns-udp-size"] == 1232 and rec["edns-do"] is True
    assert dnswire.read_name(wire, 12 + 15) == ([b"a", b"example"], 12 + 15 + 2)
    assert dns.message.from_wire(wire).question[0].name.to_text() == "a.example."


def test_question_name_cache_is_only_for_uncompressed_names(monkeypatch):
    """Names are cached by their bytes up to the first zero byte. A question
    name ending in a pointer whose second byte is zero (to offset 0: the
    header) stops at that same zero byte, but its text comes from the header,
    which differs between messages: it must not be cached."""
    monkeypatch.setattr(dnswire, "_QNAMES", {})
    tail = b"\x00\x01\x00\x01"
    plain = _header() + b"\x03www\x07example\x00" + tail
    first, again = {}, {}
    assert parse(plain, first) and parse(plain, again)
    assert first["qname"] == again["qname"] == "www.example."
    assert dnswire._QNAMES == {b"\x03www\x07example\x00": "www.example."}

    def pointing_at_the_header(msg_id: int) -> bytes:
        # The header read as a name: its first byte is the length of a label.
        return struct.pack("!HHHHHH", msg_id, 0, 1, 0, 0, 0) + b"\x01a\xc0\x00" + tail

    names = []
    for msg_id in (0x0162, 0x0163):  # labels "b" and "c" (then the rest of the header)
        rec: dict = {}
        parse(pointing_at_the_header(msg_id), rec)
        names.append(rec.get("qname"))
    assert names[0] != names[1], names
    assert len(dnswire._QNAMES) == 1


@pytest.mark.parametrize("label_type", [0x40, 0x41, 0x80, 0xBF])
def test_reserved_label_types_are_malformed(label_type):
    assert parse(_header() + bytes([label_type, 1]) + b"\x00\x01\x00\x01", {}) is False


def test_label_running_past_the_end():
    assert parse(_header() + b"\x05ab", {}) is False


def test_question_without_type_and_class():
    rec: dict = {}
    assert parse(_header() + b"\x00\x00\x01", rec) is False


def _long_name_wire(sizes: list[int]) -> bytes:
    return b"".join(bytes([n]) + b"x" * n for n in sizes) + b"\x00"


@pytest.mark.parametrize(
    "sizes, valid",
    [([63, 63, 63, 61], True), ([63, 63, 63, 62], False), ([63, 63, 63, 63], False)],
)
def test_name_length_limit_matches_dnspython(sizes, valid):
    name = _long_name_wire(sizes)
    assert (len(name) <= 255) is valid
    wire = _header() + name + b"\x00\x01\x00\x01"
    rec: dict = {}
    assert parse(wire, rec) is valid
    try:
        dns.message.from_wire(wire)
        dnspython_valid = True
    except dns.exception.DNSException:
        dnspython_valid = False
    assert dnspython_valid is valid
    if valid:
        assert rec["qname"] == dns.message.from_wire(wire).question[0].name.to_text()


def _opt(options: bytes, rdlen: int | None = None, ttl: int = 0, payload: int = 1232) -> bytes:
    rdlen = len(options) if rdlen is None else rdlen
    return b"\x00" + struct.pack("!HHIH", 41, payload, ttl, rdlen) + options


QUESTION = b"\x03www\x07example\x00\x00\x01\x00\x01"


def test_opt_rdata_overrunning_the_message():
    wire = _header(ar=1) + QUESTION + _opt(b"", rdlen=10)
    rec: dict = {}
    assert parse(wire, rec) is False
    assert rec["edns-udp-size"] == 1232  # read before the overrun was found


def test_edns_option_overrunning_the_opt_record():
    # The ECS option claims 20 bytes; the OPT rdata holds only 8 of them.
    ecs = struct.pack("!HHHBB", 8, 20, 1, 24, 0) + b"\x0a\x00\x00"
    wire = _header(ar=1) + QUESTION + _opt(ecs[:8] + b"\x00", rdlen=9) + ecs[8:] * 5
    assert parse(wire, {}) is False
    with pytest.raises(dns.exception.DNSException):
        dns.message.from_wire(wire)


def test_edns_found_after_other_additional_records():
    extra = b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04\x01\x02\x03\x04"
    ttl = (0x01 << 24) | (0 << 16) | 0x8000  # extended rcode 1 -> 16 with header 0
    wire = _header(ar=2) + QUESTION + extra + _opt(b"", ttl=ttl, payload=4096)
    rec: dict = {}
    assert parse(wire, rec) is True
    assert rec["rcode"] == "BADVERS"
    assert rec["edns-udp-size"] == 4096 and rec["edns-do"] is True and rec["edns-version"] == 0


def test_edns_is_read_when_there_is_no_question():
    """BADVERS/FORMERR answers often carry no question but an OPT record."""
    ttl = 1 << 24  # extended rcode 16 (BADVERS)
    wire = _header(qd=0, ar=1, word=0x8000) + _opt(b"", ttl=ttl, payload=1400)
    rec: dict = {}
    assert parse(wire, rec) is True
    assert rec["rcode"] == "BADVERS" == dns.rcode.to_text(dns.message.from_wire(wire).rcode())
    assert rec["edns-udp-size"] == 1400 and rec["edns-version"] == 0
    assert "qname" not in rec


@pytest.mark.parametrize(
    "option, expected",
    [
        (struct.pack("!HBB", 1, 24, 0) + b"\xc0\x00\x02", "192.0.2.0/24"),
        (struct.pack("!HBB", 1, 0, 0), "0.0.0.0/0"),
        (struct.pack("!HBB", 1, 32, 0) + b"\x0a\x01\x02\x03", "10.1.2.3/32"),
        (struct.pack("!HBB", 2, 56, 0) + bytes.fromhex("20010db8000001"), "2001:db8:0:100::/56"),
        (struct.pack("!HBB", 2, 128, 0) + bytes.fromhex("20010db8" + "00" * 11 + "01"), "2001:db8::1/128"),
        (struct.pack("!HBB", 1, 33, 0) + b"\x01\x02\x03\x04", None),  # prefix too long
        (struct.pack("!HBB", 1, 8, 0) + b"\x01\x02\x03\x04\x05", None),  # address too long
        (struct.pack("!HBB", 3, 8, 0) + b"\x01", None),  # unknown family
        (b"\x00\x01", None),  # too short
    ],
)
def test_ecs_formats(option, expected):
    opts = struct.pack("!HH", 8, len(option)) + option
    wire = _header(ar=1) + QUESTION + _opt(opts)
    rec: dict = {}
    assert parse(wire, rec) is True
    assert rec["edns-client-subnet"] == expected


# --------------------------------------------------------------------------
# Text helpers
# --------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(name=name_st)
def test_name_to_text_matches_dnspython(name):
    assert name_to_text(list(name.labels[:-1])) == name.to_text()


def test_name_to_text_examples():
    assert name_to_text([]) == "."
    assert name_to_text([b"www", b"example", b"com"]) == "www.example.com."
    assert name_to_text([b"a.b", b"c"]) == "a\\.b.c."
    assert name_to_text([b'q"\\ ', b"\x00\xff"]) == 'q\\"\\\\\\032.\\000\\255.'
    assert name_to_text([b"@$();"]) == "\\@\\$\\(\\)\\;."


@pytest.mark.parametrize("code", [0, 1, 2, 3, 4, 5, 6, 16, 23, 255, 254, 65535, 12345])
def test_class_and_type_text_match_dnspython(code):
    assert qclass_text(code) == dns.rdataclass.to_text(code)
    assert rrtype_text(code) == dns.rdatatype.to_text(code)


@given(code=st.integers(0, 4095))
def test_rcode_text_matches_dnspython(code):
    assert rcode_text(code) == dns.rcode.to_text(code)


def test_rcode_text_beyond_twelve_bits():
    assert rcode_text(5000) == "5000"


@given(word=st.integers(0, 65535))
def test_flags_text_matches_dnspython(word):
    assert flags_text(word) == dns.flags.to_text(word)


def test_flags_text_examples():
    assert flags_text(0x8180) == "QR RD RA"
    assert flags_text(0x0100 | 0x7800 | 0x000F) == "RD"  # opcode and rcode bits are not flags
    assert flags_text(0) == ""
    assert flags_text(0x0040) == "FLAG6"  # the reserved Z bit, as dnspython writes it
