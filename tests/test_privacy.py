"""core/privacy.py and transforms/privacy.py: anonymised or hashed addresses, minimised qnames."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import socket

import apache_beam as beam
import pytest
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.util import BeamAssertException, assert_that
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from core import counters
from core.message import FIELDS, DnstapRecord
from core.privacy import HASH_HEX_CHARS, Privacy
from pipeline.config import PrivacyOptions
from transforms.batches import RecordBatch
from transforms.privacy import ApplyPrivacy

SECRET = "s3cret"


def _record(query_ip: str = "-", response_ip: str = "-", qname: str = "-") -> DnstapRecord:
    rec = DnstapRecord(FIELDS)
    rec.update({"query-ip": query_ip, "response-ip": response_ip, "qname": qname})
    return rec


def _text(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """The address as the decoder writes it (inet_ntop)."""
    family = socket.AF_INET if addr.version == 4 else socket.AF_INET6
    return socket.inet_ntop(family, addr.packed)


def _hmac(secret: str, text: str) -> str:
    return hmac.new(secret.encode(), ipaddress.ip_address(text).packed, hashlib.sha256).hexdigest()[:32]


def test_default_options_change_nothing():
    privacy = Privacy.from_options(PrivacyOptions())
    assert not privacy.active
    records = [_record("192.0.2.77", "2001:db8::1", "www.example.com.")]
    assert privacy.apply(records) == 0
    assert records == [_record("192.0.2.77", "2001:db8::1", "www.example.com.")]


@pytest.mark.parametrize(
    ("v4", "v6", "address", "expected"),
    [
        (24, 56, "192.0.2.77", "192.0.2.0"),
        (24, 56, "2001:db8:0:1ab::1", "2001:db8:0:100::"),
        (24, 56, "2001:db8:0:100::", "2001:db8:0:100::"),
        (16, 48, "198.51.100.7", "198.51.0.0"),
        (16, 48, "2001:db8:aa:bb:cc::1", "2001:db8:aa::"),
        (0, 0, "203.0.113.9", "0.0.0.0"),
        (0, 0, "2001:db8::1", "::"),
        (32, 128, "203.0.113.9", "203.0.113.9"),
        (32, 128, "2001:db8::1", "2001:db8::1"),
        (24, 56, "::ffff:192.0.2.77", "::ffff:192.0.2.0"),  # an IPv4 client on a dual-stack socket
        (8, 128, "::ffff:192.0.2.77", "::ffff:192.0.0.0"),
        (24, 56, "::ffff:0:c000:24d", "::"),  # ::ffff:0:0:0/96 (SIIT) is not a mapped address
        (24, 56, "-", "-"),
    ],
)
def test_anonymize(v4, v6, address, expected):
    privacy = Privacy(anonymize_ip=True, ipv4_prefix=v4, ipv6_prefix=v6)
    rec = _record(address, address)
    assert privacy.apply([rec]) == 0
    assert rec["query-ip"] == rec["response-ip"] == expected


def test_hash():
    privacy = Privacy.from_options(PrivacyOptions(hash_ip=True, hash_secret=SECRET))
    rec = _record("192.0.2.77", "2001:db8::1")
    privacy.apply([rec])
    assert rec["query-ip"] == _hmac(SECRET, "192.0.2.77")
    assert rec["response-ip"] == _hmac(SECRET, "2001:db8::1")
    assert len(rec["query-ip"]) == HASH_HEX_CHARS and int(rec["query-ip"], 16) >= 0
    # Same client, other spellings: one hash (a mapped address is its IPv4 client).
    assert privacy.address("2001:DB8:0::1") == rec["response-ip"]
    assert privacy.address("::ffff:192.0.2.77") == privacy.address("::FFFF:c000:24d") == rec["query-ip"]
    assert privacy.address("::192.0.2.77") != rec["query-ip"]
    none = _record()
    privacy.apply([none])
    assert none["query-ip"] == none["response-ip"] == "-"


def test_client_subnet_is_anonymised_or_hashed_too():
    rec = _record("192.0.2.77")
    rec["edns-client-subnet"] = "198.51.100.0/24"
    Privacy(anonymize_ip=True, ipv4_prefix=16).apply([rec])
    assert rec["edns-client-subnet"] == "198.51.0.0/24"
    rec["edns-client-subnet"] = "2001:db8:1234::/48"
    Privacy(hash_ip=True, hash_secret=SECRET).apply([rec])
    assert rec["edns-client-subnet"] == _hmac(SECRET, "2001:db8:1234::") + "/48"
    rec["edns-client-subnet"] = None  # no ECS option: nothing to do
    Privacy(anonymize_ip=True).apply([rec])
    assert rec["edns-client-subnet"] is None


@pytest.mark.parametrize("bad", ["not-an-ip", "192.0.2.300", "2001:db8::1::2", "192.0.2.1/24", "", "1.2.3.4\0"])
@pytest.mark.parametrize("options", [{"anonymize_ip": True}, {"hash_ip": True, "hash_secret": SECRET}])
def test_non_addresses_become_unknown_and_are_counted(bad, options):
    privacy = Privacy(**options)
    records = [_record(bad, "192.0.2.1"), _record(bad, bad)]
    assert privacy.apply(records) == 3
    assert records[0]["query-ip"] == records[1]["query-ip"] == records[1]["response-ip"] == "-"
    assert records[0]["response-ip"] not in ("-", "192.0.2.1")


def test_bad_combinations():
    with pytest.raises(ValueError):
        Privacy(anonymize_ip=True, hash_ip=True, hash_secret=SECRET)
    with pytest.raises(ValueError):
        Privacy(hash_ip=True)
    with pytest.raises(ValueError):
        Privacy(anonymize_ip=True, ipv4_prefix=33)
    with pytest.raises(ValueError):
        ApplyPrivacy(PrivacyOptions(hash_ip=True))


@pytest.mark.parametrize(
    ("qname", "expected"),
    [
        ("www.example.co.uk.", "example.co.uk."),
        ("www.example.co.uk", "example.co.uk"),
        ("a.b.WWW.Example.COM.", "Example.COM."),  # the case is kept (normalize lowercases)
        ("x\\.y.example.com.", "example.com."),
        ("example.com.", "example.com."),
        ("com.", "com."),  # a TLD has no registrable domain: unchanged
        ("co.uk", "co.uk"),
        (".", "."),
        ("-", "-"),
    ],
)
def test_minimize_qname(qname, expected):
    rec = _record("192.0.2.1", qname=qname)
    Privacy.from_options(PrivacyOptions(minimize_qname=True)).apply([rec])
    assert rec["qname"] == expected
    assert rec["query-ip"] == "192.0.2.1"  # addresses untouched without anonymize/hash


def test_address_cache_is_bounded(monkeypatch):
    from core import privacy as module

    monkeypatch.setattr(module, "_CACHE_SIZE", 50)
    privacy = Privacy(anonymize_ip=True)
    records = [_record(f"10.0.{i // 256}.{i % 256}") for i in range(1000)]
    privacy.apply(records)
    assert len(privacy._cache) <= 50
    assert records[999]["query-ip"] == "10.0.3.0"


_PREFIX4 = st.integers(0, 32)
_PREFIX6 = st.integers(0, 128)


def _client(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    """What identifies a client: a mapped IPv6 address is its IPv4 address."""
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).packed


# Mapped addresses are rare in ip_addresses(): mix some in.
_ADDRESSES = st.one_of(
    st.ip_addresses(),
    st.ip_addresses(v=4).map(lambda a: ipaddress.IPv6Address(f"::ffff:{a}")),
)


@settings(max_examples=300, deadline=None)
@given(_ADDRESSES, _PREFIX4, _PREFIX6)
def test_anonymised_address_is_the_network_of_the_original(addr, v4, v6):
    prefix = v4 if addr.version == 4 else 96 + v4 if addr.ipv4_mapped else v6
    text = _text(addr)
    out = Privacy(anonymize_ip=True, ipv4_prefix=v4, ipv6_prefix=v6).address(text)
    anon = ipaddress.ip_address(out)
    assert anon.version == addr.version
    network = ipaddress.ip_network(f"{addr}/{prefix}", strict=False)
    assert anon == network.network_address and addr in ipaddress.ip_network(f"{anon}/{prefix}")
    host_bits = int(addr) & int(network.hostmask)
    assert (out == text) == (host_bits == 0)
    assert "/" not in out


@settings(max_examples=200, deadline=None)
@given(_ADDRESSES, _ADDRESSES, st.text(min_size=1), st.text(min_size=1))
def test_hash_stable_and_distinct(a, b, secret, other_secret):
    one = Privacy(hash_ip=True, hash_secret=secret)
    two = Privacy(hash_ip=True, hash_secret=secret)
    ha = one.address(_text(a))
    assert ha == one.address(_text(a)) == two.address(_text(a))  # cached, and across instances
    assert len(ha) == HASH_HEX_CHARS
    if _client(a) != _client(b):
        assert one.address(_text(b)) != ha
    else:
        assert one.address(_text(b)) == ha
    assume(secret.encode() != other_secret.encode())
    assert Privacy(hash_ip=True, hash_secret=other_secret).address(_text(a)) != ha


def test_beam_transform():
    batch = RecordBatch(
        [
            _record("192.0.2.77", "2001:db8:0:1ab::53", "www.example.co.uk."),
            _record("-", "bogus", "-"),
        ]
    )
    expected = [("192.0.2.0", "2001:db8:0:100::", "example.co.uk."), ("-", "-", "-")]

    def check(batches):
        if len(batches) != 1 or type(batches[0]) is not RecordBatch:
            raise BeamAssertException(f"expected one RecordBatch, got {batches!r}")
        got = [(r["query-ip"], r["response-ip"], r["qname"]) for r in batches[0]]
        if got != expected:
            raise BeamAssertException(f"{got} != {expected}")

    stats = counters.counter_group("privacy")
    before = dict(stats)
    opts = PrivacyOptions(anonymize_ip=True, minimize_qname=True)
    with beam.Pipeline(runner=FnApiRunner()) as p:
        out = p | beam.Create([batch]) | ApplyPrivacy(opts)
        assert out.element_type is RecordBatch
        assert_that(out, check)
    assert stats["records"] == before.get("records", 0) + 2
    assert stats["invalid-address"] == before.get("invalid-address", 0) + 1
