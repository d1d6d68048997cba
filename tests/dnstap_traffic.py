"""Generated live dnstap traffic for tests that watch the receiver's statistics change:
CLIENT_QUERY/CLIENT_RESPONSE pairs stamped with the current time (the statistics windows are
event time, so a replayed capture would land in windows long closed), from several
identities, each over a Frame Streams connection of its own, until stopped.

The mix is fixed per identity so that tests can predict its shape: mostly NOERROR and some
NXDOMAIN, A/AAAA/MX, a few clients (one IPv6), UDP and some TCP, latencies of 0.4 to 30 ms,
and one name in ``BLOCKED`` for a filter to drop. ``bad_frames`` adds a malformed message
and an undecodable frame to the first batch of each identity. With ``hostile=True``, one
exchange comes from identity ``HOSTILE_IDENTITY`` asking ``HOSTILE_QNAME``: markup that runs
a script if a page puts it into HTML instead of text.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import dns.message
import dns.rcode
import dns.rdatatype
import peers
from fstrm_client import FstrmClient, free_tcp_port

from core import dnstap_pb2

NAMES = ["www.example.test.", "mail.example.test.", "api.example.org.", "cdn.example.net.", "db.example.test."]
NX_NAMES = ["nope.example.test.", "typo.example.org."]
BLOCKED = "ads.blocked.test."
CLIENTS = ["192.0.2.10", "192.0.2.11", "198.51.100.7", "2001:db8::53"]
# Valid as they are: an identity is any bytes, and these labels need no escaping in a name's
# presentation form (a space or a quote would be written \032 or \", defusing the markup).
HOSTILE_IDENTITY = '<img src=x onerror="window.__xss=1">'
HOSTILE_QNAME = "<img/src/onerror=window.__xss=1>.xss.test."
QTYPES = ["A", "AAAA", "A", "MX"]


def _address(ip: str) -> tuple[int, bytes]:
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    return (dnstap_pb2.INET6 if ":" in ip else dnstap_pb2.INET), socket.inet_pton(family, ip)


def exchange(identity: str, i: int, now: float, qname: str | None = None) -> list[bytes]:
    """The query and the response of exchange number ``i`` of ``identity``, at ``now`` (for
    ``qname`` if given)."""
    if qname is not None:
        rcode = dns.rcode.NOERROR
    elif i % 10 == 9:
        qname, rcode = NX_NAMES[(i // 10) % len(NX_NAMES)], dns.rcode.NXDOMAIN
    elif i % 50 == 7:
        qname, rcode = BLOCKED, dns.rcode.NOERROR
    else:
        qname, rcode = NAMES[i % len(NAMES)], dns.rcode.NOERROR
    client = CLIENTS[i % len(CLIENTS)]
    query = dns.message.make_query(qname, QTYPES[i % len(QTYPES)])
    query.id = i % 65536
    response = dns.message.make_response(query)
    response.set_rcode(rcode)
    latency = (0.0004, 0.003, 0.012, 0.03)[i % 4]
    family, address = _address(client)
    frames = []
    for mtype, wire, stamp in (
        (dnstap_pb2.Message.CLIENT_QUERY, query.to_wire(), now - latency),
        (dnstap_pb2.Message.CLIENT_RESPONSE, response.to_wire(), now),
    ):
        tap = dnstap_pb2.Dnstap(type=dnstap_pb2.Dnstap.MESSAGE, identity=identity.encode())
        m = tap.message
        m.type = mtype
        m.socket_family = family
        m.socket_protocol = dnstap_pb2.TCP if i % 8 == 3 else dnstap_pb2.UDP
        m.query_address = address
        m.query_port = 40000 + i % 20000
        m.query_time_sec, m.query_time_nsec = int(now - latency), int(((now - latency) % 1) * 1e9)
        if mtype == dnstap_pb2.Message.CLIENT_QUERY:
            m.query_message = wire
        else:
            m.response_message = wire
            m.response_time_sec, m.response_time_nsec = int(now), int((now % 1) * 1e9)
        frames.append(tap.SerializeToString())
    return frames


def bad_frames(identity: str, now: float) -> list[bytes]:
    """A response whose DNS payload is cut short (decoded, flagged malformed) and a frame that
    is no dnstap message at all (undecodable, skipped)."""
    _query, response = exchange(identity, 0, now)
    tap = dnstap_pb2.Dnstap.FromString(response)
    tap.message.response_message = tap.message.response_message[:15]
    return [tap.SerializeToString(), b"\xff\x00 not a dnstap message"]


class Traffic:
    """Sends ``rates`` (identity -> exchanges per second) to the receiver's TCP input from a
    thread per identity until :meth:`stop`; :attr:`sent` counts exchanges per identity."""

    def __init__(self, port: int, rates: dict[str, int], host: str = "127.0.0.1", hostile: bool = False) -> None:
        self._port, self._host, self._rates, self._hostile = port, host, rates, hostile
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.sent = dict.fromkeys([*rates, *([HOSTILE_IDENTITY] if hostile else [])], 0)
        self.errors: list[BaseException] = []

    def start(self) -> Traffic:
        if self._hostile:
            self._send_hostile()
        for identity, rate in self._rates.items():
            thread = threading.Thread(target=self._run, args=(identity, rate), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def _run(self, identity: str, rate: int) -> None:
        tick = 0.05
        try:
            with FstrmClient.tcp(self._host, self._port) as client:
                client.handshake()
                client.send_frames(bad_frames(identity, time.time()))
                while not self._stop.wait(tick):
                    now = time.time()
                    n = max(1, round(rate * tick))
                    frames = []
                    for _ in range(n):
                        frames.extend(exchange(identity, self.sent[identity], now))
                        self.sent[identity] += 1
                    client.send_frames(frames)
                client.stop()
        except Exception as exc:  # noqa: BLE001 - reported by stop(): a thread cannot fail the test
            self.errors.append(exc)

    def _send_hostile(self) -> None:
        with FstrmClient.tcp(self._host, self._port) as client:
            client.handshake()
            client.send_frames(exchange(HOSTILE_IDENTITY, 0, time.time(), HOSTILE_QNAME))
            client.stop()
        self.sent[HOSTILE_IDENTITY] = 1

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(15)
        assert not self.errors, self.errors


def start_watched_receiver(factory, directory: Path, login: str, password: str, api_key: str, **extra):
    """A receiver for ``Traffic`` with its web API up, a filter dropping ``BLOCKED`` and a
    network output whose server is down (so that their counters and metrics exist);
    ``extra`` sections are merged in. ``factory`` is conftest's receiver factory.
    Returns (receiver, Frame Streams port, API port)."""
    directory.mkdir(parents=True, exist_ok=True)
    blocked = directory / "blocked.txt"
    blocked.write_text(BLOCKED + "\n")
    port, api = free_tcp_port(), free_tcp_port()
    config = {
        "input": {"tcp-socket": {"enable": True, "local-address": "127.0.0.1", "local-port": port}},
        "web-api": {"enable": True, "local-port": api, "login": login, "password": password, "api-key": api_key},
        "statistics": {"window": 1},
        "filter": {"drop-domains-file": str(blocked)},
        "output": {"tcp-socket": {"enable": True, "remote-address": "127.0.0.1", "remote-port": free_tcp_port(),
                                  "retry": 1, "flush-timeout": 1}},
    }
    for section, values in extra.items():
        config[section] = {**config.get(section, {}), **values}
    rx = factory(directory / "rx", config)
    deadline = time.monotonic() + 20
    while not peers.port_open("127.0.0.1", api):  # the API starts after the inputs listen
        assert time.monotonic() < deadline, rx.logs()
        time.sleep(0.1)
    return rx, port, api
