"""output.dnstap: the original dnstap messages forwarded as Frame Streams.

- the identity rewrite against the protobuf library (hypothesis), for messages
  the library wrote and for any field layout a valid message may have;
- the Frame Streams writer against readers that misbehave (wrong content
  type, no ACCEPT, closing, chatter, no FINISH) and over TLS;
- into fstrm_capture (libfstrm) and the Go dnstap tool: their capture files
  hold exactly the frames sent, identity rewritten when configured;
- a chain of two real receivers, and WriteToDnstap in a Beam pipeline;
- a reader SIGKILLed mid-stream and restarted: every frame arrives or is
  counted dropped; an outage with a tiny buffer: drops counted, no blocking,
  delivery resumes when a reader appears.
"""

from __future__ import annotations

import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import apache_beam as beam
import peers
import pytest
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from conftest import REPO, start_receiver, wait_for_lines
from fstrm_client import FstrmClient, capture_frames, free_tcp_port
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core import counters
from core.dnstap_pb2 import Dnstap, Message
from core.framestream import (
    ACCEPT,
    CONTENT_TYPE_DNSTAP,
    FINISH,
    START,
    ReaderSession,
    encode_control,
)
from pipeline.config import DnstapOutput
from sinks.delivery import Delivery
from sinks.dnstap import (
    FrameStreamWriter,
    WriteToDnstap,
    encode_frames,
    encode_identity,
    rewrite_identity,
    transport_for,
)
from transforms.batches import RecordBatch
from transforms.decode import decode_batch

IO = 10.0  # seconds any wait in these tests may take before failing


def wait_until(predicate, timeout: float = IO, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def read_stream(data: bytes) -> tuple[list[bytes], bool]:
    """The data frames of a capture file (START ... STOP) and whether it ends with STOP."""
    frames: list[bytes] = []
    session = ReaderSession()
    session.receive(data, frames)
    return frames, session.finished


def read_data_frames(path: Path) -> list[bytes]:
    """The frames of a file of bare data frames (written by READER below)."""
    frames, _ = read_stream(encode_control(START) + path.read_bytes()) if path.exists() else ([], False)
    return frames


def unique_frames(n: int, tag: str) -> list[bytes]:
    """``n`` distinct dnstap frames: the capture's, cycled, each with an identity of its own."""
    base = capture_frames()
    return [rewrite_identity(base[i % len(base)], encode_identity(f"{tag}-{i}")) for i in range(n)]


def identity_of(frame: bytes) -> bytes:
    tap = Dnstap()
    tap.ParseFromString(frame)
    return tap.identity


def with_identity(frame: bytes, identity: bytes) -> bytes:
    """What the protobuf library makes of ``frame`` with its identity set."""
    tap = Dnstap()
    tap.ParseFromString(frame)
    tap.identity = identity
    return tap.SerializeToString()


# --------------------------------------------------------------------------- identity rewrite


@st.composite
def inner_messages(draw) -> Message:
    m = Message(type=draw(st.integers(1, 14)))
    if draw(st.booleans()):
        m.socket_family = draw(st.sampled_from([1, 2]))
        m.socket_protocol = draw(st.integers(1, 7))
    if draw(st.booleans()):
        m.query_address = draw(st.binary(min_size=4, max_size=16))
        m.query_port = draw(st.integers(0, 2**32 - 1))
    if draw(st.booleans()):
        m.query_time_sec = draw(st.integers(0, 2**64 - 1))
        m.query_time_nsec = draw(st.integers(0, 2**32 - 1))
    if draw(st.booleans()):
        m.query_message = draw(st.binary(max_size=600))
    if draw(st.booleans()):
        m.response_message = draw(st.binary(max_size=600))
    return m


@st.composite
def dnstap_messages(draw) -> Dnstap:
    tap = Dnstap(type=Dnstap.MESSAGE)
    for name in ("identity", "version", "extra"):
        value = draw(st.none() | st.binary(max_size=200))
        if value is not None:
            setattr(tap, name, value)
    if draw(st.booleans()):
        tap.message.CopyFrom(draw(inner_messages()))
    return tap


identities = st.binary(max_size=300) | st.text(max_size=40).map(str.encode)


@settings(max_examples=300, deadline=None)
@given(dnstap_messages(), identities)
def test_rewrite_is_the_protobuf_librarys_result(tap, identity):
    payload = tap.SerializeToString()
    assert rewrite_identity(payload, encode_identity(identity)) == with_identity(payload, identity)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(number: int, wire: int, value) -> bytes:
    tag = _varint(number << 3 | wire)
    if wire == 0:
        return tag + _varint(value)
    if wire == 2:
        return tag + _varint(len(value)) + value
    if wire == 1:
        return tag + value.to_bytes(8, "little")
    if wire == 5:
        return tag + value.to_bytes(4, "little")
    # a group holding one varint field
    return tag + _field(1, 0, value) + _varint(number << 3 | 4)


# Field numbers Dnstap does not define: they stay unknown fields.
unknown_numbers = st.integers(4, 13) | st.integers(16, 5000)
unknown_fields = st.one_of(
    st.tuples(unknown_numbers, st.just(0), st.integers(0, 2**64 - 1)),
    st.tuples(unknown_numbers, st.just(1), st.integers(0, 2**64 - 1)),
    st.tuples(unknown_numbers, st.just(2), st.binary(max_size=200)),
    st.tuples(unknown_numbers, st.just(5), st.integers(0, 2**32 - 1)),
)


@st.composite
def field_layouts(draw, groups: bool):
    """The top-level fields of a valid Dnstap message, as (number, wire type,
    value), in any order, with repeated identities and unknown fields."""
    fields = [(15, 0, 1)]  # type = MESSAGE, required
    fields += [(1, 2, v) for v in draw(st.lists(st.binary(max_size=300), max_size=3))]
    for number in (2, 3):
        if draw(st.booleans()):
            fields.append((number, 2, draw(st.binary(max_size=50))))
    if draw(st.booleans()):
        fields.append((14, 2, draw(inner_messages()).SerializeToString()))
    fields += draw(st.lists(unknown_fields, max_size=4))
    if groups:
        fields += draw(st.lists(st.tuples(unknown_numbers, st.just(3), st.integers(0, 1000)), min_size=1, max_size=2))
    return draw(st.permutations(fields))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(field_layouts(groups=False), identities)
def test_rewrite_any_field_layout_keeps_every_other_byte(fields, identity):
    payload = b"".join(_field(*f) for f in fields)
    rewritten = rewrite_identity(payload, encode_identity(identity))
    # Semantically the library's answer ...
    got = Dnstap()
    got.ParseFromString(rewritten)
    assert got == Dnstap.FromString(with_identity(payload, identity))
    assert got.identity == identity
    # ... and on the wire: the new identity, then every other field as it was.
    others = b"".join(_field(*f) for f in fields if f[0] != 1)
    assert rewritten == encode_identity(identity) + others


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(field_layouts(groups=True), identities)
def test_rewrite_with_unknown_groups_falls_back_to_protobuf(fields, identity):
    payload = b"".join(_field(*f) for f in fields)
    rewritten = rewrite_identity(payload, encode_identity(identity))
    got = Dnstap.FromString(rewritten)
    assert got == Dnstap.FromString(with_identity(payload, identity))
    assert got.identity == identity


@pytest.mark.parametrize("payload", [b"\x0a\x05ab", b"\x0f", b"\x00\x01", b"\x78", b"\x72\xff\xff\xff\xff\xff\xff"])
def test_rewrite_leaves_an_invalid_payload_unchanged(payload):
    assert rewrite_identity(payload, encode_identity("x")) == payload


def test_encode_frames_skips_records_without_raw():
    records = decode_batch(capture_frames()[:10], keep_raw=True)
    plain = decode_batch(capture_frames()[:3])
    frames, missing = encode_frames(list(records) + list(plain), None)
    assert frames == capture_frames()[:10]
    assert missing == 3
    frames, _ = encode_frames(records, encode_identity("relay"))
    assert frames == [with_identity(f, b"relay") for f in capture_frames()[:10]]


# --------------------------------------------------------------------------- readers in threads


class ThreadReader:
    """A Frame Streams reader on loopback (TCP, optionally TLS): one
    connection after the other, answered by ReaderSession; keeps the frames.
    ``on_connection(conn)``, if given, replaces the protocol entirely."""

    def __init__(self, tls: ssl.SSLContext | None = None, on_connection=None) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.1)
        self.port = self.server.getsockname()[1]
        self.tls = tls
        self.on_connection = on_connection
        self.frames: list[bytes] = []
        self.finished = 0
        self.errors: list[str] = []
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.server.accept()
            except (TimeoutError, ssl.SSLError, OSError):
                continue
            try:
                conn.settimeout(IO)
                if self.tls is not None:
                    conn = self.tls.wrap_socket(conn, server_side=True)
                if self.on_connection is not None:
                    self.on_connection(conn)
                else:
                    self._serve(conn)
            except Exception as exc:  # noqa: BLE001 - reported by the test
                self.errors.append(repr(exc))
            finally:
                conn.close()

    def _serve(self, conn) -> None:
        session = ReaderSession()
        while not session.finished:
            data = conn.recv(65536)
            if not data:
                return
            reply = session.receive(data, self.frames)
            if session.finished:  # counted before FINISH goes out: the writer may look at once
                self.finished += 1
            if reply:
                conn.sendall(reply)

    def close(self) -> None:
        self._stop = True
        self._thread.join(5)
        self.server.close()


@pytest.fixture
def reader():
    made = []

    def make(**kwargs) -> ThreadReader:
        made.append(ThreadReader(**kwargs))
        return made[-1]

    yield make
    for r in made:
        r.close()


def read_control(conn) -> bytes:
    """A whole control frame from the writer (escape, length, body)."""
    head = b""
    while len(head) < 8:
        head += conn.recv(8 - len(head))
    body = b""
    (length,) = struct.unpack(">I", head[4:])
    while len(body) < length:
        body += conn.recv(length - len(body))
    return head + body


def test_writer_speaks_bidirectional_frame_streams(reader):
    r = reader()
    frames = capture_frames()
    writer = FrameStreamWriter(address="127.0.0.1", port=r.port)
    assert writer.confirms is False
    writer.connect()
    writer.send([frames[:1000], frames[1000:1500]])
    writer.send([frames[1500:]])
    assert writer.close(graceful=True) is True  # FINISH came back
    assert r.frames == frames and r.finished == 1 and not r.errors
    assert writer.close(graceful=True) is False  # already closed


def test_writer_refuses_another_content_type(reader):
    def accept_other(conn):
        read_control(conn)
        conn.sendall(encode_control(ACCEPT, (b"protobuf:other",)))
        time.sleep(0.5)

    r = reader(on_connection=accept_other)
    writer = FrameStreamWriter(address="127.0.0.1", port=r.port)
    with pytest.raises(ConnectionError, match="protobuf:other"):
        writer.connect()


def test_writer_refuses_an_answer_other_than_accept(reader):
    def finish(conn):
        read_control(conn)
        conn.sendall(encode_control(FINISH))
        time.sleep(0.5)

    r = reader(on_connection=finish)
    with pytest.raises(ConnectionError, match="expected ACCEPT"):
        FrameStreamWriter(address="127.0.0.1", port=r.port).connect()


def test_writer_handshake_times_out(reader):
    r = reader(on_connection=lambda conn: time.sleep(1.0))
    writer = FrameStreamWriter(address="127.0.0.1", port=r.port, timeout=0.3)
    started = time.monotonic()
    with pytest.raises((TimeoutError, socket.timeout)):
        writer.connect()
    assert time.monotonic() - started < 0.9


def test_writer_connect_refused():
    with pytest.raises(OSError):
        FrameStreamWriter(address="127.0.0.1", port=free_tcp_port()).connect()


def _handshake_then(action):
    def serve(conn):
        read_control(conn)  # READY
        conn.sendall(encode_control(ACCEPT, (CONTENT_TYPE_DNSTAP,)))
        read_control(conn)  # START
        action(conn)
    return serve


@pytest.mark.parametrize("peer, message", [
    (lambda conn: None, "closed the connection"),  # closes right after START
    (lambda conn: (conn.sendall(b"\x00\x00\x00\x00"), time.sleep(1)), "unexpected bytes"),
])
def test_writer_sees_the_peer_before_writing_more(reader, peer, message):
    r = reader(on_connection=_handshake_then(peer))
    writer = FrameStreamWriter(address="127.0.0.1", port=r.port)
    writer.connect()
    time.sleep(0.2)
    with pytest.raises(ConnectionError, match=message):
        writer.send([capture_frames()[:5]])
    writer.close(False)


def test_graceful_close_without_finish_is_not_confirmed(reader):
    r = reader(on_connection=_handshake_then(lambda conn: time.sleep(1.0)))
    writer = FrameStreamWriter(address="127.0.0.1", port=r.port, timeout=0.3)
    writer.connect()
    writer.send([capture_frames()[:5]])
    started = time.monotonic()
    assert writer.close(graceful=True) is False
    assert time.monotonic() - started < 0.9


@pytest.fixture
def tls_reader(reader, tls_files):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*tls_files)
    return reader(tls=ctx)


def test_tls_verified_with_the_ca_file(tls_reader, tls_files):
    frames = capture_frames()
    writer = FrameStreamWriter(address="127.0.0.1", port=tls_reader.port, tls=True, tls_ca_file=tls_files[0])
    writer.connect()
    writer.send([frames])
    assert writer.close(graceful=True) is True
    assert tls_reader.frames == frames


def test_tls_unknown_certificate_refused_unless_insecure(tls_reader):
    with pytest.raises(ssl.SSLCertVerificationError):
        FrameStreamWriter(address="127.0.0.1", port=tls_reader.port, tls=True).connect()
    writer = FrameStreamWriter(address="127.0.0.1", port=tls_reader.port, tls=True, tls_insecure=True)
    writer.connect()
    writer.send([capture_frames()[:10]])
    assert writer.close(graceful=True) is True
    assert tls_reader.frames == capture_frames()[:10]


# --------------------------------------------------------------------------- real Frame Streams readers

pytest_integration = pytest.mark.integration


def _listen(kind: str, tmp_path: Path) -> tuple[list[str], dict]:
    """Listener arguments and the transport keyword arguments for ``kind``."""
    if kind == "unix":
        sock = str(peers.short_socket_dir(tmp_path) / "fwd.sock")
        return [sock], {"sock_path": sock}
    port = peers.free_port()
    return [str(port)], {"address": "127.0.0.1", "port": port}


def _wait_listening(transport: dict, proc: subprocess.Popen) -> None:
    def up() -> bool:
        assert proc.poll() is None, f"listener exited with {proc.returncode}"
        if "sock_path" in transport:
            return peers.unix_socket_open(transport["sock_path"])
        return peers.port_open(transport["address"], transport["port"])
    wait_until(up, what="the listener")


def _forward(transport: dict, frames: list[bytes], identity: str | None) -> list[bytes]:
    """Send ``frames`` in chunks through a FrameStreamWriter, STOP, FINISH; returns what
    the reader must have received."""
    writer = FrameStreamWriter(**transport)
    writer.connect()
    field = None if identity is None else encode_identity(identity)
    sent = [rewrite_identity(f, field) for f in frames] if field else list(frames)
    for i in range(0, len(sent), 300):
        writer.send([sent[i : i + 100], sent[i + 100 : i + 300]])
    assert writer.close(graceful=True) is True, "no FINISH after STOP"
    return sent


@pytest_integration
@pytest.mark.parametrize("kind, identity", [("unix", None), ("tcp", "relay-ß"), ("unix", "r"), ("tcp", None)])
def test_fstrm_capture_receives_every_frame(tmp_path, kind, identity):
    program = peers.require("fstrm_capture")
    where, transport = _listen(kind, tmp_path)
    out = tmp_path / "capture.fstrm"
    listen = ["-u", where[0]] if kind == "unix" else ["-a", "127.0.0.1", "-p", where[0]]
    proc = subprocess.Popen([program, "-t", CONTENT_TYPE_DNSTAP.decode(), *listen, "-w", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_listening(transport, proc)
        sent = _forward(transport, capture_frames(), identity)
    finally:
        proc.send_signal(signal.SIGINT)  # flushes and ends the file with STOP
        proc.wait(IO)
    frames, finished = read_stream(out.read_bytes())
    assert finished
    assert frames == sent and len(frames) == 2006
    if identity is not None:
        assert frames == [with_identity(f, identity.encode()) for f in capture_frames()]


@pytest_integration
@pytest.mark.parametrize("kind, identity", [("tcp", None), ("unix", "relay")])
def test_go_dnstap_receives_every_frame(tmp_path, kind, identity):
    program = peers.require("dnstap")
    where, transport = _listen(kind, tmp_path)
    out = tmp_path / "go.fstrm"
    listen = ["-u", where[0]] if kind == "unix" else ["-l", f"127.0.0.1:{where[0]}"]
    proc = subprocess.Popen([program, *listen, "-w", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    rotated = tmp_path / "go.1.fstrm"
    try:
        _wait_listening(transport, proc)
        sent = _forward(transport, capture_frames(), identity)
        # The tool flushes its file only when it reopens it (SIGHUP after a rename,
        # as logrotate does): SIGINT/SIGTERM lose its buffer.
        wait_until(out.exists, what="the output file")
        out.rename(rotated)
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: read_stream(rotated.read_bytes())[1], what="the rotated file to end with STOP")
    finally:
        proc.kill()
        proc.wait(IO)
    frames, _ = read_stream(rotated.read_bytes())
    assert frames == sent and len(frames) == 2006
    if identity is not None:
        assert {identity_of(f) for f in frames} == {identity.encode()}


# --------------------------------------------------------------------------- receiver -> receiver


def _receiver_b(tmp_path: Path, kind: str, tls_files=None):
    """A real receiver listening on ``kind`` (unix, tcp, tls) with a JSON file output;
    returns it, its output file and DnstapOutput keys pointing at it."""
    out = tmp_path / "b.jsonl"
    config: dict = {"output": {"file": {"enable": True, "format": "json", "file": str(out)}}}
    if kind == "unix":
        sock = str(peers.short_socket_dir(tmp_path) / "b.sock")
        config["input"] = {"unix-socket": {"enable": True, "path": sock}}
        target = {"sock_path": sock}
    else:
        port = peers.free_port()
        tcp = {"enable": True, "local-address": "127.0.0.1", "local-port": port}
        target = {"remote_address": "127.0.0.1", "remote_port": port}
        if kind == "tls":
            tcp.update({"tls-support": True, "tls-server-cert": tls_files[0], "tls-server-key": tls_files[1]})
            target.update({"tls_support": True, "tls_ca_file": tls_files[0]})
        config["input"] = {"tcp-socket": tcp}
    return start_receiver(tmp_path / "b", config), out, target


@pytest.mark.parametrize("kind", ["unix", "tls"])
def test_chain_delivery_into_a_real_receiver(tmp_path, tls_files, kind):
    """A = this output's Delivery and transport fed from the capture, B = the receiver."""
    b, out, target = _receiver_b(tmp_path, kind, tls_files)
    options = DnstapOutput(enable=True, retry=0.2, dnstap_identity="relay", **target)
    records = decode_batch(capture_frames(), keep_raw=True)
    delivery = Delivery("dnstap-chain", transport_for(options), retry=options.retry)
    field = encode_identity(options.dnstap_identity)
    for i in range(0, len(records), 512):
        frames, missing = encode_frames(records[i : i + 512], field)
        assert missing == 0
        delivery.put(frames, len(frames))
    delivery.close(timeout=IO)
    counts = delivery.snapshot()
    assert counts["delivered"] == 2006 and counts["dropped"] == 0
    assert wait_for_lines(out, 2006, IO, b) == 2006
    assert b.stop() == 0
    lines = b.output_lines(out)
    assert len(lines) == 2006
    assert {line["identity"] for line in lines} == {"relay"}
    assert Counter(line["message"] for line in lines) == {"CLIENT_QUERY": 1003, "CLIENT_RESPONSE": 1003}


def test_chain_of_two_receivers(tmp_path):
    """Receiver A (output.dnstap) forwards the capture to receiver B: 2006 messages end to
    end, the same as A's own file output but for the identity."""
    b, b_out, target = _receiver_b(tmp_path, "tcp")
    a_port = peers.free_port()
    a_out = tmp_path / "a.jsonl"
    dnstap = {"enable": True, "retry": 0.2, "dnstap-identity": "relay-a",
              "remote-address": target["remote_address"], "remote-port": target["remote_port"]}
    a = start_receiver(tmp_path / "a", {
        "input": {"tcp-socket": {"enable": True, "local-address": "127.0.0.1", "local-port": a_port}},
        "output": {"file": {"enable": True, "format": "json", "file": str(a_out)}, "dnstap": dnstap},
    })
    with FstrmClient.tcp("127.0.0.1", a_port) as client:
        client.handshake()
        client.send_frames(capture_frames())
        client.stop()
    assert wait_for_lines(a_out, 2006, IO, a) == 2006
    wait_for_lines(b_out, 2006, IO, b)
    assert a.stop() == 0, a.logs()
    assert b.stop() == 0, b.logs()
    a_lines, b_lines = a.output_lines(a_out), b.output_lines(b_out)
    assert len(b_lines) == len(a_lines) == 2006, f"{len(b_lines)} forwarded\n{a.logs()}"
    assert {line["identity"] for line in b_lines} == {"relay-a"}

    def key(line):
        return tuple(sorted((k, str(v)) for k, v in line.items() if k != "identity"))

    assert Counter(map(key, b_lines)) == Counter(map(key, a_lines))


# --------------------------------------------------------------------------- Beam


def test_write_to_dnstap_in_a_pipeline(reader):
    r = reader()
    options = DnstapOutput(enable=True, retry=0.2, remote_address="127.0.0.1", remote_port=r.port,
                           dnstap_identity="beam")
    frames = capture_frames()
    records = decode_batch(frames, keep_raw=True)
    batches = [RecordBatch(records[i : i + 500]) for i in range(0, len(records), 500)]
    batches.append(RecordBatch(decode_batch(frames[:7])))  # no raw: skipped and counted
    skipped = counters.counter_group("output.dnstap.skipped")
    before = skipped["no_raw"]
    with beam.Pipeline(runner=FnApiRunner()) as p:
        _ = p | beam.Create(batches) | WriteToDnstap(options)
    # The last DoFn torn down flushes the Delivery: STOP, FINISH.
    wait_until(lambda: r.finished == 1, what="FINISH")
    assert Counter(r.frames) == Counter(with_identity(f, b"beam") for f in frames)
    assert skipped["no_raw"] - before == 7


# --------------------------------------------------------------------------- outages

# A Frame Streams reader as a process of its own, so that it can be SIGKILLed: it
# appends every data frame it receives to a file (bare length-prefixed frames, written
# as they arrive) and answers READY and STOP.
READER = r"""
import os, signal, socket, sys
from core.framestream import ReaderSession, encode_data
kind, where, out = sys.argv[1:4]
if kind == "unix":
    if os.path.exists(where):
        os.unlink(where)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(where)
    server.listen()
else:
    server = socket.create_server(("127.0.0.1", int(where)))
fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
print("listening", flush=True)
while True:
    conn, _ = server.accept()
    session = ReaderSession()
    with conn:
        while not session.finished:
            data = conn.recv(262144)
            if not data:
                break
            frames = []
            reply = session.receive(data, frames)
            if frames:
                os.write(fd, b"".join(encode_data(f) for f in frames))
            if reply:
                conn.sendall(reply)
"""


class ReaderProcess:
    def __init__(self, kind: str, where: str, out: Path) -> None:
        self.out = out
        self.proc = subprocess.Popen([sys.executable, "-c", READER, kind, where, str(out)], cwd=REPO,
                                     stdout=subprocess.PIPE)
        assert self.proc.stdout.readline() == b"listening\n"

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(IO)

    def frames(self) -> list[bytes]:
        return read_data_frames(self.out)


@pytest.fixture
def reader_processes():
    made: list[ReaderProcess] = []

    def make(*args) -> ReaderProcess:
        made.append(ReaderProcess(*args))
        return made[-1]

    yield make
    for r in made:
        if r.proc.poll() is None:
            r.kill()


@pytest.mark.parametrize("kind", ["tcp", "unix"])
def test_reader_killed_and_restarted_nothing_unaccounted(tmp_path, reader_processes, kind):
    where, transport = _listen(kind, tmp_path)
    first = reader_processes(kind, where[0], tmp_path / "first.bin")
    delivery = Delivery("dnstap-kill", FrameStreamWriter(**transport), retry=0.1)  # settle: the default 2 s
    sent = unique_frames(6000, kind)
    second = None
    try:
        # A steady stream over about 3 s; the reader dies at 1 s and is back at 1.5 s.
        for n, i in enumerate(range(0, len(sent), 20)):
            delivery.put(sent[i : i + 20], 20)
            if n == 100:
                first.kill()
            if n == 150:
                second = reader_processes(kind, where[0], tmp_path / "second.bin")
            time.sleep(0.01)
        delivery.close(timeout=IO)  # STOP; FINISH confirms what is in flight
    finally:
        delivery.close(timeout=0)
    counts = delivery.snapshot()
    received = first.frames() + second.frames()
    duplicates = len(received) - len(set(received))
    print(f"{kind}: {counts}, received {len(received)} ({len(first.frames())} + "
          f"{len(second.frames())}), duplicates {duplicates}")
    assert counts["delivered"] + counts["dropped"] == len(sent)
    assert counts["dropped"] == 0  # the buffer held the outage
    assert set(received) == set(sent)  # every frame, and nothing else
    assert counts["send_errors"] >= 1 and counts["connects"] >= 2
    assert first.frames() and second.frames()
    assert duplicates <= counts["resent"]  # only the resent frames can come twice


def test_outage_with_a_tiny_buffer_drops_oldest_then_resumes(tmp_path, reader_processes):
    where, transport = _listen("unix", tmp_path)
    delivery = Delivery("dnstap-outage", FrameStreamWriter(**transport), retry=0.1, buffer_size=100)
    sent = unique_frames(500, "outage")
    try:
        started = time.monotonic()
        for i in range(0, len(sent), 10):
            delivery.put(sent[i : i + 10], 10)
        assert time.monotonic() - started < 0.5  # put never waits for the reader
        counts = delivery.snapshot()
        assert counts["dropped"] == 400 and counts["buffered"] == 100 and counts["connected"] == 0
        time.sleep(0.3)  # a few failed connection attempts
        assert delivery.snapshot()["connect_errors"] >= 2
        reader = reader_processes("unix", where[0], tmp_path / "late.bin")
        wait_until(lambda: len(reader.frames()) >= 100, what="delivery after the outage")
        delivery.close(timeout=IO)
    finally:
        delivery.close(timeout=0)
    counts = delivery.snapshot()
    assert reader.frames() == sent[400:]  # the newest 100, once each, in order
    assert counts["delivered"] == 100 and counts["dropped"] == 400
    assert counts["delivered"] + counts["dropped"] == len(sent)
