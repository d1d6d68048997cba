#!/usr/bin/env python3
"""Throughput of the PostgreSQL output (sinks/pgsql.py) into a real server.

N records decoded from tests/data/captures (cycled) are encoded the way the
pipeline does (chunks of --chunk records, in COPY text format) and put into a
``Delivery`` with a ``PgsqlTransport``, which inserts them from its thread;
the clock runs from the first record encoded until the Delivery reports all
of them delivered (committed), and the table's row count is checked.

Without --dsn a throwaway server is started with tests/pg_server.py (as the
postgres user when run as root) on default settings (fsync on), and removed.
--compare also times the two ways of inserting the same rows with psycopg2
directly, one transaction per --batch-size rows: COPY FROM STDIN (what the
output does) and execute_values.

    .venv/bin/python benchmarks/bench_pgsql.py                 # 200,000 messages
    .venv/bin/python benchmarks/bench_pgsql.py --compare --messages 100000
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # core, sinks; tests/pg_server.py

from core import message  # noqa: E402
from core.framestream import ReaderSession  # noqa: E402
from sinks.delivery import Delivery  # noqa: E402
from sinks.pgsql import COLUMNS, PgsqlTransport, default_row, encode_rows  # noqa: E402


def load_records(n: int) -> list[dict]:
    decoded = []
    for path in sorted((REPO / "tests" / "data" / "captures").glob("*.fstrm")):
        frames: list[bytes] = []
        ReaderSession().receive(path.read_bytes(), frames)
        decoded += [message.decode(f) for f in frames]
    return [dict(rec) for rec in itertools.islice(itertools.cycle(decoded), n)]


def count(dsn: str, table: str) -> int:
    import psycopg2

    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(f"SELECT count(*) FROM {table}")
        return cur.fetchone()[0]


def drop(dsn: str, table: str) -> None:
    import psycopg2

    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f"DROP TABLE IF EXISTS {table}")
    conn.close()


def bench_delivery(dsn: str, records: list[dict], chunk: int, batch_size: int) -> tuple[float, float]:
    """(messages/s end to end, seconds spent encoding)."""
    table = "bench_delivery"
    drop(dsn, table)
    stats: dict = {"skipped": 0, "row_errors": 0, "rejected": 0}
    transport = PgsqlTransport(dsn, table, stats=stats)
    delivery = Delivery("pgsql-bench", transport, retry=1.0, buffer_size=len(records) + 1,
                        batch_size=batch_size, describe=f"bench {table}")
    deadline = time.monotonic() + 60
    while not delivery.connected and time.monotonic() < deadline:
        time.sleep(0.01)
    start = time.perf_counter()
    encoding = 0.0
    for i in range(0, len(records), chunk):
        t = time.perf_counter()
        data, rows = encode_rows(records[i:i + chunk], default_row, len(COLUMNS), stats)
        encoding += time.perf_counter() - t
        delivery.put(data, rows)
    while delivery.snapshot()["delivered"] < len(records):
        if time.perf_counter() - start > 600:
            raise SystemExit(f"not delivered within 600 s: {delivery.snapshot()}")
        time.sleep(0.005)
    elapsed = time.perf_counter() - start
    delivery.close()
    snap = delivery.snapshot()
    rows = count(dsn, table)
    if rows != len(records) or snap["dropped"] or stats["rejected"]:
        raise SystemExit(f"{rows} rows for {len(records)} records; {snap}; {stats}")
    return len(records) / elapsed, encoding


def bench_methods(dsn: str, records: list[dict], batch_size: int) -> dict[str, float]:
    """rows/s of COPY and of execute_values, rows already mapped (default_row)."""
    import io

    import psycopg2
    from psycopg2.extras import execute_values

    from sinks.pgsql import copy_line, create_default_table

    rows = [default_row(r) for r in records]
    columns = ", ".join(COLUMNS)
    out = {}
    for method in ("copy", "execute_values"):
        table = f"bench_{method}"
        drop(dsn, table)
        conn = psycopg2.connect(dsn)
        with conn.cursor() as cur:
            create_default_table(cur, table)
        conn.commit()
        start = time.perf_counter()
        with conn.cursor() as cur:
            for i in range(0, len(rows), batch_size):
                batch = rows[i:i + batch_size]
                if method == "copy":
                    data = ("\n".join(map(copy_line, batch)) + "\n").encode()
                    cur.copy_expert(f"COPY {table} ({columns}) FROM STDIN", io.BytesIO(data))
                else:
                    execute_values(cur, f"INSERT INTO {table} ({columns}) VALUES %s", batch, page_size=batch_size)
                conn.commit()
        out[method] = len(rows) / (time.perf_counter() - start)
        conn.close()
        assert count(dsn, table) == len(rows), method
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=200_000)
    ap.add_argument("--chunk", type=int, default=512, help="records per chunk (input.batch-size)")
    ap.add_argument("--batch-size", type=int, default=1000, help="messages per transaction (Delivery batch_size)")
    ap.add_argument("--dsn", help="an existing server (its bench_* tables are dropped and written)")
    ap.add_argument("--compare", action="store_true", help="also time COPY against execute_values")
    args = ap.parse_args()

    server = None
    dsn = args.dsn
    if dsn is None:
        import pg_server

        bindir = pg_server.find_bindir()
        if bindir is None:
            print("no PostgreSQL server programs found; install postgresql or give --dsn", file=sys.stderr)
            return 1
        server = pg_server.PgServer(bindir)
        server.start()
        dsn = server.dsn
    try:
        records = load_records(args.messages)
        rate, encoding = bench_delivery(dsn, records, args.chunk, args.batch_size)
        print(f"pgsql output: {len(records)} messages, {rate:,.0f} messages/s "
              f"(chunks of {args.chunk}, {args.batch_size} per transaction; encoding took {encoding:.2f} s)")
        if args.compare:
            for method, value in bench_methods(dsn, records, args.batch_size).items():
                print(f"  {method:15} {value:,.0f} rows/s")
    finally:
        if server is not None:
            server.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
