"""core/fragments.py and its use by the packet decoder: IP fragments put back
together, so large DNS responses (DNSSEC, big TXT sets) over UDP are not lost
by the sniffer and by pcap replay.

The kernel's own fragmentation is checked live in tests/test_sniffer.py; here
fragments are built byte by byte, in every order, with duplicates, overlaps
and garbage, and read back through ``read_pcap`` as a replay sees them.
"""

from __future__ import annotations

import struct

import dns.message
import dns.rdatatype
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_pcap import CLIENT4, CLIENT6, SERVER4, SERVER6, ipv4, ipv6, pcap, query, read_all, records, taps, tcp, udp

from core.message import decode
from core.fragments import MAX_FRAGMENTS, Reassembler
from core.packets import LINK_RAW, PacketDecoder, PacketStats


def big_response(name: str = "big.example.test.", size: int = 4000) -> bytes:
    """A DNS response of about ``size`` bytes (TXT strings of 200 bytes)."""
    msg = dns.message.make_response(dns.message.make_query(name, "TXT", use_edns=0, payload=4096))
    strings = " ".join('"' + "x" * 200 + '"' for _ in range(max(1, size // 220)))
    msg.answer.append(dns.rrset.from_text(name, 300, "IN", "TXT", strings))
    return msg.to_wire(max_size=65535)


def split(body: bytes, chunk: int) -> list[tuple[int, bytes, bool]]:
    """(offset, payload, more) fragments of ``body``; ``chunk`` a multiple of 8."""
    out = [(off, body[off : off + chunk], off + chunk < len(body)) for off in range(0, len(body), chunk)]
    return out


def v4_fragments(src, dst, l4, chunk: int = 1480, ident: int = 7) -> list[bytes]:
    proto, body = l4
    return [ipv4(src, dst, (proto, part), frag=(0x2000 if more else 0) | off // 8, ident=ident)
            for off, part, more in split(body, chunk)]


def v6_fragments(src, dst, l4, chunk: int = 1232, ident: int = 7) -> list[bytes]:
    proto, body = l4
    return [ipv6(src, dst, (proto, part), ext=((44, b"\0" + struct.pack("!HI", off | bool(more), ident)),))
            for off, part, more in split(body, chunk)]


def responses(frames) -> list[bytes]:
    return [tap.message.response_message for tap in taps(frames) if tap.message.response_message]


def fresh() -> tuple[Reassembler, PacketStats]:
    stats = PacketStats()
    return Reassembler(stats), stats


# --------------------------------------------------------------------------- the reassembler alone


def test_in_order_and_reversed_give_the_datagram_once():
    payload = bytes(range(256)) * 20
    for order in (1, -1):
        r, stats = fresh()
        parts = split(payload, 1480)[::order]
        got = [r.add("k", off, more, part, 1.0) for off, part, more in parts]
        assert got[:-1] == [None] * (len(parts) - 1) and got[-1] == payload
        assert (stats.fragments, stats.fragments_reassembled, stats.fragments_dropped) == (len(parts), 1, 0)
        assert (r.datagrams, r.held_bytes) == (0, 0)


def test_exact_duplicate_is_ignored_an_overlap_kills_the_datagram():
    r, stats = fresh()
    assert r.add("k", 0, True, b"a" * 16, 1.0) is None
    assert r.add("k", 0, True, b"a" * 16, 1.0) is None  # a duplicate: ignored
    assert stats.fragments_dropped == 1
    assert r.add("k", 8, True, b"b" * 16, 1.0) is None  # overlaps the first: all goes
    assert stats.fragments_dropped == 3 and r.held_bytes == 0
    assert r.add("k", 16, False, b"c" * 4, 1.0) is None  # a later fragment of the dead datagram
    assert stats.fragments_dropped == 4 and stats.fragments_reassembled == 0


@pytest.mark.parametrize("fragments", [
    [(0, True, b"a" * 12), (12, False, b"b")],  # a middle fragment not a multiple of 8
    [(0, True, b""), (0, False, b"b")],  # an empty middle fragment
    [(65528, False, b"z" * 16)],  # past 65,535 bytes
    [(0, True, b"a" * 16), (8, False, b"b")],  # the last fragment ends inside one held
    [(16, False, b"a"), (24, True, b"b" * 8)],  # a fragment past the end
    [(16, False, b"a"), (0, False, b"b" * 8)],  # two different ends
])
def test_inconsistent_fragments_drop_the_datagram(fragments):
    r, stats = fresh()
    for off, more, part in fragments:
        assert r.add("k", off, more, part, 1.0) is None
    assert stats.fragments_dropped == len(fragments) and stats.fragments_reassembled == 0
    assert r.held_bytes == 0


def test_an_unfinished_datagram_times_out():
    stats = PacketStats()
    r = Reassembler(stats, timeout=30.0)
    r.add("k", 0, True, b"a" * 8, 100.0)
    r.add("k", 8, True, b"b" * 8, 120.0)
    assert r.add("other", 0, False, b"x", 129.0) == b"x"  # a sweep at 129: still young
    assert stats.fragments_dropped == 0
    r.add("k", 16, True, b"c" * 8, 131.0)  # 31 s after its first fragment: expired first
    assert stats.fragments_dropped == 2
    assert r.add("k", 24, False, b"d", 131.5) is None, "the timed out datagram does not come back"
    r.expire(200.0)
    assert (r.datagrams, r.held_bytes) == (0, 0)


def test_state_is_bounded():
    stats = PacketStats()
    r = Reassembler(stats, max_datagrams=10, max_bytes=1000)
    for i in range(100):
        r.add(("k", i), 0, True, b"a" * 80, 1.0)
        assert r.datagrams <= 10 and r.held_bytes <= 1000
    assert stats.fragments_dropped == 90
    r, stats = fresh()
    for i in range(MAX_FRAGMENTS):
        r.add("k", i * 8, True, b"a" * 8, 1.0)
    assert stats.fragments_dropped == 0
    r.add("k", MAX_FRAGMENTS * 8, True, b"a" * 8, 1.0)
    assert stats.fragments_dropped == MAX_FRAGMENTS + 1 and r.held_bytes == 0


def test_close_drops_what_is_held():
    r, stats = fresh()
    r.add("k", 0, True, b"a" * 8, 1.0)
    r.add("j", 8, False, b"a", 1.0)
    r.close()
    assert stats.fragments_dropped == 2 and (r.datagrams, r.held_bytes) == (0, 0)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), chunk=st.integers(18, 200).map(lambda n: n * 8))
def test_any_order_with_duplicates_and_another_datagram_between(data, chunk):
    """Two datagrams' fragments shuffled together, some sent twice: each comes
    out once, whole, when its last missing fragment arrives."""
    size = data.draw(st.integers(chunk, 9000))  # two fragments at least, MAX_FRAGMENTS at most
    payloads = {key: bytes([key]) + data.draw(st.binary(min_size=size, max_size=size)) for key in (1, 2)}
    fragments = [(key, *part) for key, body in payloads.items() for part in split(body, chunk)]
    # Duplicates of fragments that are not the last: one arriving after its
    # datagram was completed starts a new one that never completes.
    extra = data.draw(st.lists(st.sampled_from([f for f in fragments if f[3]]), max_size=5))
    order = data.draw(st.permutations(fragments + extra))
    r, stats = fresh()
    out = {}
    for key, off, part, more in order:
        whole = r.add(key, off, more, part, 1.0)
        if whole is not None:
            assert key not in out
            out[key] = whole
    assert out == payloads
    r.close()
    assert stats.fragments_reassembled == 2
    assert stats.fragments_dropped == len(extra)
    assert stats.fragments == len(order)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 70000), st.booleans(), st.binary(max_size=64),
                          st.floats(0, 100, allow_nan=False))))
def test_arbitrary_fragments_never_raise_and_stay_bounded(fragments):
    stats = PacketStats()
    r = Reassembler(stats, max_datagrams=3, max_bytes=100)
    for key, off, more, part, now in fragments:
        whole = r.add(key, off, more, part, now)
        assert whole is None or len(whole) <= 65535
        assert r.datagrams <= 3 and r.held_bytes <= 100
    r.close()
    assert stats.fragments == len(fragments)
    assert stats.fragments_dropped <= len(fragments)


# --------------------------------------------------------------------------- through the packet decoder


def test_fragmented_ipv4_response_is_one_message_at_the_time_of_its_last_fragment():
    wire = big_response()
    assert len(wire) > 3000
    packets = [(100, 0, ipv4(CLIENT4, SERVER4, udp(40000, 53, query("big.example.test.", "TXT"))))]
    for i, frag in enumerate(v4_fragments(SERVER4, CLIENT4, udp(53, 40000, wire))):
        packets.append((101, 1000 * (i + 1), frag))
    frames, reader = read_all(pcap(packets, LINK_RAW))
    recs = [decode(f) for f in frames]
    assert [r["message"] for r in recs] == ["CLIENT_QUERY", "CLIENT_RESPONSE"]
    assert responses(frames) == [wire]
    resp = recs[1]
    assert (resp["query-ip"], resp["response-ip"], resp["response-port"], resp["length"]) == (CLIENT4, SERVER4, 53, len(wire))
    assert resp["timestamp"] == pytest.approx(101.003)
    stats = reader.stats
    assert (stats.fragments, stats.fragments_reassembled, stats.fragments_dropped) == (3, 1, 0)


def test_fragmented_ipv6_response_in_reverse_order():
    wire = big_response(size=5000)
    frags = v6_fragments(SERVER6, CLIENT6, udp(53, 40000, wire))[::-1]
    frames, reader = read_all(pcap([(1, i, f) for i, f in enumerate(frags)], LINK_RAW))
    recs = [decode(f) for f in frames]
    assert len(recs) == 1 and responses(frames) == [wire]
    assert recs[0]["family"] == "INET6" and recs[0]["response-ip"] == SERVER6
    assert (reader.stats.fragments, reader.stats.fragments_reassembled) == (len(frags), 1)


def test_fragmented_tcp_segment_is_reassembled_then_split():
    msgs = [query(f"q{i}.example.test.") for i in range(40)]
    stream = b"".join(struct.pack("!H", len(m)) + m for m in msgs)
    frags = v4_fragments(CLIENT4, SERVER4, tcp(40000, 53, 1, stream), chunk=512)
    recs, reader = records(pcap([(1, i, f) for i, f in enumerate(frags)], LINK_RAW))
    assert [r["qname"] for r in recs] == [f"q{i}.example.test." for i in range(40)]


def test_fragments_of_other_traffic_are_not_held():
    """The sniffer's kernel filter passes every later fragment (they carry no
    ports): a datagram whose first fragment is not DNS is dropped at once."""
    body = b"v" * 4000
    frags = v4_fragments(CLIENT4, SERVER4, udp(40000, 4789, body))  # VXLAN, say
    decoder = PacketDecoder()
    for f in frags:
        decoder.packet(LINK_RAW, f, 1, 0)
        assert decoder._fragments.held_bytes == 0
    stats = decoder.stats
    assert (stats.non_dns, stats.fragments, stats.fragments_dropped, stats.dns_messages) == (1, 3, 2, 0)


def test_same_identification_from_other_hosts_are_other_datagrams():
    a, b = big_response("a.example.test."), big_response("b.example.test.")
    fa = v4_fragments(SERVER4, CLIENT4, udp(53, 40000, a), ident=9)
    fb = v4_fragments("198.51.100.54", CLIENT4, udp(53, 40000, b), ident=9)
    mixed = [f for pair in zip(fa, fb) for f in pair]
    frames, _ = read_all(pcap([(1, i, f) for i, f in enumerate(mixed)], LINK_RAW))
    assert sorted(responses(frames)) == sorted([a, b])
