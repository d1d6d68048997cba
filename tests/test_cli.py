"""The ``python -m pipeline`` command as its users run it (a subprocess, from the repo root).

Configuration errors, start-up errors, ``--help``, signals, the shutdown guarantee
(every frame acknowledged with FINISH, or received before the signal, reaches the
output), rotation through the configuration, stdout text output and the -u/-l/-p flags.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, ReceiverProcess, count_lines, merge
from core import dnstap_pb2
from core.formats import format_text
from core.message import decode
from fstrm_client import FstrmClient, capture_frames, free_tcp_port
from peers import port_open as port_listening

RUN_TIMEOUT = 60.0
SIGNAL_EXIT_TIMEOUT = 5.0


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", "--runner=DirectRunner", *args]


def run_cli(*args: str, timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run(
        command(*args), cwd=REPO, capture_output=True, text=True, timeout=timeout,
        stdin=subprocess.DEVNULL, env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )


def write_config(path: Path, data: dict) -> Path:
    """The YAML config ``data``, with the web API off unless it says otherwise
    (several receivers in a row must not compete for port 8080)."""
    data = {"web-api": {"enable": False}, **data}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def tcp_input(port: int) -> dict:
    return {"tcp-socket": {"enable": True, "local-address": "127.0.0.1", "local-port": port}}


def json_file_output(out: Path, **extra) -> dict:
    return {"file": {"enable": True, "format": "json", "file": str(out), "file-max-size": "1G", **extra}}


def unique_frames(n: int, tag: str = "seq") -> list[bytes]:
    """``n`` real dnstap frames (the capture's, cycled), each with a distinct ``extra``."""
    base = capture_frames("unbound-tcp.fstrm")
    frames = []
    for i in range(n):
        tap = dnstap_pb2.Dnstap()
        tap.ParseFromString(base[i % len(base)])
        tap.extra = f"{tag}-{i}".encode()
        frames.append(tap.SerializeToString())
    return frames


def output_files(out: Path) -> list[Path]:
    """out.N ... out.1, out (oldest first)."""
    files = []
    i = 1
    while Path(f"{out}.{i}").exists():
        files.append(Path(f"{out}.{i}"))
        i += 1
    files.reverse()
    if out.exists():
        files.append(out)
    return files


def output_extras(out: Path) -> list[str]:
    extras = []
    for path in output_files(out):
        extras.extend(rec["extra"] for rec in ReceiverProcess.output_lines(path))
    return extras


def stop_with(rx: ReceiverProcess, signum: int = signal.SIGTERM, timeout: float = SIGNAL_EXIT_TIMEOUT) -> int:
    started = time.monotonic()
    rx.proc.send_signal(signum)
    try:
        code = rx.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        rx.kill()
        pytest.fail(f"no exit within {timeout} s of {signal.Signals(signum).name}\n{rx.logs()}", pytrace=False)
    assert time.monotonic() - started < timeout
    return code


def stderr_text(rx: ReceiverProcess) -> str:
    return rx.stderr_path.read_text(errors="replace")


def assert_clean_exit(rx: ReceiverProcess, code: int) -> None:
    assert code == 0, f"exit status {code}\n{rx.logs()}"
    assert "Traceback" not in stderr_text(rx), rx.logs()


# --------------------------------------------------------------------------- bad configs


BAD_CONFIGS = {
    "unknown-key": ({"output": {"file": {"formatt": "json"}}}, "output.file.formatt"),
    "unknown-section": ({"outputs": {"stdout": {"enable": True}}}, "outputs"),
    "bad-port-type": ({"input": {"tcp-socket": {"local-port": "six thousand"}}}, "input.tcp-socket.local-port"),
    "bad-bool": ({"output": {"stdout": {"enable": "yes"}}}, "output.stdout.enable"),
    "bad-format": ({"output": {"stdout": {"format": "xml"}}}, "output.stdout.format"),
    "bad-size": ({"output": {"file": {"file-max-size": "lots"}}}, "output.file.file-max-size"),
}


def assert_one_line_error(proc: subprocess.CompletedProcess, needle: str) -> None:
    assert proc.returncode == 2, f"exit status {proc.returncode}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{proc.stderr}"
    assert needle in lines[0], lines[0]
    assert lines[0].startswith("dnstap_receiver: error: "), lines[0]


@pytest.mark.parametrize("case", list(BAD_CONFIGS), ids=list(BAD_CONFIGS))
def test_bad_config_exits_2_with_one_line(tmp_path, case):
    data, key = BAD_CONFIGS[case]
    path = write_config(tmp_path / "bad.yaml", data)
    proc = run_cli("-c", str(path))
    assert_one_line_error(proc, key)
    assert proc.stdout == ""


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    proc = run_cli("-c", str(missing))
    assert_one_line_error(proc, f"config file not found: {missing}")


def test_invalid_yaml(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("input: [unclosed\n")
    proc = run_cli("-c", str(path))
    assert_one_line_error(proc, "invalid YAML")


def test_bad_port_flag(tmp_path):
    path = write_config(tmp_path / "ok.yaml", {"input": tcp_input(free_tcp_port())})
    proc = run_cli("-c", str(path), "-p", "70000")
    assert_one_line_error(proc, "-p")


@pytest.mark.parametrize("content", [None, b"not an mmdb file"], ids=["missing", "not-mmdb"])
def test_bad_geoip_database_exits_2_naming_the_file(tmp_path, content):
    database = tmp_path / "city.mmdb"
    if content is not None:
        database.write_bytes(content)
    path = write_config(tmp_path / "geoip.yaml", {
        "input": tcp_input(free_tcp_port()),
        "output": {"stdout": {"enable": False}},
        "geoip": {"enable": True, "city-database": str(database)},
    })
    proc = run_cli("-c", str(path))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "geoip.city-database" in proc.stderr and str(database) in proc.stderr


def test_port_in_use_exits_2(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        path = write_config(tmp_path / "busy.yaml", {
            "input": tcp_input(port),
            "output": {"stdout": {"enable": False}},
        })
        proc = run_cli("-c", str(path))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, proc.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in errors[0]
    assert "in use" in errors[0].lower()


def test_help():
    proc = run_cli("--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: dnstap_receiver")
    for flag in ("-l IP", "-p PORT", "-u PATH", "-c FILE", "-v", "--replay"):
        assert flag in proc.stdout, flag
    assert "Traceback" not in proc.stderr


def test_console_script_is_installed():
    """run_tests.sh / run_local.sh install the project: `dnstap_receiver` is the command users know."""
    script = Path(sys.executable).parent / "dnstap_receiver"
    assert script.exists(), "run ./run_tests.sh, which installs the console script"
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: dnstap_receiver")


# --------------------------------------------------------------------------- signals


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("open_connection", [False, True], ids=["idle", "open-connection"])
def test_signal_exits_0_quickly(receiver, tmp_path, signum, open_connection):
    port = free_tcp_port()
    rx = receiver(tmp_path, {"input": tcp_input(port), "output": json_file_output(tmp_path / "out.json")})
    client = None
    if open_connection:  # a unidirectional sender that never stops: closed after the grace
        client = FstrmClient.tcp("127.0.0.1", port)
        client.start_unidirectional()
        client.send_frames(unique_frames(3))
        # A connection still in the listen backlog at the signal is never accepted:
        # wait until the receiver has it, then give it time to read the frames.
        local = f"connection from 127.0.0.1:{client.sock.getsockname()[1]}"
        wait_for(lambda: local in stderr_text(rx), rx, "the connection to be accepted")
        time.sleep(0.6)
    try:
        assert_clean_exit(rx, stop_with(rx, signum))
    finally:
        if client is not None:
            client.close()
    if open_connection:
        assert sorted(output_extras(tmp_path / "out.json")) == ["seq-0", "seq-1", "seq-2"]


# --------------------------------------------------------------------------- shutdown proof


def send_stream(port: int, frames: list[bytes]) -> None:
    """A whole bidirectional stream; returns once FINISH acknowledged every frame."""
    with FstrmClient.tcp("127.0.0.1", port) as client:
        client.handshake()
        for i in range(0, len(frames), 1000):
            client.send_frames(frames[i : i + 1000])
        client.stop()


def test_sigterm_right_after_finish_loses_nothing(receiver, tmp_path):
    n = 20_000
    port, out = free_tcp_port(), tmp_path / "out.json"
    rx = receiver(tmp_path, {"input": tcp_input(port), "output": json_file_output(out)})
    frames = unique_frames(n)
    send_stream(port, frames)
    assert_clean_exit(rx, stop_with(rx, timeout=30))
    assert count_lines(out) == n
    extras = output_extras(out)
    assert len(extras) == n and set(extras) == {f"seq-{i}" for i in range(n)}


def test_sigterm_with_a_stream_still_open(receiver, tmp_path):
    n, m = 20_000, 3000
    port, out = free_tcp_port(), tmp_path / "out.json"
    rx = receiver(tmp_path, {"input": tcp_input(port), "output": json_file_output(out)})
    still_open = FstrmClient.tcp("127.0.0.1", port)
    try:
        still_open.handshake()
        still_open.send_frames(unique_frames(m, "open"))
        still_open.send(struct.pack(">I", 256) + b"p" * 100)  # 100 bytes of a 256-byte frame
        # The open stream's complete frames reach the output while it stays open.
        wait_for(lambda: count_lines(out) >= m, rx, f"{m} lines of the open stream")
        send_stream(port, unique_frames(n))
        rx.proc.send_signal(signal.SIGTERM)
        still_open.read_finish()  # the open stream is told the receiver is done
    finally:
        still_open.close()
    try:
        code = rx.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        rx.kill()
        pytest.fail(f"no exit after SIGTERM\n{rx.logs()}", pytrace=False)
    assert_clean_exit(rx, code)
    extras = output_extras(out)
    want = {f"seq-{i}" for i in range(n)} | {f"open-{i}" for i in range(m)}
    assert len(extras) == n + m, f"{len(extras)} lines, {n + m} expected"
    assert set(extras) == want
    log = stderr_text(rx)
    assert "disconnected in the middle of a frame; 104 bytes dropped" in log, rx.logs()
    assert "partial_frames_dropped=1" in log, rx.logs()


def test_rotation_loses_nothing(receiver, tmp_path):
    port, out = free_tcp_port(), tmp_path / "out.json"
    rx = receiver(tmp_path, {
        "input": tcp_input(port),
        "output": json_file_output(out, **{"file-max-size": "20K", "file-count": 100}),
    })
    n = 2006
    send_stream(port, unique_frames(n))
    assert_clean_exit(rx, stop_with(rx, timeout=30))
    files = output_files(out)
    assert len(files) > 10, "the output was meant to rotate many times"
    assert not Path(f"{out}.101").exists()
    assert sum(count_lines(f) for f in files) == n
    extras = output_extras(out)
    assert sorted(extras, key=lambda e: int(e.split("-")[1])) == [f"seq-{i}" for i in range(n)]
    for f in files:
        assert f.stat().st_size <= 20 * 1024, f"{f}: {f.stat().st_size} bytes"
        assert f.read_bytes().endswith(b"\n")


def test_stdout_text_format(receiver, tmp_path):
    port = free_tcp_port()
    rx = receiver(tmp_path, {"input": tcp_input(port), "output": {"stdout": {"enable": True, "format": "text"}}})
    frames = capture_frames("named.fstrm")
    send_stream(port, frames)
    assert_clean_exit(rx, stop_with(rx, timeout=30))
    printed = rx.stdout_path.read_bytes().splitlines()
    expected = [format_text(decode(f)) for f in frames]
    assert sorted(printed) == sorted(expected), rx.logs()
    # 4.7.0's layout: datetime identity message rcode ip port family protocol <len>b qname rrtype latency
    fields = printed[0].decode().split(" ")
    assert len(fields) == 12 and fields[8].endswith("b") and fields[9].endswith(".")


# --------------------------------------------------------------------------- flags


def start_cli(tmp_path: Path, args: list[str]) -> ReceiverProcess:
    """The receiver with our own arguments (no config merging, nothing waited for)."""
    out, err = tmp_path / "receiver.stdout", tmp_path / "receiver.stderr"
    with open(out, "wb") as fo, open(err, "wb") as fe:
        proc = subprocess.Popen(command(*args), cwd=REPO, stdout=fo, stderr=fe, stdin=subprocess.DEVNULL,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
    return ReceiverProcess(proc, tmp_path, {}, tmp_path / "none.yaml")


def wait_for(predicate, rx: ReceiverProcess, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if not rx.running():
            pytest.fail(f"receiver exited ({rx.proc.returncode}) before {what}\n{rx.logs()}", pytrace=False)
        if time.monotonic() > deadline:
            rx.kill()
            pytest.fail(f"timed out waiting for {what}\n{rx.logs()}", pytrace=False)
        time.sleep(0.05)


def unix_listening(path: Path) -> bool:
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX) as sock:
        try:
            sock.connect(str(path))
            return True
        except OSError:
            return False


@pytest.fixture
def cli_procs():
    started: list[ReceiverProcess] = []
    yield started
    for rx in started:
        rx.kill()


def test_u_flag_listens_on_unix_socket_only(tmp_path, cli_procs):
    port = free_tcp_port()
    sock = tmp_path / "dnstap.sock"
    out = tmp_path / "out.json"
    config = write_config(tmp_path / "c.yaml", merge(
        {"web-api": {"enable": False}, "output": {"stdout": {"enable": False}}},
        {"input": tcp_input(port), "output": json_file_output(out)},
    ))
    rx = start_cli(tmp_path, ["-c", str(config), "-u", str(sock)])
    cli_procs.append(rx)
    wait_for(lambda: unix_listening(sock), rx, "the unix socket")
    assert not port_listening("127.0.0.1", port), "-u alone must disable the TCP input"
    with FstrmClient.unix(sock) as client:
        client.handshake()
        client.send_frames(unique_frames(10))
        client.stop()
    assert_clean_exit(rx, stop_with(rx))
    log = stderr_text(rx)
    assert f"unix-socket input listening on {sock}" in log
    assert "tcp-socket input listening" not in log
    assert sorted(output_extras(out)) == sorted(f"seq-{i}" for i in range(10))


def test_u_flag_without_config_file_disables_default_tcp(tmp_path, cli_procs):
    sock = tmp_path / "dnstap.sock"
    port_6000_before = port_listening("127.0.0.1", 6000)
    rx = start_cli(tmp_path, ["-u", str(sock)])
    cli_procs.append(rx)
    wait_for(lambda: "receiver started" in stderr_text(rx), rx, "the start-up")
    assert unix_listening(sock)
    if not port_6000_before:
        assert not port_listening("127.0.0.1", 6000)
    with FstrmClient.unix(sock) as client:
        client.handshake()
        client.send_frames(capture_frames("named.fstrm")[:5])
        client.stop()
    assert_clean_exit(rx, stop_with(rx))
    log = stderr_text(rx)
    assert "unix-socket input listening" in log
    assert "tcp-socket input listening" not in log
    assert len(rx.stdout_path.read_bytes().splitlines()) == 5  # default output: stdout, text


def test_l_and_p_override_the_config(tmp_path, cli_procs):
    config_port, flag_port = free_tcp_port(), free_tcp_port()
    out = tmp_path / "out.json"
    config = write_config(tmp_path / "c.yaml", {
        "web-api": {"enable": False},
        "input": {"tcp-socket": {"enable": False, "local-address": "::1", "local-port": config_port}},
        "output": {"stdout": {"enable": False}, **json_file_output(out)},
    })
    rx = start_cli(tmp_path, ["-c", str(config), "-l", "127.0.0.1", "-p", str(flag_port)])
    cli_procs.append(rx)
    wait_for(lambda: port_listening("127.0.0.1", flag_port), rx, f"port {flag_port}")
    assert not port_listening("127.0.0.1", config_port)
    assert not port_listening("::1", config_port)
    assert not port_listening("::1", flag_port)
    send_stream(flag_port, unique_frames(25))
    assert_clean_exit(rx, stop_with(rx))
    log = stderr_text(rx)
    assert f"tcp-socket input listening on 127.0.0.1:{flag_port}" in log
    assert len(output_extras(out)) == 25


def test_u_with_p_runs_both_inputs(tmp_path, cli_procs):
    port = free_tcp_port()
    sock = tmp_path / "both.sock"
    out = tmp_path / "out.json"
    config = write_config(tmp_path / "c.yaml", {
        "web-api": {"enable": False},
        "input": {"tcp-socket": {"local-address": "127.0.0.1"}},
        "output": {"stdout": {"enable": False}, **json_file_output(out)},
    })
    rx = start_cli(tmp_path, ["-c", str(config), "-u", str(sock), "-p", str(port)])
    cli_procs.append(rx)
    wait_for(lambda: port_listening("127.0.0.1", port) and unix_listening(sock), rx, "both inputs")
    send_stream(port, unique_frames(7, "tcp"))
    with FstrmClient.unix(sock) as client:
        client.handshake()
        client.send_frames(unique_frames(5, "unix"))
        client.stop()
    assert_clean_exit(rx, stop_with(rx))
    extras = output_extras(out)
    assert sorted(extras) == sorted([f"tcp-{i}" for i in range(7)] + [f"unix-{i}" for i in range(5)])


def test_sigterm_the_moment_the_port_listens(tmp_path, cli_procs):
    """No window between "inputs listening" and "signal handlers installed": a
    SIGTERM right after the port opens still gives a clean shutdown."""
    for attempt in range(3):
        port = free_tcp_port()
        workdir = tmp_path / f"run{attempt}"
        workdir.mkdir()
        config = write_config(workdir / "c.yaml", {
            "web-api": {"enable": False},
            "input": tcp_input(port),
            "output": {"stdout": {"enable": False}},
        })
        rx = start_cli(workdir, ["-c", str(config)])
        cli_procs.append(rx)
        deadline = time.monotonic() + 30
        while True:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert rx.running(), rx.logs()
            assert time.monotonic() < deadline, rx.logs()
            time.sleep(0.0005)
        assert_clean_exit(rx, stop_with(rx))
