"""output.syslog: the message encoders, and delivery into a real rsyslogd
(tests/rsyslog_server.py) over UDP and TCP, through outages, and from the
running receiver."""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
import time
from collections import Counter
from logging.handlers import SysLogHandler

import apache_beam as beam
import orjson
import pytest
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from hypothesis import given, settings
from hypothesis import strategies as st

import peers
from conftest import start_receiver
from core.batches import RecordBatch
from core.formats import format_text
from core.message import FIELDS, decode
from fstrm_client import FstrmClient, capture_frames, free_tcp_port
from pipeline.config import SYSLOG_FACILITIES, SYSLOG_SEVERITIES, SyslogOutput
from rsyslog_server import Rsyslog
from sinks.delivery import Delivery
from sinks.syslog import (
    MAX_DATAGRAM,
    SyslogEncoder,
    SyslogUdp,
    WriteToSyslog,
    _WriteSyslogFn,
    frame_non_transparent,
    frame_octet_counted,
    priority,
    truncate,
)
from sinks.tcp import TcpStream

# rsyslog's names for the facilities whose BSD name RFC 5424 does not use.
RSYSLOG_FACILITY = {"security": "audit", "console": "alert", "solaris-cron": "clock"}

_CAPTURE = [decode(frame) for frame in capture_frames()]


def records(n: int, start: int = 0) -> list[dict]:
    """``n`` records from the capture, each with its own qname ``m<i>.test.``."""
    out = []
    for i in range(start, start + n):
        rec = dict(_CAPTURE[i % len(_CAPTURE)])
        rec["qname"] = f"m{i}.test."
        out.append(rec)
    return out


_ID = re.compile(r"\bm(\d+)\.test\.")


def message_id(msg: str) -> int:
    return int(_ID.search(msg).group(1))


def options(port: int, **over) -> SyslogOutput:
    values = dict(enable=True, remote_address="127.0.0.1", remote_port=port, retry=0.2)
    values.update(over)
    return SyslogOutput(**values)


def send_through_output(opts: SyslogOutput, batches: list[list[dict]]) -> dict:
    """Run the output's DoFn (setup, process, teardown: the flush) outside
    Beam; returns the Delivery's counters."""
    fn = _WriteSyslogFn(opts)
    fn.setup()
    delivery = fn._delivery
    for batch in batches:
        fn.process(RecordBatch(batch))
    fn.teardown()
    return dict(delivery.counts)


def wait_until(predicate, timeout: float = 20.0, explain=lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out\n{explain()}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def rsyslog(tmp_path_factory):
    """One rsyslogd for the tests that do not stop it; each test tells its
    messages apart by a HOSTNAME of its own."""
    server = Rsyslog(tmp_path_factory.mktemp("rsyslog"))
    server.start()
    yield server
    server.stop(signal.SIGKILL)


def lines_from(server: Rsyslog, hostname: str, n: int, timeout: float = 20.0):
    wait_until(lambda: sum(1 for line in server.lines() if line.hostname == hostname) >= n, timeout)
    time.sleep(0.2)  # anything more (a duplicate) would show up now
    return [line for line in server.lines() if line.hostname == hostname]


# ----------------------------------------------------------------------------- encoding


def test_priority_of_every_configured_name():
    for facility in SYSLOG_FACILITIES:
        for severity in SYSLOG_SEVERITIES:
            pri = priority(facility, severity)
            assert 0 <= pri <= 191
            assert divmod(pri, 8) == (SysLogHandler.facility_names[facility], SysLogHandler.priority_names[severity])
    assert priority("daemon", "info") == 30
    assert priority("kern", "emerg") == 0
    assert priority("local7", "debug") == 191
    assert priority("security", "info") == 13 * 8 + 6  # RFC 5424's "log audit"
    with pytest.raises(ValueError, match="local9"):
        priority("local9", "info")


def test_rfc5424_header():
    rec = records(1)[0]
    enc = SyslogEncoder(facility="local3", severity="notice", app_name="dnstap-rx", hostname="ns1.example", pid=4242)
    [msg] = enc.messages([rec])
    header = f"<{19 * 8 + 5}>1 {rec['datetime'][:26]}Z ns1.example dnstap-rx 4242 CLIENT_QUERY - ".encode()
    assert rec["message"] == "CLIENT_QUERY" and rec["datetime"].endswith("+00:00")
    assert msg == header + format_text(rec)  # no BOM, no line break


def test_rfc5424_timestamp_from_the_float_when_datetime_is_unknown():
    rec = dict(FIELDS, timestamp=1700000000.25, message="AUTH_RESPONSE")  # datetime "-"
    [msg] = SyslogEncoder(hostname="h", pid=1).messages([rec])
    assert msg.startswith(b"<30>1 2023-11-14T22:13:20.250000Z h dnstap-receiver 1 AUTH_RESPONSE - ")
    enc = SyslogEncoder(hostname="h", pid=1, format="json")
    for timestamp, message in ((None, "NOT A VALID MSGID"), (float("inf"), None), (1e300, "X" * 33)):
        rec.update(timestamp=timestamp, message=message)  # MSGID: 1-32 PRINTUSASCII, no space
        [msg] = enc.messages([rec])
        assert msg.startswith(b"<30>1 - h dnstap-receiver 1 - - {")


def test_rfc3164_header_is_local_time_without_year():
    rec = dict(records(1)[0], timestamp=1700000000.9)  # Nov 14 (a day < 10 would be space-padded)
    [msg] = SyslogEncoder(rfc="3164", facility="user", severity="err", hostname="h", pid=7, app_name="tap").messages([rec])
    stamp = time.strftime("%b %e %H:%M:%S", time.localtime(1700000000)).encode()
    assert msg == b"<11>" + stamp + b" h tap[7]: " + format_text(rec)
    unknown = dict(rec, timestamp=float("nan"))  # no NILVALUE in RFC 3164: the current time
    before = time.time()
    [msg] = SyslogEncoder(rfc="3164", hostname="h", pid=7).messages([unknown])
    assert msg[4:19].decode() in {time.strftime("%b %e %H:%M:%S", time.localtime(t)) for t in (before, time.time())}
    assert msg.startswith(b"<30>") and msg[19:].startswith(b" h dnstap-receiver[7]: ")


def test_json_body_is_the_record():
    recs = records(3)
    enc = SyslogEncoder(format="json", hostname="h", pid=1)
    for rec, msg in zip(recs, enc.messages(recs)):
        _, _, body = msg.partition(b" - ")
        assert orjson.loads(body) == orjson.loads(orjson.dumps(rec))


def test_bad_options_are_refused_when_the_pipeline_is_built():
    with pytest.raises(ValueError, match="remote-address"):
        WriteToSyslog(SyslogOutput(enable=True, remote_port=514))
    with pytest.raises(ValueError, match="hostname"):
        WriteToSyslog(options(514, hostname="two words"))
    with pytest.raises(ValueError, match="format"):
        SyslogEncoder(format="yaml")  # YAML is multi-line: not a syslog message


_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)


@settings(max_examples=200, deadline=None)
@given(identity=_text, qname=_text, fmt=st.sampled_from(["text", "json"]), rfc=st.sampled_from(["5424", "3164"]))
def test_one_line_per_record_whatever_the_fields_hold(identity, qname, fmt, rfc):
    recs = [dict(_CAPTURE[0], identity=identity, qname=qname), dict(_CAPTURE[1])]
    msgs = SyslogEncoder(rfc=rfc, format=fmt, hostname="h", pid=1).messages(recs)
    assert len(msgs) == 2
    for msg in msgs:
        assert b"\n" not in msg and b"\r" not in msg
        msg.decode("utf-8")  # valid UTF-8 (no BOM needed: RFC 5424 MSG-ANY)
        assert not msg.startswith(b"\xef\xbb\xbf")
    # The framings give the messages back, one each.
    assert frame_non_transparent(msgs).split(b"\n") == [*msgs, b""]
    assert parse_octet_counted(frame_octet_counted(msgs)) == msgs


def parse_octet_counted(data: bytes) -> list[bytes]:
    out = []
    while data:
        length, _, rest = data.partition(b" ")
        out.append(rest[: int(length)])
        data = rest[int(length):]
    return out


@given(st.lists(st.binary(max_size=300)))
def test_octet_counting_round_trips_any_bytes(msgs):
    assert parse_octet_counted(frame_octet_counted(msgs)) == msgs


@given(st.text(st.characters(blacklist_categories=("Cs",)), max_size=200), st.integers(1, 150))
def test_truncation_keeps_whole_characters(text, limit):
    original = text.encode()
    msgs = [original]
    cut = truncate(msgs, limit)
    assert cut == (len(original) > limit)
    assert len(msgs[0]) <= limit and original.startswith(msgs[0])
    msgs[0].decode("utf-8")
    assert len(msgs[0]) > limit - 4 or not cut


# ----------------------------------------------------------------------------- UDP transport, no server


def test_udp_port_unreachable_fails_the_send_and_pauses_one_connect():
    port = peers.free_port(udp_too=True)
    udp = SyslogUdp("127.0.0.1", port)
    udp.connect()
    with pytest.raises(ConnectionRefusedError):
        for _ in range(10):  # the ICMP of the first datagram fails a later send
            udp.send([[b"<30>1 - h a 1 - - x"]])
    udp.close(False)
    with pytest.raises(ConnectionError, match="Connection refused"):
        udp.connect()  # once: the Delivery waits `retry` instead of spinning
    udp.connect()
    udp.send([[b"<30>1 - h a 1 - - y"]])
    assert udp.close(True) is False  # the ICMP came back: nothing confirmed


# ----------------------------------------------------------------------------- into rsyslog

CASES = [
    # rfc, transport, framing, format, facility, severity
    ("5424", "tcp", "octet-counted", "text", "local3", "notice"),
    ("5424", "tcp", "non-transparent", "json", "daemon", "info"),
    ("5424", "udp", "octet-counted", "text", "security", "warning"),
    ("5424", "udp", "octet-counted", "json", "user", "debug"),
    ("3164", "tcp", "octet-counted", "text", "local7", "err"),
    ("3164", "tcp", "non-transparent", "json", "auth", "crit"),
    ("3164", "udp", "octet-counted", "text", "solaris-cron", "alert"),
]


@pytest.mark.parametrize("rfc, transport, framing, fmt, facility, severity", CASES,
                         ids=["-".join(c[:4]) for c in CASES])
def test_rsyslog_parses_every_field(rsyslog, rfc, transport, framing, fmt, facility, severity):
    hostname = f"h{rfc}-{transport}-{framing}-{fmt}"
    recs = records(300)
    opts = options(rsyslog.port, rfc=rfc, transport=transport, framing=framing, format=fmt,
                   facility=facility, severity=severity, hostname=hostname, app_name="dnstap-test")
    counts = send_through_output(opts, [recs[:100], recs[100:250], recs[250:]])
    assert counts["delivered"] == 300 and counts["dropped"] == 0

    got = lines_from(rsyslog, hostname, 300)
    assert len(got) == 300
    by_id = {message_id(line.msg): line for line in got}
    assert sorted(by_id) == list(range(300))
    for i, rec in enumerate(recs):
        line = by_id[i]
        assert line.facility == RSYSLOG_FACILITY.get(facility, facility)
        assert line.severity == severity
        assert (line.app_name, line.procid) == ("dnstap-test", str(os.getpid()))
        if fmt == "text":
            assert line.msg == format_text(rec).decode()
        else:
            assert orjson.loads(line.msg) == orjson.loads(orjson.dumps(rec))
        if rfc == "5424":
            assert line.msgid == rec["message"]
            assert line.timestamp == rec["datetime"][:26] + "Z"
        else:
            assert line.msgid == "-"
            # No year in RFC 3164: rsyslog guesses it; month to second must match.
            assert line.timestamp[5:19] == time.strftime("%m-%dT%H:%M:%S", time.localtime(int(rec["timestamp"])))
    raw = [r for r in rsyslog.raw_lines() if f" {hostname} " in r]
    assert len(raw) == 300
    pri = priority(facility, severity)
    assert all(r.startswith(f"<{pri}>1 " if rfc == "5424" else f"<{pri}>") for r in raw)
    if rfc == "5424":
        assert all(" - \ufeff" not in r for r in raw)


def test_every_facility_and_severity_reaches_rsyslog(rsyslog):
    pairs = [(f, s) for f in SYSLOG_FACILITIES for s in SYSLOG_SEVERITIES]
    rec = records(1)[0]
    data = b"".join(
        frame_octet_counted(SyslogEncoder(facility=f, severity=s, hostname="all-pri", pid=1).messages([rec]))
        for f, s in pairs
    )
    with socket.create_connection(("127.0.0.1", rsyslog.port)) as sock:
        sock.sendall(data)
    got = lines_from(rsyslog, "all-pri", len(pairs))
    assert [(line.facility, line.severity) for line in got] == [(RSYSLOG_FACILITY.get(f, f), s) for f, s in pairs]


def test_udp_datagrams_are_cut_to_fit_and_counted(rsyslog):
    from core import counters

    big = dict(records(1)[0], identity="x" * (MAX_DATAGRAM + 5000))
    before = counters.counter_group("output.syslog.encode")["truncated"]
    counts = send_through_output(options(rsyslog.port, transport="udp", hostname="big-udp"), [[big]])
    assert counters.counter_group("output.syslog.encode")["truncated"] == before + 1
    assert counts["delivered"] == 1
    [raw] = [r for r in rsyslog.raw_lines() if " big-udp " in r] or [None]
    assert raw is not None and len(raw.encode()) == MAX_DATAGRAM  # rsyslog's limit here is 64k


def test_write_to_syslog_in_a_beam_pipeline(rsyslog):
    recs = records(600)
    opts = options(rsyslog.port, transport="tcp", hostname="beam-test", format="json")
    with beam.Pipeline(runner=FnApiRunner()) as p:
        _ = (p | beam.Create([RecordBatch(recs[:300]), RecordBatch(recs[300:]), RecordBatch()])
             | WriteToSyslog(opts))
    got = lines_from(rsyslog, "beam-test", 600)
    assert sorted(orjson.loads(line.msg)["qname"] for line in got) == sorted(r["qname"] for r in recs)
    assert Counter(line.msgid for line in got) == Counter(r["message"] for r in recs)


# ----------------------------------------------------------------------------- outages


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_rsyslog_killed_and_restarted_every_message_delivered_or_dropped(tmp_path, sig):
    """TCP syslog has no acknowledgements: what was in flight at the kill is
    sent again, so some messages may arrive twice, none may go missing
    uncounted."""
    server = Rsyslog(tmp_path / "rsyslog").start()
    encoder = SyslogEncoder(hostname="kill-test", pid=1)
    d = Delivery(f"syslog-kill-{sig.name}", TcpStream("127.0.0.1", server.port), retry=0.2, buffer_size=100_000)
    total, step = 20_000, 100
    recs = records(total)
    restart = threading.Timer(2.0, server.start)
    try:
        for i in range(0, total, step):
            if i == 6_000:
                assert server.wait_lines(4_000) >= 4_000  # it is really writing them
                server.stop(sig)
                restart.start()  # on the same port, two seconds later
            d.put(frame_octet_counted(encoder.messages(recs[i:i + step])), step)
            time.sleep(0.02)  # a steady 5,000 messages/s
        restart.join()
        assert server.running(), server.log()
        d.close()
        server.wait_lines(total, timeout=20, quiet=0.5)
        server.stop(signal.SIGTERM)  # writes out what it holds
        ids = [message_id(line.msg) for line in server.lines()]
    finally:
        restart.cancel()
        d.close()
        server.stop(signal.SIGKILL)
    unique = set(ids)
    counts = d.counts
    assert counts["send_errors"] >= 1 and counts["connects"] == 2, counts
    assert unique <= set(range(total))
    assert len(unique) + counts["dropped"] == total, (len(unique), counts)
    assert counts["delivered"] + counts["dropped"] == total
    duplicates = len(ids) - len(unique)
    assert duplicates <= counts["resent"]  # only what was in flight came twice
    print(f"syslog tcp {sig.name}: {len(unique)} delivered, {counts['dropped']} dropped, "
          f"{counts['resent']} resent, {duplicates} twice")


def test_no_server_tiny_buffer_drops_oldest_without_blocking_then_resumes(tmp_path):
    port = peers.free_port(udp_too=True)
    opts = options(port, transport="tcp", hostname="late-server", buffer_size=500, retry=0.1)
    fn = _WriteSyslogFn(opts)
    fn.setup()
    delivery = fn._delivery
    recs = records(4_400)
    server = Rsyslog(tmp_path / "rsyslog", port)
    try:
        started = time.monotonic()
        for i in range(0, 4_000, 100):
            fn.process(RecordBatch(recs[i:i + 100]))
        assert time.monotonic() - started < 1.0  # the pipeline never waits for the server
        snap = delivery.snapshot()
        assert (snap["dropped"], snap["buffered"], snap["connected"]) == (3_500, 500, 0)
        wait_until(lambda: delivery.counts["connect_errors"] >= 2)  # retried, still down

        server.start()
        assert server.wait_lines(500) == 500
        # Written messages occupy the buffer until they settle (2 s), then
        # there is room again.
        wait_until(lambda: delivery.counts["delivered"] == 500)
        for i in range(4_000, 4_400, 100):
            fn.process(RecordBatch(recs[i:i + 100]))
        fn.teardown()
        server.wait_lines(900, quiet=0.3)
        ids = [message_id(line.msg) for line in server.lines()]
    finally:
        fn.teardown()
        server.stop(signal.SIGKILL)
    assert ids == list(range(3_500, 4_400))  # the newest, in order, once each
    assert delivery.counts["dropped"] + len(ids) == 4_400
    assert delivery.counts["delivered"] == 900


def test_udp_server_down_is_noticed_and_messages_kept_until_it_starts(tmp_path):
    """Over UDP only the ICMP "port unreachable" tells that the server is
    down (here on loopback it always comes back): the sends fail, what was
    sent is kept and goes out again once the server listens."""
    port = peers.free_port(udp_too=True)
    opts = options(port, transport="udp", hostname="udp-late", retry=0.2)
    fn = _WriteSyslogFn(opts)
    fn.setup()
    delivery = fn._delivery
    recs = records(750)
    server = Rsyslog(tmp_path / "rsyslog", port)
    try:
        started = time.monotonic()
        for i in range(0, 500, 50):
            fn.process(RecordBatch(recs[i:i + 50]))
            time.sleep(0.1)
        down_for = time.monotonic() - started
        assert delivery.counts["send_errors"] >= 1 and delivery.counts["delivered"] == 0
        # A refused send is followed by a failed connect and a pause: no busy
        # loop against a dead port (a new batch may end the pause early).
        assert delivery.counts["send_errors"] <= 10 + down_for / 0.2 + 2
        assert delivery.counts["connect_errors"] >= delivery.counts["send_errors"] - 1
        server.start()
        for i in range(500, 750, 50):
            fn.process(RecordBatch(recs[i:i + 50]))
        fn.teardown()
        server.wait_lines(750, quiet=0.3)
        ids = [message_id(line.msg) for line in server.lines()]
    finally:
        fn.teardown()
        server.stop(signal.SIGKILL)
    assert set(ids) == set(range(750))
    assert delivery.counts["delivered"] == 750 and delivery.counts["dropped"] == 0
    print(f"syslog udp down then up: {delivery.counts['resent']} resent, {len(ids) - 750} twice")


# ----------------------------------------------------------------------------- the receiver


@pytest.mark.parametrize("transport, rfc, fmt", [("tcp", "5424", "json"), ("udp", "3164", "text")])
def test_receiver_sends_every_message_to_rsyslog(rsyslog, tmp_path, transport, rfc, fmt):
    hostname = f"e2e-{transport}"
    port = free_tcp_port()
    receiver = start_receiver(tmp_path / "rx", {
        "input": {"tcp-socket": {"enable": True, "local-address": "127.0.0.1", "local-port": port}},
        "output": {"syslog": {
            "enable": True, "transport": transport, "rfc": rfc, "format": fmt, "remote-address": "127.0.0.1",
            "remote-port": rsyslog.port, "facility": "local5", "severity": "notice", "hostname": hostname,
        }},
    })
    frames = capture_frames()
    with FstrmClient.tcp("127.0.0.1", port) as client:
        client.handshake()
        client.send_frames(frames)
        client.stop()
    wait_until(lambda: sum(1 for line in rsyslog.lines() if line.hostname == hostname) >= len(frames), 30,
               explain=receiver.logs)
    assert receiver.stop() == 0, receiver.logs()
    got = [line for line in rsyslog.lines() if line.hostname == hostname]
    assert len(got) == len(frames) == 2006  # one message each, none twice
    assert {(line.facility, line.severity, line.app_name, line.procid) for line in got} == {
        ("local5", "notice", "dnstap-receiver", str(receiver.pid))
    }
    if fmt == "json":
        docs = [orjson.loads(line.msg) for line in got]
    else:
        docs = [dict(zip(("datetime", "identity", "message"), line.msg.split(" ", 3))) for line in got]
    assert Counter(d["message"] for d in docs) == {"CLIENT_QUERY": 1003, "CLIENT_RESPONSE": 1003}
    if rfc == "5424":
        assert [line.msgid for line in got] == [d["message"] for d in docs]
        assert all(line.timestamp == d["datetime"][:26] + "Z" for line, d in zip(got, docs))
