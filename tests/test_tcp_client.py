"""The tcp-client input (sources/tcp_client.py): the receiver connects to a sender that listens.

The remote is tests/fstrm_sender.py, which listens on loopback and streams the real
unbound capture to every reader that connects (bidirectional or unidirectional,
optionally TLS); closing it and listening again on the same port is a remote restart.
The first tests run a ListenerHub with the client as its only feeder and consume its
queue in the test thread, as the Beam source would (helpers from test_listener.py);
the last ones run the real receiver (``python -m pipeline``) with a JSON file output.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time

import pytest

from conftest import wait_for_lines
from core.errors import ConfigError
from core.message import decode
from fstrm_client import FstrmClient, capture_frames, free_tcp_port
from fstrm_sender import FstrmSender
from pipeline.build import hub_spec
from pipeline.config import TcpClientInput, config_from_dict
from sources.listener import HubSpec, forget_hub, get_hub
from sources.tcp_client import TcpClientSpec
from test_listener import WAIT, close_hub, collect, wait_until

FRAMES = capture_frames("unbound-tcp.fstrm")  # 1003 CLIENT_QUERY + 1003 CLIENT_RESPONSE
INPUT_LOGGER = "dnstap_receiver.input"


@pytest.fixture
def client_hub():
    """``make(TcpClientSpec, **HubSpec fields)`` -> a started hub whose only input is that
    client; shut down (if the test did not) and forgotten after the test."""
    made = []

    def make(client: TcpClientSpec, **kwargs):
        spec = HubSpec(feeders=(client,), **kwargs)
        try:
            hub = get_hub(spec)
        except BaseException:
            forget_hub(spec)
            raise
        made.append((spec, hub))
        return hub

    yield make
    for spec, hub in made:
        try:
            if not hub.stopped.is_set():
                close_hub(hub)
        finally:
            forget_hub(spec)


def client_lines(caplog, text: str = "") -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("tcp-client:") and text in r.getMessage()]


# --------------------------------------------------------------------------- streams


@pytest.mark.parametrize("host,address", [("127.0.0.1", "127.0.0.1"), ("::1", "::1"), ("127.0.0.1", "localhost")])
def test_bidirectional_session(client_hub, host, address):
    with FstrmSender(FRAMES, host=host) as sender:
        hub = client_hub(TcpClientSpec(address, sender.port, retry=0.2))
        assert collect(hub, len(FRAMES)) == FRAMES
        (session,) = sender.wait_sessions(1)
        assert session.error is None and session.finished, "STOP must be answered with FINISH"
        assert session.accept.content_types == (b"protobuf:dnstap.Dnstap",)
        wait_until(lambda: hub.stats.active == 0, what="the connection to end")
        stats = hub.stats
        assert (stats.client_connects, stats.connections, stats.protocol_errors) == (1, 1, 0)
        assert stats.closed_without_stop == 0 and stats.partial_frames_dropped == 0


def test_unidirectional_session(client_hub):
    with FstrmSender(FRAMES, bidirectional=False, max_sessions=1) as sender:
        hub = client_hub(TcpClientSpec("127.0.0.1", sender.port, retry=0.2))
        assert collect(hub, len(FRAMES)) == FRAMES
        (session,) = sender.wait_sessions(1)
        assert session.error is None and session.accept is None and not session.finished
    assert hub.stats.protocol_errors == 0 and hub.stats.closed_without_stop == 0


def test_pipeline_behind_pauses_the_connection_and_loses_nothing(client_hub):
    with FstrmSender(FRAMES, max_sessions=1) as sender:
        hub = client_hub(TcpClientSpec("127.0.0.1", sender.port), batch_size=16, queue_size=1)
        got = []
        deadline = time.monotonic() + WAIT
        while len(got) < len(FRAMES) and time.monotonic() < deadline:
            time.sleep(0.002)  # a slow pipeline: the queue of one batch fills
            with contextlib.suppress(TimeoutError):
                got.extend(hub.queue.get(timeout=0.5))
        assert got == FRAMES
        assert hub.stats.blocked_episodes > 0
        assert sender.wait_sessions(1)[0].finished


# --------------------------------------------------------------------------- outages


def test_remote_down_at_start_then_up_is_logged_once(client_hub, caplog):
    """A refused remote with retry 0.1: about 20 attempts in 2 s, one log line; it comes
    up: connected within the retry interval, one line saying after how many attempts."""
    caplog.set_level(logging.INFO, logger=INPUT_LOGGER)
    port = free_tcp_port()
    hub = client_hub(TcpClientSpec("127.0.0.1", port, retry=0.1))
    time.sleep(2.0)
    assert hub.stats.client_attempts >= 10
    assert hub.stats.client_connect_errors == hub.stats.client_attempts
    assert client_lines(caplog, "unreachable") == [
        f"tcp-client: 127.0.0.1:{port} unreachable: Connection refused; retrying every 0.1 s"
    ]
    assert len(client_lines(caplog)) == 1, client_lines(caplog)
    with FstrmSender(FRAMES, port=port) as sender:
        up = time.monotonic()
        wait_until(lambda: sender.sessions, timeout=1.0, what="a connection within the retry interval")
        assert time.monotonic() - up < 0.1 + 0.5
        assert collect(hub, len(FRAMES)) == FRAMES
    (connected,) = client_lines(caplog, "connected")
    assert connected.startswith(f"tcp-client: connected to 127.0.0.1:{port} after ")
    assert connected.endswith(" failed attempts")


def test_remote_restarts_every_session_arrives(client_hub, caplog):
    """The remote serves one stream, goes down, comes back on the same port, three times
    (bidirectional, unidirectional, bidirectional): every frame of every session arrives
    in order, each outage is logged once."""
    caplog.set_level(logging.INFO, logger=INPUT_LOGGER)
    port = free_tcp_port()
    hub = None
    for round_, bidirectional in enumerate((True, False, True)):
        with FstrmSender(FRAMES, port=port, bidirectional=bidirectional, max_sessions=1) as sender:
            if hub is None:
                hub = client_hub(TcpClientSpec("127.0.0.1", port, retry=0.05))
            assert collect(hub, len(FRAMES)) == FRAMES, f"session {round_}"
            (session,) = sender.wait_sessions(1)
            assert session.error is None and session.finished == bidirectional
        # Down for a while: the client keeps trying.
        attempts = hub.stats.client_attempts
        wait_until(lambda a=attempts: hub.stats.client_attempts >= a + 3, what="attempts while down")
    stats = hub.stats
    assert stats.client_connects == stats.connections == 3
    assert stats.frames == 3 * len(FRAMES) and stats.protocol_errors == 0
    assert len(client_lines(caplog, "unreachable")) == 3  # one per outage
    assert len(client_lines(caplog, "connected to")) == 3


def test_remote_closes_mid_frame(client_hub):
    """Half a frame, then the remote closes: the complete frames are kept, the half one
    dropped and counted, and the next session arrives whole."""
    port = free_tcp_port()
    with FstrmSender(FRAMES, port=port, cut_after=500, max_sessions=1) as sender:
        hub = client_hub(TcpClientSpec("127.0.0.1", port, retry=0.05))
        assert collect(hub, 500) == FRAMES[:500]
        sender.wait_sessions(1)
    wait_until(lambda: hub.stats.partial_frames_dropped == 1, what="the half frame to be counted")
    assert hub.stats.closed_without_stop == 1
    with FstrmSender(FRAMES, port=port, max_sessions=1) as sender:
        assert collect(hub, len(FRAMES)) == FRAMES
        assert sender.wait_sessions(1)[0].finished
    assert hub.stats.client_connects == 2


def test_remote_without_a_usable_stream_is_logged_once(client_hub, caplog):
    """A remote that accepts but offers another content type fails the same way at every
    attempt: logged once (not a connection and a failure every retry), counted each
    time; once it is fixed its stream is read."""
    caplog.set_level(logging.INFO, logger=INPUT_LOGGER)
    port = free_tcp_port()
    with FstrmSender(FRAMES, port=port, content_type=b"protobuf:other") as sender:
        hub = client_hub(TcpClientSpec("127.0.0.1", port, retry=0.05))
        wait_until(lambda: len(sender.sessions) >= 5, what="several attempts")
    assert hub.stats.errors_by_reason["ContentTypeMismatch"] >= 5
    (line,) = client_lines(caplog, "usable")
    assert line.startswith(f"tcp-client: 127.0.0.1:{port} sent no usable stream: READY offers content type(s) protobuf:other")
    assert len(client_lines(caplog, "connected")) == 1  # the first connection only
    with FstrmSender(FRAMES, port=port) as sender:
        assert collect(hub, len(FRAMES)) == FRAMES
    assert len(client_lines(caplog, "connected")) == 2
    assert "failed attempts" in client_lines(caplog, "connected")[-1]


def test_remote_that_closes_at_once_is_logged_once(client_hub, caplog):
    caplog.set_level(logging.INFO, logger=INPUT_LOGGER)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(WAIT)
        port = listener.getsockname()[1]
        hub = client_hub(TcpClientSpec("127.0.0.1", port, retry=0.05))
        for _ in range(5):
            listener.accept()[0].close()
        wait_until(lambda: hub.stats.client_connects >= 5, what="five connections")
    assert client_lines(caplog) == [
        f"tcp-client: connected to 127.0.0.1:{port}",  # the first time only
        f"tcp-client: 127.0.0.1:{port} closed the connection before starting a stream; retrying every 0.05 s",
    ]


def test_remote_that_accepts_and_sends_nothing_is_an_outage(client_hub, caplog):
    """It used to hold the client on "connected" for ever: now the stream must
    start within connect_timeout, else the connection is aborted and retried,
    and the outage is logged once."""
    caplog.set_level(logging.INFO, logger=INPUT_LOGGER)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(WAIT)
        port = listener.getsockname()[1]
        hub = client_hub(TcpClientSpec("127.0.0.1", port, retry=0.05, connect_timeout=0.3))
        accepted = [listener.accept()[0] for _ in range(3)]  # held open, silent
        for conn in accepted:
            conn.settimeout(WAIT)
            assert conn.recv(100) == b"", "the client did not close the silent connection"
            conn.close()
    assert client_lines(caplog) == [
        f"tcp-client: connected to 127.0.0.1:{port}",
        f"tcp-client: 127.0.0.1:{port} started no stream within 0.3 s; retrying every 0.05 s",
    ]
    assert hub.stats.client_connects >= 3


@pytest.fixture
def silent_port():
    """A port whose SYNs go unanswered: a listener that never accepts, its accept queue
    filled, so the kernel drops further connection requests."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", port))
        fillers.append(sock)
    time.sleep(0.1)
    yield port
    for sock in fillers:
        sock.close()
    listener.close()


def test_silent_remote_times_out(client_hub, caplog, silent_port):
    caplog.set_level(logging.INFO, logger=INPUT_LOGGER)
    hub = client_hub(TcpClientSpec("127.0.0.1", silent_port, retry=0.05, connect_timeout=0.3))
    wait_until(lambda: hub.stats.client_connect_errors >= 3, what="timed out attempts")
    assert client_lines(caplog) == [
        f"tcp-client: 127.0.0.1:{silent_port} unreachable: no answer within 0.3 s; retrying every 0.05 s"
    ]
    assert hub.stats.client_connects == 0


# --------------------------------------------------------------------------- TLS


@pytest.mark.parametrize("address", ["localhost", "127.0.0.1"])
def test_tls_verified_with_ca_file(client_hub, tls_files, address):
    with FstrmSender(FRAMES, tls=tls_files) as sender:
        hub = client_hub(TcpClientSpec(address, sender.port, tls=True, tls_ca_file=tls_files[0]))
        assert collect(hub, len(FRAMES)) == FRAMES
        assert sender.wait_sessions(1)[0].finished


def test_tls_insecure_skips_verification(client_hub, tls_files):
    with FstrmSender(FRAMES, tls=tls_files) as sender:
        hub = client_hub(TcpClientSpec("127.0.0.1", sender.port, tls=True, tls_insecure=True))
        assert collect(hub, len(FRAMES)) == FRAMES


def test_tls_untrusted_certificate_is_an_outage(client_hub, tls_files, caplog):
    caplog.set_level(logging.INFO, logger=INPUT_LOGGER)
    with FstrmSender(FRAMES, tls=tls_files) as sender:
        hub = client_hub(TcpClientSpec("localhost", sender.port, retry=0.05, tls=True))
        wait_until(lambda: hub.stats.client_connect_errors >= 3, what="failed attempts")
    (line,) = client_lines(caplog, "unreachable")
    assert "TLS certificate not accepted: self-signed certificate" in line
    assert hub.stats.frames == 0 and hub.stats.client_connects == 0


def test_tls_plain_remote_is_an_outage(client_hub, caplog):
    caplog.set_level(logging.INFO, logger=INPUT_LOGGER)
    with FstrmSender(FRAMES) as sender:
        hub = client_hub(TcpClientSpec("127.0.0.1", sender.port, retry=0.05, tls=True, tls_insecure=True))
        wait_until(lambda: hub.stats.client_connect_errors >= 3, what="failed attempts")
    (line,) = client_lines(caplog, "unreachable")
    assert "TLS handshake failed" in line
    assert hub.stats.frames == 0


def test_unreadable_ca_file_stops_the_start(tmp_path):
    bogus = tmp_path / "ca.pem"
    bogus.write_text("not a certificate\n")
    spec = HubSpec(feeders=(TcpClientSpec("127.0.0.1", 1, tls=True, tls_ca_file=str(bogus)),))
    try:
        with pytest.raises(ConfigError, match="input.tcp-client.tls-ca-file: cannot load"):
            get_hub(spec)
    finally:
        forget_hub(spec)


# --------------------------------------------------------------------------- shutdown


def test_shutdown_finishes_the_open_stream_and_stops_reconnecting(client_hub):
    with FstrmSender(FRAMES, hold_open=True) as sender:
        hub = client_hub(TcpClientSpec("127.0.0.1", sender.port, retry=0.05), shutdown_grace=5.0)
        assert collect(hub, len(FRAMES)) == FRAMES
        (conn,) = hub.connections
        sock = conn.transport.get_extra_info("socket")  # an idle remote host that vanishes is noticed
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 60
        assert close_hub(hub) == []
        (session,) = sender.wait_sessions(1)
        assert session.finished, "the open bidirectional stream must get FINISH"
        time.sleep(0.3)
        assert len(sender.sessions) == 1, "the client reconnected after shutdown"


def test_shutdown_while_the_remote_is_down(client_hub):
    hub = client_hub(TcpClientSpec("127.0.0.1", free_tcp_port(), retry=0.05))
    wait_until(lambda: hub.stats.client_connect_errors >= 2, what="failed attempts")
    started = time.monotonic()
    assert close_hub(hub) == []
    assert time.monotonic() - started < 2.0


def test_shutdown_while_connecting_to_a_silent_remote(client_hub, silent_port):
    """Shutdown does not wait for a connection attempt to time out."""
    hub = client_hub(TcpClientSpec("127.0.0.1", silent_port))
    time.sleep(0.3)
    assert (hub.stats.client_attempts, hub.stats.client_connect_errors, hub.stats.client_connects) == (1, 0, 0)
    started = time.monotonic()
    assert close_hub(hub) == []
    assert time.monotonic() - started < 2.0


# --------------------------------------------------------------------------- configuration


def test_config_keys_and_hub_spec():
    cfg = config_from_dict({"input": {"tcp-socket": {"enable": False}, "tcp-client": {
        "enable": True, "retry": 0.5, "remote-address": "[2001:db8::1]", "remote-port": 6000,
        "tls-support": True, "tls-insecure": True}}})
    assert cfg.input.tcp_client == TcpClientInput(
        enable=True, retry=0.5, remote_address="2001:db8::1", remote_port=6000, tls_support=True, tls_insecure=True)
    spec = hub_spec(cfg)
    assert spec.tcp == () and spec.feeders == (
        TcpClientSpec("2001:db8::1", 6000, retry=0.5, tls=True, tls_insecure=True),)
    assert spec.feeders[0].where == "[2001:db8::1]:6000"
    assert hub_spec(config_from_dict({})).feeders == ()  # disabled by default


@pytest.mark.parametrize("section,message", [
    ({"enable": True, "remote-port": 6000}, "input.tcp-client.remote-address: required when input.tcp-client.enable is true"),
    ({"enable": True, "remote-address": "dns1"}, "input.tcp-client.remote-port: required when input.tcp-client.enable is true"),
    ({"remote-port": 70000}, "input.tcp-client.remote-port: expected an integer between 1 and 65535, got 70000"),
    ({"retry": 0}, "input.tcp-client.retry: expected a number >= 0.01, got 0"),
    ({"remote-address": "a b"}, "input.tcp-client.remote-address: expected an IP address or host name, got 'a b'"),
    ({"enable": True, "remote-address": "dns1", "remote-port": 6000, "tls-ca-file": "/nope.pem"},
     "input.tcp-client.tls-ca-file: no such file: /nope.pem"),
])
def test_config_errors_name_the_key(section, message):
    with pytest.raises(ConfigError) as info:
        config_from_dict({"input": {"tcp-client": section}})
    assert str(info.value) == message


def test_tcp_client_alone_is_an_input():
    cfg = config_from_dict({"input": {"tcp-socket": {"enable": False}, "tcp-client": {
        "enable": True, "remote-address": "dns1", "remote-port": 6000}}})
    assert cfg.input.tcp_client.enable and not cfg.input.tcp_socket.enable


# --------------------------------------------------------------------------- the receiver


def _key(record: dict) -> tuple:
    return (record["message"], record["id"], record["query-port"], record["qname"])


EXPECTED = [_key(decode(f)) for f in FRAMES]


def _file_config(out, **inputs) -> dict:
    return {
        "input": inputs,
        "output": {"file": {"enable": True, "format": "json", "file": str(out), "file-max-size": "1G"}},
    }


def test_receiver_reads_a_listening_sender_across_restarts(receiver, tmp_path):
    port = free_tcp_port()
    out = tmp_path / "out.json"
    rx = None
    for round_ in range(2):
        with FstrmSender(FRAMES, port=port, max_sessions=1) as sender:
            if rx is None:
                rx = receiver(tmp_path / "rx", _file_config(out, **{"tcp-client": {
                    "enable": True, "retry": 0.2, "remote-address": "127.0.0.1", "remote-port": port}}))
            (session,) = sender.wait_sessions(1, timeout=30)
            assert session.finished and session.error is None
        assert wait_for_lines(out, (round_ + 1) * len(FRAMES), 30, rx) == (round_ + 1) * len(FRAMES)
    assert rx.stop() == 0, rx.logs()
    assert [_key(r) for r in rx.output_lines(out)] == EXPECTED * 2
    logs = rx.stderr_path.read_text()
    assert logs.count(f"tcp-client: connected to 127.0.0.1:{port}") == 2, rx.logs()
    assert "Traceback" not in logs
    # The counters line carries the client's counters.
    assert "client_connects=2" in logs, rx.logs()


def test_receiver_runs_tcp_client_next_to_tcp_socket(receiver, tmp_path):
    named = capture_frames("named.fstrm")
    out = tmp_path / "out.json"
    server_port = free_tcp_port()
    with FstrmSender(FRAMES, bidirectional=False, max_sessions=1) as sender:
        rx = receiver(tmp_path / "rx", _file_config(
            out,
            **{"tcp-socket": {"enable": True, "local-address": "127.0.0.1", "local-port": server_port},
               "tcp-client": {"enable": True, "retry": 0.2, "remote-address": "127.0.0.1", "remote-port": sender.port}},
        ))
        with FstrmClient.tcp("127.0.0.1", server_port) as client:
            client.handshake()
            client.send_frames(named)
            client.stop()
        sender.wait_sessions(1, timeout=30)
        total = len(FRAMES) + len(named)
        assert wait_for_lines(out, total, 30, rx) == total
    assert rx.stop() == 0, rx.logs()
    records = rx.output_lines(out)
    assert [_key(r) for r in records if r["identity"] == "unbound-probe"] == EXPECTED
    assert [_key(r) for r in records if r["identity"] == "named-probe"] == [_key(decode(f)) for f in named]


def test_receiver_sigterm_mid_stream_sends_finish(receiver, tmp_path):
    """SIGTERM while the remote is streaming: the receiver answers FINISH, the remote
    stops, and every frame it sent before is in the output."""
    out = tmp_path / "out.json"
    with FstrmSender(FRAMES, chunk=20, pause=0.05, max_sessions=1) as sender:
        rx = receiver(tmp_path / "rx", _file_config(out, **{"tcp-client": {
            "enable": True, "retry": 0.2, "remote-address": "127.0.0.1", "remote-port": sender.port}}))
        assert wait_for_lines(out, 200, 30, rx) >= 200
        assert rx.stop() == 0, rx.logs()
        (session,) = sender.wait_sessions(1)
    assert session.finished and session.error is None, session
    assert 200 <= session.frames_sent < len(FRAMES), "the stream was not cut in the middle"
    assert [_key(r) for r in rx.output_lines(out)] == EXPECTED[: session.frames_sent]
