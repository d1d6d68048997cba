"""Helpers for integration tests against real dnstap peers (Debian packages).

Programs used: unbound (dnstap producer), dnsperf and dig (DNS load), fstrm_replay /
fstrm_capture (Frame Streams tools), dnstap-ldns and the Go ``dnstap`` tool (reference
decoders and senders). ``run_tests.sh`` installs them when it runs as root.

A missing program skips the test, except when DNSTAP_REQUIRE_PEERS=1 (CI): then it fails,
so that a broken install step can never turn into a green run of skipped tests.

Nothing here reads outside the repository: the unbound configuration template is
``tests/data/peers/unbound.conf.in``.
"""

from __future__ import annotations

import calendar
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "tests" / "data"
CAPTURES = DATA / "captures"
UNBOUND_TEMPLATE = DATA / "peers" / "unbound.conf.in"
CONTENT_TYPE = "protobuf:dnstap.Dnstap"

# unbound lives in /usr/sbin, which a non-root PATH often lacks.
_EXTRA_PATH = ("/usr/sbin", "/sbin", "/usr/local/sbin")

# The names unbound answers from local data (tests/data/peers/unbound.conf.in), and the
# types asked; anything else under "." is NXDOMAIN there.
LOCAL_NAMES = (
    "www.example.test",
    "mail.example.test",
    "api.example.test",
    "v6only.example.test",
    "ns.example.test",
    "example.test",
)
QTYPES = ("A", "AAAA", "MX", "TXT")
NXDOMAIN_NAMES = ("nope.example.test", "missing.example.test", "host.invalid")


def peers_required() -> bool:
    return os.environ.get("DNSTAP_REQUIRE_PEERS") == "1"


def which(program: str) -> str | None:
    path = os.environ.get("PATH", os.defpath)
    path = os.pathsep.join([path, *_EXTRA_PATH])
    return shutil.which(program, path=path)


def require(program: str) -> str:
    """Full path of ``program``; skips the test when it is missing (fails under
    DNSTAP_REQUIRE_PEERS=1)."""
    found = which(program)
    if found:
        return found
    message = f"peer program {program!r} is not installed (run ./run_tests.sh as root to install it)"
    if peers_required():
        pytest.fail(message + "; DNSTAP_REQUIRE_PEERS=1", pytrace=False)
    pytest.skip(message)
    raise AssertionError("unreachable")


def free_port(udp_too: bool = False) -> int:
    """A loopback port free for TCP (and for UDP when ``udp_too``: a DNS server needs both)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = tcp.getsockname()[1]
            if not udp_too:
                return port
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free loopback port found")


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def unix_socket_open(path: str | os.PathLike, timeout: float = 0.5) -> bool:
    if not os.path.exists(path):
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(os.fspath(path))
            return True
        except OSError:
            return False


def short_socket_dir(preferred: Path) -> Path:
    """A directory for unix sockets: ``preferred`` unless its paths would be too long
    for sun_path (108 bytes), else a fresh directory under /tmp."""
    if len(os.fsencode(preferred)) <= 80:
        return preferred
    import tempfile

    return Path(tempfile.mkdtemp(prefix="dnstap-sock-", dir="/tmp"))


# --------------------------------------------------------------------------- unbound


def file_tail(path: Path, limit: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return "(none)"


def write_unbound_conf(
    workdir: Path,
    dns_port: int,
    target: str,
    dnstap_options: tuple[str, ...] = (),
    any_client: bool = False,
) -> Path:
    """The unbound.conf for ``target`` (``unix:/path`` or ``tcp:HOST:PORT``), as
    run-unbound.sh writes it; ``dnstap_options`` are extra lines for its dnstap: section,
    e.g. "dnstap-bidirectional: no". ``any_client`` listens on every local address and
    answers every client (only inside a network namespace a test made)."""
    if target.startswith("unix:"):
        line = f'dnstap-socket-path: "{target[len("unix:"):]}"'
    elif target.startswith("tcp:"):
        host, _, port = target[len("tcp:"):].rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"bad tcp target {target!r}; expected tcp:HOST:PORT")
        line = f'dnstap-ip: "{host}@{port}"\n    dnstap-tls: no'
    else:
        raise ValueError(f"target must be unix:PATH or tcp:HOST:PORT, not {target!r}")
    text = UNBOUND_TEMPLATE.read_text()
    text = text.replace("@PORT@", str(dns_port)).replace("@WORK@", str(workdir))
    for option in dnstap_options:
        line += f"\n    {option}"
    text = text.replace("@DNSTAP_TARGET@", line)
    if any_client:
        text = text.replace("interface: 127.0.0.1@", "interface: 0.0.0.0@")
        text = text.replace("access-control: 127.0.0.0/8 allow", "access-control: 0.0.0.0/0 allow")
    conf = workdir / "unbound.conf"
    conf.write_text(text)
    return conf


def start_unbound(
    workdir: str | os.PathLike,
    dns_port: int,
    target: str,
    *,
    timeout: float = 20.0,
    probe: bool = False,
    dnstap_options: tuple[str, ...] = (),
    any_client: bool = False,
) -> subprocess.Popen:
    """Start unbound in the foreground (``-d``) answering example.test. on
    127.0.0.1:``dns_port`` and streaming dnstap to ``target``; the receiver must already
    listen there. Returns once unbound's TCP port accepts connections; with ``probe`` it
    must also answer a dig query (which then shows up as one query/response pair in the
    dnstap stream). The Popen has ``workdir`` and ``log`` attributes."""
    unbound = require("unbound")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    conf = write_unbound_conf(workdir, dns_port, target, dnstap_options, any_client)
    checkconf = which("unbound-checkconf")
    if checkconf:
        check = subprocess.run([checkconf, str(conf)], capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"unbound-checkconf refused {conf}:\n{check.stdout}{check.stderr}")
    out = open(workdir / "unbound.stdout", "wb")
    proc = subprocess.Popen(
        [unbound, "-d", "-c", str(conf)],
        stdout=out,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        cwd=workdir,
    )
    out.close()
    proc.workdir = workdir
    proc.log = workdir / "unbound.log"
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(
                f"unbound exited with {proc.returncode} at start-up\n"
                f"stdout: {file_tail(workdir / 'unbound.stdout')}\nlog: {file_tail(proc.log)}"
            )
        if port_open("127.0.0.1", dns_port) and (not probe or dig(dns_port, "ns.example.test", "A")):
            return proc
        if time.monotonic() > deadline:
            _kill(proc)
            raise RuntimeError(
                f"unbound did not come up on port {dns_port} within {timeout} s\n"
                f"stdout: {file_tail(workdir / 'unbound.stdout')}\nlog: {file_tail(proc.log)}"
            )
        time.sleep(0.1)


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)


def stop_unbound(proc: subprocess.Popen, *, settle: float = 2.0, timeout: float = 15.0) -> int:
    """Stop unbound with SIGTERM, ``settle`` seconds after the last query: unbound flushes
    its dnstap queue on a timer and drops the tail on a quick stop. Returns its exit code."""
    if proc.poll() is None:
        time.sleep(settle)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill(proc)
    return proc.returncode


def dig(
    port: int, qname: str, qtype: str = "A", *, host: str = "127.0.0.1", source: str | None = None
) -> str | None:
    """One query with dig (from ``source`` when given); its status (NOERROR,
    NXDOMAIN...) or None without an answer."""
    bind = ["-b", source] if source else []
    out = subprocess.run(
        [require("dig"), f"@{host}", "-p", str(port), *bind, "+time=1", "+tries=1", qname, qtype],
        capture_output=True,
        text=True,
    )
    match = re.search(r"status: (\w+)", out.stdout)
    return match.group(1) if match else None


# --------------------------------------------------------------------------- dnsperf


def write_queries(path: str | os.PathLike, n: int) -> list[tuple[str, str]]:
    """Write a dnsperf query file of ``n`` lines and return its (qname, qtype) pairs,
    qnames absolute (with the trailing dot), as a receiver reports them.

    A deterministic mix: every local-data name with A/AAAA/MX/TXT (answers, NODATA),
    and about one query in six for names that do not exist (NXDOMAIN)."""
    mix = [(name, qtype) for name in LOCAL_NAMES for qtype in QTYPES]
    mix += [(name, qtype) for name in NXDOMAIN_NAMES for qtype in ("A", "AAAA")]
    queries = [mix[(i * 7) % len(mix)] for i in range(n)]  # 7 is prime to len(mix)=30
    Path(path).write_text("".join(f"{name} {qtype}\n" for name, qtype in queries))
    return [(name + ".", qtype) for name, qtype in queries]


_DNSPERF_STATS = {
    "sent": re.compile(r"Queries sent:\s+(\d+)"),
    "completed": re.compile(r"Queries completed:\s+(\d+)"),
    "lost": re.compile(r"Queries lost:\s+(\d+)"),
}


def run_dnsperf(
    port: int,
    queries_file: str | os.PathLike,
    *,
    runs: int = 1,
    qps: int = 2000,
    host: str = "127.0.0.1",
    timeout: float = 120.0,
    extra_args: tuple[str, ...] = (),
) -> dict:
    """Run ``dnsperf -s HOST -p PORT -d FILE -n RUNS -Q QPS``; returns its statistics
    {"sent", "completed", "lost"} and "output"."""
    cmd = [require("dnsperf"), "-s", host, "-p", str(port), "-d", str(queries_file),
           "-n", str(runs), "-Q", str(qps), *extra_args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    stats: dict = {"output": out.stdout + out.stderr, "returncode": out.returncode}
    for key, pattern in _DNSPERF_STATS.items():
        match = pattern.search(out.stdout)
        stats[key] = int(match.group(1)) if match else None
    if out.returncode != 0 or stats["sent"] is None:
        raise RuntimeError(f"dnsperf failed ({out.returncode}):\n{stats['output']}")
    return stats


# --------------------------------------------------------------------------- reference decoders
#
# Each decoder below returns one dict per dnstap message, in file order:
#   "doc":  what the tool printed for the message, parsed (YAML mapping / JSON object /
#           quiet-line fields),
# and the fields normalised to the receiver's names and spellings:
#   "message" (CLIENT_QUERY...), "identity", "version", "family" (INET/INET6),
#   "protocol" (UDP/TCP...), "query-ip", "query-port", "response-ip", "response-port",
#   "time" (float seconds, UTC), and from the DNS message text: "id", "opcode", "rcode",
#   "qname" (absolute, trailing dot), "rrtype", "qclass"; None where the tool printed none.

_LDNS_HEADER = re.compile(r";; ->>HEADER<<- opcode: (\S+), rcode: (\S+), id: (\d+)")
_GO_HEADER = re.compile(r";; opcode: (\S+), status: (\S+), id: (\d+)")
# dnstap-ldns: ";www.example.test.\tIN\tA"; Go (miekg/dns): ";www.example.test.\tIN\t A"
_QUESTION = re.compile(r";; QUESTION SECTION:\n;(\S+)\t(\S+)\t ?(\S+)")


def _run(cmd: list[str]) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr[-2000:]}")
    return out.stdout


def _dns_fields(text: str | None, header: re.Pattern) -> dict:
    fields = {"id": None, "opcode": None, "rcode": None, "qname": None, "rrtype": None, "qclass": None}
    if not text:
        return fields
    match = header.search(text)
    if match:
        fields["opcode"], fields["rcode"], fields["id"] = match.group(1), match.group(2), int(match.group(3))
    match = _QUESTION.search(text)
    if match:
        fields["qname"], fields["qclass"], fields["rrtype"] = match.groups()
    return fields


def _epoch(value) -> float | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value.timestamp()
    # RFC 3339 with up to nanoseconds: 2026-11-29T07:17:33.028898181Z
    match = re.fullmatch(r"(\d{4})-(\d\d)-(\d\d)[T ](\d\d):(\d\d):(\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)?", str(value))
    if not match:
        return None
    y, mo, d, h, mi, s, frac, tz = match.groups()
    seconds = calendar.timegm((int(y), int(mo), int(d), int(h), int(mi), int(s)))
    if tz and tz != "Z":
        sign = 1 if tz[0] == "+" else -1
        seconds -= sign * (int(tz[1:3]) * 3600 + int(tz[4:6]) * 60)
    return seconds + (int(frac) / 10 ** len(frac) if frac else 0.0)


def _normalise(doc: dict, header: re.Pattern) -> dict:
    msg = doc.get("message") or {}
    mtype = msg.get("type")
    text = msg.get("query_message") if mtype and mtype.endswith("_QUERY") else msg.get("response_message")
    if text is None:
        text = msg.get("query_message") or msg.get("response_message")
    time_value = msg.get("query_time") if mtype and mtype.endswith("_QUERY") else msg.get("response_time")
    if time_value is None:
        time_value = msg.get("query_time") or msg.get("response_time")
    rec = {
        "doc": doc,
        "message": mtype,
        "identity": doc.get("identity"),
        "version": doc.get("version"),
        "family": msg.get("socket_family"),
        "protocol": msg.get("socket_protocol"),
        "query-ip": msg.get("query_address"),
        "query-port": msg.get("query_port"),
        "response-ip": msg.get("response_address"),
        "response-port": msg.get("response_port"),
        "time": _epoch(time_value),
    }
    rec.update(_dns_fields(text, header))
    return rec


_LDNS_QUIET = re.compile(
    r"^(?P<date>\d{4}-\d\d-\d\d) (?P<time>\d\d:\d\d:\d\d\.\d+) (?P<code>[A-Z]{2}) "
    r"(?P<address>\S+) (?P<protocol>\S+) (?P<length>\d+)b "
    r'"(?P<qname>.*)" (?P<qclass>\S+) (?P<rrtype>\S+)$'
)
_QUIET_CODES = {
    "AQ": "AUTH_QUERY", "AR": "AUTH_RESPONSE", "RQ": "RESOLVER_QUERY", "RR": "RESOLVER_RESPONSE",
    "CQ": "CLIENT_QUERY", "CR": "CLIENT_RESPONSE", "FQ": "FORWARDER_QUERY",
    "FR": "FORWARDER_RESPONSE", "SQ": "STUB_QUERY", "SR": "STUB_RESPONSE",
    "TQ": "TOOL_QUERY", "TR": "TOOL_RESPONSE",
}


def dnstap_ldns_decode(path: str | os.PathLike, *, quiet: bool = False) -> list[dict]:
    """Decode a capture file with ``dnstap-ldns -r FILE -y`` (YAML documents), or ``-q``
    (one line per message: date time CODE address protocol NNb "qname" class type; the
    quiet records carry "message", "address", "protocol", "length", "qname", "qclass",
    "rrtype" and "time" only)."""
    tool = require("dnstap-ldns")
    if quiet:
        records = []
        for line in _run([tool, "-r", str(path), "-q"]).splitlines():
            if not line.strip():
                continue
            match = _LDNS_QUIET.match(line)
            if not match:
                raise ValueError(f"unexpected dnstap-ldns -q line: {line!r}")
            doc = match.groupdict()
            records.append({
                "doc": doc,
                "message": _QUIET_CODES.get(doc["code"], doc["code"]),
                "address": doc["address"],
                "protocol": doc["protocol"],
                "length": int(doc["length"]),
                "qname": doc["qname"],
                "qclass": doc["qclass"],
                "rrtype": doc["rrtype"],
                "time": _epoch(f"{doc['date']}T{doc['time']}Z"),
            })
        return records
    text = _run([tool, "-r", str(path), "-y"])
    # dnstap-ldns writes "type: MESSAGE ..." documents separated by "---".
    return [_normalise(doc, _LDNS_HEADER) for doc in yaml.safe_load_all(text) if doc]


def golang_dnstap_decode_json(path: str | os.PathLike) -> list[dict]:
    """Decode a capture file with the Go tool: ``dnstap -r FILE -j`` (one JSON object a line,
    DNS messages as miekg/dns text: ";; opcode: QUERY, status: NOERROR, id: N")."""
    tool = require("dnstap")
    return [
        _normalise(json.loads(line), _GO_HEADER)
        for line in _run([tool, "-r", str(path), "-j"]).splitlines()
        if line.strip()
    ]


def captures() -> list[Path]:
    return sorted(CAPTURES.glob("*.fstrm"))


# --------------------------------------------------------------------------- senders


def fstrm_replay(path: str | os.PathLike, target: str, *, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """Send a capture with ``fstrm_replay -t protobuf:dnstap.Dnstap -r FILE`` to
    ``unix:/path`` (-u) or ``tcp:HOST:PORT`` (-a HOST -p PORT); bidirectional handshake."""
    cmd = [require("fstrm_replay"), "-t", CONTENT_TYPE, "-r", str(path)]
    if target.startswith("unix:"):
        cmd += ["-u", target[len("unix:"):]]
    else:
        host, _, port = target[len("tcp:"):].rpartition(":")
        cmd += ["-a", host, "-p", port]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def golang_dnstap_send(path: str | os.PathLike, target: str, *, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """Send a capture with the Go tool: ``dnstap -r FILE -U /path`` or ``-T HOST:PORT``."""
    cmd = [require("dnstap"), "-r", str(path)]
    if target.startswith("unix:"):
        cmd += ["-U", target[len("unix:"):]]
    else:
        cmd += ["-T", target[len("tcp:"):]]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------------------- Prometheus


def _get_json(url: str) -> dict:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


def prometheus_scrape(
    workdir: Path, target_port: int, username: str, password: str, query: str,
    done, timeout: float = 30.0,
) -> tuple[dict, dict, str]:
    """Run a real Prometheus scraping 127.0.0.1:``target_port``/metrics every second with
    Basic auth, and poll ``query`` until ``done(values)`` is true (values: identity label ->
    float) or ``timeout``. Returns (values, targets API answer, Prometheus log tail)."""
    import urllib.parse

    prometheus = require("prometheus")
    web_port = free_port()
    config = workdir / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n"
        "  - job_name: dnstap\n    scrape_timeout: 1s\n"
        f"    basic_auth:\n      username: {username}\n      password: '{password}'\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{target_port}']\n"
    )
    with open(workdir / "prometheus.log", "wb") as log:
        proc = subprocess.Popen(
            [prometheus, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'prometheus-data'}",
             f"--web.listen-address=127.0.0.1:{web_port}"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
    encoded = urllib.parse.urlencode({"query": query})
    values: dict = {}
    targets: dict = {}
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                result = _get_json(f"http://127.0.0.1:{web_port}/api/v1/query?{encoded}")["data"]["result"]
            except OSError:
                result = []
            values = {r["metric"].get("identity"): float(r["value"][1]) for r in result}
            if done(values):
                break
            time.sleep(0.5)
        if proc.poll() is None:
            targets = _get_json(f"http://127.0.0.1:{web_port}/api/v1/targets")
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                _kill(proc)
    return values, targets, file_tail(workdir / "prometheus.log")
