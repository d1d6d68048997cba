"""Example ``output.pgsql.userfuncfile``: a compact table of responses.

Point the output at it (and at a table name of your choice):

    output:
      pgsql:
        enable: true
        dsn: host=127.0.0.1 port=5432 user=dnstap dbname=dns
        table: dns_responses
        userfuncfile: /etc/dnstap_receiver/pgsql_userfunc.py

The receiver loads this file with importlib when it starts (and again in its
worker), so keep the top level free of side effects. It may define:

- ``create_table(cursor, table)``: run on every (re)connection instead of the
  default ``CREATE TABLE IF NOT EXISTS``; ``cursor`` is a psycopg2 cursor,
  ``table`` the configured name ([schema.]name, checked to hold only letters,
  digits and _, so it can be written into the SQL as it is). The receiver
  commits after it.
- ``COLUMNS`` and ``row(record)``, together: the columns each row fills, in
  order, and the values of one record (a dict with the receiver's field names:
  "timestamp", "message", "type", "query-ip", "qname", "rrtype", "rcode",
  "latency"...; "-" marks an unknown value). Return None to skip the record.
  An exception or a tuple of the wrong length skips it too, logged and counted
  (output.pgsql.rows: skipped, row_errors). Values may be None, bool, int,
  float, str, datetime, bytes, or dict/list (stored as JSON).

Either part can come alone: ``create_table`` alone keeps the default rows
(sinks/pgsql.py lists their columns), e.g. to add indexes or partitioning;
``COLUMNS``/``row`` alone write into the default table, which then must have
those columns.
"""

from datetime import datetime, timezone

COLUMNS = ("ts", "client", "qname", "qtype", "rcode", "latency_ms")


def create_table(cursor, table):
    cursor.execute(
        f"""CREATE TABLE IF NOT EXISTS {table} (
            ts         timestamptz NOT NULL,
            client     inet,      -- text instead with privacy.hash-ip, whose digests are no addresses
            qname      text NOT NULL,
            qtype      text,
            rcode      text,
            latency_ms real
        )"""
    )
    # An index lives in its table's schema: its own name takes no schema.
    cursor.execute(f"CREATE INDEX IF NOT EXISTS {table.rpartition('.')[2]}_ts_idx ON {table} (ts)")


def row(record):
    """Responses only, qnames in lower case, latency in milliseconds."""
    if record["type"] != "response" or record["qname"] == "-":
        return None
    client = record["query-ip"]
    latency = record["latency"]
    return (
        datetime.fromtimestamp(record["timestamp"], timezone.utc),
        None if client == "-" else client,
        record["qname"].lower(),
        record["rrtype"],
        record["rcode"],
        None if latency == "-" else latency * 1000.0,
    )
