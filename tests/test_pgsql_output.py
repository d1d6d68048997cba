"""output.pgsql: rows in a real PostgreSQL server, through outages.

The pure parts (row mapping, COPY text encoding, the userfuncfile checks) run
without a server; the rest runs against one throwaway server per module
(tests/pg_server.py), stopped and started again by the outage tests.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from datetime import datetime, timezone
from io import BytesIO
from pathlib import Path

import apache_beam as beam
import psycopg2
import pytest
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from hypothesis import given, settings
from hypothesis import strategies as st

import pg_server
from conftest import REPO, start_receiver
from core import message
from core.errors import ConfigError
from fstrm_client import FstrmClient, capture_frames, free_tcp_port
from pipeline.config import PgsqlOutput
from sinks.delivery import Delivery
from sinks.pgsql import (
    COLUMNS,
    Hooks,
    PgsqlTransport,
    WriteToPostgres,
    _field,
    connect_params,
    copy_line,
    create_default_table,
    default_row,
    describe,
    encode_rows,
    load_hooks,
)
from transforms.batches import RecordBatch

EXAMPLE = REPO / "deploy" / "pgsql_userfunc.py"


@pytest.fixture(scope="module")
def pg():
    server = pg_server.PgServer(pg_server.require_bindir())
    try:
        server.start()
        yield server
    finally:
        server.destroy()


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return [message.decode(frame) for frame in capture_frames("unbound-tcp.fstrm")]


def wait_until(predicate, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def row_count(pg, table: str) -> int:
    return pg.query(f"SELECT count(*) FROM {table}")[0][0]


def stats() -> Counter:
    return Counter()


def unique_records(records, n: int) -> list[dict]:
    """``n`` records cycled from the capture, each with its own identity
    ("m<i>"), so that a row written twice shows up."""
    out = []
    for i, rec in zip(range(n), itertools.cycle(records)):
        rec = dict(rec)
        rec["identity"] = f"m{i}"
        out.append(rec)
    return out


def put_all(delivery: Delivery, recs: list[dict], chunk: int = 100, pace: float = 0.0, during=None) -> None:
    """Encode ``recs`` in chunks into ``delivery``; ``during(i)`` runs before
    the chunk starting at record i."""
    for i in range(0, len(recs), chunk):
        if during is not None:
            during(i)
        data, rows = encode_rows(recs[i:i + chunk], default_row, len(COLUMNS), stats())
        delivery.put(data, rows)
        if pace:
            time.sleep(pace)


def assert_each_once(pg, table: str, total: int, dropped: int) -> None:
    twice = pg.query(f"SELECT identity, count(*) FROM {table} GROUP BY identity HAVING count(*) > 1 LIMIT 5")
    assert twice == [], f"rows written twice: {twice}"
    rows = row_count(pg, table)
    assert rows + dropped == total, (rows, dropped, total)


# ----------------------------------------------------------------------------- encoding

def parse_copy_line(line: str) -> list:
    """The values of one COPY text row (what the server reads)."""
    unescape = {"\\": "\\", "t": "\t", "n": "\n", "r": "\r"}
    out = []
    for field in line.split("\t"):
        if field == "\\N":
            out.append(None)
            continue
        chars, it = [], iter(field)
        for c in it:
            chars.append(unescape[next(it)] if c == "\\" else c)
        out.append("".join(chars))
    return out


scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**63), st.floats(allow_nan=False),
    st.text(), st.text(alphabet="\\\t\n\r\0N a"),
)


@given(st.lists(scalars, min_size=1, max_size=30))
def test_copy_line_equals_escaping_each_value_and_reads_back(values):
    line = copy_line(values)
    assert line == "\t".join(map(_field, values))  # the fast path never differs
    expected = [
        None if v is None else ("t" if v else "f") if isinstance(v, bool)
        else repr(v) if isinstance(v, (int, float)) else v.replace("\0", "\\000")
        for v in values
    ]
    assert parse_copy_line(line) == expected


def test_other_values_are_converted_for_copy():
    when = datetime(2026, 11, 29, 7, 21, 57, 91122, tzinfo=timezone.utc)
    line = copy_line([when, b"\x00\xff", {"a": "b\tc"}, [1, 2], 1.5e-7])
    assert parse_copy_line(line) == [when.isoformat(), "\\x00ff", '{"a":"b\\tc"}', "[1,2]", "1.5e-07"]


def test_default_row_of_a_decoded_message(records):
    rec = records[0]
    row = dict(zip(COLUMNS, default_row(rec)))
    assert row["ts"] == rec["datetime"] == "2026-11-29T07:21:57.091122+00:00"
    assert (row["message"], row["type"], row["family"], row["protocol"]) == ("CLIENT_QUERY", "query", "INET", "UDP")
    assert (row["query_ip"], row["query_port"], row["response_port"]) == ("127.0.0.1", 33825, 15353)
    assert (row["qname"], row["qtype"], row["qclass"], row["id"]) == ("ns.example.test.", "A", "IN", 61524)
    assert row["latency"] is None and row["malformed"] is False  # "-" is NULL
    assert row["country"] is None and row["query_ip_hash"] is None


def test_default_row_unknowns_hashes_and_geoip():
    rec = dict(message.FIELDS)
    rec.update({
        "timestamp": 1700000000.25, "datetime": "-", "query-ip": "3f" * 16, "response-ip": "2001:db8::1",
        "latency": 0.0125, "country": "FR", "city": "-", "asn": "AS64496", "as-org": "Example",
        "id": 2**31, "malformed": True,
    })
    row = dict(zip(COLUMNS, default_row(rec)))
    assert row["ts"] == "2023-11-14 22:13:20.250000+00"  # from the float when datetime is unknown
    assert (row["query_ip"], row["query_ip_hash"]) == (None, "3f" * 16)  # privacy.hash-ip's digest
    assert (row["response_ip"], row["response_ip_hash"]) == ("2001:db8::1", None)
    assert (row["latency"], row["country"], row["city"], row["asn"], row["as_org"]) == (
        0.0125, "FR", None, "AS64496", "Example")
    assert row["id"] is None  # out of the integer column's range: NULL, not a refused row
    assert row["identity"] is None and row["qname"] is None and row["malformed"] is True
    rec["timestamp"] = 0.0
    assert default_row(rec)[0] is None


def test_encode_rows_counts_skipped_records_and_hook_errors(records):
    def row(rec):
        if rec["type"] == "query":
            return None
        if rec["id"] % 2:
            raise KeyError("boom")
        return (rec["qname"],) if rec["id"] % 4 else (rec["qname"], 1)

    counts = Counter()
    data, rows = encode_rows(records, row, 1, counts)
    responses = [r for r in records if r["type"] == "response"]
    odd = sum(r["id"] % 2 for r in responses)
    wrong_length = sum(r["id"] % 4 == 0 for r in responses)
    assert counts == {"skipped": 1003, "row_errors": odd + wrong_length}
    assert rows == 1003 - odd - wrong_length == data.count(b"\n")
    assert encode_rows(records[:1], row, 1, counts) == (b"", 0)


# ----------------------------------------------------------------------------- configuration

def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "userfunc.conf"  # any file name, not only *.py
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("text, error", [
    ("def oops(:\n", "cannot load"),
    ("async def pgsql_init(conn): pass\nasync def pgsql_main(msg, conn): pass\n", "4.7.0's asyncpg hooks"),
    ("X = 1\n", "defines none of"),
    ("def row(r): return (1,)\n", "row and COLUMNS together"),
    ("COLUMNS = ('a b',)\ndef row(r): return (1,)\n", "non-empty sequence of column names"),
    ("COLUMNS = ()\ndef row(r): return ()\n", "non-empty sequence of column names"),
    ("create_table = 3\n", "is not a function"),
])
def test_bad_userfuncfile_is_refused_when_the_pipeline_is_built(tmp_path, text, error):
    options = PgsqlOutput(enable=True, userfuncfile=write(tmp_path, text))
    with pytest.raises(ConfigError, match=error):
        WriteToPostgres(options)


def test_userfuncfile_parts_and_bad_table_name(tmp_path):
    hooks = load_hooks(write(tmp_path, "def create_table(cursor, table):\n    pass\n"))
    assert hooks.columns == COLUMNS and hooks.row is default_row  # the default rows, the user's table
    hooks = load_hooks(write(tmp_path, "COLUMNS = ['Qname']\ndef row(r):\n    return (r['qname'],)\n"))
    assert hooks.columns == ("qname",) and hooks.create_table is Hooks().create_table
    with pytest.raises(ConfigError, match="no such file"):
        load_hooks(str(tmp_path / "missing.py"))
    with pytest.raises(ConfigError, match="output.pgsql.table"):
        WriteToPostgres(PgsqlOutput(table="dnstap; drop table x"))


def test_connection_parameters(tmp_path):
    params = connect_params("postgres://u:secret@db.example:5433/dns?connect_timeout=7", "~/none", 60)
    assert params["connect_timeout"] == "7"  # the dsn wins
    assert params["tcp_user_timeout"] == "60000" and "passfile" not in params  # no such file
    passfile = tmp_path / "pgpass"
    passfile.write_text("*:*:*:*:pw\n")
    assert connect_params("host=h", str(passfile), 0.5)["passfile"] == str(passfile)
    assert connect_params("host=h", str(passfile), 0.5)["connect_timeout"] == "2"  # libpq's least
    text = describe("postgres://u:secret@db.example:5433/dns", "dnstap")
    assert text == "postgresql db.example:5433/dns table dnstap" and "secret" not in text


# ----------------------------------------------------------------------------- real server

@pytest.fixture(scope="module")
def roundtrip(pg):
    conn = pg.connect()
    with conn.cursor() as cur:
        cur.execute("CREATE TABLE roundtrip (i integer, a text, b text, n bigint, f double precision, ok boolean)")
    yield conn
    conn.close()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.text(), st.one_of(st.none(), st.text(alphabet="\\\t\n\r\0N ab\u00e9\u2028")),
                          st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1)),
                          st.floats(allow_nan=False), st.booleans()), max_size=20))
def test_whatever_the_values_hold_the_server_reads_them_back(roundtrip, rows):
    with roundtrip.cursor() as cur:
        cur.execute("TRUNCATE roundtrip")
        data = "".join(copy_line((i, *row)) + "\n" for i, row in enumerate(rows)).encode()
        cur.copy_expert("COPY roundtrip FROM STDIN", BytesIO(data))
        cur.execute("SELECT a, b, n, f, ok FROM roundtrip ORDER BY i")
        got = cur.fetchall()

    def nul(text):
        return None if text is None else text.replace("\0", "\\000")  # what PostgreSQL text cannot hold

    assert got == [(nul(a), nul(b), n, f, ok) for a, b, n, f, ok in rows]


def test_beam_pipeline_rows_equal_the_messages(pg, records):
    options = PgsqlOutput(enable=True, dsn=pg.dsn, table="beam_rows", retry=0.2)
    with beam.Pipeline(runner=FnApiRunner()) as p:
        _ = (p | beam.Create([RecordBatch(records[:1000]), RecordBatch(records[1000:]), RecordBatch()])
             | WriteToPostgres(options))
    rows = pg.query("SELECT ts, message, type, family, protocol, host(query_ip), query_port, host(response_ip),"
                    " response_port, length, id, opcode, rcode, flags, qname, qtype, qclass, latency, malformed"
                    " FROM beam_rows")
    assert len(rows) == len(records) == 2006

    def expected(rec):
        return (datetime.fromisoformat(rec["datetime"]), rec["message"], rec["type"], rec["family"],
                rec["protocol"], rec["query-ip"], rec["query-port"], rec["response-ip"], rec["response-port"],
                rec["length"], rec["id"], rec["opcode"], rec["rcode"], rec["flags"], rec["qname"], rec["rrtype"],
                rec["qclass"], None if rec["latency"] == "-" else rec["latency"], rec["malformed"])

    assert Counter(rows) == Counter(map(expected, records))
    [(kind, family)] = pg.query("SELECT pg_typeof(query_ip)::text, family(query_ip) FROM beam_rows LIMIT 1")
    assert (kind, family) == ("inet", 4)
    first = pg.query("SELECT ts, identity FROM beam_rows ORDER BY ts LIMIT 1")[0]
    assert first == (datetime(2026, 11, 29, 7, 21, 57, 91122, tzinfo=timezone.utc), "unbound-probe")


def test_example_userfuncfile_makes_its_table_and_rows(pg, records):
    pg.query("CREATE SCHEMA IF NOT EXISTS example")
    counts = Counter()
    hooks = load_hooks(str(EXAMPLE))
    transport = PgsqlTransport(pg.dsn, "example.responses", hooks=hooks, timeout=10, stats=counts)
    delivery = Delivery("pgsql-example", transport, retry=0.2, describe="example")
    data, rows = encode_rows(records, hooks.row, len(hooks.columns), counts)
    delivery.put(data, rows)
    delivery.close()
    assert delivery.counts["delivered"] == rows == 1003 and counts["skipped"] == 1003
    got = pg.query("SELECT ts, host(client), qname, qtype, rcode, latency_ms FROM example.responses")
    responses = [r for r in records if r["type"] == "response"]
    assert Counter(got) == Counter(
        (datetime.fromtimestamp(r["timestamp"], timezone.utc), r["query-ip"], r["qname"].lower(), r["rrtype"],
         r["rcode"], None) for r in responses
    )
    assert pg.query("SELECT indexname FROM pg_indexes WHERE schemaname = 'example'") == [("responses_ts_idx",)]


def test_server_crash_mid_stream_every_row_once_or_dropped(pg, records):
    """pg_ctl stop -m immediate while rows stream in, start again: each
    message is in the table exactly once or counted dropped."""
    total = 30_000
    recs = unique_records(records, total)
    delivery = Delivery("pgsql-crash", PgsqlTransport(pg.dsn, "crash", timeout=10), retry=0.2,
                        buffer_size=50_000, describe="crash")

    def during(i):
        if i == 10_000:
            wait_until(lambda: delivery.counts["delivered"] >= 5_000, what="first rows")
            pg.stop("immediate")
        if i == 15_000:
            pg.start()

    try:
        put_all(delivery, recs, chunk=100, pace=0.01, during=during)
    finally:
        if not pg.running():
            pg.start()
    delivery.close(timeout=20)
    counts = delivery.counts
    assert counts["send_errors"] + counts["connect_errors"] >= 1 and counts["connects"] >= 2, counts
    assert counts["delivered"] + counts["dropped"] == total, counts
    assert counts["delivered"] == row_count(pg, "crash")
    assert_each_once(pg, "crash", total, counts["dropped"])
    print(f"pgsql crash/restart: {counts['delivered']} rows, {counts['dropped']} dropped, "
          f"{counts['send_errors']} failed sends, {counts['connect_errors']} failed connects")


class AckLost(PgsqlTransport):
    """The connection fails during the 3rd COMMIT: after it reached the server
    (``committed``) or before."""

    def __init__(self, *args, committed: bool, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.committed = committed
        self.commits = 0

    def _commit(self) -> None:
        self.commits += 1
        if self.commits == 3:
            if self.committed:
                super()._commit()
            raise psycopg2.OperationalError("server closed the connection unexpectedly (test)")
        super()._commit()


@pytest.mark.parametrize("committed", [True, False], ids=["committed", "not-committed"])
def test_commit_cut_short_is_resolved_without_duplicates(pg, records, committed, caplog):
    table = f"ack_lost_{int(committed)}"
    recs = unique_records(records, 5_000)
    transport = AckLost(pg.dsn, table, committed=committed, timeout=10)
    delivery = Delivery(f"pgsql-{table}", transport, retry=0.1, batch_size=1_000, describe=table)
    put_all(delivery, recs, chunk=250, pace=0.02)
    delivery.close(timeout=20)
    assert delivery.counts["send_errors"] == 1 and delivery.counts["connects"] == 2
    assert delivery.counts["delivered"] == 5_000 and delivery.counts["dropped"] == 0
    assert_each_once(pg, table, 5_000, 0)
    outcome = "committed" if committed else "aborted"
    assert f"turned out {outcome}" in caplog.text


def test_server_down_tiny_buffer_counts_drops_then_resumes(pg, records):
    pg.stop("fast")
    try:
        recs = unique_records(records, 5_000)
        delivery = Delivery("pgsql-down", PgsqlTransport(pg.dsn, "down", timeout=5), retry=0.1,
                            buffer_size=1_000, describe="down")
        started = time.monotonic()
        put_all(delivery, recs, chunk=100)
        assert time.monotonic() - started < 1.0  # the pipeline side never waits
        wait_until(lambda: delivery.counts["connect_errors"] >= 2, what="connection attempts")
        assert delivery.counts["dropped"] == 4_000 and not delivery.connected
    finally:
        pg.start()
    wait_until(lambda: delivery.counts["delivered"] == 1_000, what="delivery after the restart")
    delivery.close()
    ids = sorted(int(i[1:]) for (i,) in pg.query("SELECT identity FROM down"))
    assert ids == list(range(4_000, 5_000))  # the newest were kept
    assert_each_once(pg, "down", 5_000, delivery.counts["dropped"])


def test_refused_rows_are_counted_and_do_not_block_the_rest(pg):
    def create(cursor, table):
        cursor.execute(f"CREATE TABLE IF NOT EXISTS {table} (n integer, addr inet, CHECK (n <> 13))")

    hooks = Hooks(columns=("n", "addr"), row=lambda r: (r["n"], r["addr"]), create_table=create)
    recs = [{"n": n, "addr": "bogus" if n % 100 == 7 else "192.0.2.1"} for n in range(1_000)]
    counts = Counter()
    delivery = Delivery("pgsql-refused", PgsqlTransport(pg.dsn, "refused", hooks=hooks, stats=counts),
                        retry=0.1, describe="refused")
    for i in range(0, 1_000, 250):
        delivery.put(*encode_rows(recs[i:i + 250], hooks.row, 2, counts))
    delivery.close()
    assert counts["rejected"] == 11  # ten bad addresses and the CHECK
    got = sorted(n for (n,) in pg.query("SELECT n FROM refused"))
    assert got == [n for n in range(1_000) if n % 100 != 7 and n != 13]
    assert delivery.counts["send_errors"] == 0


def test_missing_columns_fail_the_connection_naming_them(pg):
    hooks = Hooks(columns=("qname", "no_such_column"), row=lambda r: (1, 2))
    transport = PgsqlTransport(pg.dsn, "beam_cols", hooks=hooks)
    with pytest.raises(LookupError, match="table beam_cols has no column no_such_column"):
        transport.connect()
    hooks = Hooks(create_table=lambda cursor, table: None)
    with pytest.raises(LookupError, match="table nowhere does not exist"):
        PgsqlTransport(pg.dsn, "nowhere", hooks=hooks).connect()


def test_a_role_that_may_only_insert_writes_into_an_existing_table(pg, records):
    conn = pg.connect()
    with conn.cursor() as cur:
        create_default_table(cur, "insert_only")
    conn.close()
    pg.query("DO $$ BEGIN CREATE ROLE writer LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$")
    pg.query("GRANT INSERT ON insert_only TO writer")
    delivery = Delivery("pgsql-writer", PgsqlTransport(pg.dsn.replace("user=postgres", "user=writer"), "insert_only"),
                        retry=0.1, describe="insert-only")
    put_all(delivery, records)
    delivery.close()
    assert delivery.counts["connect_errors"] == 0 and delivery.counts["delivered"] == len(records)
    assert row_count(pg, "insert_only") == len(records)


def test_receiver_writes_every_message_to_postgres(pg, tmp_path):
    port = free_tcp_port()
    receiver = start_receiver(tmp_path / "rx", {
        "input": {"tcp-socket": {"enable": True, "local-address": "127.0.0.1", "local-port": port}},
        "output": {"pgsql": {"enable": True, "dsn": pg.dsn, "table": "receiver_rows", "retry": 0.2}},
    })
    frames = capture_frames()
    with FstrmClient.tcp("127.0.0.1", port) as client:
        client.handshake()
        client.send_frames(frames)
        client.stop()

    def rows() -> int:
        try:
            return row_count(pg, "receiver_rows")
        except psycopg2.errors.UndefinedTable:
            return 0

    deadline = time.monotonic() + 30
    while rows() < len(frames) and receiver.running():
        assert time.monotonic() < deadline, (
            f"{rows()} rows of {len(frames)} after 30 s (is output.pgsql wired in pipeline/build.py?)\n"
            f"{receiver.logs()}")
        time.sleep(0.1)
    assert receiver.stop() == 0, receiver.logs()
    assert rows() == len(frames) == 2006, receiver.logs()
    assert Counter(dict(pg.query("SELECT message, count(*) FROM receiver_rows GROUP BY message"))) == {
        "CLIENT_QUERY": 1003, "CLIENT_RESPONSE": 1003}
