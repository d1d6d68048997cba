"""A throwaway PostgreSQL server for the tests and the benchmark.

``find_bindir()`` locates the server programs (Debian keeps them in
/usr/lib/postgresql/<version>/bin, off PATH); ``require_bindir()`` skips the
test when they are missing, or fails it under DNSTAP_REQUIRE_PEERS=1 (see
tests/peers.py). ``PgServer`` runs ``initdb`` once in a fresh directory under
/tmp and then ``pg_ctl start``/``stop`` on 127.0.0.1:<port>, with its unix
socket in the same directory.

PostgreSQL refuses to run as root: as root, every program runs as the
``postgres`` user (``runuser -u postgres``), in a directory that user owns.
pytest's tmp_path is under a 0700 directory of root's, which postgres cannot
traverse, hence /tmp.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import peers

SERVER_USER = "postgres"


def find_bindir() -> Path | None:
    """The newest /usr/lib/postgresql/<version>/bin holding initdb and pg_ctl, or
    the directory of an initdb on PATH."""
    found = [Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")]
    found = [d for d in found if os.access(d / "initdb", os.X_OK) and os.access(d / "pg_ctl", os.X_OK)]
    if found:
        def version(d: Path) -> tuple:
            return tuple(int(n) for n in re.findall(r"\d+", d.parent.name)) or (0,)
        return max(found, key=version)
    initdb = peers.which("initdb")
    return Path(initdb).parent if initdb else None


def _missing(message: str) -> None:
    import pytest

    message += " (run ./run_tests.sh as root to install it)"
    if peers.peers_required():
        pytest.fail(message + "; DNSTAP_REQUIRE_PEERS=1", pytrace=False)
    pytest.skip(message)


def require_bindir() -> Path:
    """The server programs' directory; skips (or fails, see tests/peers.py) without them."""
    bindir = find_bindir()
    if bindir is None:
        _missing("PostgreSQL server programs (initdb, pg_ctl) are not installed")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SERVER_USER)
        except KeyError:
            _missing(f"running as root needs the {SERVER_USER!r} user of the postgresql package")
    return bindir


class PgServer:
    """One PostgreSQL cluster in a temporary directory, on 127.0.0.1:``port``."""

    def __init__(self, bindir: Path, port: int | None = None, settings: dict | None = None) -> None:
        self.bindir = Path(bindir)
        self.port = port or peers.free_port()
        self.settings = dict(settings or {})
        self.base = Path(tempfile.mkdtemp(prefix="dnstap-pg-", dir="/tmp"))
        self.datadir = self.base / "data"
        self.logfile = self.base / "server.log"
        self._as_root = os.geteuid() == 0
        try:
            if self._as_root:
                user = pwd.getpwnam(SERVER_USER)
                os.chown(self.base, user.pw_uid, user.pw_gid)
            self._run("initdb", "-D", str(self.datadir), "-A", "trust", "-U", "postgres",
                      "--no-sync", "-E", "UTF8", "--locale=C")
        except BaseException:
            shutil.rmtree(self.base, ignore_errors=True)
            raise

    @property
    def dsn(self) -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres"

    def _run(self, program: str, *args: str, timeout: float = 60.0) -> str:
        cmd = [str(self.bindir / program), *args]
        if self._as_root:
            cmd = ["runuser", "-u", SERVER_USER, "--", *cmd]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=self.base)
        if out.returncode != 0:
            raise RuntimeError(
                f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout}{out.stderr}\n"
                f"server log:\n{peers.file_tail(self.logfile)}"
            )
        return out.stdout

    def start(self) -> None:
        options = [f"-p {self.port}", f"-k {self.base}", "-c listen_addresses=127.0.0.1"]
        options += [f"-c {key}={value}" for key, value in self.settings.items()]
        self._run("pg_ctl", "-D", str(self.datadir), "-l", str(self.logfile), "-w", "-t", "60",
                  "-o", " ".join(options), "start")

    def stop(self, mode: str = "fast") -> None:
        """``mode`` "immediate" is a crash: every server process quits at once,
        without a checkpoint; the next start recovers from the WAL."""
        self._run("pg_ctl", "-D", str(self.datadir), "-w", "-t", "60", "-m", mode, "stop")

    def running(self) -> bool:
        out = subprocess.run(
            (["runuser", "-u", SERVER_USER, "--"] if self._as_root else [])
            + [str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "status"],
            capture_output=True, text=True, cwd=self.base,
        )
        return out.returncode == 0

    def wait_accepting(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not peers.port_open("127.0.0.1", self.port):
            if time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL not accepting on {self.port}\n{peers.file_tail(self.logfile)}")
            time.sleep(0.05)

    def connect(self):
        import psycopg2

        conn = psycopg2.connect(self.dsn)
        conn.autocommit = True
        return conn

    def query(self, sql: str, args: tuple = ()) -> list[tuple]:
        conn = self.connect()
        try:
            with conn.cursor() as cur:
                cur.execute(sql, args)
                return cur.fetchall() if cur.description else []
        finally:
            conn.close()

    def destroy(self) -> None:
        try:
            if self.running():
                self.stop("immediate")
        finally:
            shutil.rmtree(self.base, ignore_errors=True)
