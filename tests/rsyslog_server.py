"""A real rsyslogd for the syslog output tests and benchmark.

``Rsyslog(workdir)`` writes an rsyslog configuration into ``workdir`` that
listens on one loopback port for both UDP (imudp) and TCP (imtcp, which reads
octet-counted and LF-framed messages alike), and writes every message it
receives there to two files:

- ``fields.log``: what rsyslog parsed, one line per message:
  ``facility.severity hostname app-name procid msgid timereported msg``
  (read with ``lines()`` as ``SyslogLine``s);
- ``raw.log``: the message as received, framing removed (``raw_lines()``).

rsyslog's own messages go to the default ruleset, which has no action, so the
files hold nothing but what the tests sent. ``start()`` returns once both
sockets are bound; ``stop(signal)`` ends it (SIGTERM: rsyslog writes out what
it holds; SIGKILL: it loses its queue), and ``start()`` again reopens the same
port, appending to the same files.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import peers

_TEMPLATE = (
    "%syslogfacility-text%.%syslogseverity-text% %hostname% %app-name% %procid% %msgid% "
    "%timereported:::date-rfc3339% %msg%\\n"
)

_CONF = """\
global(workDirectory="{work}" maxMessageSize="64k")
module(load="imudp")
module(load="imtcp")
input(type="imudp" address="127.0.0.1" port="{port}" ruleset="remote" rcvbufSize="16m")
input(type="imtcp" address="127.0.0.1" port="{port}" ruleset="remote")
template(name="fields" type="string" string="{template}")
template(name="raw" type="string" string="%rawmsg%\\n")
ruleset(name="remote") {{
  action(type="omfile" file="{fields}" template="fields")
{raw_action}}}
"""
_RAW_ACTION = '  action(type="omfile" file="{raw}" template="raw")\n'



@dataclass(frozen=True)
class SyslogLine:
    """One message as rsyslog parsed it. ``msg`` lacks the space rsyslog
    keeps after an RFC 3164 TAG (it has no leading space otherwise)."""

    facility: str
    severity: str
    hostname: str
    app_name: str
    procid: str
    msgid: str
    timestamp: str
    msg: str

    @classmethod
    def parse(cls, line: str) -> "SyslogLine":
        priority, hostname, app_name, procid, msgid, timestamp, msg = line.split(" ", 6)
        facility, _, severity = priority.partition(".")
        return cls(facility, severity, hostname, app_name, procid, msgid, timestamp, msg.lstrip(" "))


class Rsyslog:
    def __init__(self, workdir: str | os.PathLike, port: int | None = None, *, raw: bool = True) -> None:
        """``raw=False``: no raw.log (half the writing, for the benchmark)."""
        self.program = peers.require("rsyslogd")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or peers.free_port(udp_too=True)
        self.fields_path = self.workdir / "fields.log"
        self.raw_path = self.workdir / "raw.log"
        self.conf = self.workdir / "rsyslog.conf"
        self.conf.write_text(_CONF.format(
            work=self.workdir, port=self.port, template=_TEMPLATE, fields=self.fields_path,
            raw_action=_RAW_ACTION.format(raw=self.raw_path) if raw else "",
        ))
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    # -- process ------------------------------------------------------------------

    def start(self, timeout: float = 15.0) -> "Rsyslog":
        if self.running():
            raise RuntimeError("rsyslogd is already running")
        self.starts += 1
        # A fresh pid file each time: a stale one (after SIGKILL) makes it refuse to start.
        pidfile = self.workdir / f"rsyslogd-{self.starts}.pid"
        self.log_path = self.workdir / f"rsyslogd-{self.starts}.log"
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(
                [self.program, "-n", "-f", str(self.conf), "-i", str(pidfile)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout
        while not (peers.port_open("127.0.0.1", self.port, 0.2) and _udp_bound(self.port)):
            if self.proc.poll() is not None:
                raise RuntimeError(f"rsyslogd exited with {self.proc.returncode} at start-up:\n{self.log()}")
            if time.monotonic() > deadline:
                self.stop(signal.SIGKILL)
                raise RuntimeError(f"rsyslogd did not listen on port {self.port} within {timeout} s:\n{self.log()}")
            time.sleep(0.05)
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        """Send ``sig`` and wait for the exit (SIGKILL after ``timeout``)."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        return proc.returncode

    def log(self) -> str:
        return peers.file_tail(self.log_path) if hasattr(self, "log_path") else "(not started)"

    def __enter__(self) -> "Rsyslog":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop(signal.SIGKILL)

    # -- what it wrote ---------------------------------------------------------------

    def lines(self) -> list[SyslogLine]:
        return [SyslogLine.parse(line) for line in _read_lines(self.fields_path)]

    def raw_lines(self) -> list[str]:
        return _read_lines(self.raw_path)

    def count(self) -> int:
        return len(_read_lines(self.fields_path))

    def wait_lines(self, n: int, timeout: float = 20.0, quiet: float = 0.0) -> int:
        """Poll until ``fields.log`` has at least ``n`` lines (then ``quiet``
        more seconds without a new one) or ``timeout`` passes; returns the count."""
        deadline = time.monotonic() + timeout
        count = self.count()
        while count < n and time.monotonic() < deadline:
            time.sleep(0.05)
            count = self.count()
        if quiet:
            while time.monotonic() < deadline:
                time.sleep(quiet)
                again = self.count()
                if again == count:
                    break
                count = again
        return count


def _read_lines(path: Path) -> list[str]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    # A line rsyslog is still writing (no newline yet) is left for the next read.
    return data.decode("utf-8", "replace").split("\n")[:-1]


def _udp_bound(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False
