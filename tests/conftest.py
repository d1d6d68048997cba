"""Shared fixtures: running the receiver as its users do (``python -m pipeline -c FILE``).

``start_receiver(tmp_path, config)`` writes a YAML configuration (the given keys merged
over a quiet base: stdout output, web API and the default TCP input disabled, verbose
trace), starts ``python -m pipeline --runner=DirectRunner -c FILE`` from the repository
root with stdout/stderr captured to files, and returns once every enabled input accepts
connections. ``ReceiverProcess.stop()`` sends SIGTERM and returns the exit code.
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"
for _path in (str(REPO), str(TESTS)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import peers  # noqa: E402

START_TIMEOUT = 30.0

# Merged under every test configuration. 4.7.0 (and our defaults) enable the TCP input
# on 0.0.0.0:6000; tests enable the inputs they use, on ports of their own.
BASE_CONFIG = {
    "trace": {"verbose": True},
    "web-api": {"enable": False},
    "input": {"tcp-socket": {"enable": False}},
    "output": {"stdout": {"enable": False}},
}


def merge(base: dict, over: dict) -> dict:
    """Mappings merged key by key, other values replaced (as the receiver merges its
    configuration over the defaults)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(missing)"
    return text[-limit:] or "(empty)"


class ReceiverProcess:
    def __init__(self, proc: subprocess.Popen, workdir: Path, config: dict, config_path: Path):
        self.proc = proc
        self.workdir = workdir
        self.config = config
        self.config_path = config_path
        self.stdout_path = workdir / "receiver.stdout"
        self.stderr_path = workdir / "receiver.stderr"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None

    def logs(self) -> str:
        return (
            f"--- receiver stdout ({self.stdout_path}):\n{_tail(self.stdout_path)}\n"
            f"--- receiver stderr ({self.stderr_path}):\n{_tail(self.stderr_path)}"
        )

    def inputs(self) -> list[tuple[str, object]]:
        """The enabled inputs: ("tcp", (host, port)) and ("unix", path)."""
        inp = self.config.get("input", {})
        found = []
        tcp = inp.get("tcp-socket", {})
        if tcp.get("enable"):
            addresses = tcp.get("local-address", "0.0.0.0")
            if not isinstance(addresses, list):
                addresses = [addresses]
            for address in addresses:
                host = address.strip("[]")
                host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
                found.append(("tcp", (host, int(tcp.get("local-port", 6000)))))
        unix = inp.get("unix-socket", {})
        if unix.get("enable"):
            found.append(("unix", unix["path"]))
        return found

    def ready(self) -> bool:
        for kind, where in self.inputs():
            if kind == "tcp" and not peers.port_open(*where):
                return False
            if kind == "unix" and not peers.unix_socket_open(where):
                return False
        return True

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready():
            if not self.running():
                pytest.fail(
                    f"receiver exited with {self.proc.returncode} before its inputs were ready\n{self.logs()}",
                    pytrace=False,
                )
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(
                    f"receiver inputs {self.inputs()} not ready within {timeout} s\n{self.logs()}",
                    pytrace=False,
                )
            time.sleep(0.1)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, then the exit code; a receiver that does not exit in ``timeout``
        seconds is killed and the test fails."""
        if self.running():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                pytest.fail(f"receiver did not exit within {timeout} s of SIGTERM\n{self.logs()}", pytrace=False)
        return self.proc.returncode

    def kill(self) -> None:
        if self.running():
            self.proc.kill()
            self.proc.wait(timeout=10)

    @staticmethod
    def output_lines(path: str | os.PathLike) -> list[dict]:
        """The JSON lines of an output file (blank lines skipped)."""
        with open(path, "rb") as fh:
            return [orjson.loads(line) for line in fh if line.strip()]


def count_lines(path: str | os.PathLike) -> int:
    try:
        with open(path, "rb") as fh:
            return sum(1 for line in fh if line.strip())
    except FileNotFoundError:
        return 0


def wait_for_lines(path: str | os.PathLike, n: int, timeout: float = 30.0, receiver: ReceiverProcess | None = None) -> int:
    """Poll until ``path`` has at least ``n`` non-blank lines or ``timeout`` seconds pass
    (or the receiver exits); returns the number of lines seen. Callers assert on it, or
    on the file after stopping the receiver (which must flush what it holds)."""
    deadline = time.monotonic() + timeout
    while True:
        count = count_lines(path)
        if count >= n or time.monotonic() > deadline:
            return count
        if receiver is not None and not receiver.running():
            return count_lines(path)
        time.sleep(0.1)


_STARTED: list[ReceiverProcess] = []


def start_receiver(tmp_path: str | os.PathLike, config: dict, *, timeout: float = START_TIMEOUT,
                   extra_args: tuple[str, ...] = ()) -> ReceiverProcess:
    workdir = Path(tmp_path)
    workdir.mkdir(parents=True, exist_ok=True)
    full = merge(BASE_CONFIG, config)
    config_path = workdir / "receiver.yaml"
    config_path.write_text(yaml.safe_dump(full, sort_keys=False))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "pipeline", "--runner=DirectRunner", "-c", str(config_path), *extra_args]
    with open(workdir / "receiver.stdout", "wb") as out, open(workdir / "receiver.stderr", "wb") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env)
    receiver = ReceiverProcess(proc, workdir, full, config_path)
    _STARTED.append(receiver)
    receiver.wait_ready(timeout)
    return receiver


@pytest.fixture(scope="session")
def receiver_factory():
    """``start_receiver`` as a fixture; receivers a test left running are killed at the end."""
    yield start_receiver
    for receiver in _STARTED:
        receiver.kill()


@pytest.fixture
def receiver(receiver_factory):
    """Function-scoped variant: kills the test's receivers (if still running) after it."""
    before = len(_STARTED)
    yield receiver_factory
    for started in _STARTED[before:]:
        started.kill()


@pytest.fixture(scope="session")
def lines_waiter():
    return wait_for_lines


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory) -> tuple[str, str]:
    """A self-signed certificate for localhost and 127.0.0.1 (names in subjectAltName,
    which hostname verification requires) and its key, made with the openssl command."""
    where = tmp_path_factory.mktemp("tls")
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True, timeout=30,
    )
    return str(cert), str(key)
