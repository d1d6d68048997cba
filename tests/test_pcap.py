"""core/pcap.py: pcap/pcapng files of DNS traffic read into dnstap frames.

Packets are built here byte by byte (a tiny pcap/pcapng writer around real DNS
messages from dnspython), then read back through ``read_pcap`` and checked with
``core.message.decode``, as the replay pipeline will see them. One real capture
(tcpdump on loopback while dig asks a real unbound over UDP and TCP) is stored
under tests/data/pcap/; the integration test makes a fresh one.
"""

from __future__ import annotations

import gzip
import socket
import struct
import subprocess
import time
from pathlib import Path

import dns.message
import peers
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core import dnstap_pb2
from core.capture import open_capture
from core.message import decode
from core.packets import LINK_RAW, MAX_HELD_SEGMENTS, PacketDecoder
from core.pcap import PcapStats, is_pcap, read_pcap

DATA = Path(__file__).resolve().parent / "data" / "pcap"
CLIENT4, SERVER4 = "192.0.2.1", "198.51.100.53"
CLIENT6, SERVER6 = "2001:db8::1", "2001:db8::53"


# --------------------------------------------------------------------------- packet builders


def query(name="www.example.test.", rdtype="A", qid=1234) -> bytes:
    msg = dns.message.make_query(name, rdtype)
    msg.id = qid
    return msg.to_wire()


def response(name="www.example.test.", rdtype="A", qid=1234) -> bytes:
    msg = dns.message.make_response(dns.message.make_query(name, rdtype))
    msg.id = qid
    return msg.to_wire()


def _sum16(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def udp(sport: int, dport: int, payload: bytes) -> tuple[int, bytes]:
    return 17, struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def tcp(sport: int, dport: int, seq: int, payload: bytes = b"", flags: int = 0x18, ack: int = 0) -> tuple[int, bytes]:
    return 6, struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack, 5 << 4, flags, 65535, 0, 0) + payload


def ipv4(src: str, dst: str, l4: tuple[int, bytes], *, frag: int = 0, ident: int = 1) -> bytes:
    proto, body = l4
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(body), ident, frag, 64, proto, 0,
                         socket.inet_aton(src), socket.inet_aton(dst))
    header = header[:10] + struct.pack("!H", _sum16(header)) + header[12:]
    return header + body


def ipv6(src: str, dst: str, l4: tuple[int, bytes], *, ext: tuple[tuple[int, bytes], ...] = ()) -> bytes:
    """``ext``: (header number, header bytes after its next-header byte) in order."""
    proto, body = l4
    chain = b""
    numbers = [number for number, _ in ext] + [proto]
    for i, (_, rest) in enumerate(ext):
        chain += bytes((numbers[i + 1],)) + rest
    payload = chain + body
    first = numbers[0]
    return struct.pack("!IHBB16s16s", 6 << 28, len(payload), first, 64,
                       socket.inet_pton(socket.AF_INET6, src), socket.inet_pton(socket.AF_INET6, dst)) + payload


def ip_packet(family: int, client_to_server: bool, l4) -> bytes:
    if family == 4:
        src, dst = (CLIENT4, SERVER4) if client_to_server else (SERVER4, CLIENT4)
        return ipv4(src, dst, l4)
    src, dst = (CLIENT6, SERVER6) if client_to_server else (SERVER6, CLIENT6)
    return ipv6(src, dst, l4)


def ethernet(ip: bytes, vlans: tuple[int, ...] = (), *, etype: int | None = None, pad_to: int = 0) -> bytes:
    if etype is None:
        etype = 0x0800 if ip[0] >> 4 == 4 else 0x86DD
    frame = b"\x02\0\0\0\0\x02" + b"\x02\0\0\0\0\x01"
    for tpid in vlans:
        frame += struct.pack("!HH", tpid, 100)
    frame += struct.pack("!H", etype) + ip
    return frame.ljust(pad_to, b"\0")


def link_frame(link: int, ip: bytes) -> bytes:
    """``ip`` framed for ``link`` (the link types read_pcap knows)."""
    v6 = ip[0] >> 4 == 6
    etype = 0x86DD if v6 else 0x0800
    if link == 0:  # null: the capturing host's AF_ value, in its byte order (macOS: 30 for IPv6)
        return struct.pack("<I", 30 if v6 else 2) + ip
    if link == 108:  # OpenBSD loop: network byte order
        return struct.pack("!I", 24 if v6 else 2) + ip
    if link == 1:
        return ethernet(ip)
    if link in (101, 228, 229):
        return ip
    if link == 113:  # packet type, ARPHRD, address length, address (8), protocol
        return struct.pack("!HHH8sH", 0, 1, 6, b"\x02\0\0\0\0\x01", etype) + ip
    if link == 276:  # protocol, reserved, ifindex, ARPHRD, packet type, address length, address
        return struct.pack("!HHIHBB8s", etype, 0, 1, 1, 0, 6, b"\x02\0\0\0\0\x01") + ip
    raise ValueError(link)


def pcap(packets, link: int = 1, *, order: str = "<", nano: bool = False, snaplen: int = 262144) -> bytes:
    """A classic pcap file; ``packets``: (sec, usec or nsec, frame bytes)."""
    magic = 0xA1B23C4D if nano else 0xA1B2C3D4
    out = struct.pack(order + "IHHiIII", magic, 2, 4, 0, 0, snaplen, link)
    for sec, frac, data in packets:
        out += struct.pack(order + "IIII", sec, frac, len(data), len(data)) + data
    return out


def _block(order: str, btype: int, body: bytes) -> bytes:
    body = body.ljust((len(body) + 3) & ~3, b"\0")
    length = 12 + len(body)
    return struct.pack(order + "II", btype, length) + body + struct.pack(order + "I", length)


def _option(order: str, code: int, value: bytes) -> bytes:
    return struct.pack(order + "HH", code, len(value)) + value.ljust((len(value) + 3) & ~3, b"\0")


def shb(order: str = "<") -> bytes:
    return _block(order, 0x0A0D0D0A, struct.pack(order + "IHHq", 0x1A2B3C4D, 1, 0, -1))


def idb(order: str, link: int, tsresol: int | None = None, tsoffset: int | None = None, snaplen: int = 0) -> bytes:
    options = b""
    if tsresol is not None:
        options += _option(order, 9, bytes((tsresol,)))
    if tsoffset is not None:
        options += _option(order, 14, struct.pack(order + "q", tsoffset))
    if options:
        options += _option(order, 0, b"")
    return _block(order, 1, struct.pack(order + "HHI", link, 0, snaplen) + options)


def epb(order: str, iface: int, ts: int, data: bytes) -> bytes:
    return _block(order, 6, struct.pack(order + "IIIII", iface, ts >> 32, ts & 0xFFFFFFFF, len(data), len(data)) + data)


def spb(order: str, data: bytes) -> bytes:
    return _block(order, 3, struct.pack(order + "I", len(data)) + data)


# --------------------------------------------------------------------------- helpers


def read_all(data: bytes, **kwargs):
    reader = read_pcap(data, "test.pcap", **kwargs)
    frames = [frame for batch in reader for frame in batch]
    return frames, reader


def records(data: bytes, **kwargs) -> tuple[list[dict], object]:
    frames, reader = read_all(data, **kwargs)
    return [decode(frame) for frame in frames], reader


def taps(frames: list[bytes]) -> list:
    out = []
    for frame in frames:
        tap = dnstap_pb2.Dnstap()
        tap.ParseFromString(frame)
        out.append(tap)
    return out


def udp_exchange(family: int = 4, sport: int = 40000, name: str = "www.example.test.") -> tuple[bytes, bytes]:
    return (ip_packet(family, True, udp(sport, 53, query(name))),
            ip_packet(family, False, udp(53, sport, response(name))))


# --------------------------------------------------------------------------- UDP and the dnstap fields


def test_udp_exchange_decodes_as_client_query_and_response():
    q, r = udp_exchange(4)
    data = pcap([(1_700_000_000, 123456, ethernet(q)), (1_700_000_000, 223456, ethernet(r, pad_to=0))])
    (rq, rr), reader = records(data, identity="pcap-test")
    assert reader.damage is None and reader.format == "pcap"
    assert rq["message"] == "CLIENT_QUERY" and rq["type"] == "query"
    assert rr["message"] == "CLIENT_RESPONSE" and rr["type"] == "response"
    for rec in (rq, rr):
        assert rec["identity"] == "pcap-test"
        assert rec["family"] == "INET" and rec["protocol"] == "UDP"
        assert rec["query-ip"] == CLIENT4 and rec["query-port"] == 40000
        assert rec["response-ip"] == SERVER4 and rec["response-port"] == 53
        assert rec["qname"] == "www.example.test." and rec["rrtype"] == "A" and rec["id"] == 1234
        assert not rec["malformed"]
    assert rq["timestamp"] == pytest.approx(1_700_000_000.123456, abs=1e-7)
    assert rr["timestamp"] == pytest.approx(1_700_000_000.223456, abs=1e-7)
    assert rq["query-time"] is not None and rq["response-time"] is None
    assert rr["response-time"] is not None and rr["query-time"] is None
    assert reader.stats.packets == 2 and reader.stats.dns_messages == 2
    assert (reader.stats.queries, reader.stats.responses) == (1, 1)


def test_frames_are_what_dnstap_pb2_writes():
    """The hand-written protobuf equals dnstap_pb2's serialisation, field for field and byte for byte."""
    q, r = udp_exchange(6, sport=54321)
    frames, _ = read_all(pcap([(1_700_000_001, 5, ethernet(q)), (1_700_000_002, 999_999, ethernet(r))]))
    expected = []
    for mtype, sec, nsec, wire in ((5, 1_700_000_001, 5000, query()), (6, 1_700_000_002, 999_999_000, response())):
        msg = dnstap_pb2.Message(
            type=mtype, socket_family=dnstap_pb2.INET6, socket_protocol=dnstap_pb2.UDP,
            query_address=socket.inet_pton(socket.AF_INET6, CLIENT6),
            response_address=socket.inet_pton(socket.AF_INET6, SERVER6),
            query_port=54321, response_port=53,
        )
        if mtype == 5:
            msg.query_time_sec, msg.query_time_nsec, msg.query_message = sec, nsec, wire
        else:
            msg.response_time_sec, msg.response_time_nsec, msg.response_message = sec, nsec, wire
        expected.append(dnstap_pb2.Dnstap(type=dnstap_pb2.Dnstap.MESSAGE, identity=b"pcap", message=msg))
    assert taps(frames) == expected
    assert frames == [tap.SerializeToString() for tap in expected]


def test_identity_can_be_left_out():
    q, _ = udp_exchange()
    frames, _ = read_all(pcap([(1, 0, ethernet(q))]), identity=None)
    (tap,) = taps(frames)
    assert not tap.HasField("identity") and tap.message.query_port == 40000


# 228 is raw IPv4 only, 229 raw IPv6 only.
LINKS = [(link, family) for link in (0, 1, 101, 108, 113, 276) for family in (4, 6)] + [(228, 4), (229, 6)]


@pytest.mark.parametrize("link,family", LINKS)
def test_link_types(link, family):
    q, r = udp_exchange(family)
    recs, reader = records(pcap([(10, 0, link_frame(link, q)), (11, 0, link_frame(link, r))], link))
    assert [rec["message"] for rec in recs] == ["CLIENT_QUERY", "CLIENT_RESPONSE"]
    client = CLIENT4 if family == 4 else CLIENT6
    assert {rec["query-ip"] for rec in recs} == {client}
    assert {rec["family"] for rec in recs} == {"INET" if family == 4 else "INET6"}
    assert reader.stats.unsupported_link == 0 and reader.damage is None


@pytest.mark.parametrize("vlans", [(0x8100,), (0x88A8, 0x8100), (0x9100, 0x8100)])
def test_vlan_tags(vlans):
    q, r = udp_exchange(6)
    recs, _ = records(pcap([(1, 0, ethernet(q, vlans)), (2, 0, ethernet(r, vlans))]))
    assert [rec["qname"] for rec in recs] == ["www.example.test."] * 2


def test_ethernet_padding_is_not_part_of_the_message():
    q = ipv4(CLIENT4, SERVER4, udp(40000, 53, b"\x00\x01\x01\x00" + b"\0" * 8))  # a 12-byte DNS header
    frames, _ = read_all(pcap([(1, 0, ethernet(q, pad_to=60))]))
    (tap,) = taps(frames)
    assert len(tap.message.query_message) == 12


@pytest.mark.parametrize("order", ["<", ">"])
@pytest.mark.parametrize("nano", [False, True])
def test_pcap_byte_orders_and_resolutions(order, nano):
    q, r = udp_exchange()
    frac = 123_456_789 if nano else 123_456
    frames, reader = read_all(pcap([(1_700_000_000, frac, ethernet(q)), (1_700_000_001, 0, ethernet(r))],
                                   order=order, nano=nano))
    tq, tr = taps(frames)
    assert (tq.message.query_time_sec, tq.message.query_time_nsec) == (1_700_000_000, 123_456_789 if nano else 123_456_000)
    assert (tr.message.response_time_sec, tr.message.response_time_nsec) == (1_700_000_001, 0)
    assert reader.damage is None


def test_pcapng_interfaces_resolutions_and_byte_orders():
    """Two sections (little then big endian), interfaces with different if_tsresol
    (default µs, ns, 2^-20 s) and an if_tsoffset, EPB and SPB, unknown blocks skipped."""
    q4, r4 = udp_exchange(4)
    q6, r6 = udp_exchange(6, name="mail.example.test.")
    le, be = "<", ">"
    data = (
        shb(le)
        + idb(le, 1)  # microseconds
        + idb(le, 101, tsresol=9)  # nanoseconds, raw IP
        + _block(le, 5, b"statistics block, skipped")
        + epb(le, 0, 1_700_000_000_123_456, ethernet(q4))
        + epb(le, 1, 1_700_000_000_987_654_321, r4)
        + shb(be)
        + idb(be, 113, tsresol=0x80 | 20, tsoffset=1_000)  # 2^-20 s, plus 1000 s
        + epb(be, 0, (1_700_000_000 << 20) | (1 << 19), link_frame(113, q6))  # .5 s
        + spb(be, link_frame(113, r6))  # no time: the previous packet's
    )
    frames, reader = read_all(data)
    assert reader.damage is None and reader.format == "pcapng"
    t = taps(frames)
    times = [(m.query_time_sec, m.query_time_nsec) if m.type == 5 else (m.response_time_sec, m.response_time_nsec)
             for m in (tap.message for tap in t)]
    assert times == [(1_700_000_000, 123_456_000), (1_700_000_000, 987_654_321),
                     (1_700_001_000, 500_000_000), (1_700_001_000, 500_000_000)]
    recs = [decode(f) for f in frames]
    assert [r["qname"] for r in recs] == ["www.example.test."] * 2 + ["mail.example.test."] * 2
    assert [r["family"] for r in recs] == ["INET", "INET", "INET6", "INET6"]
    assert reader.stats.skipped_blocks == 1 and reader.stats.packets == 4


def test_pcapng_packet_of_undeclared_interface_is_counted():
    q, _ = udp_exchange()
    frames, reader = read_all(shb() + idb("<", 1) + epb("<", 3, 0, ethernet(q)) + epb("<", 0, 5, ethernet(q)))
    assert len(frames) == 1 and reader.stats.unsupported_link == 1 and reader.damage is None


# --------------------------------------------------------------------------- IP layer


def test_ipv6_extension_headers_are_walked():
    hop = (0, b"\0" + b"\x01\x04\0\0\0\0")  # hop-by-hop: PadN
    dest = (60, b"\0" + b"\x01\x04\0\0\0\0")
    routing = (43, b"\x02" + b"\0\0\0\0\0\0" + b"\0" * 16)  # type 0, 1 address: 24 bytes
    atomic = (44, b"\0\0\0\0\0\0\x2a")  # offset 0, M=0: the whole packet
    auth = (51, b"\x04\0\0" + b"\0" * 20)  # AH: (4 + 2) * 4 = 24 bytes
    l4 = udp(40000, 53, query())
    packets = [ipv6(CLIENT6, SERVER6, l4, ext=(hop, dest, routing, atomic, auth))]
    packets.append(ipv6(CLIENT6, SERVER6, l4, ext=((44, b"\0\0\x01\0\0\0\x2a"),)))  # first fragment (M=1)
    packets.append(ipv6(CLIENT6, SERVER6, l4, ext=((44, b"\0\x05\x00\0\0\0\x2a"),)))  # a later fragment
    recs, reader = records(pcap([(1, 0, p) for p in packets], 229))
    assert [r["qname"] for r in recs] == ["www.example.test."]
    # A first fragment of a length no fragment can have (not a multiple of 8): no datagram.
    assert (reader.stats.fragments, reader.stats.fragments_dropped) == (2, 2)


def test_fragments_that_make_no_datagram_are_counted_and_dropped():
    l4 = udp(40000, 53, query())
    packets = [
        ipv4(CLIENT4, SERVER4, l4, frag=0x2000),  # more fragments
        ipv4(CLIENT4, SERVER4, l4, frag=0x0010),  # offset 128
        ipv4(CLIENT4, SERVER4, l4, frag=0x4000),  # don't fragment: a whole packet
    ]
    recs, reader = records(pcap([(1, 0, p) for p in packets], 101))
    assert len(recs) == 1
    assert (reader.stats.fragments, reader.stats.fragments_dropped, reader.stats.fragments_reassembled) == (2, 2, 0)


def test_other_traffic_is_counted_not_emitted():
    arp = ethernet(b"\0" * 28, etype=0x0806)
    web = ethernet(ipv4(CLIENT4, SERVER4, udp(40000, 80, query())))
    icmp = ethernet(ipv4(CLIENT4, SERVER4, (1, b"\x08\0\0\0\0\0\0\0")))
    short = ethernet(ipv4(CLIENT4, SERVER4, udp(40000, 53, b"\0\1\2")))  # not a DNS header
    snapped = ethernet(ipv4(CLIENT4, SERVER4, udp(40000, 53, query())))[:40]
    bad_udp = ethernet(ipv4(CLIENT4, SERVER4, (17, struct.pack("!HHHH", 40000, 53, 400, 0) + query())))
    frames, reader = read_all(pcap([(1, 0, p) for p in (arp, web, icmp, short, snapped, bad_udp, b"\0\1")]))
    s = reader.stats
    assert frames == []
    assert (s.packets, s.non_ip, s.non_dns, s.malformed, s.snapped) == (7, 1, 2, 3, 1)
    assert reader.damage is None


def test_unknown_link_type_is_counted():
    q, _ = udp_exchange()
    frames, reader = read_all(pcap([(1, 0, q)], link=127))
    assert frames == [] and reader.stats.unsupported_link == 1


def test_dns_ports_are_configurable():
    q = ipv4(CLIENT4, SERVER4, udp(40000, 5353, query()))
    r = ipv4(SERVER4, CLIENT4, udp(5353, 40000, response()))
    data = pcap([(1, 0, q), (2, 0, r)], 101)
    assert read_all(data)[0] == []
    recs, _ = records(data, dns_ports={53, 5353})
    assert [(r["message"], r["response-port"]) for r in recs] == [("CLIENT_QUERY", 5353), ("CLIENT_RESPONSE", 5353)]


# --------------------------------------------------------------------------- TCP


def framed(*wires: bytes) -> bytes:
    return b"".join(struct.pack("!H", len(w)) + w for w in wires)


def tcp_packets(segments, *, isn=1000, family=4, syn=True, fin=True, client=True):
    """IP packets of one TCP direction (client -> server when ``client``);
    ``segments``: (offset in the stream, bytes) in the order sent."""
    sport, dport = (40001, 53) if client else (53, 40001)
    out = []
    if syn:
        out.append(ip_packet(family, client, tcp(sport, dport, isn, flags=0x02 if client else 0x12)))
    end = 0
    for off, data in segments:
        out.append(ip_packet(family, client, tcp(sport, dport, isn + 1 + off, data)))
        end = max(end, off + len(data))
    if fin:
        out.append(ip_packet(family, client, tcp(sport, dport, isn + 1 + end, flags=0x11)))
    return out


def tcp_read(packets, **kwargs):
    return records(pcap([(100 + i, 0, p) for i, p in enumerate(packets)], 101), **kwargs)


def names(recs):
    return [r["qname"] for r in recs]


def test_tcp_three_messages_in_one_segment():
    wires = [query(f"n{i}.example.test.", qid=i) for i in range(3)]
    recs, reader = tcp_read(tcp_packets([(0, framed(*wires))]))
    assert names(recs) == [f"n{i}.example.test." for i in range(3)]
    assert {(r["protocol"], r["query-ip"], r["query-port"], r["response-port"]) for r in recs} == {("TCP", CLIENT4, 40001, 53)}
    assert reader.stats.tcp_incomplete == 0


def test_tcp_one_message_over_three_segments_gets_the_last_segment_time():
    stream = framed(query("long.example.test.", "TXT"))
    parts = [(0, stream[:1]), (1, stream[1:10]), (10, stream[10:])]
    recs, _ = tcp_read(tcp_packets(parts))
    assert names(recs) == ["long.example.test."] and recs[0]["rrtype"] == "TXT"
    assert recs[0]["timestamp"] == 103.0  # SYN at 100, segments at 101..103


def test_tcp_responses_both_directions_ipv6():
    q = tcp_packets([(0, framed(query()))], family=6, fin=False)
    r = tcp_packets([(0, framed(response(), response("mail.example.test.")))], family=6, isn=7000, client=False, fin=False)
    recs, _ = tcp_read([q[0], r[0], q[1], r[1]])
    assert [r["message"] for r in recs] == ["CLIENT_QUERY", "CLIENT_RESPONSE", "CLIENT_RESPONSE"]
    assert {(r["query-ip"], r["query-port"], r["response-ip"], r["response-port"], r["family"]) for r in recs} == {
        (CLIENT6, 40001, SERVER6, 53, "INET6")}


def test_tcp_out_of_order_retransmitted_and_overlapping_segments():
    wires = [query(f"m{i}.example.test.", qid=i) for i in range(4)]
    stream = framed(*wires)
    a, b, c = len(stream) // 4, len(stream) // 2, 3 * len(stream) // 4
    segments = [
        (b, stream[b:c]),  # early
        (0, stream[:a]),
        (0, stream[:a]),  # retransmitted
        (c, stream[c:]),  # early
        (a - 5, stream[a - 5 : b + 3]),  # fills the gap, overlapping both sides
        (c, stream[c:]),  # late duplicate
    ]
    recs, reader = tcp_read(tcp_packets(segments))
    assert names(recs) == [f"m{i}.example.test." for i in range(4)]
    s = reader.stats
    assert s.tcp_out_of_order == 2 and s.tcp_retransmits == 2 and s.tcp_overlaps == 1
    assert s.tcp_incomplete == 0 and s.malformed == 0


def test_tcp_overlap_is_trimmed():
    stream = framed(query("a.example.test."), query("b.example.test."))
    recs, reader = tcp_read(tcp_packets([(0, stream[:20]), (10, stream[10:])]))
    assert names(recs) == ["a.example.test.", "b.example.test."] and reader.stats.tcp_overlaps == 1


def test_tcp_sequence_wraps_around():
    stream = framed(query("w1.example.test."), query("w2.example.test."))
    recs, _ = tcp_read(tcp_packets([(0, stream[:30]), (30, stream[30:])], isn=0xFFFFFFFF - 20))
    assert names(recs) == ["w1.example.test.", "w2.example.test."]


def test_tcp_flow_picked_up_mid_stream():
    stream = framed(query("mid.example.test."))
    recs, _ = tcp_read(tcp_packets([(0, stream)], syn=False))
    assert names(recs) == ["mid.example.test."]


def test_tcp_reset_and_fin_drop_partial_messages():
    stream = framed(query("cut.example.test."))
    packets = tcp_packets([(0, stream[:10])], fin=True)
    recs, reader = tcp_read(packets)
    assert recs == [] and reader.stats.tcp_incomplete == 1
    packets = tcp_packets([(0, stream[:10])], fin=False)
    packets.append(ipv4(SERVER4, CLIENT4, tcp(53, 40001, 5, flags=0x04)))  # the server resets
    packets += tcp_packets([(0, stream)], isn=9000)  # a new connection on the same ports
    recs, reader = tcp_read(packets)
    assert names(recs) == ["cut.example.test."] and reader.stats.tcp_incomplete == 1


def test_tcp_flow_table_is_bounded():
    half = framed(query("x.example.test."))[:8]
    packets = [ipv4(CLIENT4, SERVER4, tcp(41000 + i, 53, 1, half)) for i in range(5)]
    _, reader = tcp_read(packets, max_flows=3)
    assert reader.stats.flows_evicted == 2 and reader.stats.tcp_incomplete == 5  # 2 evicted, 3 at the end


def test_tcp_idle_flows_expire_by_packet_time():
    stream = framed(query("late.example.test."))
    packets = [(0, 0, ipv4(CLIENT4, SERVER4, tcp(40001, 53, 1, stream[:8]))),
               (100, 0, ipv4(CLIENT4, SERVER4, tcp(40001, 53, 9, stream[8:])))]
    frames, reader = read_all(pcap(packets, 101), flow_timeout=30)
    assert frames == [] and reader.stats.flows_expired == 1 and reader.stats.tcp_incomplete == 2
    frames, reader = read_all(pcap(packets, 101), flow_timeout=300)
    assert len(frames) == 1 and reader.stats.flows_expired == 0


def test_tcp_buffer_is_bounded():
    stream = framed(query("big.example.test."))
    packets = tcp_packets([(100, b"x" * 200), (0, stream[:5])], fin=False)
    _, reader = tcp_read(packets, max_flow_buffer=150)
    assert reader.stats.flows_overflowed == 1


def test_out_of_order_segments_cost_linear_time_and_are_bounded():
    """Each early segment used to re-sum every held one: 20,000 one-byte
    segments with gaps between them took seconds (a live capture stalls on
    spoofed traffic). Now a direction holds at most MAX_HELD_SEGMENTS."""
    n = 40_000
    decoder = PacketDecoder()
    packets = [ipv4(CLIENT4, SERVER4, tcp(40001, 53, 1000 + 2 * i, b"\0")) for i in range(n)]
    started = time.process_time()
    for packet in packets:
        decoder.packet(LINK_RAW, packet, 100, 0)
    elapsed = time.process_time() - started
    assert elapsed < 2.0, f"{n} out-of-order segments took {elapsed:.2f} s"
    stats = decoder.stats
    # Each flow holds MAX_HELD_SEGMENTS, is dropped at the next, and the one after starts the next flow.
    assert stats.flows_overflowed == n // (MAX_HELD_SEGMENTS + 2)
    assert stats.tcp_out_of_order == stats.flows_overflowed * (MAX_HELD_SEGMENTS + 1) + n % (MAX_HELD_SEGMENTS + 2) - 1


def test_reordered_message_of_max_held_segments_is_read():
    stream = framed(query("r.example.test.", qid=7) + b"\0" * 1000)
    size = -(-len(stream) // (MAX_HELD_SEGMENTS + 1))
    segments = [(i, stream[i : i + size]) for i in range(0, len(stream), size)]
    assert len(segments) == MAX_HELD_SEGMENTS + 1
    recs, reader = tcp_read(tcp_packets(segments[1:] + segments[:1]))
    assert names(recs) == ["r.example.test."]
    assert reader.stats.tcp_out_of_order == MAX_HELD_SEGMENTS and reader.stats.flows_overflowed == 0


def test_retransmission_after_fin_is_not_a_second_message():
    stream = framed(query("once.example.test."))
    packets = tcp_packets([(0, stream)], fin=True)
    packets.append(packets[1])  # the data segment again, after the FIN
    recs, reader = tcp_read(packets)
    assert names(recs) == ["once.example.test."] and reader.stats.tcp_retransmits == 1
    # The same ports again: a new connection (with or without its SYN seen) is read.
    packets += tcp_packets([(0, stream)], isn=500_000_000)
    packets += tcp_packets([(0, stream)], isn=900_000_000, syn=False)
    recs, reader = tcp_read(packets)
    assert names(recs) == ["once.example.test."] * 3 and reader.stats.tcp_retransmits == 1


def test_largest_tcp_message_fits_the_default_buffer():
    big = dns.message.make_response(dns.message.make_query("big.example.test.", "TXT"))
    wire = big.to_wire() + b"\0" * (65535 - len(big.to_wire()))  # trailing junk: still a DNS header
    stream = framed(wire)
    segments = [(i, stream[i : i + 1400]) for i in range(0, len(stream), 1400)]
    frames, reader = read_all(pcap([(100 + i, 0, p) for i, p in enumerate(tcp_packets(segments, client=False))], 101))
    assert len(frames) == 1 and reader.stats.flows_overflowed == 0
    assert len(taps(frames)[0].message.response_message) == 65535


# --------------------------------------------------------------------------- batches, damage, gzip


def test_batches_are_bounded():
    q, r = udp_exchange()
    data = pcap([(i, 0, ethernet(q if i % 2 else r)) for i in range(25)])
    batches = list(read_pcap(data, "x", batch_size=10))
    assert [len(b) for b in batches] == [10, 10, 5]


def test_gzip_through_open_capture(tmp_path):
    q, r = udp_exchange()
    path = tmp_path / "dns.pcap.gz"
    path.write_bytes(gzip.compress(pcap([(1, 0, ethernet(q)), (2, 0, ethernet(r))])))
    with open_capture(str(path)) as stream:
        assert is_pcap(stream.peek(4)[:4])  # peeked, not consumed: the reader starts at 0
        reader = read_pcap(stream, str(path))
        assert sum(len(b) for b in reader) == 2 and reader.damage is None


@pytest.mark.parametrize("data,offset,reason", [
    (b"", 0, "empty file"),
    (b"\x1f\x8b\x08\0" + b"\0" * 40, 0, "not a pcap or pcapng file"),
    (b"\xd4\xc3\xb2\xa1\x02\0", 0, "truncated file header"),
])
def test_damage_at_start(data, offset, reason):
    frames, reader = read_all(data)
    assert frames == []
    assert reader.damage.offset == offset and reason in reader.damage.reason
    assert reader.damage.path == "test.pcap"


def test_truncated_pcap_keeps_the_packets_before_the_cut():
    q, r = udp_exchange()
    data = pcap([(1, 0, ethernet(q)), (2, 0, ethernet(r))])
    second = 24 + 16 + len(ethernet(q))
    frames, reader = read_all(data[:-3])
    assert len(frames) == 1 and reader.damage.offset == second
    assert "truncated record" in reader.damage.reason and reader.stats.truncated_file == 1


def test_corrupt_record_length_is_reported_with_its_offset():
    q, _ = udp_exchange()
    good = pcap([(1, 0, ethernet(q))])
    data = good + struct.pack("<IIII", 2, 0, 10_000_000, 60) + b"\0" * 60
    frames, reader = read_all(data)
    assert len(frames) == 1 and reader.damage.offset == len(good) and "exceeds" in reader.damage.reason


def test_corrupt_pcapng_block_is_reported_with_its_offset():
    q, _ = udp_exchange()
    good = shb() + idb("<", 1) + epb("<", 0, 1, ethernet(q))
    bad = bytearray(epb("<", 0, 2, ethernet(q)))
    bad[-4:] = struct.pack("<I", 12)  # trailing length does not match
    frames, reader = read_all(good + bytes(bad))
    assert len(frames) == 1 and reader.damage.offset == len(good) and "trailing" in reader.damage.reason


@pytest.mark.parametrize("options", [
    struct.pack("<HH", 9, 1),  # if_tsresol of 1 byte, the block ends before it
    struct.pack("<HH", 14, 8) + struct.pack("<i", 5),  # if_tsoffset of 8 bytes, 4 there
    struct.pack("<HH", 2, 400) + b"eth0",  # if_name, far longer than the block
])
def test_interface_option_past_its_block_is_damage(options):
    """Such options raised IndexError / struct.error out of the reader."""
    q, _ = udp_exchange()
    good = shb() + idb("<", 1) + epb("<", 0, 1, ethernet(q))
    bad = _block("<", 1, struct.pack("<HHI", 1, 0, 0) + options)
    frames, reader = read_all(good + bad + epb("<", 1, 2, ethernet(q)))
    assert len(frames) == 1 and reader.damage.offset == len(good)
    assert "runs past the end of the block" in reader.damage.reason


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(options=st.binary(max_size=40), order=st.sampled_from(["<", ">"]))
def test_arbitrary_interface_options_never_raise(options, order):
    q, _ = udp_exchange()
    data = shb(order) + _block(order, 1, struct.pack(order + "HHI", 1, 0, 0) + options) + epb(order, 0, 1, ethernet(q))
    frames, reader = read_all(data)
    for frame in frames:
        decode(frame)
    assert reader.damage is None or 0 <= reader.damage.offset <= len(data)


def test_simple_packet_block_takes_the_time_of_the_packet_before():
    q, r = udp_exchange()
    ng = shb() + idb("<", 1) + epb("<", 0, 1_700_000_000_123_456, ethernet(q)) + spb("<", ethernet(r))
    recs = records(ng)[0]
    assert [rec["message"] for rec in recs] == ["CLIENT_QUERY", "CLIENT_RESPONSE"]
    assert recs[1]["timestamp"] == pytest.approx(1_700_000_000.123456)
    # The time is the reader's own: a reader that never saw a timed packet starts at 0.
    assert records(shb() + idb("<", 1) + spb("<", ethernet(r)))[0][0]["timestamp"] == 0


def _sample_files() -> list[tuple[bytes, set[int]]]:
    """(file, the offsets where a record or block ends: a clean place to cut)."""
    q, r = udp_exchange()
    q6, r6 = udp_exchange(6)
    tcp_stream = framed(query("t.example.test."), query("u.example.test."))
    frames = [ethernet(p) for p in [q, r, q6, r6]]
    frames += [ethernet(p) for p in tcp_packets([(0, tcp_stream[:30]), (30, tcp_stream[30:])])]
    classic = pcap([])
    classic_ends = {len(classic)}
    for i, frame in enumerate(frames):
        classic += pcap([(i, 0, frame)])[24:]
        classic_ends.add(len(classic))
    ng = shb() + idb("<", 1)
    ng_ends = {len(shb()), len(ng)}
    for i, frame in enumerate(frames):
        ng += epb("<", 0, i, frame)
        ng_ends.add(len(ng))
    return [(classic, classic_ends), (ng, ng_ends | {0})]


SAMPLES = _sample_files()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(which=st.sampled_from([0, 1]), cut=st.integers(min_value=0, max_value=2000))
def test_truncation_yields_every_packet_before_the_cut(which, cut):
    data, ends = SAMPLES[which]
    cut = min(cut, len(data))
    full, _ = read_all(data)
    frames, reader = read_all(data[:cut])
    # TCP messages complete only when their last segment is in: a prefix of the frames.
    assert frames == full[: len(frames)]
    if cut in ends and cut:
        assert reader.damage is None
    else:
        assert reader.damage is not None and 0 <= reader.damage.offset <= cut
        # The damage is at the last record end before the cut, and everything before it was read.
        assert reader.damage.offset == max((e for e in ends if e <= cut), default=0)
        assert frames == read_all(data[: reader.damage.offset])[0]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=600), head=st.sampled_from([b"", b"\xd4\xc3\xb2\xa1", b"\xa1\xb2\x3c\x4d", None]))
def test_arbitrary_bytes_never_raise(data, head):
    if head is None:  # a valid pcapng start, then noise
        data = shb() + idb("<", 1) + data
    else:
        data = head + data
    frames, reader = read_all(data, batch_size=2)
    for frame in frames:
        decode(frame)  # every frame is a decodable dnstap message
    assert reader.damage is None or 0 <= reader.damage.offset <= len(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payload=st.binary(max_size=200), link=st.sampled_from([0, 1, 101, 113, 276]),
       l4=st.sampled_from([6, 17]), family=st.sampled_from([4, 6]))
def test_arbitrary_payloads_in_valid_headers_never_raise(payload, link, l4, family):
    body = (udp(40000, 53, payload) if l4 == 17 else tcp(40000, 53, 7, payload))
    ip = ip_packet(family, True, body)
    frames, reader = read_all(pcap([(1, 0, link_frame(link, ip)), (2, 0, link_frame(link, ip)[: len(payload) % 50])], link))
    assert reader.damage is None
    for frame in frames:
        decode(frame)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(which=st.sampled_from([0, 1]),
       flips=st.lists(st.tuples(st.integers(min_value=0, max_value=10**6), st.integers(0, 255)), min_size=1, max_size=8))
def test_corrupted_valid_files_never_raise(which, flips):
    data = bytearray(SAMPLES[which][0])
    for where, value in flips:
        data[where % len(data)] = value
    frames, reader = read_all(bytes(data), batch_size=3)
    for frame in frames:
        decode(frame)
    assert reader.damage is None or 0 <= reader.damage.offset <= len(data)


def test_stats_as_dict():
    assert PcapStats(packets=3).as_dict()["packets"] == 3


# --------------------------------------------------------------------------- real captures

STORED = DATA / "unbound-dig.pcap"
# What tests/data/pcap/README says the stored capture holds (made by make_capture below).
STORED_EXCHANGES = [("www.example.test.", "A", "UDP"), ("mail.example.test.", "AAAA", "UDP"),
                    ("example.test.", "MX", "UDP"), ("nope.example.test.", "A", "UDP"),
                    ("www.example.test.", "A", "TCP"), ("example.test.", "TXT", "TCP"),
                    ("api.example.test.", "A", "TCP")]


def check_capture(recs: list[dict], exchanges, port: int | None = None) -> None:
    queries = [r for r in recs if r["message"] == "CLIENT_QUERY"]
    responses = [r for r in recs if r["message"] == "CLIENT_RESPONSE"]
    assert len(queries) == len(responses) == len(exchanges), recs
    assert sorted((r["qname"], r["rrtype"], r["protocol"]) for r in queries) == sorted(exchanges)
    assert sorted((r["qname"], r["rrtype"], r["protocol"]) for r in responses) == sorted(exchanges)
    by_id = {(r["protocol"], r["query-port"], r["id"]): r for r in queries}
    for resp in responses:
        q = by_id[(resp["protocol"], resp["query-port"], resp["id"])]
        assert (resp["query-ip"], resp["response-ip"]) == (q["query-ip"], q["response-ip"]) == ("127.0.0.1", "127.0.0.1")
        assert resp["response-port"] == q["response-port"]
        assert resp["timestamp"] >= q["timestamp"]
        assert resp["rcode"] in ("NOERROR", "NXDOMAIN") and not resp["malformed"]
        if port is not None:
            assert q["response-port"] == port
    rcodes = {r["qname"]: r["rcode"] for r in responses}
    if "nope.example.test." in rcodes:
        assert rcodes["nope.example.test."] == "NXDOMAIN"


def test_stored_real_capture():
    """tcpdump -i lo while dig asked a real unbound (port 5399) over UDP and TCP."""
    with open(STORED, "rb") as stream:
        reader = read_pcap(stream, str(STORED), dns_ports={5399})
        recs = [decode(f) for batch in reader for f in batch]
    assert reader.damage is None
    check_capture(recs, STORED_EXCHANGES, port=5399)
    assert reader.stats.tcp_incomplete == 0 and reader.stats.malformed == 0


def make_capture(tmp_path: Path, out: Path, dns_port: int, exchanges, keepopen=()) -> None:
    """Capture ``exchanges`` (qname, qtype, UDP/TCP) asked with dig of a real unbound on
    loopback, then ``keepopen`` (qname, qtype) pairs asked in one TCP connection."""
    tcpdump = peers.require("tcpdump")
    peers.require("dig")
    sock = peers.short_socket_dir(tmp_path) / "none.sock"  # unbound's dnstap goes nowhere
    unbound = peers.start_unbound(tmp_path / "unbound", dns_port, f"unix:{sock}")
    dump = subprocess.Popen([tcpdump, "-i", "lo", "-n", "-U", "--immediate-mode", "-w", str(out), "port", str(dns_port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while not (out.exists() and out.stat().st_size >= 24):  # the file header: capture is on
            assert dump.poll() is None, dump.stderr.read()
            assert time.monotonic() < deadline, "tcpdump did not start"
            time.sleep(0.05)
        time.sleep(0.3)
        for qname, qtype, proto in exchanges:
            extra = ["+tcp"] if proto == "TCP" else []
            result = subprocess.run([peers.which("dig"), "@127.0.0.1", "-p", str(dns_port), *extra,
                                     "+time=2", "+tries=1", qname, qtype], capture_output=True, text=True)
            assert "status:" in result.stdout, result.stdout + result.stderr
        if keepopen:
            args = [arg for qname, qtype in keepopen for arg in (qname, qtype)]
            result = subprocess.run([peers.which("dig"), "@127.0.0.1", "-p", str(dns_port), "+tcp", "+keepopen",
                                     "+time=2", "+tries=1", *args], capture_output=True, text=True)
            assert result.stdout.count("status:") == len(keepopen), result.stdout + result.stderr
        time.sleep(0.5)
    finally:
        dump.terminate()
        dump.wait(timeout=10)
        peers.stop_unbound(unbound, settle=0)


@pytest.mark.integration
def test_live_tcpdump_capture_of_unbound(tmp_path):
    exchanges = STORED_EXCHANGES + [("v6only.example.test.", "AAAA", "TCP"), ("missing.example.test.", "TXT", "UDP")]
    keepopen = [("www.example.test", "AAAA"), ("mail.example.test", "A"), ("nope.example.test", "MX")]
    dns_port = peers.free_port(udp_too=True)
    out = tmp_path / "live.pcap"
    make_capture(tmp_path, out, dns_port, exchanges, keepopen)
    exchanges += [(qname + ".", qtype, "TCP") for qname, qtype in keepopen]
    with open(out, "rb") as stream:
        reader = read_pcap(stream, str(out), dns_ports={dns_port})
        recs = [decode(f) for batch in reader for f in batch]
    assert reader.damage is None and reader.format == "pcap"
    check_capture(recs, exchanges, port=dns_port)
    s = reader.stats
    assert s.tcp_incomplete == 0 and s.malformed == 0
    # Both directions of each dig +tcp connection; the +keepopen one carries three exchanges.
    assert s.tcp_flows == 2 * (sum(1 for e in exchanges if e[2] == "TCP") - len(keepopen) + 1)
    # The same file with its records rewritten as pcapng (EPB, ns resolution) reads the same.
    assert [decode(f) for batch in read_pcap(to_pcapng(out.read_bytes()), "x", dns_ports={dns_port})
            for f in batch] == recs


def to_pcapng(classic: bytes) -> bytes:
    """A little-endian µs pcap file rewritten as pcapng with nanosecond timestamps."""
    (_, _, _, _, _, snaplen, link) = struct.unpack_from("<IHHiIII", classic)
    out = shb() + idb("<", link, tsresol=9, snaplen=snaplen)
    pos = 24
    while pos < len(classic):
        sec, usec, incl, _ = struct.unpack_from("<IIII", classic, pos)
        out += epb("<", 0, sec * 1_000_000_000 + usec * 1000, classic[pos + 16 : pos + 16 + incl])
        pos += 16 + incl
    return out
