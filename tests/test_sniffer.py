"""The sniffer input: core.packets.PacketDecoder's direction and fields on
hand-built packets, the BPF filter and the raw socket on the loopback
interface, the ``input.sniffer`` config, and the whole receiver sniffing a
real unbound (dig and dnsperf over UDP and TCP, IPv4 and IPv6) whose own
dnstap stream goes to the same receiver: both accounts of the run must agree.

The live tests need CAP_NET_RAW (CI runs as root); without it they skip
locally and fail under DNSTAP_REQUIRE_PEERS=1.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import re
import select
import socket
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

import dns.message
import peers
import pytest
from conftest import REPO
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_fragments import big_response
from test_pcap import ethernet, ipv4, ipv6, query, response, tcp, udp

from core import dnstap_pb2
from core.errors import ConfigError
from core.message import decode
from core.packets import (
    CLIENT_QUERY,
    LINK_ETHERNET,
    PacketDecoder,
)
from pipeline.config import SnifferInput, config_from_dict
from sources import sniffer
from sources.sniffer import SnifferSpec, bpf_filter, open_socket, sniffer_spec

OURS4, OURS6 = "192.0.2.53", "2001:db8::53"
OTHER4, OTHER6 = "198.51.100.7", "2001:db8::7"
UPSTREAM4 = "203.0.113.1"


def packed(*ips: str) -> frozenset[bytes]:
    return frozenset(socket.inet_pton(socket.AF_INET6 if ":" in ip else socket.AF_INET, ip) for ip in ips)


def decoded(decoder: PacketDecoder, *frames: bytes, sec: int = 1_800_000_000, nsec: int = 0) -> list[dict]:
    for frame in frames:
        decoder.packet(LINK_ETHERNET, frame, sec, nsec)
    return [decode(f) for f in decoder.take()]


def recursion(wire: bytes, rd: bool) -> bytes:
    flags = wire[2] | 0x01 if rd else wire[2] & 0xFE
    return wire[:2] + bytes((flags,)) + wire[3:]


def have_raw_socket() -> bool:
    try:
        socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0).close()
    except PermissionError:
        return False
    return True


def require_raw_socket() -> None:
    if not have_raw_socket():
        if peers.peers_required():
            pytest.fail("the sniffer tests need CAP_NET_RAW (run as root)")
        pytest.skip("no CAP_NET_RAW")


# --------------------------------------------------------------------------- direction and fields


def test_direction_by_our_addresses():
    decoder = PacketDecoder(local_ips=packed(OURS4, OURS6), identity="sniffer")
    q, r = query("www.example.test."), response("www.example.test.")
    recs = decoded(
        decoder,
        ethernet(ipv4(OTHER4, OURS4, udp(40000, 53, q))),
        ethernet(ipv4(OURS4, OTHER4, udp(53, 40000, r))),
        ethernet(ipv6(OTHER6, OURS6, udp(40001, 53, q))),
        ethernet(ipv6(OURS6, OTHER6, udp(53, 40001, r))),
    )
    assert [r["message"] for r in recs] == ["CLIENT_QUERY", "CLIENT_RESPONSE"] * 2
    for rec, family, client, server, port in (
        (recs[0], "INET", OTHER4, OURS4, 40000), (recs[1], "INET", OTHER4, OURS4, 40000),
        (recs[2], "INET6", OTHER6, OURS6, 40001), (recs[3], "INET6", OTHER6, OURS6, 40001),
    ):
        assert (rec["family"], rec["protocol"], rec["identity"]) == (family, "UDP", "sniffer")
        assert (rec["query-ip"], rec["query-port"], rec["response-ip"], rec["response-port"]) == (
            client, port, server, 53)
    assert decoder.stats.dns_messages == 4 and decoder.stats.foreign == 0


def test_our_own_queries_are_resolver_or_forwarder_messages():
    decoder = PacketDecoder(local_ips=packed(OURS4))
    q, r = query("example.test."), response("example.test.")
    recs = decoded(
        decoder,
        ethernet(ipv4(OURS4, UPSTREAM4, udp(33000, 53, recursion(q, False)))),
        ethernet(ipv4(UPSTREAM4, OURS4, udp(53, 33000, recursion(r, False)))),
        ethernet(ipv4(OURS4, UPSTREAM4, udp(33001, 53, recursion(q, True)))),
        ethernet(ipv4(UPSTREAM4, OURS4, udp(53, 33001, recursion(r, True)))),
    )
    assert [r["message"] for r in recs] == [
        "RESOLVER_QUERY", "RESOLVER_RESPONSE", "FORWARDER_QUERY", "FORWARDER_RESPONSE"]
    # Our resolver is the querier: query-ip is ours, response-ip the upstream server.
    assert {(r["query-ip"], r["response-ip"]) for r in recs} == {(OURS4, UPSTREAM4)}


def test_traffic_between_other_hosts_is_counted_not_emitted():
    decoder = PacketDecoder(local_ips=packed(OURS4))
    assert decoded(decoder, ethernet(ipv4(OTHER4, UPSTREAM4, udp(40000, 53, query())))) == []
    assert decoder.stats.foreign == 1 and decoder.stats.dns_messages == 0


def test_message_types_switched_off_are_counted():
    decoder = PacketDecoder(local_ips=packed(OURS4), message_types={CLIENT_QUERY})
    recs = decoded(decoder, ethernet(ipv4(OTHER4, OURS4, udp(40000, 53, query()))),
                   ethernet(ipv4(OURS4, OTHER4, udp(53, 40000, response()))))
    assert [r["message"] for r in recs] == ["CLIENT_QUERY"]
    assert decoder.stats.unrecorded == 1


def test_loopback_both_ends_ours_direction_by_qr_bit():
    decoder = PacketDecoder(local_ips=packed("127.0.0.1"))
    recs = decoded(decoder, ethernet(ipv4("127.0.0.1", "127.0.0.1", udp(40000, 53, query()))),
                   ethernet(ipv4("127.0.0.1", "127.0.0.1", udp(53, 40000, response()))))
    assert [(r["message"], r["query-port"], r["response-port"]) for r in recs] == [
        ("CLIENT_QUERY", 40000, 53), ("CLIENT_RESPONSE", 40000, 53)]


def test_without_our_addresses_every_message_is_a_client_one():
    decoder = PacketDecoder()
    recs = decoded(decoder, ethernet(ipv4(OTHER4, UPSTREAM4, udp(40000, 53, recursion(query(), False)))))
    assert [r["message"] for r in recs] == ["CLIENT_QUERY"]


def test_kernel_time_is_kept_to_the_nanosecond_and_latency_follows():
    decoder = PacketDecoder(local_ips=packed(OURS4))
    decoder.packet(LINK_ETHERNET, ethernet(ipv4(OTHER4, OURS4, udp(40000, 53, query()))), 1_800_000_000, 123_456_789)
    decoder.packet(LINK_ETHERNET, ethernet(ipv4(OURS4, OTHER4, udp(53, 40000, response()))), 1_800_000_000, 124_000_001)
    q, r = (decode(f) for f in decoder.take())
    assert q["timestamp"] == pytest.approx(1_800_000_000.123457, abs=1e-6)
    assert q["query-time"] == pytest.approx(1_800_000_000.123456789)
    assert r["query-time"] is None and r["response-time"] == pytest.approx(1_800_000_000.124000001)


def test_tcp_messages_split_across_segments_and_packed_in_one():
    decoder = PacketDecoder(local_ips=packed(OURS4))
    wires = [query(f"n{i}.example.test.", qid=i) for i in range(3)]
    stream = b"".join(struct.pack("!H", len(w)) + w for w in wires)
    cut = 5  # inside the first message's header
    frames = [
        ethernet(ipv4(OTHER4, OURS4, tcp(40000, 53, 999, flags=0x02))),  # SYN
        ethernet(ipv4(OTHER4, OURS4, tcp(40000, 53, 1000, stream[:cut]))),
        ethernet(ipv4(OTHER4, OURS4, tcp(40000, 53, 1000 + cut, stream[cut:]))),
    ]
    recs = decoded(decoder, *frames)
    assert [(r["message"], r["protocol"], r["qname"], r["id"]) for r in recs] == [
        ("CLIENT_QUERY", "TCP", f"n{i}.example.test.", i) for i in range(3)]


def test_idle_flows_expire_by_the_callers_clock():
    decoder = PacketDecoder(flow_timeout=5.0)
    decoder.packet(LINK_ETHERNET, ethernet(ipv4(OTHER4, OURS4, tcp(40000, 53, 1000, b"\x00\x20abc"))), 100, 0)
    assert decoder.flows == 1
    decoder.expire(104.0)
    assert decoder.flows == 1
    decoder.expire(106.0)
    assert decoder.flows == 0
    assert (decoder.stats.flows_expired, decoder.stats.tcp_incomplete) == (1, 1)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=300), link=st.sampled_from([LINK_ETHERNET, 101, 113, 276, 0, -1]),
       local=st.booleans())
def test_arbitrary_packets_never_raise(data, link, local):
    decoder = PacketDecoder(local_ips=packed(OURS4, "127.0.0.1") if local else None, max_flows=4)
    decoder.packet(link, data, 1_800_000_000, 0)
    decoder.packet(link, data, 1_800_000_001, 0)
    for frame in decoder.take():
        decode(frame)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payload=st.binary(max_size=200), l4=st.sampled_from(["udp", "tcp"]), v6=st.booleans(),
       to_us=st.booleans())
def test_arbitrary_dns_payloads_never_raise(payload, l4, v6, to_us):
    ours, other = (OURS6, OTHER6) if v6 else (OURS4, OTHER4)
    src, dst = (other, ours) if to_us else (ours, other)
    body = udp(40000, 53, payload) if l4 == "udp" else tcp(40000, 53, 7, payload)
    frame = ethernet((ipv6 if v6 else ipv4)(src, dst, body))
    decoder = PacketDecoder(local_ips=packed(OURS4, OURS6))
    decoder.packet(LINK_ETHERNET, frame, 1_800_000_000, 0)
    for record in decoder.take():
        decode(record)


# --------------------------------------------------------------------------- config


def test_config_defaults_and_4_7_0_spellings():
    assert config_from_dict({}).input.sniffer == SnifferInput()
    cfg = config_from_dict({"input": {"sniffer": {
        "eth-ip": ["10.0.0.2", "2001:DB8::2", "10.0.0.2"], "dns-port": 5353,
        "client-query-support": False, "client-response-support": True,
    }}})
    s = cfg.input.sniffer
    assert (s.eth_ip, s.dns_port, s.record_client_query, s.record_client_response) == (
        ("10.0.0.2", "2001:db8::2"), (5353,), False, True)
    # 4.7.0's README spelling is the key; both spellings agreeing is fine, disagreeing is not.
    same = {"record-client-query": False, "client-query-support": False}
    assert config_from_dict({"input": {"sniffer": same}}).input.sniffer.record_client_query is False
    with pytest.raises(ConfigError, match=r"input.sniffer.client-query-support: another spelling of "
                                          r"input.sniffer.record-client-query"):
        config_from_dict({"input": {"sniffer": {"record-client-query": True, "client-query-support": False}}})


@pytest.mark.parametrize("section, message", [
    ({"eth-ip": ["10.0.0.300"]}, "input.sniffer.eth-ip: expected an IP address, got '10.0.0.300'"),
    ({"eth-ip": 5}, "input.sniffer.eth-ip: expected a list of IP addresses, got 5"),
    ({"dns-port": [53, 70000]}, "input.sniffer.dns-port: expected a port or a list of ports (1-65535), got a list"),
    ({"dns-port": []}, "input.sniffer.dns-port: expected a port or a list of ports (1-65535), got a list"),
    ({"dns-port": list(range(1, 102))}, "input.sniffer.dns-port: at most 100 ports (the capture filter's limit)"),
    ({"enable": True, "eth-name": "nosuchif0"}, "input.sniffer.eth-name: no such network interface: nosuchif0"),
    ({"enable": True, "eth-name": "../lo"}, "input.sniffer.eth-name: no such network interface: ../lo"),
    ({"resolver-query-support": "yes"}, "input.sniffer.resolver-query-support: expected true or false, got 'yes'"),
])
def test_config_errors(section, message):
    with pytest.raises(ConfigError) as info:
        config_from_dict({"input": {"sniffer": section}})
    assert str(info.value).startswith(message)


def test_config_sniffer_alone_is_an_input_and_becomes_a_feeder():
    from pipeline.build import hub_spec

    cfg = config_from_dict({"input": {"tcp-socket": {"enable": False}, "sniffer": {
        "enable": True, "eth-name": "lo", "eth-ip": ["127.0.0.1"], "dns-port": [53, 5353],
        "record-client-response": False, "forwarder-query-support": False}}})
    (feeder,) = hub_spec(cfg).feeders
    assert feeder == sniffer_spec(cfg.input.sniffer)
    assert (feeder.interface, feeder.local_ips, feeder.dns_ports) == ("lo", ("127.0.0.1",), (53, 5353))
    assert feeder.message_types == (3, 4, 5, 8)


# --------------------------------------------------------------------------- BPF and the raw socket


def test_bpf_program_is_well_formed():
    for ports in ([53], [53, 5353, 853], range(1, 101)):
        program = bpf_filter(ports)
        assert (0x06, 0, 0, 0) in program and (0x06, 0, 0, 0x40000) in program
        for i, (code, jt, jf, k) in enumerate(program):
            if code & 0x07 == 0x05:  # a jump stays inside the program
                assert i + 1 + (k if code == 0x05 else max(jt, jf)) < len(program)
    with pytest.raises(ValueError, match="too many ports for the capture filter"):
        bpf_filter(range(1, 200))


class FakeHub:
    """What a feeder sees of the ListenerHub."""

    class spec:
        batch_size = 512

    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def feed_threadsafe(self, frames: list[bytes]) -> None:
        self.frames.extend(frames)


def _udp_exchange(family: int, host: str, port: int, name: str) -> int:
    """One query and its answer over loopback through a socket we serve ourselves; the client port."""
    server = socket.socket(family, socket.SOCK_DGRAM)
    client = socket.socket(family, socket.SOCK_DGRAM)
    with server, client:
        server.bind((host, port))
        client.sendto(dns.message.make_query(name, "A").to_wire(), (host, port))
        wire, peer = server.recvfrom(4096)
        server.sendto(dns.message.make_response(dns.message.from_wire(wire)).to_wire(), peer)
        client.recv(4096)
        return client.getsockname()[1]


@pytest.mark.parametrize("interface", ["lo", None])
def test_raw_socket_on_loopback_sees_each_packet_once(interface):
    """On lo alone or on every interface, the BPF filter drops what is not
    DNS and the outgoing copy of each loopback packet."""
    require_raw_socket()
    port, other = peers.free_port(udp_too=True), peers.free_port(udp_too=True)
    spec = SnifferSpec(interface=interface, local_ips=("127.0.0.1", "::1"), dns_ports=(port,))
    hub = FakeHub()

    async def run():
        capture = await spec.open(hub)
        ports = [_udp_exchange(socket.AF_INET, "127.0.0.1", port, "v4.example.test."),
                 _udp_exchange(socket.AF_INET6, "::1", port, "v6.example.test.")]
        _udp_exchange(socket.AF_INET, "127.0.0.1", other, "not-dns-port.example.test.")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"short", ("127.0.0.1", port))  # to the DNS port, shorter than a header
        await asyncio.sleep(0.3)
        await capture.close()
        return capture.stats, ports

    stats, ports = asyncio.run(run())
    recs = [decode(f) for f in hub.frames]
    assert [(r["message"], r["family"], r["query-port"], r["response-port"], r["qname"]) for r in recs] == [
        ("CLIENT_QUERY", "INET", ports[0], port, "v4.example.test."),
        ("CLIENT_RESPONSE", "INET", ports[0], port, "v4.example.test."),
        ("CLIENT_QUERY", "INET6", ports[1], port, "v6.example.test."),
        ("CLIENT_RESPONSE", "INET6", ports[1], port, "v6.example.test."),
    ]
    assert all(abs(r["timestamp"] - time.time()) < 30 for r in recs)
    assert (stats.malformed, stats.non_dns) == (1, 0)
    if interface == "lo":
        assert stats.packets == 5


def test_missing_interface_is_a_config_error():
    with pytest.raises(ConfigError, match="no such network interface: nosuchif0"):
        open_socket(SnifferSpec(interface="nosuchif0"))


def test_without_cap_net_raw_the_receiver_exits_2(tmp_path):
    """One clear line and exit status 2, not a traceback."""
    setpriv = peers.require("setpriv")
    config = tmp_path / "c.yaml"
    config.write_text("web-api: {enable: false}\noutput: {stdout: {enable: false}}\n"
                      "input: {tcp-socket: {enable: false}, sniffer: {enable: true, eth-name: lo}}\n")
    proc = subprocess.run(
        [setpriv, "--inh-caps=-all", "--bounding-set=-net_raw", sys.executable, "-m", "pipeline",
         "--runner=DirectRunner", "-c", str(config)],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "CAP_NET_RAW" in line]
    assert len(errors) == 1 and "input.sniffer: cannot open a raw socket on lo" in errors[0], proc.stderr[-3000:]


# --------------------------------------------------------------------------- the receiver against a real unbound


def start_dual_stack_unbound(workdir: Path, port: int, target: str) -> subprocess.Popen:
    """peers' unbound, also answering on ::1."""
    unbound = peers.require("unbound")
    workdir.mkdir(parents=True, exist_ok=True)
    conf = peers.write_unbound_conf(workdir, port, target)
    text = conf.read_text().replace("do-ip6: no", "do-ip6: yes")
    text = text.replace(f"interface: 127.0.0.1@{port}", f"interface: 127.0.0.1@{port}\n    interface: ::1@{port}")
    text = text.replace("access-control: 127.0.0.0/8 allow", "access-control: 127.0.0.0/8 allow\n"
                        "    access-control: ::1/128 allow")
    conf.write_text(text)
    with open(workdir / "unbound.stdout", "wb") as out:
        proc = subprocess.Popen([unbound, "-d", "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=workdir)
    proc.log = workdir / "unbound.log"
    deadline = time.monotonic() + 20
    while not (peers.port_open("127.0.0.1", port) and peers.port_open("::1", port)):
        if proc.poll() is not None or time.monotonic() > deadline:
            peers.stop_unbound(proc, settle=0)
            raise RuntimeError(f"unbound did not start\n{peers.file_tail(proc.log)}")
        time.sleep(0.1)
    return proc


def wait_started(rx, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while "receiver started" not in rx.stderr_path.read_text(errors="replace"):
        assert rx.running() and time.monotonic() < deadline, rx.logs()
        time.sleep(0.1)


def raw_tcp_queries(host: str, port: int, names: list[str], *, split: bool) -> None:
    """Several queries on one TCP connection: all in one write, or the first
    cut inside its header into two writes with a pause (two segments)."""
    wires = [dns.message.make_query(n, "A").to_wire() for n in names]
    stream = b"".join(struct.pack("!H", len(w)) + w for w in wires)
    with socket.create_connection((host, port), timeout=5) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if split:
            s.sendall(stream[:5])
            time.sleep(0.2)
            s.sendall(stream[5:])
        else:
            s.sendall(stream)
        got, want = b"", len(names)
        while want:
            chunk = s.recv(65536)
            assert chunk, "unbound closed the connection"
            got += chunk
            while len(got) >= 2 and len(got) >= 2 + struct.unpack("!H", got[:2])[0]:
                got = got[2 + struct.unpack("!H", got[:2])[0]:]
                want -= 1


def key(rec: dict) -> tuple:
    return (rec["message"], rec["family"], rec["protocol"], rec["query-ip"], rec["query-port"],
            rec["response-ip"], rec["response-port"], rec["id"], rec["qname"], rec["rrtype"], rec["rcode"])


def test_sniffed_traffic_matches_unbounds_own_dnstap(tmp_path, receiver):
    require_raw_socket()
    for program in ("unbound", "dig", "dnsperf"):
        peers.require(program)
    port = peers.free_port(udp_too=True)
    sock = peers.short_socket_dir(tmp_path) / "dnstap.sock"
    out = tmp_path / "out.jsonl"
    rx = receiver(tmp_path / "rx", {
        "input": {
            "unix-socket": {"enable": True, "path": str(sock)},
            "sniffer": {"enable": True, "eth-name": "lo", "eth-ip": ["127.0.0.1", "::1"], "dns-port": [port]},
        },
        "output": {"file": {"enable": True, "format": "json", "file": str(out)}},
    })
    wait_started(rx)
    unbound = start_dual_stack_unbound(tmp_path / "unbound", port, f"unix:{sock}")
    try:
        for host in ("127.0.0.1", "::1"):
            for name in ("www.example.test", "nope.example.test"):
                assert peers.dig(port, name, host=host)
            for extra in (["+tcp"], ["+tcp", "+keepopen"]):
                subprocess.run([peers.require("dig"), f"@{host}", "-p", str(port), *extra, "+time=2", "+tries=1",
                                "www.example.test", "mail.example.test", "MX", "api.example.test"],
                               capture_output=True, check=True, timeout=30)
        raw_tcp_queries("127.0.0.1", port, ["split.example.test.", "www.example.test."], split=True)
        raw_tcp_queries("::1", port, ["a.example.test.", "b.example.test.", "c.example.test."], split=False)
        queries = tmp_path / "queries.txt"
        peers.write_queries(queries, 300)
        udp_run = peers.run_dnsperf(port, queries, qps=3000)
        tcp_run = peers.run_dnsperf(port, queries, qps=3000, extra_args=("-m", "tcp"))
        # Not DNS: another port on lo, and a datagram to the DNS port too short for a header.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"x" * 40, ("127.0.0.1", peers.free_port(udp_too=True)))
            s.sendto(b"short", ("127.0.0.1", port))
    finally:
        assert peers.stop_unbound(unbound) == 0, peers.file_tail(unbound.log)
    assert udp_run["lost"] == 0 and tcp_run["lost"] == 0
    expected = 2 * (2 * (2 + 3 + 3) + 2 + 3 + 600)
    assert rx.stop() == 0, rx.logs()
    recs = rx.output_lines(out)
    sniffed = [r for r in recs if r["identity"] == "sniffer"]
    own = [r for r in recs if r["identity"] == "unbound-probe"]
    # unbound logs the short datagram as a query with no DNS header; the sniffer counts it as malformed.
    (short,) = [r for r in own if r["id"] == "-"]
    assert (short["message"], short["length"]) == ("CLIENT_QUERY", 5)
    own.remove(short)
    assert len(own) == expected, collections.Counter(r["message"] for r in own)
    assert collections.Counter(map(key, sniffed)) == collections.Counter(map(key, own))
    by_key = collections.defaultdict(list)
    for rec in own:
        by_key[key(rec)].append(rec["timestamp"])
    gaps = [abs(rec["timestamp"] - by_key[key(rec)].pop(0)) for rec in sorted(sniffed, key=lambda r: r["timestamp"])]
    assert statistics.median(gaps) < 0.002 and max(gaps) < 0.25, (statistics.median(gaps), max(gaps))
    responses = [r for r in sniffed if r["message"] == "CLIENT_RESPONSE"]
    assert all(isinstance(r["latency"], float) and 0 <= r["latency"] < 1 for r in responses)
    assert {r["protocol"] for r in sniffed} == {"UDP", "TCP"} and {r["family"] for r in sniffed} == {"INET", "INET6"}
    assert any(r["qname"] == "split.example.test." for r in sniffed)
    summary = rx.stderr_path.read_text(errors="replace").rsplit("stopped; counters", 1)[-1]
    assert re.search(r"input\.sniffer: [^;]*\bmalformed=1\b", summary), summary


def test_open_on_a_hub_feeds_it_and_stops_on_close(tmp_path):
    """The feeder contract with the real ListenerHub: frames arrive as batches
    on its queue, and close() is awaited before the last batch."""
    require_raw_socket()
    from sources.listener import END, HubSpec, ListenerHub

    port = peers.free_port(udp_too=True)
    hub = ListenerHub(HubSpec(feeders=(SnifferSpec(interface="lo", dns_ports=(port,)),)))
    hub.start()
    try:
        _udp_exchange(socket.AF_INET, "127.0.0.1", port, "hub.example.test.")
        time.sleep(0.3)
    finally:
        hub.shutdown()
    frames = []
    while (batch := hub.queue.get(timeout=10)) is not END:
        frames.extend(batch)
    assert [decode(f)["message"] for f in frames] == ["CLIENT_QUERY", "CLIENT_RESPONSE"]


# --------------------------------------------------------------------------- interface down / gone

_CLONE_NEWNET = 0x40000000


def _setns(fd: int) -> None:
    import ctypes

    if ctypes.CDLL(None, use_errno=True).setns(fd, _CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns")


@pytest.fixture
def netns():
    """A network namespace of its own (deleted after the test) and a function
    running a callable inside it (on this thread, switched back after)."""
    require_raw_socket()
    peers.require("ip")
    name = f"dtsniff{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)

    def inside(call):
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        there = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
        try:
            _setns(there)
            try:
                return call()
            finally:
                _setns(home)
        finally:
            os.close(home)
            os.close(there)

    def ip(*args: str) -> None:
        subprocess.run(["ip", "-n", name, *args], check=True)

    try:
        yield inside, ip
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


class CountingPoll:
    """select with its poll objects counting their calls."""

    POLLIN, POLLERR = select.POLLIN, select.POLLERR

    def __init__(self) -> None:
        self.calls = 0

    def poll(self):
        real, outer = select.poll(), self

        class Poll:
            def register(self, *args):
                real.register(*args)

            def poll(self, timeout):
                outer.calls += 1
                return real.poll(timeout)

        return Poll()


def test_interface_down_or_deleted_is_logged_once_and_does_not_spin(netns, monkeypatch, caplog):
    """A socket error (ENETDOWN) made poll() return at once forever: 100 % CPU.
    It is read and logged once per state; the capture resumes when the
    interface is back, even after it was deleted and created again."""
    inside, ip = netns

    def add_link() -> None:
        ip("link", "add", "dt0", "type", "veth", "peer", "name", "dt1")
        ip("addr", "add", "192.0.2.1/24", "dev", "dt0")
        ip("link", "set", "dt1", "up")
        ip("link", "set", "dt0", "up")
        ip("neigh", "add", "192.0.2.2", "lladdr", "02:00:00:00:00:02", "dev", "dt0")

    add_link()
    fake = CountingPoll()
    monkeypatch.setattr(sniffer, "select", fake)
    port = 53
    hub = FakeHub()

    def send_query(name: str) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(dns.message.make_query(name, "A").to_wire(), ("192.0.2.2", port))

    async def run():
        def start():  # SnifferSpec.open, with the socket and the capture thread in the namespace
            spec = SnifferSpec(interface="dt0", dns_ports=(port,))
            capture = sniffer._Capture(spec, hub, *open_socket(spec))
            capture.start()
            return capture

        capture = inside(start)
        await asyncio.sleep(0.2)
        for step in (("set", "dt0", "down"), ("del", "dt0")):
            ip("link", *step)
            fake.calls = 0
            await asyncio.sleep(1.0)
            assert fake.calls < 40, f"{fake.calls} polls in 1 s after link {step[0]}: the capture spins"
        add_link()
        await asyncio.sleep(1.5)  # REBIND_EVERY
        inside(lambda: send_query("back.example.test."))
        await asyncio.sleep(0.3)
        await capture.close()

    with caplog.at_level(logging.INFO, logger="dnstap_receiver.input"):
        asyncio.run(run())
    down = [r.getMessage() for r in caplog.records if "interrupted" in r.getMessage()]
    assert down == ["sniffer: capture on dt0 interrupted (Network is down); waiting for the interface to come back"]
    assert any("capturing on dt0 again" in r.getMessage() for r in caplog.records)
    assert [decode(f)["qname"] for f in hub.frames] == ["back.example.test."]


def test_raw_ip_link_is_filtered_in_the_kernel(netns):
    """A tun interface (no Ethernet header, like WireGuard) used to pass every
    packet to Python; the filter reads its IP header at offset 0."""
    import fcntl

    inside, ip = netns
    tun_setiff, iff_tun, iff_no_pi = 0x400454CA, 0x0001, 0x1000

    def make_tun() -> int:
        fd = os.open("/dev/net/tun", os.O_RDWR)
        fcntl.ioctl(fd, tun_setiff, struct.pack("16sH", b"dttun0", iff_tun | iff_no_pi))
        return fd

    tun = inside(make_tun)
    try:
        ip("link", "set", "dttun0", "up")
        hub = FakeHub()
        q = dns.message.make_query("tun.example.test.", "A").to_wire()

        def start():
            spec = SnifferSpec(interface="dttun0", dns_ports=(53,))
            capture = sniffer._Capture(spec, hub, *open_socket(spec))
            capture.start()
            return capture

        async def run():
            capture = inside(start)
            for dport in (9999, 53, 9999):  # only the middle one is DNS
                os.write(tun, ipv4("192.0.2.9", "192.0.2.1", udp(40000, dport, q)))
            await asyncio.sleep(0.3)
            await capture.close()
            return capture.stats

        stats = asyncio.run(run())
    finally:
        os.close(tun)
    assert [decode(f)["qname"] for f in hub.frames] == ["tun.example.test."]
    assert (stats.packets, stats.non_dns) == (1, 0)


def test_responses_fragmented_by_the_kernel_are_reassembled(netns):
    """A namespace whose loopback has an MTU of 1,280: the kernel fragments a
    4,000-byte answer (IPv4 and IPv6) and the sniffer puts each back together."""
    inside, ip = netns
    ip("link", "set", "lo", "mtu", "1280", "up")
    hub = FakeHub()
    wires = {}

    def start():
        spec = SnifferSpec(interface="lo", local_ips=("127.0.0.1", "::1"), dns_ports=(53,))
        capture = sniffer._Capture(spec, hub, *open_socket(spec))
        capture.start()
        return capture

    def exchange(family: int, host: str) -> None:
        server, client = socket.socket(family, socket.SOCK_DGRAM), socket.socket(family, socket.SOCK_DGRAM)
        with server, client:
            if family == socket.AF_INET:  # no DF bit: the kernel fragments instead of refusing
                server.setsockopt(socket.IPPROTO_IP, 10, 0)  # IP_MTU_DISCOVER, IP_PMTUDISC_DONT
            server.bind((host, 53))
            client.sendto(query("big.example.test.", "TXT"), (host, 53))
            wire, peer = server.recvfrom(4096)
            answer = big_response()
            server.sendto(answer, peer)
            assert client.recv(8192) == answer
            wires[family] = answer

    async def run():
        capture = inside(start)
        await asyncio.sleep(0.2)
        inside(lambda: exchange(socket.AF_INET, "127.0.0.1"))
        inside(lambda: exchange(socket.AF_INET6, "::1"))
        await asyncio.sleep(0.3)
        await capture.close()
        return capture.stats

    stats = asyncio.run(run())
    taps = []
    for frame in hub.frames:
        tap = dnstap_pb2.Dnstap()
        tap.ParseFromString(frame)
        taps.append(tap)
    assert [(decode(f)["message"], decode(f)["family"]) for f in hub.frames] == [
        ("CLIENT_QUERY", "INET"), ("CLIENT_RESPONSE", "INET"), ("CLIENT_QUERY", "INET6"), ("CLIENT_RESPONSE", "INET6"),
    ]
    assert [taps[1].message.response_message, taps[3].message.response_message] == [
        wires[socket.AF_INET], wires[socket.AF_INET6],
    ]
    assert stats.fragments == stats.packets - 2 >= 6, "each answer in three fragments at least"
    assert (stats.fragments_reassembled, stats.fragments_dropped) == (2, 0)
