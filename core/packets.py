"""Packets of DNS traffic turned into dnstap messages, one packet at a time, no engine.

:class:`PacketDecoder` is the part shared by the pcap/pcapng file reader
(core/pcap.py) and the live sniffer (sources/sniffer.py): each call of
``decoder.packet(link, data, sec, nsec)`` decodes one captured packet (link
layer -> IP -> UDP/TCP -> DNS) and appends the dnstap protobuf frames it
completes to ``decoder.out``; the caller takes them with ``decoder.take()``.
Every skip is counted in ``decoder.stats`` (a :class:`PacketStats`).

What is read: link types (pcap LINKTYPE_ numbers) null/loopback (0, 108),
Ethernet (1, with 802.1Q / 802.1ad / QinQ tags; Linux's loopback interface
uses it too), raw IP (101, 228, 229), Linux cooked SLL (113) and SLL2 (276);
IPv4 and IPv6 (extension headers walked); UDP and TCP to or from one of
``dns_ports``. IP fragments (IPv4, and IPv6 fragment headers) are put back
together by core.fragments.Reassembler before UDP or TCP is read; a datagram
whose first fragment shows ports that are not DNS is not reassembled.

Query or response: the DNS payload must hold at least a header; its QR bit
says which it is, so traffic between two DNS ports (53 to 53) and loopback
(where both ends are ours) still come out right. query_address / query_port
are always the querier's, response_address / response_port the server's. The
time is the packet's, nanoseconds kept, in query_time_* for queries and
response_time_* for responses; a message over TCP gets the time of the
segment that completed it.

Message type: without ``local_ips`` (a file, or a sniffer without
``eth-ip``) every message is CLIENT_QUERY or CLIENT_RESPONSE. With
``local_ips`` (the sniffer's ``eth-ip``) the addresses decide, as in
dnstap-receiver 4.7.0: when the server end is one of ours the message is
CLIENT_*; when the querier is one of ours (our resolver asking another
server) it is FORWARDER_* if the RD bit is set (a forwarded query; a response
copies RD), else RESOLVER_*; when neither end is ours it is counted
(``foreign``) and skipped. ``message_types`` keeps only some types (the
others are counted as ``unrecorded``).

TCP: each direction of a flow is reassembled in sequence order (out-of-order
segments held, retransmissions and overlaps trimmed, SYN/FIN/RST followed)
and split on the two-byte length prefix, so a message spread over several
segments and several messages in one segment both come out whole. A flow
whose start was not seen is picked up at its first data segment, which is
assumed to start a message. State is bounded: at most ``max_flows``
directions (the least recently used is evicted), ``max_flow_buffer`` bytes
and ``MAX_HELD_SEGMENTS`` early segments held per direction (past either the
flow is dropped: each segment costs constant time, so spoofed out-of-order
traffic cannot stall a live capture), directions idle for ``flow_timeout``
seconds expire (by packet time, or by the caller's clock through
:meth:`PacketDecoder.expire`). The directions closed by a FIN are remembered
(as many as ``max_flows``, the oldest forgotten first), so that a
retransmission after the FIN is counted, not read as a new flow that would
emit its messages a second time.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, fields

from core.batches import FrameBatch
from core.dnstap_wire import identity_field, varint
from core.fragments import Reassembler

__all__ = [
    "ALL_MESSAGE_TYPES",
    "CLIENT_QUERY",
    "CLIENT_RESPONSE",
    "DEFAULT_DNS_PORTS",
    "DEFAULT_FLOW_TIMEOUT",
    "DEFAULT_MAX_FLOWS",
    "DEFAULT_MAX_FLOW_BUFFER",
    "FORWARDER_QUERY",
    "FORWARDER_RESPONSE",
    "LINK_ETHERNET",
    "LINK_RAW",
    "MAX_HELD_SEGMENTS",
    "RESOLVER_QUERY",
    "RESOLVER_RESPONSE",
    "PacketDecoder",
    "PacketStats",
]

DEFAULT_DNS_PORTS = frozenset({53})
DEFAULT_MAX_FLOWS = 10_000
DEFAULT_MAX_FLOW_BUFFER = 65_535 + 2  # one largest message with its length prefix
DEFAULT_FLOW_TIMEOUT = 60.0
# Early segments held per direction: a 64 KiB message whose first of 46
# segments (1,448 bytes each) comes last still fits.
MAX_HELD_SEGMENTS = 64

# Link types (pcap LINKTYPE_ numbers)
_NULL, LINK_ETHERNET, LINK_RAW, _IPV4, _IPV6, _SLL, _LOOP, _SLL2 = 0, 1, 101, 228, 229, 113, 108, 276
# Link header length, and the offset of the EtherType in it; -1: no EtherType,
# IP follows the header and its version tells which.
_LINKS = {
    LINK_ETHERNET: (14, 12), _SLL: (16, 14), _SLL2: (20, 0),
    LINK_RAW: (0, -1), _IPV4: (0, -1), _IPV6: (0, -1), _NULL: (4, -1), _LOOP: (4, -1),
}
_VLAN_TYPES = frozenset({0x8100, 0x88A8, 0x9100, 0x9200})
_ETH_IPV4, _ETH_IPV6 = 0x0800, 0x86DD
# IPv6 extension headers laid out as next-header, length in 8-octet units - 1.
_IPV6_EXT = frozenset({0, 43, 60, 135, 139, 140})
_IPV6_FRAGMENT, _IPV6_AH = 44, 51
_TCP, _UDP = 6, 17
_FIN, _SYN, _RST = 0x01, 0x02, 0x04
_SEQ_MASK = 0xFFFFFFFF
# How far before a closed direction's end a segment counts as its
# retransmission; a new connection's random first number lands there
# one time in 4096.
_RETRANSMIT_WINDOW = 1 << 20

_U16_PAIR = struct.Struct("!HH")
_U32 = struct.Struct("!I")
_NSEC = struct.Struct("<I")

# dnstap Message.Type numbers (core/dnstap.proto)
RESOLVER_QUERY, RESOLVER_RESPONSE = 3, 4
CLIENT_QUERY, CLIENT_RESPONSE = 5, 6
FORWARDER_QUERY, FORWARDER_RESPONSE = 7, 8
ALL_MESSAGE_TYPES = frozenset({
    RESOLVER_QUERY, RESOLVER_RESPONSE, CLIENT_QUERY, CLIENT_RESPONSE, FORWARDER_QUERY, FORWARDER_RESPONSE,
})

# dnstap protobuf, written by hand (the fields' numbers are core/dnstap.proto's):
# building dnstap_pb2 objects costs more than the whole packet parse. The tests
# check these bytes against dnstap_pb2.
_HEADS = {
    (mtype, family, proto): bytes((0x08, mtype, 0x10, family, 0x18, proto))
    for mtype in ALL_MESSAGE_TYPES
    for family in (1, 2)
    for proto in (1, 2)
}
_DNSTAP_TAIL = b"\x78\x01"  # Dnstap.type = MESSAGE
# Tags of the time (seconds, nanoseconds) and message fields: query_* or response_*.
_QUERY_TAGS = (b"\x40", b"\x4d", b"\x52")
_RESPONSE_TAGS = (b"\x60", b"\x6d", b"\x72")


@dataclass
class PacketStats:
    """What a decoder saw; ``as_dict()`` for counters and logs."""

    packets: int = 0  # packets read (counted by the caller)
    dns_messages: int = 0  # frames produced
    queries: int = 0
    responses: int = 0
    non_ip: int = 0  # ARP, LLDP...
    non_dns: int = 0  # IP, but not UDP/TCP to or from a DNS port
    malformed: int = 0  # bad IP/UDP/TCP headers, DNS payloads shorter than a header
    snapped: int = 0  # captured shorter than the IP packet (snaplen)
    fragments: int = 0  # IPv4 / IPv6 fragments read
    fragments_reassembled: int = 0  # datagrams put back together from them
    fragments_dropped: int = 0  # fragments that made no datagram (overlapping, timed out, not DNS...)
    unsupported_link: int = 0  # packets of an unknown link type or undeclared interface
    foreign: int = 0  # DNS messages between two addresses that are not ours (local_ips)
    unrecorded: int = 0  # DNS messages of a type switched off (message_types)
    tcp_flows: int = 0  # flow directions tracked
    tcp_retransmits: int = 0  # segments entirely already seen
    tcp_overlaps: int = 0  # segments partly already seen (trimmed)
    tcp_out_of_order: int = 0  # segments held until the gap before them is filled
    tcp_incomplete: int = 0  # directions closed/expired/evicted holding a partial message
    flows_evicted: int = 0  # least recently used directions dropped at max_flows
    flows_expired: int = 0  # directions idle for flow_timeout
    flows_overflowed: int = 0  # directions dropped past max_flow_buffer bytes or MAX_HELD_SEGMENTS segments

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class _Flow:
    """One direction of a TCP connection: the next expected sequence number,
    the bytes of an unfinished message, segments that came early (and how
    many bytes they hold)."""

    __slots__ = ("buf", "held", "last", "next", "pending")

    def __init__(self, next_seq: int, last: float) -> None:
        self.next = next_seq
        self.buf = b""
        self.pending: dict[int, bytes] | None = None
        self.held = 0
        self.last = last


class PacketDecoder:
    """Captured packets in, dnstap frames out (see the module docstring).

    ``local_ips``: packed addresses (4 or 16 bytes, ``socket.inet_pton``)
    that are ours, or None to make every message a CLIENT_* one.
    ``message_types``: the dnstap types to emit (default all).
    """

    def __init__(
        self,
        *,
        dns_ports: frozenset[int] | set[int] = DEFAULT_DNS_PORTS,
        identity: bytes | str | None = None,
        local_ips: frozenset[bytes] | set[bytes] | None = None,
        message_types: frozenset[int] | set[int] = ALL_MESSAGE_TYPES,
        max_flows: int = DEFAULT_MAX_FLOWS,
        max_flow_buffer: int = DEFAULT_MAX_FLOW_BUFFER,
        flow_timeout: float = DEFAULT_FLOW_TIMEOUT,
        stats: PacketStats | None = None,
    ) -> None:
        if max_flows < 1:
            raise ValueError(f"max_flows must be >= 1, got {max_flows!r}")
        if max_flow_buffer < 2:
            raise ValueError(f"max_flow_buffer must be >= 2, got {max_flow_buffer!r}")
        self.dns_ports = frozenset(dns_ports)
        self.local_ips = frozenset(local_ips) if local_ips is not None else None
        self.message_types = frozenset(message_types)
        self.max_flows = max_flows
        self.max_flow_buffer = max_flow_buffer
        self.flow_timeout = float(flow_timeout)
        self.stats = stats if stats is not None else PacketStats()
        self.out = FrameBatch()
        self._prefix = identity_field(identity) if identity else b""
        self._flows: dict[tuple, _Flow] = {}
        self._closed: dict[tuple, int] = {}  # direction closed by a FIN -> its next sequence number
        self._fragments = Reassembler(self.stats)
        self._sweep_at = 0.0

    def take(self) -> FrameBatch:
        """The frames produced since the last call."""
        out, self.out = self.out, FrameBatch()
        return out

    # ------------------------------------------------------------------ packet layer

    def packet(self, link: int, data: bytes, sec: int, nsec: int) -> None:
        """Decode one packet captured at ``sec`` + ``nsec`` (epoch); never raises."""
        try:
            self._decode(link, data, sec, nsec)
        except (IndexError, struct.error):  # a header cut short that a check missed
            self.stats.malformed += 1

    def _decode(self, link: int, data: bytes, sec: int, nsec: int) -> None:
        stats = self.stats
        framing = _LINKS.get(link)
        if framing is None:
            stats.unsupported_link += 1
            return
        off, at = framing
        if at >= 0:
            if len(data) < off:
                stats.malformed += 1
                return
            etype = data[at] << 8 | data[at + 1]
        else:
            if len(data) <= off:
                stats.malformed += 1
                return
            version = data[off] >> 4
            etype = _ETH_IPV4 if version == 4 else _ETH_IPV6 if version == 6 else 0
        while etype in _VLAN_TYPES:
            if len(data) < off + 4:
                stats.malformed += 1
                return
            etype = data[off + 2] << 8 | data[off + 3]
            off += 4
        if etype == _ETH_IPV4:
            n = len(data)
            if n - off < 20:
                stats.malformed += 1
                return
            vihl = data[off]
            ihl = (vihl & 0x0F) * 4
            total = data[off + 2] << 8 | data[off + 3]
            if vihl >> 4 != 4 or ihl < 20 or total < ihl:
                stats.malformed += 1
                return
            end = off + total  # what follows is link-layer padding
            if end > n:
                stats.snapped += 1
                return
            proto = data[off + 9]
            src = data[off + 12 : off + 16]
            dst = data[off + 16 : off + 20]
            family = 1
            pos = off + ihl
            frag = data[off + 6] << 8 | data[off + 7]
            if frag & 0x3FFF:  # more fragments, or an offset
                whole = self._fragment(
                    (src, dst, data[off + 4 : off + 6], proto), proto, (frag & 0x1FFF) * 8, frag & 0x2000,
                    data[pos:end], sec, nsec,
                )
                if whole is None:
                    return
                data, pos, end = whole, 0, len(whole)
        elif etype == _ETH_IPV6:
            n = len(data)
            if n - off < 40:
                stats.malformed += 1
                return
            if data[off] >> 4 != 6:
                stats.malformed += 1
                return
            plen = data[off + 4] << 8 | data[off + 5]
            proto = data[off + 6]
            src = data[off + 8 : off + 24]
            dst = data[off + 24 : off + 40]
            pos = off + 40
            end = pos + plen if plen else n  # 0: a jumbogram, the rest of the packet
            if end > n:
                stats.snapped += 1
                return
            family = 2
            while proto in _IPV6_EXT or proto == _IPV6_FRAGMENT or proto == _IPV6_AH:
                if end - pos < 8:
                    stats.malformed += 1
                    return
                if proto == _IPV6_FRAGMENT:
                    frag = data[pos + 2] << 8 | data[pos + 3]
                    if frag & 0xFFF9:  # offset or more-fragments
                        proto = data[pos]
                        whole = self._fragment(
                            (src, dst, data[pos + 4 : pos + 8]), proto, frag & 0xFFF8, frag & 1,
                            data[pos + 8 : end], sec, nsec,
                        )
                        if whole is None:
                            return
                        data, pos, end = whole, 0, len(whole)
                        continue
                    size = 8  # an atomic fragment (RFC 6946): the whole packet is here
                elif proto == _IPV6_AH:
                    size = (data[pos + 1] + 2) * 4
                else:
                    size = (data[pos + 1] + 1) * 8
                proto = data[pos]
                pos += size
        else:
            stats.non_ip += 1
            return
        if proto != _UDP and proto != _TCP:
            stats.non_dns += 1
            return
        if end - pos < (8 if proto == _UDP else 20):
            stats.malformed += 1
            return
        sport, dport = _U16_PAIR.unpack_from(data, pos)
        ports = self.dns_ports
        if sport not in ports and dport not in ports:
            stats.non_dns += 1
            return
        if proto == _UDP:
            ulen = data[pos + 4] << 8 | data[pos + 5]
            if ulen < 8 or pos + ulen > end:
                if ulen == 0 and family == 2:  # a jumbogram's UDP length
                    ulen = end - pos
                else:
                    stats.malformed += 1
                    return
            self._dns(data[pos + 8 : pos + ulen], family, 1, src, sport, dst, dport, sec, nsec)
        else:
            (seq,) = _U32.unpack_from(data, pos + 4)
            doff = (data[pos + 12] >> 4) * 4
            if doff < 20 or pos + doff > end:
                stats.malformed += 1
                return
            self._tcp(family, src, sport, dst, dport, seq, data[pos + 13], data[pos + doff : end], sec, nsec)

    def _fragment(self, key, proto, offset, more, payload, sec, nsec) -> bytes | None:
        """Hand a fragment to the reassembler; the datagram it completes."""
        now = sec + nsec * 1e-9
        if not offset and (proto == _UDP or proto == _TCP) and len(payload) >= 4:
            sport, dport = _U16_PAIR.unpack_from(payload)
            if sport not in self.dns_ports and dport not in self.dns_ports:
                self.stats.non_dns += 1
                self._fragments.reject(key, now)
                return None
        return self._fragments.add(key, offset, bool(more), payload, now)

    # ------------------------------------------------------------------ TCP

    def _tcp(self, family, src, sport, dst, dport, seq, flags, payload, sec, nsec) -> None:
        stats = self.stats
        flows = self._flows
        now = sec + nsec * 1e-9
        if now >= self._sweep_at:
            self.expire(now)
        key = (src, sport, dst, dport)
        flow = flows.pop(key, None)  # re-inserted below: dict order is least recently used first
        if flags & _RST:
            if flow is not None and (flow.buf or flow.pending):
                stats.tcp_incomplete += 1
            back = flows.pop((dst, dport, src, sport), None)
            if back is not None and (back.buf or back.pending):
                stats.tcp_incomplete += 1
            return
        if flags & _SYN:
            if flow is None or flow.next != (seq + 1) & _SEQ_MASK:  # a new connection
                if flow is not None and (flow.buf or flow.pending):
                    stats.tcp_incomplete += 1
                flow = None
            seq = (seq + 1) & _SEQ_MASK  # data on a SYN (TCP Fast Open) follows it
            self._closed.pop(key, None)
        if flow is None:
            if not payload and not flags & _SYN:
                return  # an ACK or FIN of a flow we know nothing of
            closed = self._closed.get(key)
            if closed is not None and not flags & _SYN:
                behind = (closed - seq) & _SEQ_MASK
                if len(payload) <= behind <= _RETRANSMIT_WINDOW:
                    stats.tcp_retransmits += 1  # a retransmission after the FIN
                    return
                del self._closed[key]  # a new connection whose SYN we missed
            if len(flows) >= self.max_flows:
                old = flows.pop(next(iter(flows)))
                stats.flows_evicted += 1
                if old.buf or old.pending:
                    stats.tcp_incomplete += 1
            flow = _Flow(seq, now)
            stats.tcp_flows += 1
        flow.last = now
        if payload and not self._segment(flow, seq, payload, family, src, sport, dst, dport, sec, nsec):
            stats.flows_overflowed += 1
            stats.tcp_incomplete += 1
            return
        if flags & _FIN and not flow.pending:
            if flow.buf:
                stats.tcp_incomplete += 1
            closed = self._closed
            closed.pop(key, None)
            if len(closed) >= self.max_flows:
                del closed[next(iter(closed))]
            closed[key] = flow.next
            return
        flows[key] = flow

    def _segment(self, flow: _Flow, seq, payload, family, src, sport, dst, dport, sec, nsec) -> bool:
        """Add a segment to ``flow`` and emit the messages it completes; False
        when the flow holds more than max_flow_buffer bytes (it is dropped)."""
        stats = self.stats
        off = (seq - flow.next) & _SEQ_MASK
        if off >= 0x80000000:
            off -= 0x100000000
        if off < 0:
            if off + len(payload) <= 0:
                stats.tcp_retransmits += 1
                return True
            stats.tcp_overlaps += 1
            payload = payload[-off:]
        elif off > 0:
            stats.tcp_out_of_order += 1
            pending = flow.pending
            if pending is None:
                pending = flow.pending = {}
            held = pending.get(seq)
            if held is None:
                if len(pending) >= MAX_HELD_SEGMENTS:
                    return False
                pending[seq] = payload
                flow.held += len(payload)
            elif len(held) < len(payload):
                pending[seq] = payload
                flow.held += len(payload) - len(held)
            return len(flow.buf) + flow.held <= self.max_flow_buffer
        data = flow.buf + payload if flow.buf else payload
        flow.next = (flow.next + len(payload)) & _SEQ_MASK
        pending = flow.pending
        if pending:
            # In sequence order from where the flow stands (signed distances:
            # the numbers may wrap); stop at the first gap.
            base = flow.next
            for start in sorted(pending, key=lambda s: (s - base + 0x80000000) & _SEQ_MASK):
                gap = (start - flow.next) & _SEQ_MASK
                if gap >= 0x80000000:
                    gap -= 0x100000000
                if gap > 0:
                    break
                held = pending.pop(start)
                flow.held -= len(held)
                if gap + len(held) > 0:
                    data += held[-gap:] if gap else held
                    flow.next = (flow.next + len(held) + gap) & _SEQ_MASK
            if not pending:
                flow.pending = None
        # Split on the length prefixes.
        pos, n = 0, len(data)
        dns = self._dns
        while n - pos >= 2:
            end = pos + 2 + (data[pos] << 8 | data[pos + 1])
            if end > n:
                break
            dns(data[pos + 2 : end], family, 2, src, sport, dst, dport, sec, nsec)
            pos = end
        flow.buf = data[pos:] if pos < n else b""
        return len(flow.buf) + flow.held <= self.max_flow_buffer

    def expire(self, now: float) -> None:
        """Drop the TCP flow directions idle since before ``now - flow_timeout``
        and the unfinished fragmented datagrams past their timeout (``now`` in
        epoch seconds, the packets' clock)."""
        timeout = self.flow_timeout
        flows = self._flows
        stats = self.stats
        limit = now - timeout
        while flows:
            key = next(iter(flows))  # least recently used first
            flow = flows[key]
            if flow.last >= limit:
                break
            del flows[key]
            stats.flows_expired += 1
            if flow.buf or flow.pending:
                stats.tcp_incomplete += 1
        self._sweep_at = now + min(timeout, 1.0)
        self._fragments.expire(now)

    def close(self) -> None:
        """End of the capture: flows holding part of a message are counted as
        incomplete, fragments of unfinished datagrams as dropped."""
        for flow in self._flows.values():
            if flow.buf or flow.pending:
                self.stats.tcp_incomplete += 1
        self._flows.clear()
        self._fragments.close()

    @property
    def flows(self) -> int:
        """TCP flow directions held now."""
        return len(self._flows)

    # ------------------------------------------------------------------ dnstap

    def _dns(self, wire: bytes, family, proto, src, sport, dst, dport, sec, nsec) -> None:
        stats = self.stats
        if len(wire) < 12:
            stats.malformed += 1
            return
        response = wire[2] & 0x80
        local = self.local_ips
        if local is None:
            mtype = CLIENT_RESPONSE if response else CLIENT_QUERY
        else:
            server, client = (src, dst) if response else (dst, src)
            if server in local:
                mtype = CLIENT_RESPONSE if response else CLIENT_QUERY
            elif client in local:
                if wire[2] & 0x01:  # RD: a forwarded query (copied into its response)
                    mtype = FORWARDER_RESPONSE if response else FORWARDER_QUERY
                else:
                    mtype = RESOLVER_RESPONSE if response else RESOLVER_QUERY
            else:
                stats.foreign += 1
                return
        if mtype not in self.message_types:
            stats.unrecorded += 1
            return
        if response:
            stats.responses += 1
            # The querier is the destination of a response.
            querier, qport, server, rport = dst, dport, src, sport
            sec_tag, nsec_tag, wire_tag = _RESPONSE_TAGS
        else:
            stats.queries += 1
            querier, qport, server, rport = src, sport, dst, dport
            sec_tag, nsec_tag, wire_tag = _QUERY_TAGS
        alen = b"\x04" if family == 1 else b"\x10"
        body = b"".join((
            _HEADS[mtype, family, proto],
            b"\x22", alen, querier, b"\x2a", alen, server,
            b"\x30", varint(qport), b"\x38", varint(rport),
            sec_tag, varint(sec), nsec_tag, _NSEC.pack(nsec),
            wire_tag, varint(len(wire)), wire,
        ))
        stats.dns_messages += 1
        self.out.append(b"".join((self._prefix, b"\x72", varint(len(body)), body, _DNSTAP_TAIL)))
