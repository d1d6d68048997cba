"""pcap and pcapng files of DNS traffic turned into dnstap messages, no engine.

``read_pcap(stream, path)`` reads a classic pcap file (either byte order,
microsecond or nanosecond magic) or a pcapng file (sections of either byte
order; interfaces with their link type, ``if_tsresol`` and ``if_tsoffset``;
enhanced, simple and obsolete packet blocks; other blocks skipped) and yields
``FrameBatch`` lists of dnstap protobuf frames, one CLIENT_QUERY or
CLIENT_RESPONSE per DNS message, so the rest of the pipeline
(core.message.decode...) is the same as for a Frame Streams capture. The
caller opens the file: ``core.capture.open_capture`` decompresses gzip.

What is read: link types null/loopback (0, 108), Ethernet (1, with 802.1Q /
802.1ad / QinQ tags), raw IP (101, 228, 229), Linux cooked SLL (113) and SLL2
(276); IPv4 and IPv6 (extension headers walked); UDP and TCP to or from one of
``dns_ports``. IP fragments are counted and skipped, not reassembled (DNS over
UDP rarely fragments; an atomic IPv6 fragment, RFC 6946, is read as it is).

DNS detection and direction: the payload must hold at least a DNS header; its
QR bit makes it a query (CLIENT_QUERY, the client is the packet's source) or
a response (CLIENT_RESPONSE, the client is its destination). query_address /
query_port are always the client's, response_address / response_port the
server's. The time is the packet's (nanosecond exact when the file is), in
query_time_* for queries and response_time_* for responses. A message over
TCP gets the time of the segment that completed it.

TCP: each direction of a flow is reassembled in sequence order (out-of-order
segments held, retransmissions and overlaps trimmed, SYN/FIN/RST followed)
and split on the two-byte length prefix. A flow whose start was not captured
is picked up at its first data segment, which is assumed to start a message.
State is bounded: at most ``max_flows`` directions (the least recently used
is evicted), ``max_flow_buffer`` bytes held per direction (past it the flow
is dropped), idle directions expire after ``flow_timeout`` seconds of packet
time. Every skip, eviction and drop is counted in ``reader.stats``.

A damaged file (truncated, corrupt, not pcap at all) never raises: iteration
stops, ``reader.damage`` is a core.capture.CaptureDamage with the byte offset
of the first record that could not be read (in the uncompressed stream), and
every message before it has been yielded. Packets that are merely odd
(malformed headers, snapped short, unknown link types) are counted and
skipped without stopping.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import BinaryIO

from core.batches import FrameBatch
from core.capture import DEFAULT_BATCH_SIZE, CaptureDamage
from core.dnstap_wire import identity_field, varint

__all__ = [
    "DEFAULT_DNS_PORTS",
    "PcapReader",
    "PcapStats",
    "is_pcap",
    "read_pcap",
]

DEFAULT_DNS_PORTS = frozenset({53})
DEFAULT_MAX_FLOWS = 10_000
DEFAULT_MAX_FLOW_BUFFER = 65_535 + 2  # one largest message with its length prefix
DEFAULT_FLOW_TIMEOUT = 60.0
READ_SIZE = 1024 * 1024
# A record longer than this is corruption, not a packet (libpcap's own bound
# for snaplen 0 / 262144 captures); a bigger declared snaplen raises it.
MAX_PACKET = 262_144
MAX_BLOCK = 16 * 1024 * 1024

PCAP_MAGICS = {
    b"\xd4\xc3\xb2\xa1": ("<", 1000),  # little endian, microseconds
    b"\xa1\xb2\xc3\xd4": (">", 1000),
    b"\x4d\x3c\xb2\xa1": ("<", 1),  # nanoseconds
    b"\xa1\xb2\x3c\x4d": (">", 1),
}
PCAPNG_SHB = b"\x0a\x0d\x0d\x0a"
_SHB_TYPE = 0x0A0D0D0A
_BYTE_ORDER_MAGIC = 0x1A2B3C4D

# Link types
_NULL, _ETHERNET, _RAW, _IPV4, _IPV6, _SLL, _LOOP, _SLL2 = 0, 1, 101, 228, 229, 113, 108, 276
_VLAN_TYPES = frozenset({0x8100, 0x88A8, 0x9100, 0x9200})
_ETH_IPV4, _ETH_IPV6 = 0x0800, 0x86DD
# IPv6 extension headers laid out as next-header, length in 8-octet units - 1.
_IPV6_EXT = frozenset({0, 43, 60, 135, 139, 140})
_IPV6_FRAGMENT, _IPV6_AH = 44, 51
_TCP, _UDP = 6, 17
_FIN, _SYN, _RST = 0x01, 0x02, 0x04
_SEQ_MASK = 0xFFFFFFFF

_U16_PAIR = struct.Struct("!HH")
_U32 = struct.Struct("!I")
_NSEC = struct.Struct("<I")

# dnstap protobuf, written by hand (the fields' numbers are core/dnstap.proto's):
# building dnstap_pb2 objects costs more than the whole packet parse. The tests
# check these bytes against dnstap_pb2.
_CLIENT_QUERY, _CLIENT_RESPONSE = 5, 6
_HEADS = {
    (mtype, family, proto): bytes((0x08, mtype, 0x10, family, 0x18, proto))
    for mtype in (_CLIENT_QUERY, _CLIENT_RESPONSE)
    for family in (1, 2)
    for proto in (1, 2)
}
_DNSTAP_TAIL = b"\x78\x01"  # Dnstap.type = MESSAGE


def is_pcap(head: bytes) -> bool:
    """Whether ``head`` (the first 4 bytes of a file, uncompressed) starts a pcap or pcapng file."""
    return head[:4] in PCAP_MAGICS or head[:4] == PCAPNG_SHB


@dataclass
class PcapStats:
    """What a reader saw; ``as_dict()`` for counters and logs."""

    packets: int = 0  # packet records read
    dns_messages: int = 0  # frames produced
    queries: int = 0
    responses: int = 0
    non_ip: int = 0  # ARP, LLDP...
    non_dns: int = 0  # IP, but not UDP/TCP to or from a DNS port
    malformed: int = 0  # bad IP/UDP/TCP headers, DNS payloads shorter than a header
    snapped: int = 0  # captured shorter than the IP packet (snaplen)
    fragments: int = 0  # IPv4 / IPv6 fragments skipped (no reassembly)
    unsupported_link: int = 0  # packets of an unknown link type or undeclared interface
    skipped_blocks: int = 0  # pcapng blocks other than SHB/IDB/EPB/SPB/PB
    tcp_flows: int = 0  # flow directions tracked
    tcp_retransmits: int = 0  # segments entirely already seen
    tcp_overlaps: int = 0  # segments partly already seen (trimmed)
    tcp_out_of_order: int = 0  # segments held until the gap before them is filled
    tcp_incomplete: int = 0  # directions closed/expired/evicted holding a partial message
    flows_evicted: int = 0  # least recently used directions dropped at max_flows
    flows_expired: int = 0  # directions idle for flow_timeout
    flows_overflowed: int = 0  # directions dropped past max_flow_buffer
    truncated_file: int = 0  # 1 when the file ends inside a record

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class _Flow:
    """One direction of a TCP connection: the next expected sequence number,
    the bytes of an unfinished message, segments that came early."""

    __slots__ = ("buf", "last", "next", "pending")

    def __init__(self, next_seq: int, last: float) -> None:
        self.next = next_seq
        self.buf = b""
        self.pending: dict[int, bytes] | None = None
        self.last = last


class _Damaged(Exception):
    def __init__(self, offset: int, reason: str) -> None:
        super().__init__(reason)
        self.offset = offset
        self.reason = reason


class PcapReader:
    """Iterator over batches (FrameBatch, at most ``batch_size`` dnstap frames
    in general; a packet carrying several TCP messages may add a few more) of
    one pcap/pcapng file. After it is exhausted: ``damage`` (None for a clean
    file), ``stats`` (PcapStats), ``format`` ("pcap", "pcapng" or None)."""

    def __init__(
        self,
        stream: BinaryIO,
        path: str = "<pcap>",
        *,
        dns_ports: frozenset[int] | set[int] = DEFAULT_DNS_PORTS,
        identity: bytes | str | None = b"pcap",
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_flows: int = DEFAULT_MAX_FLOWS,
        max_flow_buffer: int = DEFAULT_MAX_FLOW_BUFFER,
        flow_timeout: float = DEFAULT_FLOW_TIMEOUT,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        if max_flows < 1:
            raise ValueError(f"max_flows must be >= 1, got {max_flows!r}")
        if max_flow_buffer < 2:
            raise ValueError(f"max_flow_buffer must be >= 2, got {max_flow_buffer!r}")
        self.path = path
        self.batch_size = batch_size
        self.dns_ports = frozenset(dns_ports)
        self.max_flows = max_flows
        self.max_flow_buffer = max_flow_buffer
        self.flow_timeout = float(flow_timeout)
        self.stats = PcapStats()
        self.damage: CaptureDamage | None = None
        self.format: str | None = None
        self._prefix = identity_field(identity) if identity else b""
        self._stream = stream
        self._out = FrameBatch()
        self._flows: dict[tuple, _Flow] = {}
        self._sweep_at = 0.0
        self._buf = b""
        self._base = 0  # file offset of self._buf[0]
        self._eof = False
        self._read_error: BaseException | None = None
        self._iter = self._run()

    def __iter__(self) -> Iterator[FrameBatch]:
        return self

    def __next__(self) -> FrameBatch:
        return next(self._iter)

    # ------------------------------------------------------------------ file layer

    def _fill(self, pos: int, need: int) -> int:
        """Make ``need`` bytes available from ``pos`` of the buffer (the buffer
        is rebased: returns the new ``pos``, 0). Short only at end of file."""
        buf = self._buf[pos:]
        self._base += pos
        while len(buf) < need and not self._eof:
            try:
                chunk = self._stream.read(max(READ_SIZE, need - len(buf)))
            except (OSError, EOFError, zlib.error) as exc:
                # Damaged compression: what was decompressed so far still counts.
                chunk, self._read_error = b"", exc
            if not chunk:
                self._eof = True
            buf += chunk
        self._buf = buf
        return 0

    def _end_damage(self, pos: int, what: str) -> _Damaged:
        if self._read_error is not None:
            exc = self._read_error
            return _Damaged(self._base + pos, f"unreadable ({type(exc).__name__}: {exc})")
        self.stats.truncated_file = 1
        return _Damaged(self._base + pos, f"truncated {what} ({len(self._buf) - pos} bytes at end of file)")

    def _take(self) -> FrameBatch:
        out, self._out = self._out, FrameBatch()
        return out

    def _run(self) -> Iterator[FrameBatch]:
        try:
            self._fill(0, 4)
            head = self._buf[:4]
            if head in PCAP_MAGICS:
                self.format = "pcap"
                body = self._pcap(head)
            elif head == PCAPNG_SHB:
                self.format = "pcapng"
                body = self._pcapng()
            elif not self._buf:
                raise self._read_error_or(_Damaged(0, "empty file"))
            else:
                raise self._read_error_or(_Damaged(0, f"not a pcap or pcapng file (magic {head.hex()})"))
            yield from body
        except _Damaged as exc:
            self.damage = CaptureDamage(self.path, exc.offset, exc.reason)
        self._close_flows()
        if self._out:
            yield self._take()

    def _read_error_or(self, damage: _Damaged) -> _Damaged:
        if self._read_error is not None:
            exc = self._read_error
            return _Damaged(0, f"unreadable ({type(exc).__name__}: {exc})")
        return damage

    def _pcap(self, magic: bytes) -> Iterator[FrameBatch]:
        order, ns_per_unit = PCAP_MAGICS[magic]
        pos = self._fill(0, 24)
        if len(self._buf) < 24:
            raise self._end_damage(0, "file header")
        snaplen, network = struct.unpack_from(order + "II", self._buf, 16)
        link = network & 0xFFFF  # the upper bits may say how long an FCS is
        limit = min(max(snaplen, MAX_PACKET), MAX_BLOCK)
        record = struct.Struct(order + "IIII")
        unpack_from = record.unpack_from
        packet = self._packet
        stats = self.stats
        batch_size = self.batch_size
        pos = 24
        buf = self._buf
        n = len(buf)
        while True:
            if n - pos < 16:
                pos = self._fill(pos, 16)
                buf = self._buf
                n = len(buf)
                if n < 16:
                    if n:
                        raise self._end_damage(0, "record header")
                    if self._read_error is not None:
                        raise self._end_damage(0, "record")
                    return
            sec, frac, incl, _orig = unpack_from(buf, pos)
            if incl > limit:
                raise _Damaged(self._base + pos, f"record of {incl} bytes exceeds the limit of {limit} "
                                                 f"bytes (corrupt record header)")
            end = pos + 16 + incl
            if end > n:
                pos = self._fill(pos, 16 + incl)
                buf = self._buf
                n = len(buf)
                end = 16 + incl
                if end > n:
                    raise self._end_damage(0, f"record ({incl} bytes announced)")
            stats.packets += 1
            nsec = frac * ns_per_unit
            if nsec >= 1_000_000_000:
                sec, nsec = sec + nsec // 1_000_000_000, nsec % 1_000_000_000
            packet(link, buf[pos + 16 : end], sec, nsec)
            pos = end
            if len(self._out) >= batch_size:
                yield self._take()

    def _pcapng(self) -> Iterator[FrameBatch]:
        pos = 0
        order = "<"
        interfaces: list[tuple[int, int, int, int, int]] = []  # link, units/s, shift or 0, offset s, snaplen
        stats = self.stats
        batch_size = self.batch_size
        u32 = struct.Struct("<I")
        while True:
            buf = self._buf
            if len(buf) - pos < 12:
                pos = self._fill(pos, 12)
                buf = self._buf
                if len(buf) < 12:
                    if buf:
                        raise self._end_damage(0, "block header")
                    if self._read_error is not None:
                        raise self._end_damage(0, "block")
                    return
            if buf[pos : pos + 4] == PCAPNG_SHB:
                bom = buf[pos + 8 : pos + 12]
                if bom == b"\x4d\x3c\x2b\x1a":
                    order = "<"
                elif bom == b"\x1a\x2b\x3c\x4d":
                    order = ">"
                else:
                    raise _Damaged(self._base + pos, f"bad section header byte-order magic {bom.hex()}")
                u32 = struct.Struct(order + "I")
                interfaces = []  # interface numbers restart with each section
            (btype,) = u32.unpack_from(buf, pos)
            (blen,) = u32.unpack_from(buf, pos + 4)
            if blen < 12 or blen % 4:
                raise _Damaged(self._base + pos, f"bad block length {blen}")
            if blen > MAX_BLOCK:
                raise _Damaged(self._base + pos, f"block of {blen} bytes exceeds the limit of {MAX_BLOCK} bytes")
            if len(buf) - pos < blen:
                pos = self._fill(pos, blen)
                buf = self._buf
                if len(buf) < blen:
                    raise self._end_damage(0, f"block ({blen} bytes announced)")
            if u32.unpack_from(buf, pos + blen - 4)[0] != blen:
                raise _Damaged(self._base + pos, f"block length {blen} does not match its trailing copy")
            body = buf[pos + 8 : pos + blen - 4]
            start = self._base + pos
            pos += blen
            if btype == 6:  # enhanced packet block
                if len(body) < 20:
                    raise _Damaged(start, "enhanced packet block too short")
                iface, high, low, caplen, _orig = struct.unpack_from(order + "IIIII", body)
                self._pcapng_packet(interfaces, iface, (high << 32) | low, body[20 : 20 + caplen], caplen)
            elif btype == 3:  # simple packet block: interface 0, no time of its own
                if len(body) < 4:
                    raise _Damaged(start, "simple packet block too short")
                stats.packets += 1
                if not interfaces:
                    stats.unsupported_link += 1
                else:
                    (orig,) = u32.unpack_from(body)
                    link, _units, _shift, _offset, snaplen = interfaces[0]
                    data = body[4:]
                    caplen = min(orig, snaplen) if snaplen else orig
                    self._packet(link, data[:caplen], *self._last_time)
            elif btype == 2:  # obsolete packet block
                if len(body) < 20:
                    raise _Damaged(start, "packet block too short")
                iface, _drops, high, low, caplen, _orig = struct.unpack_from(order + "HHIIII", body)
                self._pcapng_packet(interfaces, iface, (high << 32) | low, body[20 : 20 + caplen], caplen)
            elif btype == 1:  # interface description block
                if len(body) < 8:
                    raise _Damaged(start, "interface description block too short")
                interfaces.append(self._interface(order, body))
            elif btype != _SHB_TYPE:
                stats.skipped_blocks += 1
            if len(self._out) >= batch_size:
                yield self._take()

    _last_time = (0, 0)

    def _pcapng_packet(self, interfaces, iface: int, ts: int, data: bytes, caplen: int) -> None:
        stats = self.stats
        stats.packets += 1
        if iface >= len(interfaces):
            stats.unsupported_link += 1  # an interface the section never described
            return
        if len(data) < caplen:
            stats.malformed += 1  # a captured length past the end of its block
            return
        link, units, shift, offset, _snaplen = interfaces[iface]
        if shift:
            sec, nsec = ts >> shift, ((ts & ((1 << shift) - 1)) * 1_000_000_000) >> shift
        else:
            sec, frac = divmod(ts, units)
            nsec = frac * 1_000_000_000 // units
        sec += offset
        if sec < 0:
            sec, nsec = 0, 0
        self._last_time = (sec, nsec)
        self._packet(link, data, sec, nsec)

    @staticmethod
    def _interface(order: str, body: bytes) -> tuple[int, int, int, int, int]:
        link, _reserved, snaplen = struct.unpack_from(order + "HHI", body)
        units, shift, offset = 1_000_000, 0, 0  # default resolution: microseconds
        pos = 8
        option = struct.Struct(order + "HH")
        while pos + 4 <= len(body):
            code, length = option.unpack_from(body, pos)
            value = body[pos + 4 : pos + 4 + length]
            if code == 0:
                break
            if code == 9 and length >= 1:  # if_tsresol
                resol = value[0]
                if resol & 0x80:
                    units, shift = 1 << (resol & 0x7F), resol & 0x7F
                else:
                    units, shift = 10 ** min(resol, 30), 0
            elif code == 14 and length >= 8:  # if_tsoffset, seconds
                (offset,) = struct.unpack_from(order + "q", value)
            pos += 4 + ((length + 3) & ~3)
        return link, units, shift, offset, snaplen

    # ------------------------------------------------------------------ packet layer

    def _packet(self, link: int, data: bytes, sec: int, nsec: int) -> None:
        try:
            self._decode(link, data, sec, nsec)
        except (IndexError, struct.error):  # a header cut short that a check missed
            self.stats.malformed += 1

    def _decode(self, link: int, data: bytes, sec: int, nsec: int) -> None:
        stats = self.stats
        if link == _ETHERNET:
            if len(data) < 14:
                stats.malformed += 1
                return
            etype = data[12] << 8 | data[13]
            off = 14
        elif link == _RAW or link == _NULL or link == _LOOP or link == _IPV4 or link == _IPV6:
            off = 4 if link == _NULL or link == _LOOP else 0
            if len(data) <= off:
                stats.malformed += 1
                return
            version = data[off] >> 4
            etype = _ETH_IPV4 if version == 4 else _ETH_IPV6 if version == 6 else 0
        elif link == _SLL:
            if len(data) < 16:
                stats.malformed += 1
                return
            etype = data[14] << 8 | data[15]
            off = 16
        elif link == _SLL2:
            if len(data) < 20:
                stats.malformed += 1
                return
            etype = data[0] << 8 | data[1]
            off = 20
        else:
            stats.unsupported_link += 1
            return
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
            if (data[off + 6] << 8 | data[off + 7]) & 0x3FFF:  # more fragments, or an offset
                stats.fragments += 1
                return
            proto = data[off + 9]
            src = data[off + 12 : off + 16]
            dst = data[off + 16 : off + 20]
            family = 1
            pos = off + ihl
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
                    if (data[pos + 2] << 8 | data[pos + 3]) & 0xFFF9:  # offset or more-fragments
                        stats.fragments += 1
                        return
                    size = 8  # an atomic fragment: the whole packet is here
                elif proto == _IPV6_AH:
                    size = (data[pos + 1] + 2) * 4
                else:
                    size = (data[pos + 1] + 1) * 8
                proto = data[pos]
                pos += size
        else:
            stats.non_ip += 1
            return
        if proto == _UDP:
            if end - pos < 8:
                stats.malformed += 1
                return
            sport, dport = _U16_PAIR.unpack_from(data, pos)
            ports = self.dns_ports
            if sport not in ports and dport not in ports:
                stats.non_dns += 1
                return
            ulen = data[pos + 4] << 8 | data[pos + 5]
            if ulen < 8 or pos + ulen > end:
                if ulen == 0 and family == 2:  # a jumbogram's UDP length
                    ulen = end - pos
                else:
                    stats.malformed += 1
                    return
            self._dns(data[pos + 8 : pos + ulen], family, 1, src, sport, dst, dport, sec, nsec)
        elif proto == _TCP:
            if end - pos < 20:
                stats.malformed += 1
                return
            sport, dport = _U16_PAIR.unpack_from(data, pos)
            ports = self.dns_ports
            if sport not in ports and dport not in ports:
                stats.non_dns += 1
                return
            (seq,) = _U32.unpack_from(data, pos + 4)
            doff = (data[pos + 12] >> 4) * 4
            if doff < 20 or pos + doff > end:
                stats.malformed += 1
                return
            self._tcp(family, src, sport, dst, dport, seq, data[pos + 13], data[pos + doff : end], sec, nsec)
        else:
            stats.non_dns += 1

    # ------------------------------------------------------------------ TCP

    def _tcp(self, family, src, sport, dst, dport, seq, flags, payload, sec, nsec) -> None:
        stats = self.stats
        flows = self._flows
        now = sec + nsec * 1e-9
        if now >= self._sweep_at:
            self._expire(now)
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
        if flow is None:
            if not payload and not flags & _SYN:
                return  # an ACK or FIN of a flow we know nothing of
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
            if held is None or len(held) < len(payload):
                pending[seq] = payload
            return len(flow.buf) + sum(map(len, pending.values())) <= self.max_flow_buffer
        data = flow.buf + payload if flow.buf else payload
        flow.next = (flow.next + len(payload)) & _SEQ_MASK
        pending = flow.pending
        while pending:
            progressed = False
            for start in list(pending):
                gap = (start - flow.next) & _SEQ_MASK
                if gap >= 0x80000000:
                    gap -= 0x100000000
                if gap <= 0:
                    held = pending.pop(start)
                    if gap + len(held) > 0:
                        data += held[-gap:] if gap else held
                        flow.next = (flow.next + len(held) + gap) & _SEQ_MASK
                        progressed = True
            if not progressed:
                break
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
        held = len(flow.buf)
        if flow.pending:
            held += sum(map(len, flow.pending.values()))
        return held <= self.max_flow_buffer

    def _expire(self, now: float) -> None:
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

    def _close_flows(self) -> None:
        for flow in self._flows.values():
            if flow.buf or flow.pending:
                self.stats.tcp_incomplete += 1
        self._flows.clear()

    # ------------------------------------------------------------------ dnstap

    def _dns(self, wire: bytes, family, proto, src, sport, dst, dport, sec, nsec) -> None:
        stats = self.stats
        if len(wire) < 12:
            stats.malformed += 1
            return
        alen = b"\x04" if family == 1 else b"\x10"
        if wire[2] & 0x80:
            stats.responses += 1
            # The client is the destination of a response.
            body = b"".join((
                _HEADS[_CLIENT_RESPONSE, family, proto],
                b"\x22", alen, dst, b"\x2a", alen, src,
                b"\x30", varint(dport), b"\x38", varint(sport),
                b"\x60", varint(sec), b"\x6d", _NSEC.pack(nsec),
                b"\x72", varint(len(wire)), wire,
            ))
        else:
            stats.queries += 1
            body = b"".join((
                _HEADS[_CLIENT_QUERY, family, proto],
                b"\x22", alen, src, b"\x2a", alen, dst,
                b"\x30", varint(sport), b"\x38", varint(dport),
                b"\x40", varint(sec), b"\x4d", _NSEC.pack(nsec),
                b"\x52", varint(len(wire)), wire,
            ))
        stats.dns_messages += 1
        self._out.append(b"".join((self._prefix, b"\x72", varint(len(body)), body, _DNSTAP_TAIL)))


def read_pcap(
    stream: BinaryIO | bytes,
    path: str = "<pcap>",
    *,
    dns_ports: frozenset[int] | set[int] = DEFAULT_DNS_PORTS,
    identity: bytes | str | None = b"pcap",
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_flows: int = DEFAULT_MAX_FLOWS,
    max_flow_buffer: int = DEFAULT_MAX_FLOW_BUFFER,
    flow_timeout: float = DEFAULT_FLOW_TIMEOUT,
) -> PcapReader:
    """Batches of dnstap frames of the pcap/pcapng file in ``stream`` (a
    binary file object, e.g. from core.capture.open_capture, or bytes); see
    :class:`PcapReader`."""
    if isinstance(stream, (bytes, bytearray, memoryview)):
        stream = io.BytesIO(bytes(stream))
    return PcapReader(
        stream, path, dns_ports=dns_ports, identity=identity, batch_size=batch_size,
        max_flows=max_flows, max_flow_buffer=max_flow_buffer, flow_timeout=flow_timeout,
    )
