"""pcap and pcapng files of DNS traffic turned into dnstap messages, no engine.

``read_pcap(stream, path)`` reads a classic pcap file (either byte order,
microsecond or nanosecond magic) or a pcapng file (sections of either byte
order; interfaces with their link type, ``if_tsresol`` and ``if_tsoffset``;
enhanced, simple and obsolete packet blocks; other blocks skipped) and yields
``FrameBatch`` lists of dnstap protobuf frames, one CLIENT_QUERY or
CLIENT_RESPONSE per DNS message, so the rest of the pipeline
(core.message.decode...) is the same as for a Frame Streams capture. The
caller opens the file: ``core.capture.open_capture`` decompresses gzip.

Packets are decoded by core.packets.PacketDecoder (link types, IPv4/IPv6,
UDP, TCP reassembly with bounded flow state, the dnstap fields: see there);
this module is the file layer. Every message is a CLIENT_QUERY or
CLIENT_RESPONSE (by its QR bit) to or from one of ``dns_ports``, with the
packet's time (nanosecond exact when the file is). Every skip, eviction and
drop is counted in ``reader.stats``.

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
from dataclasses import dataclass
from typing import BinaryIO

from core.batches import FrameBatch
from core.capture import DEFAULT_BATCH_SIZE, CaptureDamage, Damaged
from core.packets import (
    DEFAULT_DNS_PORTS,
    DEFAULT_FLOW_TIMEOUT,
    DEFAULT_MAX_FLOW_BUFFER,
    DEFAULT_MAX_FLOWS,
    PacketDecoder,
    PacketStats,
)

__all__ = [
    "PcapReader",
    "PcapStats",
    "is_pcap",
    "read_pcap",
]

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


def is_pcap(head: bytes) -> bool:
    """Whether ``head`` (the first 4 bytes of a file, uncompressed) starts a pcap or pcapng file."""
    return head[:4] in PCAP_MAGICS or head[:4] == PCAPNG_SHB


@dataclass
class PcapStats(PacketStats):
    """What a reader saw: the decoder's counters and the file's own."""

    skipped_blocks: int = 0  # pcapng blocks other than SHB/IDB/EPB/SPB/PB
    truncated_file: int = 0  # 1 when the file ends inside a record


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
        self.path = path
        self.batch_size = batch_size
        self.stats = PcapStats()
        self.decoder = PacketDecoder(
            dns_ports=dns_ports, identity=identity, max_flows=max_flows,
            max_flow_buffer=max_flow_buffer, flow_timeout=flow_timeout, stats=self.stats,
        )
        self.damage: CaptureDamage | None = None
        self.format: str | None = None
        self._stream = stream
        self._buf = b""
        self._base = 0  # file offset of self._buf[0]
        self._eof = False
        self._read_error: BaseException | None = None
        self._last_time = (0, 0)  # of the last timed packet: a simple packet block has none of its own
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

    def _end_damage(self, pos: int, what: str) -> Damaged:
        if self._read_error is not None:
            return Damaged.unreadable(self._base + pos, self._read_error)
        self.stats.truncated_file = 1
        return Damaged(self._base + pos, f"truncated {what} ({len(self._buf) - pos} bytes at end of file)")

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
                raise self._read_error_or(Damaged(0, "empty file"))
            else:
                raise self._read_error_or(Damaged(0, f"not a pcap or pcapng file (magic {head.hex()})"))
            yield from body
        except Damaged as exc:
            self.damage = CaptureDamage(self.path, exc.offset, exc.reason)
        self.decoder.close()
        if self.decoder.out:
            yield self.decoder.take()

    def _read_error_or(self, damage: Damaged) -> Damaged:
        if self._read_error is not None:
            return Damaged.unreadable(0, self._read_error)
        return damage

    def _pcap(self, magic: bytes) -> Iterator[FrameBatch]:
        order, ns_per_unit = PCAP_MAGICS[magic]
        self._fill(0, 24)
        if len(self._buf) < 24:
            raise self._end_damage(0, "file header")
        snaplen, network = struct.unpack_from(order + "II", self._buf, 16)
        link = network & 0xFFFF  # the upper bits may say how long an FCS is
        limit = min(max(snaplen, MAX_PACKET), MAX_BLOCK)
        record = struct.Struct(order + "IIII")
        unpack_from = record.unpack_from
        decoder = self.decoder
        packet = decoder.packet
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
                raise Damaged(self._base + pos, f"record of {incl} bytes exceeds the limit of {limit} "
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
            if len(decoder.out) >= batch_size:
                yield decoder.take()

    def _pcapng(self) -> Iterator[FrameBatch]:
        pos = 0
        order = "<"
        interfaces: list[tuple[int, int, int, int, int]] = []  # link, units/s, shift or 0, offset s, snaplen
        stats = self.stats
        decoder = self.decoder
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
                    raise Damaged(self._base + pos, f"bad section header byte-order magic {bom.hex()}")
                u32 = struct.Struct(order + "I")
                interfaces = []  # interface numbers restart with each section
            (btype,) = u32.unpack_from(buf, pos)
            (blen,) = u32.unpack_from(buf, pos + 4)
            if blen < 12 or blen % 4:
                raise Damaged(self._base + pos, f"bad block length {blen}")
            if blen > MAX_BLOCK:
                raise Damaged(self._base + pos, f"block of {blen} bytes exceeds the limit of {MAX_BLOCK} bytes")
            if len(buf) - pos < blen:
                pos = self._fill(pos, blen)
                buf = self._buf
                if len(buf) < blen:
                    raise self._end_damage(0, f"block ({blen} bytes announced)")
            if u32.unpack_from(buf, pos + blen - 4)[0] != blen:
                raise Damaged(self._base + pos, f"block length {blen} does not match its trailing copy")
            body = buf[pos + 8 : pos + blen - 4]
            start = self._base + pos
            pos += blen
            if btype == 6:  # enhanced packet block
                if len(body) < 20:
                    raise Damaged(start, "enhanced packet block too short")
                iface, high, low, caplen, _orig = struct.unpack_from(order + "IIIII", body)
                self._pcapng_packet(interfaces, iface, (high << 32) | low, body[20 : 20 + caplen], caplen)
            elif btype == 3:  # simple packet block: interface 0, no time of its own
                if len(body) < 4:
                    raise Damaged(start, "simple packet block too short")
                stats.packets += 1
                if not interfaces:
                    stats.unsupported_link += 1
                else:
                    (orig,) = u32.unpack_from(body)
                    link, _units, _shift, _offset, snaplen = interfaces[0]
                    data = body[4:]
                    caplen = min(orig, snaplen) if snaplen else orig
                    decoder.packet(link, data[:caplen], *self._last_time)
            elif btype == 2:  # obsolete packet block
                if len(body) < 20:
                    raise Damaged(start, "packet block too short")
                iface, _drops, high, low, caplen, _orig = struct.unpack_from(order + "HHIIII", body)
                self._pcapng_packet(interfaces, iface, (high << 32) | low, body[20 : 20 + caplen], caplen)
            elif btype == 1:  # interface description block
                if len(body) < 8:
                    raise Damaged(start, "interface description block too short")
                interfaces.append(self._interface(order, body, start))
            elif btype != _SHB_TYPE:
                stats.skipped_blocks += 1
            if len(decoder.out) >= batch_size:
                yield decoder.take()

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
        self.decoder.packet(link, data, sec, nsec)

    @staticmethod
    def _interface(order: str, body: bytes, start: int) -> tuple[int, int, int, int, int]:
        link, _reserved, snaplen = struct.unpack_from(order + "HHI", body)
        units, shift, offset = 1_000_000, 0, 0  # default resolution: microseconds
        pos = 8
        option = struct.Struct(order + "HH")
        while pos + 4 <= len(body):
            code, length = option.unpack_from(body, pos)
            if code == 0:
                break
            if pos + 4 + length > len(body):
                raise Damaged(start, f"interface description block option {code} of {length} bytes "
                                     f"runs past the end of the block")
            value = body[pos + 4 : pos + 4 + length]
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
