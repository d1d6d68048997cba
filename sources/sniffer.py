"""The sniffer input: DNS traffic captured from a network interface, as dnstap messages.

A feeder of the ListenerHub (see sources/listener.py, ``HubSpec.feeders``):
:meth:`SnifferSpec.open` opens a Linux ``AF_PACKET`` socket with a
``TPACKET_V3`` receive ring mapped into this process (it needs CAP_NET_RAW;
without it, or for an interface that does not exist, it raises ConfigError
and the receiver exits 2) and starts a capture thread. The kernel writes
packets into the ring in blocks, each packet with its receive time in
nanoseconds; the thread walks the blocks without a system call per packet,
decodes each packet with core.packets.PacketDecoder (Ethernet and the
loopback interface's framing, VLAN tags, IPv4/IPv6, UDP, TCP reassembled per
flow and split on the length prefix) and hands the dnstap frames to the hub
every ``FLUSH_INTERVAL`` or ``batch_size`` frames with
``hub.feed_threadsafe``. The ring reads about 1.8x the packets per CPU second
of one ``recvmsg`` per packet (which also costs an ``ioctl`` per packet in
Python to name the interface) and its 32 MiB absorb bursts.

Direction: with ``eth-ip`` (our addresses) a query to one of them is a
CLIENT_QUERY and the answer from it a CLIENT_RESPONSE; our own resolver's
queries to other servers are RESOLVER_* or FORWARDER_* (4.7.0's
``resolver-*`` / ``forwarder-*`` keys); without ``eth-ip`` every message is a
CLIENT_* one, by its QR bit.

A classic BPF filter on the socket lets only IPv4/IPv6 UDP/TCP packets to or
from a DNS port reach Python (plus IP fragments, VLAN-tagged frames and IPv6
extension headers, which the decoder sorts out; Ethernet, loopback and raw IP
links such as tun or WireGuard are filtered, other link types pass whole),
and drops the outgoing copy of every loopback packet (the kernel shows each
packet on ``lo`` twice: sent, then received), so on one interface each
message is seen once. Without ``eth-name`` (every interface) a message that
crosses several interfaces of this host (a bridge and its ports, a veth pair,
a VLAN or bond and its members, a tunnel and the link under it) is captured
once on each: name the interface the DNS traffic arrives on. Packets the ring
had no room for are counted from ``PACKET_STATISTICS`` (``kernel_drops``) and
logged. The bound interface going down (or being deleted) is logged once and
the capture waits: it resumes when the interface is up again, or once an
interface of that name exists again (it is bound anew). Counters (``stats``,
registered as the ``input.sniffer`` counter group): packets, dns_messages,
non_dns, malformed, fragments, fragments_reassembled, kernel_drops,
flows_expired... TCP flow state and fragments held for reassembly are
bounded and expire.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import ipaddress
import logging
import mmap
import os
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass

from core import counters
from core.errors import ConfigError
from core.packets import (
    ALL_MESSAGE_TYPES,
    CLIENT_QUERY,
    CLIENT_RESPONSE,
    FORWARDER_QUERY,
    FORWARDER_RESPONSE,
    LINK_ETHERNET,
    LINK_RAW,
    RESOLVER_QUERY,
    RESOLVER_RESPONSE,
    PacketDecoder,
    PacketStats,
)

__all__ = ["SnifferSpec", "SnifferStats", "attach_filter", "bpf_filter", "open_socket", "sniffer_spec"]

log = logging.getLogger("dnstap_receiver.input")

FLUSH_INTERVAL = 0.05  # seconds between hand-overs to the hub
POLL_MS = 50
RING_BLOCK = 1 << 20  # bytes; a block holds many packets, or one of up to 1 MiB
RING_BLOCKS = 32
RING_RETIRE_MS = 10  # a block not full is handed to us after this long
KERNEL_DROP_LOG_EVERY = 60.0
REBIND_EVERY = 1.0  # seconds between looks for a deleted interface's successor

_ETH_P_ALL = 0x0003
_SOL_PACKET = 263
_PACKET_RX_RING, _PACKET_STATISTICS, _PACKET_VERSION, _TPACKET_V3 = 5, 6, 10, 2
_TP_STATUS_USER = 1
_SO_ATTACH_FILTER = 26
_PACKET_OUTGOING = 4
_ARPHRD_ETHER, _ARPHRD_LOOPBACK, _ARPHRD_RAWIP, _ARPHRD_NONE = 1, 772, 519, 0xFFFE
# Hardware type of the receiving interface -> framing of the captured bytes.
_LINKS = {_ARPHRD_ETHER: LINK_ETHERNET, _ARPHRD_LOOPBACK: LINK_ETHERNET,
          _ARPHRD_RAWIP: LINK_RAW, _ARPHRD_NONE: LINK_RAW}
_UNKNOWN_LINK = -1
_REQ3 = struct.Struct("@7I")  # struct tpacket_req3
_BLOCK_HEAD = struct.Struct("@3I")  # tpacket_hdr_v1: block_status, num_pkts, offset_to_first_pkt
_PACKET_HEAD = struct.Struct("@6IH")  # tpacket3_hdr: next_offset, sec, nsec, snaplen, len, status, mac
_HATYPE_OFFSET = 48 + 8  # TPACKET_ALIGN(sizeof tpacket3_hdr) + offsetof(sockaddr_ll, sll_hatype)
_HATYPE = struct.Struct("@H")
_TPACKET_STATS = struct.Struct("@III")  # tpacket_stats_v3


@dataclass
class SnifferStats(PacketStats):
    """The decoder's counters plus the socket's."""

    kernel_drops: int = 0  # packets the ring had no room for


@dataclass(frozen=True)
class SnifferSpec:
    """``input.sniffer`` as the hub's feeder. ``interface`` None captures on
    every interface; ``local_ips`` are our addresses (``eth-ip``)."""

    interface: str | None = None
    local_ips: tuple[str, ...] = ()
    dns_ports: tuple[int, ...] = (53,)
    identity: str = "sniffer"
    message_types: tuple[int, ...] = tuple(sorted(ALL_MESSAGE_TYPES))

    async def open(self, hub) -> _Capture:
        sock, ring = open_socket(self)
        capture = _Capture(self, hub, sock, ring)
        capture.start()
        return capture

    def decoder(self, stats: PacketStats | None = None) -> PacketDecoder:
        local = frozenset(ipaddress.ip_address(ip).packed for ip in self.local_ips) or None
        return PacketDecoder(
            dns_ports=frozenset(self.dns_ports), identity=self.identity, local_ips=local,
            message_types=frozenset(self.message_types), stats=stats,
        )


def sniffer_spec(options) -> SnifferSpec:
    """The feeder for ``options`` (pipeline.config.SnifferInput)."""
    wanted = {
        CLIENT_QUERY: options.record_client_query,
        CLIENT_RESPONSE: options.record_client_response,
        RESOLVER_QUERY: options.resolver_query_support,
        RESOLVER_RESPONSE: options.resolver_response_support,
        FORWARDER_QUERY: options.forwarder_query_support,
        FORWARDER_RESPONSE: options.forwarder_response_support,
    }
    return SnifferSpec(
        interface=options.eth_name,
        local_ips=tuple(options.eth_ip),
        dns_ports=tuple(options.dns_port),
        identity=options.dnstap_identity,
        message_types=tuple(mtype for mtype, on in sorted(wanted.items()) if on),
    )


def open_socket(spec: SnifferSpec) -> tuple[socket.socket, mmap.mmap]:
    """The packet socket of ``spec`` (filtered, bound) and its mapped ring;
    ConfigError when they cannot be had (no CAP_NET_RAW, no such interface)."""
    where = spec.interface or "all interfaces"
    try:
        program = bpf_filter(spec.dns_ports)
    except ValueError as exc:
        raise ConfigError(f"input.sniffer.dns-port: {exc}") from None
    try:
        # Bound to one interface, protocol 0 receives nothing until bind(): the
        # filter and the ring are in place first. Every interface cannot be bound to.
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0 if spec.interface else socket.htons(_ETH_P_ALL))
    except PermissionError as exc:
        raise ConfigError(
            f"input.sniffer: cannot open a raw socket on {where} ({exc.strerror}): capturing needs the "
            f"CAP_NET_RAW capability (run as root, or grant it: setcap cap_net_raw+ep on the Python "
            f"binary, AmbientCapabilities=CAP_NET_RAW in a systemd unit)"
        ) from None
    except OSError as exc:
        raise ConfigError(f"input.sniffer: cannot open a raw socket on {where}: {exc.strerror or exc}") from None
    ring = None
    try:
        sock.setsockopt(_SOL_PACKET, _PACKET_VERSION, _TPACKET_V3)
        attach_filter(sock, program)
        frame = 2048  # V3 packs packets of any size in a block; the kernel only checks this
        sock.setsockopt(_SOL_PACKET, _PACKET_RX_RING, _REQ3.pack(
            RING_BLOCK, RING_BLOCKS, frame, RING_BLOCK // frame * RING_BLOCKS, RING_RETIRE_MS, 0, 0))
        ring = mmap.mmap(sock.fileno(), RING_BLOCK * RING_BLOCKS, mmap.MAP_SHARED,
                         mmap.PROT_READ | mmap.PROT_WRITE)
        if spec.interface:
            sock.bind((spec.interface, _ETH_P_ALL))
    except OSError as exc:
        if ring is not None:
            ring.close()
        sock.close()
        if exc.errno == errno.ENODEV:
            raise ConfigError(f"input.sniffer.eth-name: no such network interface: {spec.interface}") from None
        raise ConfigError(f"input.sniffer: cannot capture on {where}: {exc.strerror or exc}") from None
    return sock, ring


# ---------------------------------------------------------------------- BPF

_LDH, _LDB, _LDW = 0x28, 0x30, 0x20  # ld{h,b,} [k]
_LDH_IND = 0x48  # ldh [x + k]
_LDXB_MSH = 0xB1  # ldx 4 * ([k] & 0xf)
_JEQ, _JSET, _JA = 0x15, 0x45, 0x05
_AND = 0x54  # and #k
_RET = 0x06
_SKF_AD_PKTTYPE, _SKF_AD_HATYPE = 0xFFFFF000 + 4, 0xFFFFF000 + 28
_SNAP = 0x40000  # bytes kept of an accepted packet: all of it
_IPV6_NEXT_HEADERS = (0, 43, 44, 51, 60, 135, 139, 140)  # extension headers: Python walks them


def bpf_filter(dns_ports) -> list[tuple[int, int, int, int]]:
    """A classic BPF program (code, jt, jf, k) that keeps, of Ethernet-framed
    packets (Ethernet and loopback interfaces) and raw IP packets (tun,
    WireGuard), the IPv4/IPv6 UDP/TCP packets to or from one of
    ``dns_ports``, IP fragments (reassembled by the decoder), VLAN-tagged frames
    and IPv6 packets with extension headers (both sorted out by the decoder);
    drops the outgoing copy of each loopback packet; keeps every packet of
    other link types (the decoder reads or counts them). ValueError for more
    ports than its 8-bit jumps can reach."""
    ports = sorted(set(dns_ports))
    prog: list = []  # (code, jt, jf, k), jt/jf a label name or 0 (next)
    labels: dict[str, int] = {}
    accept, drop = (_RET, 0, 0, _SNAP), (_RET, 0, 0, 0)

    def label(name: str) -> None:
        labels[name] = len(prog)

    def match_ports(load: int, base: int, name: str) -> None:
        # Its own accept right after: jumps stay short.
        for src_dst in (0, 2):
            prog.append((load, 0, 0, base + src_dst))
            for port in ports:
                prog.append((_JEQ, name, 0, port))
        prog.append(drop)
        label(name)
        prog.append(accept)

    def match_ip(l3: str, base: int) -> None:
        # The IPv4 and IPv6 headers at ``base``, labels ``l3``-ipv4 and ``l3``-ipv6.
        label(f"{l3}-ipv4")
        prog.append((_LDB, 0, 0, base + 9))
        prog.append((_JEQ, f"{l3}-ipv4-l4", 0, 17))
        prog.append((_JEQ, f"{l3}-ipv4-l4", 0, 6))
        prog.append(drop)
        label(f"{l3}-ipv4-l4")
        prog.append((_LDH, 0, 0, base + 6))
        prog.append((_JSET, 0, f"{l3}-ipv4-ports", 0x1FFF))  # a later fragment: no ports to look at
        prog.append(accept)
        label(f"{l3}-ipv4-ports")
        prog.append((_LDXB_MSH, 0, 0, base))
        match_ports(_LDH_IND, base, f"{l3}-ipv4-dns")
        label(f"{l3}-ipv6")
        prog.append((_LDB, 0, 0, base + 6))
        prog.append((_JEQ, f"{l3}-ipv6-l4", 0, 17))
        prog.append((_JEQ, f"{l3}-ipv6-l4", 0, 6))
        for header in _IPV6_NEXT_HEADERS:
            prog.append((_JEQ, f"{l3}-ipv6-ext", 0, header))
        prog.append(drop)
        label(f"{l3}-ipv6-ext")
        prog.append(accept)
        label(f"{l3}-ipv6-l4")
        match_ports(_LDH, base + 40, f"{l3}-ipv6-dns")

    prog.append((_LDW, 0, 0, _SKF_AD_HATYPE))
    prog.append((_JEQ, "loopback", 0, _ARPHRD_LOOPBACK))
    prog.append((_JEQ, "ethernet", 0, _ARPHRD_ETHER))
    prog.append((_JEQ, "to-raw", 0, _ARPHRD_RAWIP))
    prog.append((_JEQ, "to-raw", 0, _ARPHRD_NONE))
    prog.append(accept)
    label("to-raw")
    prog.append((_JA, 0, 0, "raw"))  # past the Ethernet part: further than a conditional jump reaches
    label("loopback")
    prog.append((_LDW, 0, 0, _SKF_AD_PKTTYPE))
    prog.append((_JEQ, 0, "ethernet", _PACKET_OUTGOING))
    prog.append(drop)
    label("ethernet")
    prog.append((_LDH, 0, 0, 12))
    prog.append((_JEQ, "eth-ipv4", 0, 0x0800))
    prog.append((_JEQ, "eth-ipv6", 0, 0x86DD))
    for vlan in (0x8100, 0x88A8, 0x9100):
        prog.append((_JEQ, "vlan", 0, vlan))
    prog.append(drop)
    label("vlan")
    prog.append(accept)
    match_ip("eth", 14)
    label("raw")
    prog.append((_LDB, 0, 0, 0))
    prog.append((_AND, 0, 0, 0xF0))  # the IP version
    prog.append((_JEQ, "raw-ipv4", 0, 0x40))
    prog.append((_JEQ, "raw-ipv6", 0, 0x60))
    prog.append(drop)
    match_ip("raw", 0)
    out = []
    for i, (code, jt, jf, k) in enumerate(prog):
        jumps = []
        for target in (jt, jf):
            delta = labels[target] - i - 1 if isinstance(target, str) else target
            if not 0 <= delta <= 255:
                raise ValueError(f"too many ports for the capture filter ({len(ports)}; at most 100)")
            jumps.append(delta)
        out.append((code, jumps[0], jumps[1], labels[k] - i - 1 if isinstance(k, str) else k))
    return out


def attach_filter(sock: socket.socket, program: list[tuple[int, int, int, int]]) -> None:
    """SO_ATTACH_FILTER ``program`` (from :func:`bpf_filter`) to ``sock``."""
    code = b"".join(struct.pack("@HBBI", *ins) for ins in program)
    buf = ctypes.create_string_buffer(code, len(code))
    fprog = struct.pack("@HL", len(program), ctypes.addressof(buf))  # struct sock_fprog
    sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, fprog)


# ---------------------------------------------------------------------- capture thread


def _index(interface: str | None) -> int:
    """The index of ``interface``, 0 for none or one that does not exist."""
    try:
        return socket.if_nametoindex(interface) if interface else 0
    except OSError:
        return 0


class _Capture:
    """The running capture: its thread, socket, ring, decoder and counters."""

    def __init__(self, spec: SnifferSpec, hub, sock: socket.socket, ring: mmap.mmap) -> None:
        self.spec = spec
        self.hub = hub
        self.sock = sock
        self.ring = ring
        self.stats = SnifferStats()
        self.decoder = spec.decoder(self.stats)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dnstap-sniffer", daemon=True)
        self._next_drop_log = 0.0
        self._drops_logged = 0
        self._down: str | None = None  # the socket error that stopped the capture, as logged
        self._ifindex = _index(spec.interface)
        self._next_rebind = 0.0

    def start(self) -> None:
        counters.register("input.sniffer", self.stats.as_dict)
        log.info(
            "sniffer input on %s: DNS ports %s, our addresses %s",
            self.spec.interface or "all interfaces",
            ", ".join(map(str, self.spec.dns_ports)),
            ", ".join(self.spec.local_ips) or "none (every message is a client one)",
        )
        self._thread.start()

    async def close(self) -> None:
        self._stop.set()
        await asyncio.to_thread(self._thread.join)

    def _run(self) -> None:
        ring, decoder, stats, hub = self.ring, self.decoder, self.stats, self.hub
        packet = decoder.packet
        batch_size = hub.spec.batch_size
        poller = select.poll()
        poller.register(self.sock, select.POLLIN | select.POLLERR)
        links = _LINKS
        block_head, packet_head, hatype_at = _BLOCK_HEAD.unpack_from, _PACKET_HEAD.unpack_from, _HATYPE.unpack_from
        block, blocks = 0, RING_BLOCKS
        next_flush = time.monotonic() + FLUSH_INTERVAL
        try:
            while not self._stop.is_set():
                base = block * RING_BLOCK
                status, count, first = block_head(ring, base + 8)
                if status & _TP_STATUS_USER:
                    pos = base + first
                    for _ in range(count):
                        step, sec, nsec, snaplen, _len, _status, mac = packet_head(ring, pos)
                        link = links.get(hatype_at(ring, pos + _HATYPE_OFFSET)[0], _UNKNOWN_LINK)
                        packet(link, ring[pos + mac : pos + mac + snaplen], sec, nsec)
                        pos += step
                    stats.packets += count
                    ring[base + 8 : base + 12] = b"\0\0\0\0"  # TP_STATUS_KERNEL: the block is the kernel's again
                    block = (block + 1) % blocks
                    if len(decoder.out) >= batch_size:
                        hub.feed_threadsafe(decoder.take())
                    if self._down is not None:
                        self._down = None
                        log.info("sniffer: capturing on %s again", self.spec.interface)
                else:
                    for _fd, event in poller.poll(POLL_MS):
                        if event & select.POLLERR and self._socket_error():
                            # A pending error makes poll() return at once until it is read.
                            self._stop.wait(POLL_MS / 1000)
                now = time.monotonic()
                if now >= next_flush:
                    next_flush = now + FLUSH_INTERVAL
                    if decoder.out:
                        hub.feed_threadsafe(decoder.take())
                    decoder.expire(time.time())
                    self._kernel_stats(now)
                    if self._down is not None and self.spec.interface and now >= self._next_rebind:
                        self._next_rebind = now + REBIND_EVERY
                        self._rebind()
        except Exception:  # a bug, not a packet (the decoder counts those): say so, stop capturing
            log.exception("sniffer: capture stopped by an unexpected error")
        finally:
            decoder.close()
            if decoder.out:
                hub.feed_threadsafe(decoder.take())
            self._kernel_stats(time.monotonic())
            ring.close()
            self.sock.close()

    def _socket_error(self) -> bool:
        """Read (and so clear) the socket's pending error, e.g. ENETDOWN when
        the bound interface went down or was deleted; log it once."""
        code = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if not code:
            return False
        down = os.strerror(code)
        if down != self._down:
            self._down = down
            log.warning("sniffer: capture on %s interrupted (%s); waiting for the interface to come back",
                        self.spec.interface or "all interfaces", down)
        return True

    def _rebind(self) -> None:
        """Bind anew once an interface of our name exists again with another
        index (it was deleted and created again: the old binding is gone)."""
        index = _index(self.spec.interface)
        if index and index != self._ifindex:
            try:
                self.sock.bind((self.spec.interface, _ETH_P_ALL))
            except OSError:
                return  # gone again
            self._ifindex = index

    def _kernel_stats(self, now: float) -> None:
        try:
            raw = self.sock.getsockopt(_SOL_PACKET, _PACKET_STATISTICS, _TPACKET_STATS.size)
        except OSError:
            return
        _received, drops, _freezes = _TPACKET_STATS.unpack(raw)  # the kernel resets them on each read
        self.stats.kernel_drops += drops
        new = self.stats.kernel_drops - self._drops_logged
        if new and now >= self._next_drop_log:
            log.warning(
                "sniffer: the kernel dropped %d packets (%d in total): the capture cannot keep up",
                new, self.stats.kernel_drops,
            )
            self._drops_logged = self.stats.kernel_drops
            self._next_drop_log = now + KERNEL_DROP_LOG_EVERY

