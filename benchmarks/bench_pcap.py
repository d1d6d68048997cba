#!/usr/bin/env python3
"""Packet decoding speed: core.pcap.read_pcap on an in-memory pcap (raw IP).

Two workloads, built once and read ``--repeat`` times (the best run counts):

- ``exchanges``: UDP queries and their answers, one IPv6 exchange in three,
  ``--questions`` distinct names;
- ``fragmented``: answers of about 3,700 bytes, each in IPv4 fragments of
  1,480 bytes (what a 1,500-byte MTU makes of a DNSSEC or big TXT answer),
  put back together by core.fragments.

The sniffer runs the same decoder (core.packets.PacketDecoder) on what its
capture ring hands it. A benchmark, not a test: it needs a quiet machine.
"""

from __future__ import annotations

import argparse
import socket
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # so that `core` imports as a plain script

import dns.message  # noqa: E402
import dns.rrset  # noqa: E402

from core.pcap import read_pcap  # noqa: E402

CLIENT4, SERVER4 = socket.inet_aton("192.0.2.1"), socket.inet_aton("198.51.100.53")
CLIENT6, SERVER6 = socket.inet_pton(socket.AF_INET6, "2001:db8::1"), socket.inet_pton(socket.AF_INET6, "2001:db8::53")


def udp(sport: int, dport: int, payload: bytes) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def ipv4(src: bytes, dst: bytes, body: bytes, *, ident: int = 0, frag: int = 0) -> bytes:
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(body), ident, frag, 64, 17, 0, src, dst) + body


def ipv6(src: bytes, dst: bytes, body: bytes) -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, len(body), 17, 64, src, dst) + body


def pcap(packets: list[bytes]) -> bytes:
    out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, 101)]
    for i, packet in enumerate(packets):
        out.append(struct.pack("<IIII", 1_800_000_000 + i // 1_000_000, i % 1_000_000, len(packet), len(packet)))
        out.append(packet)
    return b"".join(out)


def exchanges(n: int, questions: int) -> list[bytes]:
    packets = []
    for i in range(n):
        q = dns.message.make_query(f"n{i % questions}.example.test.", "A")
        q.id = i & 0xFFFF
        r = dns.message.make_response(q)
        port = 10_000 + i % 50_000
        if i % 3:
            packets += [ipv4(CLIENT4, SERVER4, udp(port, 53, q.to_wire())),
                        ipv4(SERVER4, CLIENT4, udp(53, port, r.to_wire()))]
        else:
            packets += [ipv6(CLIENT6, SERVER6, udp(port, 53, q.to_wire())),
                        ipv6(SERVER6, CLIENT6, udp(53, port, r.to_wire()))]
    return packets


def big_answer() -> bytes:
    msg = dns.message.make_response(dns.message.make_query("big.example.test.", "TXT", use_edns=0, payload=4096))
    msg.answer.append(dns.rrset.from_text("big.example.test.", 300, "IN", "TXT",
                                          " ".join('"' + "x" * 200 + '"' for _ in range(18))))
    return msg.to_wire()


def fragmented(n: int, chunk: int = 1480) -> list[bytes]:
    answer = big_answer()
    packets = []
    for i in range(n):
        body = udp(53, 10_000 + i % 50_000, answer)
        for off in range(0, len(body), chunk):
            more = 0x2000 if off + chunk < len(body) else 0
            packets.append(ipv4(SERVER4, CLIENT4, body[off : off + chunk], ident=i & 0xFFFF, frag=more | off // 8))
    return packets


def measure(name: str, packets: list[bytes], repeat: int) -> None:
    data = pcap(packets)
    best, frames = float("inf"), 0
    for _ in range(repeat):
        start = time.perf_counter()
        reader = read_pcap(data, name)
        frames = sum(len(batch) for batch in reader)
        best = min(best, time.perf_counter() - start)
    print(f"{name:<11} {len(packets):>9,} {frames:>9,} {best:>8.3f} {len(packets) / best:>12,.0f} {frames / best:>13,.0f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--exchanges", type=int, default=100_000, help="UDP query/answer pairs (default 100000)")
    p.add_argument("--fragmented", type=int, default=20_000, help="fragmented answers (default 20000)")
    p.add_argument("--questions", type=int, default=1000, help="distinct names (default 1000)")
    p.add_argument("--repeat", type=int, default=5, help="runs of each workload; the best counts (default 5)")
    args = p.parse_args()
    print(f"{'workload':<11} {'packets':>9} {'messages':>9} {'seconds':>8} {'packets/s':>12} {'messages/s':>13}")
    measure("exchanges", exchanges(args.exchanges, args.questions), args.repeat)
    measure("fragmented", fragmented(args.fragmented), args.repeat)


if __name__ == "__main__":
    main()
