"""WriteToPostgres: records as rows of a PostgreSQL table (4.7.0's
``output.pgsql``), and ``PgsqlTransport``, the psycopg2 connection it
inserts with.

The table (``table``, created if missing) has one typed column per field:

    ts timestamptz, identity text, version text, message text (CLIENT_QUERY...),
    type text (query/response), family text, protocol text,
    query_ip inet, query_port integer, response_ip inet, response_port integer,
    length integer, id integer, opcode text, rcode text, flags text,
    qname text, qtype text, qclass text, latency double precision (seconds),
    malformed boolean, country text, city text, asn text, as_org text
    (the geoip fields, when that transform adds them),
    query_ip_hash text, response_ip_hash text

Unknown values ("-") are NULL. ``ts`` is the decoder's ``datetime`` (exact
to the microsecond, as the other outputs show it), else ``timestamp``. An
address that is not an IP address (privacy.hash-ip's digest) cannot go in an
inet column: it goes in the ``*_hash`` column instead, and the inet one is
NULL.

The table is created only if missing, so a role with just the INSERT
privilege on an existing table can write. Each batch the delivery thread
takes (sinks/delivery.py) is one transaction: ``COPY table (columns) FROM
STDIN`` of rows the pipeline thread already wrote in COPY's text format, then
COMMIT. COPY measured 5 to 8 times faster than psycopg2's ``execute_values``
here (170,000-240,000 against 28,000-31,000 rows/s, 1,000 rows a
transaction; benchmarks/bench_pgsql.py --compare).

A failure rolls the transaction back and the Delivery sends the same chunks
again after reconnecting, so no row is written twice, with one case handled
here: a connection lost *during* COMMIT leaves its outcome unknown. The
transport then keeps that transaction's id and, once reconnected, asks the
server (``txid_status``); if it did commit, the chunks the Delivery hands back
are skipped instead of inserted again.

A row the server refuses (a data error: a value the column type rejects, a
constraint of a user table) must not block the output forever: that batch is
inserted again in halves within savepoints, down to the refused rows, which
are logged and counted as ``rejected`` in the group ``output.pgsql.rows``
(with ``skipped`` and ``row_errors`` of the user hooks below); the Delivery
counts them delivered, as their transaction went through.

Configuration (pipeline.config.PgsqlOutput):

- ``dsn``: a libpq connection string or URI; ``passfile`` is libpq's
  ``passfile`` parameter (used when the file exists and the dsn names none);
- ``timeout``: libpq's ``connect_timeout``, the server's ``statement_timeout``
  (how long one COPY or COMMIT may take) and ``tcp_user_timeout`` (how long
  sent data may stay unacknowledged by a dead server; with ``keepalives_idle``
  also how long an idle or waiting connection goes unchecked), unless the dsn
  sets them;
- ``min_size``/``max_size`` (4.7.0's asyncpg pool) are accepted for
  compatibility: the Delivery is one thread sending one batch at a time, so
  one connection is all it can use;
- ``busy_wait`` (in 4.7.0, how long its loop slept when its queue was empty)
  is accepted and has no effect: the delivery thread wakes up as soon as
  messages are queued, and under load each insert takes everything that
  accumulated during the previous one.

``userfuncfile``: a Python file, loaded with importlib when the pipeline is
built (to report errors at start-up) and again by the worker, that may define

    create_table(cursor, table)   run at every connection instead of the
                                  default CREATE TABLE IF NOT EXISTS; ``table``
                                  is the configured name ([schema.]name,
                                  checked to be plain identifiers); committed
                                  by the caller
    COLUMNS = ("ts", "qname")     the columns ``row`` fills, in order
    row(record) -> tuple | None   the values of one record (a dict with the
                                  keys of core.message.FIELDS), or None to skip
                                  it (counted as ``skipped``); an exception or a
                                  tuple of the wrong length skips the record,
                                  logged and counted as ``row_errors``

``row`` and ``COLUMNS`` go together; either group may come alone. Values are
converted for COPY: None -> NULL, bool, int, float, str, datetime/date
(isoformat), bytes (bytea), dict/list (JSON, for json/jsonb columns), anything
else with str(). deploy/pgsql_userfunc.py is a working example. 4.7.0's hooks
(``pgsql_init``/``pgsql_main``, coroutines on an asyncpg connection) cannot run
here; a file defining only those is refused with a message saying so.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import logging
import math
import os
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from datetime import time as dtime
from io import BytesIO
from typing import Any

import apache_beam as beam
import orjson
import psycopg2
import psycopg2.extensions
from psycopg2 import sql

from core import counters
from core.errors import ConfigError
from core.message import UNKNOWN
from core.ratelimit import RateLimitedLog
from sinks.network import DeliverFn

__all__ = [
    "COLUMNS",
    "Hooks",
    "PgsqlTransport",
    "WriteToPostgres",
    "copy_line",
    "default_row",
    "encode_rows",
    "load_hooks",
]

log = logging.getLogger("dnstap_receiver.output")

STATS_GROUP = "output.pgsql.rows"

# (column, SQL type) of the default table, in COPY order.
DEFAULT_TABLE: tuple[tuple[str, str], ...] = (
    ("ts", "timestamptz"),
    ("identity", "text"),
    ("version", "text"),
    ("message", "text"),
    ("type", "text"),
    ("family", "text"),
    ("protocol", "text"),
    ("query_ip", "inet"),
    ("query_port", "integer"),
    ("response_ip", "inet"),
    ("response_port", "integer"),
    ("length", "integer"),
    ("id", "integer"),
    ("opcode", "text"),
    ("rcode", "text"),
    ("flags", "text"),
    ("qname", "text"),
    ("qtype", "text"),
    ("qclass", "text"),
    ("latency", "double precision"),
    ("malformed", "boolean"),
    ("country", "text"),
    ("city", "text"),
    ("asn", "text"),
    ("as_org", "text"),
    ("query_ip_hash", "text"),
    ("response_ip_hash", "text"),
)
COLUMNS: tuple[str, ...] = tuple(name for name, _ in DEFAULT_TABLE)

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?")

# --------------------------------------------------------------------------- rows


class _Timestamps:
    """Epoch seconds -> timestamptz text; the date and time part is cached,
    as consecutive messages share their second (one tuple: threads share it)."""

    __slots__ = ("cached",)

    def __init__(self) -> None:
        self.cached: tuple[int, str] = (-1, "")

    def __call__(self, ts: Any) -> str | None:
        if (type(ts) is not float and type(ts) is not int) or not 0 < ts < 253402300800:
            return None  # 0.0: the message had no time; NaN, or past year 9999
        sec = int(ts)
        usec = round((ts - sec) * 1e6)
        if usec >= 1_000_000:
            sec, usec = sec + 1, usec - 1_000_000
        cached_sec, text = self.cached
        if sec != cached_sec:
            text = datetime.fromtimestamp(sec, tz=UTC).strftime("%Y-%m-%d %H:%M:%S")
            self.cached = (sec, text)
        return f"{text}.{usec:06d}+00"


_timestamp = _Timestamps()


def _text(value: Any) -> str | None:
    return None if value is None or value == UNKNOWN else str(value)


def _int(value: Any) -> int | None:
    return value if type(value) is int and -0x80000000 <= value <= 0x7FFFFFFF else None


def _float(value: Any) -> float | None:
    return float(value) if type(value) is float or type(value) is int else None


_ADDRESS_CACHE: dict[str, bool] = {}


def _is_address(text: str) -> bool:
    known = _ADDRESS_CACHE.get(text)
    if known is None:
        try:
            socket.inet_pton(socket.AF_INET6 if ":" in text else socket.AF_INET, text)
            known = True
        except (OSError, ValueError):  # ValueError: an embedded NUL
            known = False
        if len(_ADDRESS_CACHE) >= 65536:
            _ADDRESS_CACHE.clear()  # the active clients come back at once
        _ADDRESS_CACHE[text] = known
    return known


def _address(value: Any) -> tuple[str | None, str | None]:
    """(inet value, hash value) of an address field."""
    if type(value) is not str or value == UNKNOWN:
        return None, None
    return (value, None) if _is_address(value) else (None, value)


def default_row(rec: dict) -> tuple:
    """The default table's values of one record (see COLUMNS)."""
    get = rec.get
    query_ip, query_hash = _address(get("query-ip"))
    response_ip, response_hash = _address(get("response-ip"))
    iso = get("datetime")
    # The decoder's text of the exact time (what the other outputs show), else
    # the float, which is a few tenths of a microsecond off.
    if type(iso) is not str or len(iso) != 32 or iso[10] != "T" or iso[19] != "." or iso[26:] != "+00:00":
        iso = _timestamp(get("timestamp"))
    return (
        iso,
        _text(get("identity")),
        _text(get("version")),
        _text(get("message")),
        _text(get("type")),
        _text(get("family")),
        _text(get("protocol")),
        query_ip,
        _int(get("query-port")),
        response_ip,
        _int(get("response-port")),
        _int(get("length")),
        _int(get("id")),
        _text(get("opcode")),
        _text(get("rcode")),
        _text(get("flags")),
        _text(get("qname")),
        _text(get("rrtype")),
        _text(get("qclass")),
        _float(get("latency")),
        bool(get("malformed")),
        _text(get("country")),
        _text(get("city")),
        _text(get("asn")),
        _text(get("as-org")),
        query_hash,
        response_hash,
    )


# COPY text format: backslash, tab, newline and carriage return are escaped;
# a NUL, which PostgreSQL text cannot hold, becomes the four characters \000.
_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r", "\0": "\\\\000"})


def _field(value: Any) -> str:
    kind = type(value)
    if kind is str:
        return value.translate(_ESCAPES)
    if value is None:
        return "\\N"
    if kind is bool:
        return "t" if value else "f"
    if kind is int or kind is float:
        return repr(value)
    if isinstance(value, (datetime, date, dtime)):
        return value.isoformat()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "\\\\x" + bytes(value).hex()  # bytea hex format, its backslash escaped
    if isinstance(value, (dict, list, tuple)):
        return orjson.dumps(value, default=str).decode().translate(_ESCAPES)
    return str(value).translate(_ESCAPES)


def _scalar(value: Any) -> str:
    kind = type(value)
    if kind is int or kind is float:
        return repr(value)
    return _field(value)


def copy_line(values) -> str:
    """One row in COPY's text format, without the newline."""
    line = "\t".join([v if type(v) is str else "\\N" if v is None else _scalar(v) for v in values])
    # Nearly always no value holds a character to escape: then the tabs are
    # the separators and the backslashes those of the NULLs, and ``line`` is it.
    if (
        line.count("\t") == len(values) - 1
        and line.count("\\") == values.count(None)
        and "\n" not in line
        and "\r" not in line
        and "\0" not in line
    ):
        return line
    return "\t".join(map(_field, values))


def encode_rows(records, row: Callable, ncolumns: int, stats, error_log=None) -> tuple[bytes, int]:
    """(COPY data, rows) for a batch of records; ``row`` gives each record's
    values or None. Skipped and failed records are counted in ``stats``."""
    lines = []
    for rec in records:
        try:
            values = row(rec)
            if values is None:
                stats["skipped"] += 1
                continue
            if len(values) != ncolumns:
                raise ValueError(f"row() gave {len(values)} values for {ncolumns} columns")
            lines.append(copy_line(values))
        except Exception as exc:  # noqa: BLE001 - a user hook: any failure skips the record
            stats["row_errors"] += 1
            if error_log is not None:
                error_log(logging.ERROR, "output pgsql: a record was skipped: %s: %s", type(exc).__name__, exc)
    if not lines:
        return b"", 0
    lines.append("")
    return "\n".join(lines).encode("utf-8", "replace"), len(lines) - 1


# --------------------------------------------------------------------------- hooks


def create_default_table(cursor, table: str) -> None:
    ident = table_identifier(table)
    # Only when missing: a role allowed to INSERT into an existing table but
    # not to create tables (PostgreSQL 15's default in the public schema) is
    # refused even a CREATE TABLE IF NOT EXISTS.
    if _table_columns(cursor, ident) is not None:
        return
    columns = sql.SQL(", ").join(
        sql.SQL("{} {}").format(sql.Identifier(name), sql.SQL(kind)) for name, kind in DEFAULT_TABLE
    )
    cursor.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {} ({})").format(ident, columns))


def _table_columns(cursor, ident: sql.Identifier) -> list[str] | None:
    """The table's column names, None if it does not exist (from the
    catalog, which needs no privilege on the table)."""
    cursor.execute(
        "SELECT array_agg(attname::text) FROM pg_attribute"
        " WHERE attrelid = to_regclass(%s) AND attnum > 0 AND NOT attisdropped",
        (ident.as_string(cursor),),
    )
    return cursor.fetchone()[0]


def table_identifier(table: str) -> sql.Identifier:
    """[schema.]name as PostgreSQL reads it unquoted (folded to lower case),
    quoted so that a reserved word works too."""
    if not isinstance(table, str) or not _TABLE_NAME.fullmatch(table):
        raise ConfigError(f"output.pgsql.table: expected [schema.]name (letters, digits, _), got {table!r}")
    return sql.Identifier(*table.lower().split("."))


@dataclass(frozen=True)
class Hooks:
    """How records become rows, and how the table is made."""

    columns: tuple[str, ...] = COLUMNS
    row: Callable[[dict], Any] = default_row
    create_table: Callable[[Any, str], None] = create_default_table
    source: str | None = None  # the userfuncfile


def load_hooks(path: str | None) -> Hooks:
    """The default hooks, or those of the userfuncfile ``path`` (see the module
    docstring); raises ConfigError naming the problem."""
    if path is None:
        return Hooks()
    key = "output.pgsql.userfuncfile"
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise ConfigError(f"{key}: no such file: {path}")
    name = "dnstap_pgsql_userfunc"
    try:
        loader = importlib.machinery.SourceFileLoader(name, path)  # any file name, not only *.py
        module = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader))
        loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - whatever the user's file raises
        raise ConfigError(f"{key}: cannot load {path}: {type(exc).__name__}: {exc}") from None
    create_table = getattr(module, "create_table", None)
    row = getattr(module, "row", None)
    columns = getattr(module, "COLUMNS", None)
    if create_table is None and row is None and columns is None:
        if hasattr(module, "pgsql_init") or hasattr(module, "pgsql_main"):
            raise ConfigError(
                f"{key}: {path} defines 4.7.0's asyncpg hooks pgsql_init/pgsql_main, which this "
                "receiver cannot run; define create_table(cursor, table) and/or COLUMNS and "
                "row(record) instead (see deploy/pgsql_userfunc.py)"
            )
        raise ConfigError(f"{key}: {path} defines none of create_table, row and COLUMNS")
    if create_table is not None and not callable(create_table):
        raise ConfigError(f"{key}: create_table in {path} is not a function")
    if (row is None) != (columns is None):
        raise ConfigError(f"{key}: {path} must define row and COLUMNS together")
    if row is not None:
        if not callable(row):
            raise ConfigError(f"{key}: row in {path} is not a function")
        if (
            not isinstance(columns, (tuple, list))
            or not columns
            or not all(isinstance(c, str) and _IDENTIFIER.fullmatch(c) for c in columns)
        ):
            raise ConfigError(f"{key}: COLUMNS in {path} must be a non-empty sequence of column names")
    return Hooks(
        columns=tuple(c.lower() for c in columns) if columns is not None else COLUMNS,
        row=row or default_row,
        create_table=create_table or create_default_table,
        source=path,
    )


# --------------------------------------------------------------------------- transport


def connect_params(dsn: str, passfile: str | None, timeout: float) -> dict:
    """psycopg2.connect keywords: the dsn's, plus passfile and the timeouts
    where the dsn leaves them out."""
    params = psycopg2.extensions.parse_dsn(dsn)
    if passfile and "passfile" not in params:
        path = os.path.expanduser(passfile)
        if os.path.isfile(path):
            params["passfile"] = path
    seconds = max(2, math.ceil(timeout)) if timeout > 0 else 0  # libpq: whole seconds, 0 = none
    params.setdefault("connect_timeout", str(seconds))
    params.setdefault("application_name", "dnstap_receiver")
    if seconds:
        params.setdefault("tcp_user_timeout", str(seconds * 1000))
        params.setdefault("keepalives_idle", str(seconds))
    return params


def describe(dsn: str, table: str) -> str:
    """Where the rows go, for logs (never the password)."""
    try:
        params = psycopg2.extensions.parse_dsn(dsn)
    except psycopg2.Error:
        return f"postgresql (bad dsn) table {table}"
    host = params.get("host") or params.get("hostaddr") or "localhost"
    port = params.get("port") or "5432"
    return f"postgresql {host}:{port}/{params.get('dbname', params.get('user', ''))} table {table}"


DOUBT_WAIT = 10.0  # seconds to wait for a COMMIT cut short to finish on the server

# The server refused a row; resending it would fail forever.
_ROW_ERRORS = (psycopg2.DataError, psycopg2.IntegrityError)


class PgsqlTransport:
    """One psycopg2 connection; ``send`` inserts the chunks (COPY text data)
    in one transaction (see Transport in sinks/delivery.py)."""

    confirms = True

    def __init__(
        self,
        dsn: str,
        table: str,
        *,
        hooks: Hooks | None = None,
        passfile: str | None = None,
        timeout: float = 60.0,
        stats=None,
    ) -> None:
        self._params = connect_params(dsn, passfile, timeout)
        self._table = table
        self._ident = table_identifier(table)
        self._hooks = hooks or Hooks()
        self._statement_ms = int(timeout * 1000) if timeout > 0 else 0
        self._stats = stats if stats is not None else counters.counter_group(STATS_GROUP)
        self._reject_log = RateLimitedLog(log)
        self._conn = None
        self._copy_sql = ""
        self._doubt: tuple[int, list] | None = None  # (txid, chunks) of a COMMIT cut short
        self._committed: list = []  # chunks known to be in the table, if handed back

    def connect(self) -> None:
        conn = psycopg2.connect(**self._params)
        try:
            with conn.cursor() as cur:
                if self._statement_ms and "statement_timeout" not in self._params.get("options", ""):
                    cur.execute("SET statement_timeout = %s", (self._statement_ms,))
                self._hooks.create_table(cur, self._table)
                have = _table_columns(cur, self._ident)
                if have is None:
                    raise LookupError(f"table {self._table} does not exist (create_table did not make it)")
                missing = [c for c in self._hooks.columns if c not in have]
                if missing:
                    raise LookupError(f"table {self._table} has no column {', '.join(missing)}")
                columns = sql.SQL(", ").join(map(sql.Identifier, self._hooks.columns))
                self._copy_sql = sql.SQL("COPY {} ({}) FROM STDIN").format(self._ident, columns).as_string(conn)
            conn.commit()
            self._resolve_doubt(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def _resolve_doubt(self, conn) -> None:
        if self._doubt is None:
            return
        txid, chunks = self._doubt
        deadline = time.monotonic() + DOUBT_WAIT
        while True:
            try:
                with conn.cursor() as cur:
                    cur.execute("SELECT txid_status(%s)", (txid,))
                    status = cur.fetchone()[0]
                conn.rollback()
            except (psycopg2.OperationalError, psycopg2.InterfaceError):
                raise  # connection trouble: ask again at the next connection
            except psycopg2.Error as exc:  # e.g. another server now: send them again
                conn.rollback()
                status = f"unknown ({exc})"
            # "in progress": the old session has not finished its COMMIT yet.
            if status != "in progress" or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        self._doubt = None
        if status == "committed":
            self._committed.extend(chunks)
        log.warning("output pgsql: the connection was lost during a COMMIT, which turned out %s; "
                    "its rows are %s", status, "not sent again" if status == "committed" else "sent again")

    def send(self, chunks: list[bytes]) -> int:
        """Insert the chunks; returns how many rows the server refused."""
        conn = self._conn
        if conn is None:
            raise ConnectionError("not connected")
        if self._committed:
            done = self._committed
            chunks = [c for c in chunks if not any(c is d for d in done)]
        txid = None
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT txid_current()")
                txid = cur.fetchone()[0]
                rejected = 0
                try:
                    self._copy(cur, b"".join(chunks))
                except _ROW_ERRORS:
                    conn.rollback()  # then row by row, as far as needed
                    cur.execute("SELECT txid_current()")
                    txid = cur.fetchone()[0]
                    rejected = self._copy_halves(cur, _lines(chunks))
        except BaseException:
            self._rollback()
            raise
        try:
            self._commit()
        except BaseException:
            self._doubt = (txid, chunks)  # committed or not: asked at the next connection
            raise
        self._committed = []
        if rejected:
            self._stats["rejected"] += rejected
        return rejected

    def _copy(self, cur, data: bytes) -> None:
        if data:
            cur.copy_expert(self._copy_sql, BytesIO(data))

    def _copy_halves(self, cur, lines: list[bytes]) -> int:
        """Insert ``lines`` within a savepoint; if the server refuses them,
        each half again, down to the refused rows. Returns how many."""
        if not lines:
            return 0
        cur.execute("SAVEPOINT dnstap_rows")
        try:
            self._copy(cur, b"".join(lines))
        except _ROW_ERRORS as exc:
            cur.execute("ROLLBACK TO SAVEPOINT dnstap_rows")
            cur.execute("RELEASE SAVEPOINT dnstap_rows")
            if len(lines) == 1:
                self._reject_log(logging.ERROR, "output pgsql: the server refused a row (%s): %r",
                                 str(exc).strip().splitlines()[0], lines[0][:300])
                return 1
            half = len(lines) // 2
            return self._copy_halves(cur, lines[:half]) + self._copy_halves(cur, lines[half:])
        cur.execute("RELEASE SAVEPOINT dnstap_rows")
        return 0

    def _commit(self) -> None:
        self._conn.commit()

    def _rollback(self) -> None:
        try:
            self._conn.rollback()
        except psycopg2.Error:
            pass  # the connection is gone: the Delivery closes it and reconnects

    def close(self, graceful: bool) -> bool:
        conn, self._conn = self._conn, None
        if conn is None:
            return False
        try:
            conn.close()
        except psycopg2.Error:
            return False
        return True


def _lines(chunks: list[bytes]) -> list[bytes]:
    """The rows of COPY data, each with its newline (a newline in a value is
    escaped, so every one ends a row)."""
    return [line + b"\n" for chunk in chunks for line in chunk.split(b"\n")[:-1]]


# --------------------------------------------------------------------------- Beam


class _WritePgsqlFn(DeliverFn):
    NAME = "pgsql"

    def __init__(self, options) -> None:
        super().__init__(options.delivery(), describe=describe(options.dsn, options.table))
        self._pg = options

    def setup(self) -> None:
        self._hooks = load_hooks(self._pg.userfuncfile)
        self._ncolumns = len(self._hooks.columns)
        self._stats = counters.counter_group(STATS_GROUP)
        self._error_log = RateLimitedLog(log)
        super().setup()

    def make_transport(self) -> PgsqlTransport:
        pg = self._pg
        return PgsqlTransport(pg.dsn, pg.table, hooks=self._hooks, passfile=pg.passfile,
                              timeout=pg.timeout, stats=self._stats)

    def encode(self, records):
        data, rows = encode_rows(records, self._hooks.row, self._ncolumns, self._stats, self._error_log)
        return (data, rows) if rows else None


class WriteToPostgres(beam.PTransform):
    """Insert batches of records into ``options.table`` over ``options.dsn``
    (a pipeline.config.PgsqlOutput); see the module docstring."""

    def __init__(self, options) -> None:
        super().__init__()
        table_identifier(options.table)
        load_hooks(options.userfuncfile)  # a bad file stops the start-up, not the worker
        self._fn = _WritePgsqlFn(options)

    def expand(self, batches):
        return batches | "Write" >> beam.ParDo(self._fn)
