"""WriteToSyslog: one syslog message per record to a remote syslog server
(``output.syslog``), RFC 5424 or RFC 3164, over UDP or TCP.

The message is the record formatted as ``text`` (4.7.0's line) or ``json``,
behind a syslog header::

    RFC 5424  <PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID - MSG
    RFC 3164  <PRI>Mmm dd hh:mm:ss HOSTNAME TAG[PROCID]: MSG

PRI is facility * 8 + severity. TIMESTAMP is the time of the dnstap message,
not of sending: RFC 3339 in UTC with microseconds (RFC 5424), or local time
without year or zone as RFC 3164 has it. RFC 3164's limits (a TAG of at most
32 characters, 1024-byte messages) are not applied: app-name is used as it is
and today's servers take longer messages. PROCID is the receiver's pid, MSGID
the dnstap message type (CLIENT_QUERY...). There is no structured data, and
MSG has no UTF-8 BOM: RFC 5424 allows that (MSG-ANY), and servers keep a BOM
as part of the text (rsyslog writes it into its files), where it would break
every JSON parser downstream. Both formats escape line breaks, so a message
never contains one.

Facility numbers are those of Python's ``SysLogHandler.facility_names`` (the
BSD ``<syslog.h>``), which has every name the configuration accepts.
RFC 5424's table has no names for 13 to 15: BSD's ``security`` (13),
``console`` (14) and ``solaris-cron`` (15) are RFC 5424's "log audit", "log
alert" and "clock daemon", and rsyslog shows them as audit, alert and clock.

Transports:

- ``udp``: one datagram per message, on a connected socket, each cut to
  MAX_DATAGRAM bytes (counted as ``truncated`` under ``output.syslog.encode``).
  UDP cannot confirm anything: a server that is down is noticed only when the
  kernel reports the ICMP "port unreachable" its previous datagrams caused,
  which happens on loopback and most LANs but not through a firewall that
  drops the ICMP. When it is reported, the send fails, the Delivery resends
  what is still in flight (its ``settle`` time) and tries again every
  ``retry`` seconds, logging a warning each time; otherwise datagrams to a
  dead server are lost without a trace, and counted delivered. Servers also
  cut long messages (rsyslog's default ``maxMessageSize`` is 8 KiB).
- ``tcp``: RFC 6587 framing, ``octet-counted`` (``LEN SP MSG``) or
  ``non-transparent`` (MSG LF), a whole batch per write (sinks.tcp.TcpStream).
  Syslog over TCP has no acknowledgements; see sinks/delivery.py for what that
  means at a server failure (at-least-once: a few seconds may arrive twice).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from datetime import UTC, datetime
from logging.handlers import SysLogHandler
from typing import TYPE_CHECKING

import apache_beam as beam

from core import counters
from core.formats import get_format
from core.ratelimit import RateLimitedLog
from sinks.network import DeliverFn
from sinks.tcp import TcpStream

if TYPE_CHECKING:
    from pipeline.config import SyslogOutput

__all__ = [
    "MAX_DATAGRAM",
    "SyslogEncoder",
    "SyslogUdp",
    "WriteToSyslog",
    "frame_non_transparent",
    "frame_octet_counted",
    "priority",
]

log = logging.getLogger("dnstap_receiver.output")

# Below the largest UDP payload over IPv4 (65,507) and IPv6 (65,527 without
# jumbograms), with room to spare.
MAX_DATAGRAM = 65_000
UDP_SEND_TIMEOUT = 10.0
UDP_CLOSE_WAIT = 0.05  # graceful close: time for a last ICMP error to come back

FORMATS = ("text", "json")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def priority(facility: str, severity: str) -> int:
    """PRI for configuration names (``daemon``, ``info``); ValueError for an
    unknown name."""
    try:
        return SysLogHandler.facility_names[facility] * 8 + SysLogHandler.priority_names[severity]
    except KeyError as exc:
        raise ValueError(f"unknown syslog facility or severity {exc.args[0]!r}") from None


def _printable(value: str, limit: int) -> bool:
    """RFC 5424's PRINTUSASCII (no space), 1 to ``limit`` characters."""
    return 0 < len(value) <= limit and all(33 <= ord(c) <= 126 for c in value)


def _local_hostname() -> str:
    """This machine's name, made a valid HOSTNAME field."""
    name = "".join(c if 33 <= ord(c) <= 126 else "_" for c in socket.gethostname())[:255]
    return name or "localhost"


class _Stamps:
    """TIMESTAMP fields from a record's float epoch seconds, the text of the
    whole second cached (consecutive records share it). A missing or out of
    range time is "-" (NILVALUE) in RFC 5424, and the current time in RFC 3164,
    which has no NILVALUE."""

    __slots__ = ("cached", "local")

    def __init__(self, local: bool) -> None:
        self.local = local
        self.cached: tuple[int, str] = (-1, "")

    def __call__(self, timestamp) -> str:
        try:
            sec = int(timestamp)
            frac = timestamp - sec
            text = self._seconds(sec)
        except (TypeError, ValueError, OverflowError, OSError):
            if not self.local:
                return "-"
            sec = int(time.time())
            frac = 0.0
            text = self._seconds(sec)
        if self.local:
            return text
        return f"{text}.{min(max(int(frac * 1_000_000), 0), 999_999):06d}Z"

    def _seconds(self, sec: int) -> str:
        cached_sec, text = self.cached
        if sec != cached_sec:
            if self.local:
                tm = time.localtime(sec)
                text = f"{_MONTHS[tm.tm_mon - 1]} {tm.tm_mday:2d} {tm.tm_hour:02d}:{tm.tm_min:02d}:{tm.tm_sec:02d}"
            else:
                text = datetime.fromtimestamp(sec, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")
            self.cached = (sec, text)  # one tuple: threads never pair a second with another's text
        return text


class SyslogEncoder:
    """Records -> syslog messages (bytes, no framing, no line break)."""

    def __init__(
        self,
        *,
        rfc: str = "5424",
        facility: str = "daemon",
        severity: str = "info",
        app_name: str = "dnstap-receiver",
        hostname: str | None = None,
        format: str = "text",
        pid: int | None = None,
    ) -> None:
        if rfc not in ("5424", "3164"):
            raise ValueError(f"rfc must be 5424 or 3164, not {rfc!r}")
        if format not in FORMATS:
            raise ValueError(f"syslog format must be one of {', '.join(FORMATS)}, not {format!r}")
        if not _printable(app_name, 48):
            raise ValueError(f"app-name must be 1 to 48 printable ASCII characters, not {app_name!r}")
        if hostname is not None and not _printable(hostname, 255):
            raise ValueError(f"hostname must be 1 to 255 printable ASCII characters, not {hostname!r}")
        self.rfc = rfc
        self.pri = priority(facility, severity)
        self.hostname = hostname or _local_hostname()
        self.pid = os.getpid() if pid is None else pid
        self._format = get_format(format)
        self._stamp = _Stamps(local=rfc == "3164")
        self._msgids: dict = {}
        if rfc == "5424":
            self._prefix = f"<{self.pri}>1 "
            self._middle = f" {self.hostname} {app_name} {self.pid} "
        else:
            self._prefix = f"<{self.pri}>"
            self._middle = f" {self.hostname} {app_name}[{self.pid}]: "

    def messages(self, records: list) -> list[bytes]:
        """One message per record, in order."""
        if self.rfc == "5424":
            return self._messages_5424(records)
        return self._messages_3164(records)

    def bodies(self, records: list) -> list[bytes]:
        """The formatted records. Neither format writes a raw line break
        (text escapes it, JSON always does), so one batch split at the
        delimiter gives them all at the cost of one."""
        fmt = self._format
        parts = fmt.batch(records, b"\n").split(b"\n")
        parts.pop()
        if len(parts) != len(records):  # cannot happen; never mix records up
            return [fmt.record(rec) for rec in records]
        return parts

    def _msgid(self, message) -> str:
        """MSGID: the message type when it is a valid one (1 to 32 printable
        ASCII characters), else "-"."""
        if not isinstance(message, str):
            return "-"
        msgid = self._msgids.get(message)
        if msgid is None:
            msgid = message if _printable(message, 32) else "-"
            if len(self._msgids) < 256:  # the message types, and a few odd values
                self._msgids[message] = msgid
        return msgid

    def _messages_5424(self, records: list) -> list[bytes]:
        prefix, middle, stamp, msgids = self._prefix, self._middle, self._stamp, self._msgids
        out = []
        append = out.append
        for rec, body in zip(records, self.bodies(records)):
            # The decoder's "datetime" is this instant as ...T12:00:00.123456+00:00.
            when = rec.get("datetime")
            if type(when) is str and len(when) == 32 and when.endswith("+00:00"):
                when = when[:26] + "Z"
            else:
                when = stamp(rec.get("timestamp"))
            message = rec.get("message")
            msgid = msgids.get(message) if type(message) is str else None
            if msgid is None:
                msgid = self._msgid(message)
            append(f"{prefix}{when}{middle}{msgid} - ".encode() + body)
        return out

    def _messages_3164(self, records: list) -> list[bytes]:
        prefix, middle, stamp = self._prefix, self._middle, self._stamp
        return [
            f"{prefix}{stamp(rec.get('timestamp'))}{middle}".encode() + body
            for rec, body in zip(records, self.bodies(records))
        ]


def frame_octet_counted(messages: list[bytes]) -> bytes:
    """RFC 6587 octet counting: ``LEN SP MSG`` per message, nothing between."""
    return b"".join([b"%d %b" % (len(m), m) for m in messages])


def frame_non_transparent(messages: list[bytes]) -> bytes:
    """RFC 6587 non-transparent framing: each message followed by LF (the
    messages never contain one)."""
    if not messages:
        return b""
    return b"\n".join(messages) + b"\n"


FRAMINGS = {"octet-counted": frame_octet_counted, "non-transparent": frame_non_transparent}


def truncate(messages: list[bytes], limit: int = MAX_DATAGRAM) -> int:
    """Cut the messages longer than ``limit`` bytes in place (at a UTF-8
    character boundary); returns how many were cut."""
    cut = 0
    for i, msg in enumerate(messages):
        if len(msg) > limit:
            messages[i] = msg[:limit].decode("utf-8", "ignore").encode("utf-8")
            cut += 1
    return cut


class SyslogUdp:
    """A connected UDP socket sending one datagram per message; chunks are
    lists of messages (see Transport).

    Connecting a UDP socket always succeeds, so after a failed send (mostly
    ECONNREFUSED: an ICMP "port unreachable" came back for an earlier
    datagram) the next ``connect`` fails once: the Delivery then waits
    ``retry`` seconds instead of resending at once, again and again, to a
    server that is down."""

    confirms = False

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._sock: socket.socket | None = None
        self._failed: OSError | None = None

    def connect(self) -> None:
        if self._failed is not None:
            failed, self._failed = self._failed, None
            raise ConnectionError(f"the last send failed ({failed}); waiting before sending again")
        family, kind, proto, _, address = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_DGRAM)[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(UDP_SEND_TIMEOUT)
            sock.connect(address)
        except OSError:
            sock.close()
            raise
        self._sock = sock

    def send(self, chunks: list[list[bytes]]) -> None:
        sock = self._sock
        if sock is None:
            raise ConnectionError("not connected")
        send = sock.send
        try:
            for chunk in chunks:
                for datagram in chunk:
                    send(datagram)
        except OSError as exc:
            self._failed = exc
            raise

    def close(self, graceful: bool) -> bool:
        """Graceful: True unless an ICMP error came back within
        UDP_CLOSE_WAIT; nothing more can be known over UDP."""
        sock, self._sock = self._sock, None
        if sock is None:
            return False
        try:
            if graceful:
                time.sleep(UDP_CLOSE_WAIT)
                return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
            return False
        except OSError:
            return False
        finally:
            sock.close()


class _WriteSyslogFn(DeliverFn):
    NAME = "syslog"

    def __init__(self, options: SyslogOutput) -> None:
        if not options.remote_address or not options.remote_port:
            raise ValueError("output.syslog needs remote-address and remote-port")
        if options.transport not in ("udp", "tcp"):
            raise ValueError(f"output.syslog.transport must be udp or tcp, not {options.transport!r}")
        if options.framing not in FRAMINGS:
            raise ValueError(f"output.syslog.framing must be one of {', '.join(FRAMINGS)}, not {options.framing!r}")
        self._encoder_args = dict(
            rfc=options.rfc,
            facility=options.facility,
            severity=options.severity,
            app_name=options.app_name,
            hostname=options.hostname,
            format=options.format,
        )
        SyslogEncoder(**self._encoder_args)  # validate when the pipeline is built
        self._syslog = options
        where = options.remote_address
        if ":" in where:
            where = f"[{where}]"
        super().__init__(options.delivery(), describe=f"syslog server {options.transport}://{where}:{options.remote_port}")

    def make_transport(self):
        o = self._syslog
        if o.transport == "udp":
            return SyslogUdp(o.remote_address, o.remote_port)
        return TcpStream(o.remote_address, o.remote_port)

    def setup(self) -> None:
        self._encoder = SyslogEncoder(**self._encoder_args)  # pid of the worker process
        self._udp = self._syslog.transport == "udp"
        self._frame = FRAMINGS[self._syslog.framing]
        self._truncate_log = RateLimitedLog(log)
        super().setup()

    def encode(self, records):
        if not records:
            return None
        messages = self._encoder.messages(records)
        if not self._udp:
            return self._frame(messages), len(messages)
        cut = truncate(messages)
        if cut:
            counters.counter_group("output.syslog.encode")["truncated"] += cut
            self._truncate_log(logging.WARNING, "output syslog: %d messages cut to %d bytes to fit a UDP datagram",
                               cut, MAX_DATAGRAM)
        return messages, len(messages)


class WriteToSyslog(beam.PTransform):
    """Send every record as a syslog message to ``options.remote_address``:
    ``remote_port`` (a pipeline.config.SyslogOutput)."""

    def __init__(self, options: SyslogOutput) -> None:
        super().__init__()
        self._fn = _WriteSyslogFn(options)

    def expand(self, batches):
        return batches | "Write" >> beam.ParDo(self._fn)
