#!/usr/bin/env python3
"""End-to-end throughput and memory benchmark: ours versus dnstap-receiver 4.7.0.

For every receiver under test, in one run: start it as a subprocess with a TCP
Frame Streams input and a JSON-lines file output, push N dnstap messages over
one bidirectional connection, and time how long until the file holds N lines.
Memory (VmRSS/VmHWM of the receiver and its children) is sampled all along.

This is a benchmark, not a test: it prints a table (and optionally writes JSON)
and exits non-zero only when it could not run at all. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import struct
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # so that `core` imports when run as a plain script

import dns.flags  # noqa: E402
import dns.message  # noqa: E402
import dns.rcode  # noqa: E402
import dns.rdatatype  # noqa: E402
import dns.rrset  # noqa: E402
import yaml  # noqa: E402

from core import dnstap_pb2  # noqa: E402
from core.errors import FrameStreamError  # noqa: E402
from core.framestream import (  # noqa: E402
    ACCEPT,
    CONTENT_TYPE_DNSTAP,
    FINISH,
    READY,
    START,
    STOP,
    ControlFrame,
    encode_control,
    encode_data,
    parse_control,
)

try:  # orjson only speeds up the verification pass; stdlib json gives the same answers.
    import orjson

    _json_loads: Callable[[bytes], Any] = orjson.loads
except ImportError:  # pragma: no cover - orjson is pinned in requirements.txt
    _json_loads = json.loads

HOST = "127.0.0.1"
OURS = "ours"
REF = "4.7"
REF_LABEL = "4.7.0"
REF_VENV = REPO / "benchmarks" / ".venv-4.7"
REF_PACKAGE = "dnstap-receiver==4.7.0"

# 4.7.0 parses file-max-size as int(value.split("M")[0]), so "100G" would crash it;
# 102400M (100 GiB) is the same "never rotate" in the only unit both understand.
FILE_MAX_SIZE = "102400M"
SEND_CHUNK = 1 << 20  # bytes per sendall: large writes, as a busy DNS server's fstrm would do
READ_CHUNK = 1 << 22  # bytes per read of the output file while counting lines
LINE_POLL_S = 0.02  # output polling period: the end-of-run timing error is at most this
MEM_POLL_S = 0.2  # RSS sampling period, as the brief asks
PROGRESS_S = 10.0
FINISH_GRACE_S = 10.0  # how long to wait for FINISH once all lines are written
STARTUP_TIMEOUT_S = 120.0
MB = 1024 * 1024

QUERY, RESPONSE = dnstap_pb2.Message.CLIENT_QUERY, dnstap_pb2.Message.CLIENT_RESPONSE
TYPE_NAMES = {QUERY: "CLIENT_QUERY", RESPONSE: "CLIENT_RESPONSE"}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- workload


@dataclass
class Workload:
    """The N frames, already Frame Streams encoded and concatenated, plus what to expect."""

    data: bytes
    messages: int
    expected: dict[str, int]
    pool_size: int
    distinct_questions: int
    seconds: float


_DOMAINS = [
    "google.com", "youtube.com", "facebook.com", "wikipedia.org", "amazon.com", "apple.com",
    "microsoft.com", "netflix.com", "github.com", "cloudflare.com", "example.org", "debian.org",
    "python.org", "mozilla.org", "twitter.com", "linkedin.com", "bbc.co.uk", "lemonde.fr",
    "spiegel.de", "yahoo.co.jp", "akamaiedge.net", "fastly.net", "office365.com", "zoom.us",
    "slack.com", "dropbox.com", "stackoverflow.com", "reddit.com", "instagram.com", "nic.fr",
]
_LABELS = ["www", "mail", "api", "cdn", "static", "login", "m", "img", "ns1", "smtp", "", "_dmarc"]
# Weighted roughly like a recursive resolver's client traffic.
_QTYPES = ["A"] * 10 + ["AAAA"] * 6 + ["HTTPS"] * 3 + ["MX", "TXT", "NS", "PTR", "SRV", "SOA"]


def _answer_rrset(qname: str, qtype: str, rng: random.Random) -> dns.rrset.RRset | None:
    ttl = rng.choice([30, 60, 300, 3600])
    rdata = {
        "A": lambda: f"192.0.2.{rng.randrange(1, 255)}",
        "AAAA": lambda: f"2001:db8::{rng.randrange(1, 0xFFFF):x}",
        "MX": lambda: f"10 mx{rng.randrange(1, 4)}.{qname}",
        "TXT": lambda: '"v=spf1 include:_spf.example.net ~all"',
        "NS": lambda: f"ns{rng.randrange(1, 4)}.{qname}",
        "SOA": lambda: f"ns1.{qname} hostmaster.{qname} 2024010101 7200 3600 1209600 300",
        "HTTPS": lambda: '1 . alpn="h2,h3"',
    }.get(qtype)
    if rdata is None:  # PTR/SRV on these names: NODATA, as in real traffic
        return None
    texts = [rdata() for _ in range(rng.choice([1, 1, 2]) if qtype in ("A", "AAAA") else 1)]
    return dns.rrset.from_text(qname, ttl, "IN", qtype, *texts)


def build_dns_templates(count: int, rng: random.Random) -> list[tuple[bytes, bytes]]:
    """(query wire, response wire) pairs for `count` distinct questions, built once with dnspython."""
    questions: set[tuple[str, str]] = set()
    # Past half the hand-written combinations, unique host labels (as CDNs and
    # trackers produce), so that any count can be reached.
    common = len(set(_LABELS)) * len(set(_DOMAINS)) * len(set(_QTYPES)) // 2  # lists repeat entries as weights
    while len(questions) < count:
        label = rng.choice(_LABELS) if len(questions) < common else f"h{rng.randrange(1 << 30):x}"
        domain = rng.choice(_DOMAINS)
        questions.add((f"{label}.{domain}." if label else f"{domain}.", rng.choice(_QTYPES)))
    templates = []
    for qname, qtype in sorted(questions):
        query = dns.message.make_query(qname, qtype, use_edns=0, payload=1232)
        response = dns.message.make_response(query, our_payload=1232)
        response.flags |= dns.flags.RA  # a recursive resolver answering its clients
        roll = rng.random()
        if roll < 0.06:
            response.set_rcode(dns.rcode.NXDOMAIN)
        elif roll < 0.07:
            response.set_rcode(dns.rcode.SERVFAIL)
        else:
            rrset = _answer_rrset(qname, qtype, rng)
            if rrset is not None:
                response.answer.append(rrset)
        templates.append((query.to_wire(), response.to_wire()))
    return templates


def _with_id(wire: bytes, msg_id: int) -> bytes:
    return struct.pack("!H", msg_id) + wire[2:]


def _random_client(rng: random.Random) -> tuple[int, bytes, bytes]:
    """(socket family, client address, resolver address): about 1 client in 5 is IPv6."""
    if rng.random() < 0.2:
        client = bytes([0x20, 0x01, 0x0D, 0xB8]) + rng.randbytes(12)
        return dnstap_pb2.INET6, client, bytes([0x20, 0x01, 0x0D, 0xB8]) + bytes(11) + b"\x35"
    client = bytes([10, rng.randrange(256), rng.randrange(256), rng.randrange(1, 255)])
    return dnstap_pb2.INET, client, bytes([10, 0, 0, 53])


@dataclass
class FramePool:
    frames: list[bytes]  # encoded data frames, alternating CLIENT_QUERY / CLIENT_RESPONSE
    types: list[int]
    id_offsets: list[int]  # where each frame's DNS message id sits inside the frame
    ids: list[int]


def build_frame_pool(templates: list[tuple[bytes, bytes]], pairs: int, rng: random.Random) -> FramePool:
    """2*pairs encoded data frames: the query and the response of each exchange."""
    pool = FramePool([], [], [], [])
    clock_ns = 1_700_000_000 * 10**9
    tap = dnstap_pb2.Dnstap()
    for _ in range(pairs):
        query_wire, response_wire = rng.choice(templates)
        msg_id = rng.randrange(65536)
        family, client, server = _random_client(rng)
        protocol = dnstap_pb2.TCP if rng.random() < 0.1 else dnstap_pb2.UDP
        port = rng.randrange(1024, 65536)
        clock_ns += rng.randrange(10_000, 2_000_000)  # 0.01-2 ms between exchanges
        latency_ns = rng.randrange(100_000, 50_000_000)  # 0.1-50 ms to answer
        for mtype in (QUERY, RESPONSE):
            tap.Clear()
            tap.identity = b"bench"
            tap.version = b"bench_e2e"
            tap.type = dnstap_pb2.Dnstap.MESSAGE
            m = tap.message
            m.type = mtype
            m.socket_family = family
            m.socket_protocol = protocol
            m.query_address, m.response_address = client, server
            m.query_port, m.response_port = port, 53
            m.query_time_sec, m.query_time_nsec = divmod(clock_ns, 10**9)
            if mtype == QUERY:
                wire = m.query_message = _with_id(query_wire, msg_id)
            else:
                m.response_time_sec, m.response_time_nsec = divmod(clock_ns + latency_ns, 10**9)
                wire = m.response_message = _with_id(response_wire, msg_id)
            frame = encode_data(tap.SerializeToString())
            pool.frames.append(frame)
            pool.types.append(mtype)
            pool.id_offsets.append(frame.index(wire))
            pool.ids.append(msg_id)
    return pool


def build_workload(messages: int, pool_frames: int, questions: int, seed: int) -> Workload:
    """N frames by cycling through a pre-serialised pool (fast even for millions of messages)."""
    started = time.perf_counter()
    rng = random.Random(seed)
    templates = build_dns_templates(questions, rng)
    pool = build_frame_pool(templates, max(1, pool_frames // 2), rng)
    size = len(pool.frames)
    full_cycles, rest = divmod(messages, size)
    blob = b"".join(pool.frames)
    data = bytearray(blob * full_cycles + b"".join(pool.frames[:rest]))
    _vary_ids(data, len(blob), pool, messages)
    types = pool.types
    counted = [types.count(t) * full_cycles + types[:rest].count(t) for t in (QUERY, RESPONSE)]
    expected = {TYPE_NAMES[QUERY]: counted[0], TYPE_NAMES[RESPONSE]: counted[1]}
    return Workload(bytes(data), messages, expected, size, len(templates), time.perf_counter() - started)


def _vary_ids(data: bytearray, cycle_bytes: int, pool: FramePool, messages: int) -> None:
    """Give each pass over the pool its own DNS ids, so that (client, port, id) keys stay
    distinct as in real traffic: a receiver that pairs queries with responses (4.7.0 keeps
    them in a cache for latency) would otherwise see only the pool's few thousand keys.
    A query and its response get the same new id, so pairs still match."""
    pack_into = struct.Struct("!H").pack_into
    positions = []  # (absolute position of frame i in the first cycle, its original id)
    base = 0
    for frame, offset, msg_id in zip(pool.frames, pool.id_offsets, pool.ids):
        positions.append((base + offset, msg_id))
        base += len(frame)
    size = len(positions)
    for cycle in range(1, -(-messages // size)):
        shift = cycle * 40503  # odd, so 65536 cycles give 65536 different ids per exchange
        start = cycle * cycle_bytes
        for pos, msg_id in positions[: min(size, messages - cycle * size)]:
            pack_into(data, start + pos, (msg_id + shift) & 0xFFFF)


# --------------------------------------------------------------------------- receivers


@dataclass
class Receiver:
    name: str
    label: str
    argv: Callable[[Path, int], list[str]]  # (config path, port) -> command line
    # SIGTERM and wait (ours), or SIGKILL: once 4.7.0's file output has written, SIGTERM
    # hangs it for good (its output task waits in queue.get() and never sees the shutdown).
    graceful_stop: bool


def ours_argv(conf: Path, port: int) -> list[str]:
    # The repo's own virtualenv, whichever interpreter runs the benchmark; not resolved,
    # because resolving the symlink would leave the virtualenv.
    venv_python = REPO / ".venv" / "bin" / "python"
    python = str(venv_python) if venv_python.exists() else sys.executable
    return [python, "-m", "pipeline", "--runner=DirectRunner", "-c", str(conf)]


def ref_argv(conf: Path, port: int) -> list[str]:
    # 4.7.0 overwrites input.tcp-socket.local-port with its -p argument (default 6000)
    # whatever the config says (receiver.py tests `args.l != DFLT_LISTEN_PORT`), so the
    # port has to be given on the command line as well.
    return [str(REF_VENV / "bin" / "dnstap_receiver"), "-c", str(conf), "-p", str(port)]


RECEIVERS = {
    OURS: Receiver(OURS, "ours", ours_argv, graceful_stop=True),
    REF: Receiver(REF, REF_LABEL, ref_argv, graceful_stop=False),
}


def ensure_ref_venv() -> None:
    """Create benchmarks/.venv-4.7 with dnstap-receiver 4.7.0 on first use."""
    if (REF_VENV / "bin" / "dnstap_receiver").exists():
        return
    log(f"creating {REF_VENV.relative_to(REPO)} with {REF_PACKAGE} (first use)")
    subprocess.run([sys.executable, "-m", "venv", str(REF_VENV)], check=True)
    subprocess.run(
        [str(REF_VENV / "bin" / "pip"), "install", "--quiet", REF_PACKAGE], check=True
    )


def write_config(directory: Path, port: int, output: Path, fmt: str, extra: dict | None = None) -> Path:
    """A 4.7.0-style config: both receivers read the same keys; ``extra``
    sections (ours only) are added to it."""
    config: dict[str, Any] = {
        "trace": {"verbose": False},
        "web-api": {"enable": False},
        "input": {"tcp-socket": {"enable": True, "local-address": HOST, "local-port": port}},
        "output": {
            "stdout": {"enable": False},
            "file": {"enable": True, "format": fmt, "file": str(output),
                     "file-max-size": FILE_MAX_SIZE, "file-count": 1},
        },
    }
    extra = dict(extra or {})
    config["output"].update(extra.pop("output", {}))
    config.update(extra)
    conf = directory / "dnstap.conf"
    conf.write_text(yaml.safe_dump(config, sort_keys=False))
    return conf


def all_transforms(directory: Path) -> dict:
    """Every transform on, none dropping a benchmark message (the clock stops at N
    lines): a 100,000-name drop list, GeoIP with MaxMind's test databases, /24 and
    /56 anonymisation, TLD and registrable domain."""
    blocked = directory / "blocked-domains.txt"
    blocked.write_text("".join(f"*.blocked{i}.example\n" for i in range(100_000)))
    geoip = REPO / "tests" / "data" / "geoip"
    return {
        "normalize": {"qname-lowercase": True, "add-tld": True, "add-registrable-domain": True},
        "latency": {"enable": True},
        "filter": {
            "keep-message-types": ["CLIENT_QUERY", "CLIENT_RESPONSE"],
            "drop-rcodes": ["REFUSED"],
            "drop-query-ip": ["203.0.113.0/24"],
            "drop-domains-file": str(blocked),
        },
        "geoip": {
            "enable": True,
            "city-database": str(geoip / "GeoIP2-City-Test.mmdb"),
            "asn-database": str(geoip / "GeoLite2-ASN-Test.mmdb"),
        },
        "privacy": {"anonymize-ip": True},
    }


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def connect_when_listening(port: int, proc: subprocess.Popen, timeout: float) -> socket.socket:
    """Retry until the receiver accepts; the first successful connection is the one we use,
    so that no empty probe connection reaches the receiver."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"receiver exited with code {proc.returncode} before listening")
        try:
            return socket.create_connection((HOST, port), timeout=1.0)
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"receiver did not listen on {HOST}:{port} within {timeout:.0f} s")
            time.sleep(0.05)


# --------------------------------------------------------------------------- Frame Streams sender


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    buf = bytearray()
    while len(buf) < size:
        chunk = sock.recv(size - len(buf))
        if not chunk:
            raise ConnectionError("receiver closed the connection")
        buf += chunk
    return bytes(buf)


def recv_control(sock: socket.socket) -> ControlFrame:
    escape, length = struct.unpack("!II", recv_exactly(sock, 8))
    if escape != 0:
        raise ConnectionError(f"expected a control frame, got a {escape}-byte data frame")
    return parse_control(recv_exactly(sock, length))


def handshake(sock: socket.socket, timeout: float) -> None:
    """READY -> ACCEPT (bidirectional Frame Streams)."""
    sock.settimeout(timeout)
    sock.sendall(encode_control(READY, (CONTENT_TYPE_DNSTAP,)))
    reply = recv_control(sock)
    if reply.type != ACCEPT or CONTENT_TYPE_DNSTAP not in reply.content_types:
        raise ConnectionError(f"expected ACCEPT with the dnstap content type, got {reply}")


class Sender(threading.Thread):
    """START, data in large chunks, STOP, then wait for FINISH; the main thread polls output.

    Runs in a thread because a slow receiver pushes back through TCP and would block
    the line counting and memory sampling otherwise.
    """

    def __init__(self, sock: socket.socket, data: bytes, timeout: float) -> None:
        super().__init__(name="fstrm-sender", daemon=True)
        self.sock, self.data, self.timeout = sock, data, timeout
        self.t_first_byte = 0.0
        self.t_last_byte: float | None = None
        self.t_finish: float | None = None
        self.error: str | None = None
        self.started_event = threading.Event()

    def run(self) -> None:
        try:
            self.sock.settimeout(self.timeout)
            self.sock.sendall(encode_control(START, (CONTENT_TYPE_DNSTAP,)))
            view = memoryview(self.data)
            self.t_first_byte = time.perf_counter()  # the clock starts at the first data byte
            self.started_event.set()
            for offset in range(0, len(view), SEND_CHUNK):
                self.sock.sendall(view[offset : offset + SEND_CHUNK])
            self.sock.sendall(encode_control(STOP))
            self.t_last_byte = time.perf_counter()
            reply = recv_control(self.sock)
            if reply.type != FINISH:
                raise ConnectionError(f"expected FINISH, got {reply.name}")
            self.t_finish = time.perf_counter()
        except (OSError, FrameStreamError) as exc:
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.started_event.set()


# --------------------------------------------------------------------------- measurement


class LineCounter:
    """Counts newlines in a growing file, reading only the bytes added since the last poll."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines = 0
        self._file = None

    def poll(self) -> int:
        if self._file is None:
            try:
                self._file = open(self.path, "rb")  # the receiver may create it lazily
            except FileNotFoundError:
                return 0
        while chunk := self._file.read(READ_CHUNK):
            self.lines += chunk.count(b"\n")
        return self.lines

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[bytes] | None:
    """/proc/PID/stat fields after the command name (which may contain spaces)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rindex(b")") + 2 :].split()


def tree_cpu_seconds(pids: list[int]) -> float:
    """utime + stime of these processes (fields 14 and 15 of /proc/PID/stat)."""
    ticks = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / _CLK_TCK


def machine_busy_seconds() -> float:
    """CPU time spent by the whole machine, all cores, from /proc/stat (idle and iowait excluded)."""
    with open("/proc/stat", "rb") as f:
        cpu = f.readline().split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in cpu[:8])
    return (user + nice + system + irq + softirq + steal) / _CLK_TCK


@dataclass
class CpuWindow:
    """CPU used during the timed window by the receiver, by this benchmark and by anything
    else: the last one says whether something else on the machine disturbed the run."""

    root: int
    receiver0: float = 0.0
    bench0: float = 0.0
    machine0: float = 0.0

    def start(self) -> None:
        self.receiver0 = tree_cpu_seconds(process_tree(self.root))
        self.bench0 = time.process_time()
        self.machine0 = machine_busy_seconds()

    def stop(self) -> dict[str, float]:
        receiver = tree_cpu_seconds(process_tree(self.root)) - self.receiver0
        bench = time.process_time() - self.bench0
        machine = machine_busy_seconds() - self.machine0
        return {
            "receiver_cpu_seconds": round(receiver, 2),
            "bench_cpu_seconds": round(bench, 2),
            "other_cpu_seconds": round(max(0.0, machine - receiver - bench), 2),
        }


def _status_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) in kB from /proc/PID/status; (0, 0) once the process is gone."""
    rss = hwm = 0
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith(b"VmHWM:"):
                    hwm = int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return rss, hwm


def process_tree(root: int) -> list[int]:
    """root and all its descendants (this kernel has no /proc/PID/task/TID/children)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat_fields(int(entry))) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


@dataclass
class MemorySampler:
    root: int
    samples: list[tuple[float, float]] = field(default_factory=list)  # (time, RSS MB of the tree)
    hwm_kb: dict[int, int] = field(default_factory=dict)  # per process, the largest VmHWM seen
    max_processes: int = 0
    pids_seen: set[int] = field(default_factory=set)

    def sample(self, now: float) -> float:
        pids = process_tree(self.root)
        self.pids_seen.update(pids)
        self.max_processes = max(self.max_processes, len(pids))
        total_kb = 0
        for pid in pids:
            rss, hwm = _status_kb(pid)
            total_kb += rss
            self.hwm_kb[pid] = max(self.hwm_kb.get(pid, 0), hwm)
        mb = total_kb / 1024
        self.samples.append((now, mb))
        return mb

    def peak_mb(self, since: float) -> float:
        return max((mb for t, mb in self.samples if t >= since), default=0.0)

    def at_fractions(self, start: float, end: float) -> dict[str, float]:
        """RSS at 25/50/75/100 % of [start, end]: flat numbers mean no growth."""
        return at_fractions([(t, round(mb, 1)) for t, mb in self.samples if t >= start], start, end)


def at_fractions(samples: list[tuple[float, Any]], start: float, end: float) -> dict[str, Any]:
    """The value of the sample closest in time to each quarter of [start, end]."""
    if not samples:
        return {}
    result = {}
    for frac in (0.25, 0.5, 0.75, 1.0):
        target = start + frac * (end - start)
        result[f"{round(frac * 100)}%"] = min(samples, key=lambda s: abs(s[0] - target))[1]
    return result


def verify_output(path: Path, fmt: str, expected: dict[str, int]) -> dict[str, Any]:
    """Every line parses (JSON) or splits (text), and the message types add up."""
    counts: dict[str, int] = {}
    lines = invalid = 0
    unterminated = False
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        data = b""
    if data and not data.endswith(b"\n"):
        unterminated = True
    for line in data.splitlines():
        lines += 1
        try:
            if fmt == "json":
                kind = _json_loads(line).get("message", "?")
            else:  # 4.7.0 text layout: timestamp identity MESSAGE rcode ...
                kind = line.split(b" ", 3)[2].decode()
        except (ValueError, IndexError, AttributeError):
            invalid += 1
            continue
        counts[kind] = counts.get(kind, 0) + 1
    want_lines = sum(expected.values())
    ok = lines == want_lines and invalid == 0 and counts == expected and not unterminated
    return {
        "ok": ok,
        "lines": lines,
        "invalid": invalid,
        "unterminated_last_line": unterminated,
        "counts": counts,
        "expected": expected,
        "bytes": len(data),
    }


def stop_receiver(proc: subprocess.Popen, receiver: Receiver, timeout: float, pids: set[int]) -> dict:
    """SIGTERM and wait (ours), or SIGKILL (4.7.0); then kill any child it left behind."""
    started = time.perf_counter()
    if proc.poll() is not None:
        info = {"signal": None, "exit_code": proc.returncode, "exit_seconds": 0.0, "killed": False}
    elif receiver.graceful_stop:
        proc.send_signal(signal.SIGTERM)
        killed = False
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            killed = True
        info = {
            "signal": "SIGTERM",
            "exit_code": proc.returncode,
            "exit_seconds": round(time.perf_counter() - started, 3),
            "killed": killed,
        }
    else:
        proc.kill()
        proc.wait()
        info = {"signal": "SIGKILL", "exit_code": proc.returncode, "exit_seconds": None, "killed": True}
    leftovers = [pid for pid in pids - {proc.pid} if _is_descendant_alive(pid)]
    for pid in leftovers:  # only processes that descended from the receiver we started
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    info["leftover_children_killed"] = len(leftovers)
    return info


def _is_descendant_alive(pid: int) -> bool:
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != b"Z"


# --------------------------------------------------------------------------- one receiver


def measure(
    proc: subprocess.Popen, sender: Sender, counter: LineCounter, sampler: MemorySampler,
    messages: int, timeout: float, label: str,
) -> dict[str, Any]:
    """Poll the output until it has all lines, the receiver dies, or the timeout passes."""
    sender.start()
    sender.started_event.wait()
    t0 = sender.t_first_byte or time.perf_counter()
    cpu = CpuWindow(proc.pid)
    cpu.start()
    deadline = t0 + timeout
    next_mem = next_progress = t0
    outcome = "complete"
    progress: list[tuple[float, int]] = []  # (time, lines written): steady or bursty output?
    while True:
        now = time.perf_counter()
        lines = counter.poll()
        if now >= next_mem:
            sampler.sample(now)
            progress.append((now, lines))
            next_mem += MEM_POLL_S
        if lines >= messages:
            break
        if proc.poll() is not None:
            outcome = f"receiver exited with code {proc.returncode}"
            break
        if now >= deadline:
            outcome = "timeout"
            break
        if now >= next_progress + PROGRESS_S:
            next_progress = now
            log(f"[{label}] {lines}/{messages} lines after {now - t0:.0f} s")
        time.sleep(LINE_POLL_S)
    t_end = time.perf_counter()
    cpu_used = cpu.stop()
    sampler.sample(t_end)  # the 100 % point
    progress.append((t_end, lines))
    if outcome == "complete":  # FINISH may trail the last line a little; a failed run has no time for it
        sender.join(FINISH_GRACE_S)
    elapsed = t_end - t0
    return {
        "outcome": outcome,
        "lines_written": lines,
        "seconds": round(elapsed, 3),
        "messages_per_second": round(lines / elapsed, 1) if elapsed > 0 else None,
        "send_seconds": _since(t0, sender.t_last_byte),
        "finish_seconds": _since(t0, sender.t_finish),
        "sender_error": sender.error,
        **cpu_used,
        "peak_rss_mb": round(sampler.peak_mb(t0), 1),
        "rss_at": sampler.at_fractions(t0, t_end),
        "lines_at": at_fractions(progress, t0, t_end),
    }


def _since(t0: float, t: float | None) -> float | None:
    return round(t - t0, 3) if t is not None else None


def run_receiver(receiver: Receiver, workload: Workload, args: argparse.Namespace) -> dict[str, Any]:
    """Start one receiver, measure it, stop it, verify its output; the temp dir goes at the end."""
    tmp = Path(tempfile.mkdtemp(prefix=f"bench-e2e-{receiver.name}-"))
    try:
        port = free_port()
        output = tmp / "dnstap.jsonl"
        extra = None
        if receiver.name == OURS:
            extra = all_transforms(tmp) if args.transforms else {}
            extra["statistics"] = {"enable": not args.no_statistics}
            if args.config:
                extra["output"] = yaml.safe_load(args.config.read_text()).get("output", {})
        argv = receiver.argv(write_config(tmp, port, output, args.format, extra), port)
        result: dict[str, Any] = {
            "receiver": receiver.label,
            "command": argv,
            "messages": workload.messages,
            "loadavg_before": os.getloadavg()[0],
        }
        log(f"[{receiver.label}] starting: {' '.join(argv)}")
        with open(tmp / "stdout.log", "wb") as stdout, open(tmp / "stderr.log", "wb") as stderr:
            t_spawn = time.perf_counter()
            proc = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr)
            sampler = MemorySampler(proc.pid)
            try:
                result.update(drive(proc, port, t_spawn, sampler, output, workload, args, receiver.label))
            finally:  # whatever happened, the receiver does not outlive its run
                sampler.sample(time.perf_counter())
                result["vmhwm_mb"] = round(sum(sampler.hwm_kb.values()) / 1024, 1)
                result["processes"] = sampler.max_processes
                result["stop"] = stop_receiver(proc, receiver, args.stop_timeout, sampler.pids_seen)
        result["verify"] = verify_output(output, args.format, workload.expected)
        if result.get("outcome") != "complete" or not result["verify"]["ok"]:
            _show_log_tail(tmp / "stderr.log", receiver.label)
        return result
    finally:
        if args.keep:
            log(f"[{receiver.label}] kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def drive(
    proc: subprocess.Popen, port: int, t_spawn: float, sampler: MemorySampler, output: Path,
    workload: Workload, args: argparse.Namespace, label: str,
) -> dict[str, Any]:
    """Connect, handshake, send and measure; failures become an outcome, not an exception."""
    result: dict[str, Any] = {}
    counter = LineCounter(output)
    try:
        sock = connect_when_listening(port, proc, STARTUP_TIMEOUT_S)
        result["startup_seconds"] = round(time.perf_counter() - t_spawn, 3)
        with sock:
            handshake(sock, STARTUP_TIMEOUT_S)
            time.sleep(args.settle)  # let a lazily started pipeline finish starting
            result["rss_idle_mb"] = round(sampler.sample(time.perf_counter()), 1)
            log(f"[{label}] listening after {result['startup_seconds']} s; sending")
            sender = Sender(sock, workload.data, args.timeout + FINISH_GRACE_S)
            result.update(measure(proc, sender, counter, sampler, workload.messages, args.timeout, label))
            if sender.is_alive():  # unblock a sender stuck on a receiver that stopped reading
                sock.shutdown(socket.SHUT_RDWR)
                sender.join(5)
    except (RuntimeError, OSError, FrameStreamError) as exc:
        result["outcome"] = f"error: {type(exc).__name__}: {exc}"
        log(f"[{label}] {result['outcome']}")
    finally:
        counter.close()
    return result


def _show_log_tail(path: Path, label: str, lines: int = 20) -> None:
    try:
        tail = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return
    if tail:
        log(f"[{label}] last lines of its stderr:\n    " + "\n    ".join(tail))


# --------------------------------------------------------------------------- report


def _fmt(value: Any, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


def _cores(r: dict[str, Any]) -> float | None:
    """Receiver CPU time over wall time: 1.0 is one core busy all along."""
    if not r.get("seconds") or r.get("receiver_cpu_seconds") is None:
        return None
    return r["receiver_cpu_seconds"] / r["seconds"]


def disturbed(r: dict[str, Any]) -> bool:
    """Did something else on the machine use more than a tenth of a core during the run?"""
    return bool(r.get("seconds")) and r.get("other_cpu_seconds", 0.0) > 0.1 * r["seconds"]


def _exit_text(stop: dict[str, Any]) -> str:
    if not stop.get("signal"):
        return f"exited {stop.get('exit_code')}"
    text = f"{stop['signal']} -> {stop.get('exit_code')}"
    return text + (f" in {stop['exit_seconds']:.1f}s" if stop.get("exit_seconds") is not None else "")


def print_table(results: list[dict[str, Any]]) -> None:
    header = ["receiver", "messages", "written", "seconds", "msg/s", "cores", "peak RSS MB",
              "RSS 25%", "50%", "75%", "100%", "outcome", "exit", "verified"]
    rows = [header]
    for r in results:
        rss = r.get("rss_at", {})
        exit_text = _exit_text(r.get("stop", {}))
        rows.append([
            r["receiver"], str(r["messages"]), _fmt(r.get("lines_written")), _fmt(r.get("seconds"), ".2f"),
            _fmt(r.get("messages_per_second"), ",.0f"), _fmt(_cores(r), ".2f"), _fmt(r.get("peak_rss_mb"), ".1f"),
            *(_fmt(rss.get(k), ".1f") for k in ("25%", "50%", "75%", "100%")),
            r.get("outcome", "?").split(":")[0], exit_text, "yes" if r["verify"]["ok"] else "NO",
        ])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for i, row in enumerate(rows):
        print("  ".join(cell.ljust(w) if j == 0 else cell.rjust(w) for j, (cell, w) in enumerate(zip(row, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def ratios(results: list[dict[str, Any]]) -> dict[str, float] | None:
    by_name = {r["receiver"]: r for r in results}
    ours, ref = by_name.get("ours"), by_name.get(REF_LABEL)
    if not ours or not ref or not ours.get("messages_per_second") or not ref.get("messages_per_second"):
        return None
    out = {"throughput": round(ours["messages_per_second"] / ref["messages_per_second"], 2)}
    if ref.get("peak_rss_mb"):
        out["peak_rss"] = round(ours["peak_rss_mb"] / ref["peak_rss_mb"], 2)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=500_000, help="dnstap messages to send (default 500000)")
    p.add_argument("--only", choices=[OURS, REF], help="run one receiver only")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON here")
    p.add_argument("--format", choices=["json", "text"], default="json",
                   help="receivers' file output format, output.file.format (default json)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per receiver (default 600)")
    p.add_argument("--settle", type=float, default=1.0,
                   help="seconds between the handshake and the first data byte (default 1)")
    p.add_argument("--stop-timeout", type=float, default=60.0,
                   help="seconds to wait for ours to exit after SIGTERM before SIGKILL (default 60)")
    p.add_argument("--pool", type=int, default=4096, help="distinct pre-serialised frames (default 4096)")
    p.add_argument("--questions", type=int, default=300, help="distinct qname/qtype pairs (default 300)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--no-statistics", action="store_true",
                   help="ours with the statistics off (they are on by default)")
    p.add_argument("--statistics-cost", type=int, metavar="N", default=0,
                   help="ours only, N runs with the statistics on and N with them off, alternating; "
                        "prints the median msg/s of each and the cost of the statistics")
    p.add_argument("--transforms", action="store_true",
                   help="ours with every transform enabled (normalize, latency, filter, GeoIP, privacy)")
    p.add_argument("--config", type=Path, metavar="YAML",
                   help="ours: the `output:` section of this YAML file is added to its config "
                        "(e.g. a network output next to the file output)")
    p.add_argument("--keep", action="store_true", help="keep the temp dirs (config, output, logs)")
    args = p.parse_args(argv)
    if args.messages < 1:
        p.error("--messages must be at least 1")
    if args.statistics_cost and (args.only == REF or args.no_statistics):
        p.error("--statistics-cost runs ours with and without statistics itself")
    return args


def statistics_cost(workload: Workload, args: argparse.Namespace) -> int:
    """Alternate runs with the statistics on and off (the machine's drift
    hits both alike) and compare the medians; one run each is too noisy here."""
    rates: dict[bool, list[float]] = {True: [], False: []}
    for i in range(args.statistics_cost):
        for on in (True, False):
            run_args = argparse.Namespace(**{**vars(args), "no_statistics": not on})
            r = run_receiver(RECEIVERS[OURS], workload, run_args)
            if r.get("outcome") != "complete" or not r["verify"]["ok"]:
                print(f"run {i + 1} statistics {'on' if on else 'off'} failed: {r.get('outcome')}")
                return 1
            rates[on].append(r["messages_per_second"])
            log(f"run {i + 1}: statistics {'on ' if on else 'off'} {r['messages_per_second']:,.0f} msg/s")
    on, off = statistics.median(rates[True]), statistics.median(rates[False])
    cost = 1 - on / off
    print(f"statistics on:  median {on:,.0f} msg/s  runs {', '.join(f'{x:,.0f}' for x in rates[True])}")
    print(f"statistics off: median {off:,.0f} msg/s  runs {', '.join(f'{x:,.0f}' for x in rates[False])}")
    print(f"cost of the statistics: {cost:.1%} of the throughput")
    if args.json:
        args.json.write_text(json.dumps({"messages": workload.messages, "on": rates[True], "off": rates[False],
                                         "median_on": on, "median_off": off, "cost": round(cost, 4)}, indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = [args.only] if args.only else [OURS, REF]
    if args.statistics_cost:
        names = [OURS]
    if REF in names:
        ensure_ref_venv()
    workload = build_workload(args.messages, args.pool, args.questions, args.seed)
    log(f"generated {workload.messages} messages ({len(workload.data) / MB:.1f} MB, pool of "
        f"{workload.pool_size} frames, {workload.distinct_questions} questions) in {workload.seconds:.2f} s")
    if args.statistics_cost:
        return statistics_cost(workload, args)
    results = [run_receiver(RECEIVERS[name], workload, args) for name in names]
    print_table(results)
    ratio = ratios(results)
    if ratio:
        print(f"\nours / {REF_LABEL}: throughput x{ratio['throughput']}, peak RSS x{ratio.get('peak_rss')}")
    for r in results:
        if disturbed(r):
            print(f"{r['receiver']}: WARNING other processes used {r['other_cpu_seconds']} CPU-s "
                  f"during its {r['seconds']} s: the machine was not quiet, numbers are low")
        if r.get("outcome") != "complete" or not r["verify"]["ok"]:
            print(f"{r['receiver']}: outcome={r.get('outcome')} verify={json.dumps(r['verify'])}")
    if args.json:
        report = {
            "messages": workload.messages,
            "stream_bytes": len(workload.data),
            "pool_frames": workload.pool_size,
            "format": args.format,
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "results": results,
            "ratio_ours_over_4.7.0": ratio,
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
