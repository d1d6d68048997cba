"""DNS statistics of dnstap-receiver 4.7.0, in bounded memory (engine-free).

One set of accumulators serves the live receiver (``StatsStore``: cumulative
and tumbling windows, read by the HTTP API) and the Beam-native path
(``transforms/statistics.py``: a CombineFn whose accumulator is a
``StatsSet``); both add batches of records and merge, so they agree.

- ``StreamStats``: the statistics of one stream (dnstap identity) or of all:
  exact counters, distinct clients and domains (HyperLogLog), top-N tables
  (Space-Saving for the unbounded key sets: domains, clients, TLDs; exact
  counts for rcodes and rrtypes, whose names are few and capped).
- ``StatsSet``: one StreamStats per identity (at most ``max_identities``,
  later ones share ``OTHER``) and their merge, ``total``.
- ``StatsStore``: thread-safe cumulative + windowed statistics for the live
  receiver; ``snapshot()`` hands readers an immutable ``StatsSnapshot``.

Speed: a batch is first reduced to a ``BatchSummary`` per identity (columns
counted by C loops, then one step per distinct key: hashing for HyperLogLog,
table updates), which is applied to that identity's stats only; totals are
merged when read. Measured per message in batches of 512: about 1.3 us on
repetitive traffic, 2.2 us when the top tables turn over constantly (tens of
thousands of clients and names), where table compaction and window closing
dominate; names never seen before also pay their MD5 (see core/sketches.py).

What is counted, per record of type "query" or "response" (``<qr>``); a
record of type "unanswered" (copy of a query never answered, see
core/latency.py) only counts ``unanswered``:
  <qr>, <qr>/bytes, <qr>/<family> (inet, inet6), <qr>/<protocol> (udp, tcp,
  dot, doh, doq, dnscryptudp, ...), <qr>/<rcode>, <qr>/<rrtype> (lowercase),
  <qr>/latency0_1 ... <qr>/latency_slow (records whose latency is a number:
  responses), malformed, unanswered; clients (distinct query-ip), domains
  (distinct qname, queries and responses); qps/rps/pps (rates, see
  ``StreamStats.counters``). Unknown values ("-") of query-ip or qname are
  neither clients nor domains.
"""

from __future__ import annotations

import math
import threading
import time
from bisect import bisect_right
from collections import Counter, deque

try:
    from _collections import _count_elements
except ImportError:  # pragma: no cover - other Pythons
    from collections import _count_elements  # type: ignore[attr-defined]
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import compress, groupby, repeat
from operator import is_, itemgetter
from typing import Any

from core.sketches import HyperLogLog, SpaceSaving

__all__ = [
    "LATENCY_BUCKETS",
    "OTHER",
    "STORE_COUNTERS",
    "BatchSummary",
    "StatsConfig",
    "StatsSet",
    "StatsSnapshot",
    "StatsStore",
    "StreamStats",
    "WindowView",
    "split_by_window",
    "summarize",
    "window_index",
]

UNKNOWN = "-"
OTHER = "other"  # the stream that identities past ``max_identities`` are folded into

# Latency buckets in seconds, as in 4.7.0's counter names; a bucket holds
# [lower, upper) (a negative latency, from server clocks, counts as 0_1).
LATENCY_BUCKETS = ("latency0_1", "latency1_10", "latency10_50", "latency50_100", "latency100_1000", "latency_slow")
_LATENCY_BOUNDS = (0.001, 0.010, 0.050, 0.100, 1.000)

# Bounds on the key sets that are counted exactly: names past them count
# under "<qr>/rcode-other", "<qr>/rrtype-other" and the domain table
# "rcode-other/<qr>" (there are 4096 rcodes and 65536 rrtypes on the wire).
MAX_RCODES = 32
MAX_RRTYPES = 256
MAX_DOMAIN_TABLES = 8  # per direction: one per rcode (NOERROR, NXDOMAIN, ...)
_RCODE_OTHER = "rcode-other"
_RRTYPE_OTHER = "rrtype-other"

_QR = ("query", "response")
STORE_COUNTERS = ("records", "windows_closed", "late", "future")
# Seconds a snapshot keeps serving StatsStore.counters/tables/windows/streams
# while batches keep coming: one Prometheus scrape reads every stream from one
# snapshot instead of copying the open window once per stream.
SNAPSHOT_MAX_AGE = 0.5
_FIELDS = itemgetter(
    "type", "family", "protocol", "rcode", "rrtype", "qname", "query-ip", "length", "latency", "malformed", "timestamp"
)
_IDENTITY = itemgetter("identity")
_TIMESTAMP = itemgetter("timestamp")
_third = itemgetter(2)


@dataclass(frozen=True)
class StatsConfig:
    """Sizes of the accumulators (identical wherever accumulators merge).

    top_capacity    entries of each Space-Saving table: exact while a table
                    sees at most this many keys, otherwise every key above
                    1/top_capacity of the traffic is listed
    hll_precision   HyperLogLog p: 2**p bytes per sketch, error 1.04/sqrt(2**p)
    max_identities  identities tracked one by one; later ones share the
                    stream OTHER
    qname_lowercase count qnames lowercased (4.7.0's statistics.qname-lowercase)
    """

    top_capacity: int = 1000
    hll_precision: int = 14
    max_identities: int = 100
    qname_lowercase: bool = False

    def __post_init__(self) -> None:
        if self.top_capacity < 1:
            raise ValueError(f"top_capacity must be >= 1, got {self.top_capacity!r}")
        if not 4 <= self.hll_precision <= 18:
            raise ValueError(f"hll_precision must be within 4..18, got {self.hll_precision!r}")
        if self.max_identities < 1:
            raise ValueError(f"max_identities must be >= 1, got {self.max_identities!r}")


def _tally(items: Iterable) -> dict:
    """Counter(items) as a plain dict: the C counting loop without the cost
    of creating a Counter (a Python-level __init__ and update)."""
    out: dict = {}
    _count_elements(out, items)
    return out


class BatchSummary:
    """Records of one batch (of one identity, usually) reduced to counts per
    distinct key, ready to be applied to a StreamStats."""

    __slots__ = (
        "counts",
        "rcodes",
        "rrtypes",
        "domain_tables",
        "tlds",
        "client_hits",
        "client_bytes",
        "clients",
        "domains",
        "first",
        "last",
    )

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}  # "query", "query/udp", ...: few keys
        self.rcodes: dict[tuple[str, str], int] = {}  # (qr, rcode lowercase) -> n
        self.rrtypes: dict[tuple[str, str], int] = {}  # (qr, rrtype lowercase) -> n
        self.domain_tables: dict[tuple[str, str], dict[str, int]] = {}  # (qr, rcode) -> qname -> n
        self.tlds: dict[str, dict[str, int]] = {}  # qr -> tld -> n
        self.client_hits: dict[str, int] = {}
        self.client_bytes: dict[str, int] = {}
        self.clients: dict[int, int] = {}  # HyperLogLog register updates
        self.domains: dict[int, int] = {}
        self.first = math.inf  # smallest and largest timestamp
        self.last = -math.inf


def summarize(records: Sequence[dict], config: StatsConfig) -> BatchSummary:
    """Reduce ``records`` (any identities) to a BatchSummary."""
    s = BatchSummary()
    if not records:
        return s
    rows = list(map(_FIELDS, records))
    columns = list(zip(*rows))
    type_counts = _tally(columns[0])
    if type_counts.keys() - _QR:
        # Rare: unanswered copies (or a type we do not know) count only as such.
        unanswered = type_counts.pop("unanswered", 0)
        if unanswered:
            s.counts["unanswered"] = unanswered
        rows = [row for row in rows if row[0] == "query" or row[0] == "response"]
        if not rows:
            return s
        columns = list(zip(*rows))
    types, families, protocols, rcodes, rrtypes, qnames, ips, lengths, latencies, malformed, stamps = columns
    counts = s.counts
    for qr in _QR:
        if qr in type_counts:
            counts[qr] = type_counts[qr]
    qbytes = sum(compress(lengths, map("query".__eq__, types)))
    if qbytes:
        counts["query/bytes"] = qbytes
    rbytes = sum(lengths) - qbytes
    if rbytes:
        counts["response/bytes"] = rbytes
    rcode_counts = s.rcodes
    rrtype_counts = s.rrtypes
    for (qr, family, protocol, rcode, rrtype), n in _tally(zip(types, families, protocols, rcodes, rrtypes)).items():
        key = f"{qr}/{family.lower()}"
        counts[key] = counts.get(key, 0) + n
        key = f"{qr}/{protocol.lower()}"
        counts[key] = counts.get(key, 0) + n
        key = (qr, rcode.lower())
        rcode_counts[key] = rcode_counts.get(key, 0) + n
        key = (qr, rrtype.lower())
        rrtype_counts[key] = rrtype_counts.get(key, 0) + n
    bad = sum(malformed)
    if bad:
        counts["malformed"] = bad
    timed = list(map(is_, map(type, latencies), repeat(float)))
    if any(timed):
        buckets = map(bisect_right, repeat(_LATENCY_BOUNDS), compress(latencies, timed))
        for (qr, bucket), n in _tally(zip(compress(types, timed), buckets)).items():
            counts[f"{qr}/{LATENCY_BUCKETS[bucket]}"] = n

    # Domains: a table per (qr, rcode), from one C count of the distinct
    # (qr, rcode, qname); rcodes are lowercased once per table.
    if config.qname_lowercase:
        qnames = map(str.lower, qnames)
    tables = s.domain_tables
    by_pair: dict[tuple[str, str], dict[str, int]] = {}
    for (qr, rcode, qname), n in _tally(zip(types, rcodes, qnames)).items():
        table = by_pair.get((qr, rcode))
        if table is None:
            table = by_pair[(qr, rcode)] = {}
        table[qname] = n
    for (qr, rcode), table in by_pair.items():
        key = (qr, rcode.lower())
        if key in tables:  # rcodes spelled two ways: merged
            merged = tables[key]
            for qname, n in table.items():
                merged[qname] = merged.get(qname, 0) + n
        else:
            tables[key] = table
    distinct: set[str] = set()
    for table in tables.values():
        table.pop(UNKNOWN, None)
        distinct.update(table)
    s.domains = HyperLogLog.register_updates(distinct, config.hll_precision)
    # TLDs: the last label of each distinct name, weighted by its count; or
    # the public suffix given by normalisation ("tld").
    raw_tlds: dict[tuple[str, str], int]
    if "tld" in records[0]:
        kept = records if len(rows) == len(records) else [r for r in records if r["type"] in _QR]
        raw_tlds = _tally((r["type"], r.get("tld")) for r in kept)
    else:
        raw_tlds = {}
        get = raw_tlds.get
        for (qr, _rc), table in tables.items():
            labels = map(_third, map(str.rpartition, map(str.rstrip, table, repeat(".")), repeat(".")))
            for key, n in zip(zip(repeat(qr), labels), table.values()):
                raw_tlds[key] = get(key, 0) + n
    tlds = s.tlds
    for (qr, tld), n in raw_tlds.items():
        if tld and tld != UNKNOWN:
            tld = tld.lower()  # once per distinct TLD, not per name
            by_tld = tlds.get(qr)
            if by_tld is None:
                by_tld = tlds[qr] = {}
            by_tld[tld] = by_tld.get(tld, 0) + n

    # Clients: hits (queries and responses, as 4.7.0), bytes, distinct count.
    hits = _tally(ips)
    hits.pop(UNKNOWN, None)
    s.client_hits = hits
    by_ip: dict[str, int] = {}
    get = by_ip.get
    for ip, length in zip(ips, lengths):
        by_ip[ip] = get(ip, 0) + length
    by_ip.pop(UNKNOWN, None)
    s.client_bytes = by_ip
    s.clients = HyperLogLog.register_updates(hits, config.hll_precision)
    s.first = min(stamps)
    s.last = max(stamps)
    return s


class StreamStats:
    """Statistics of one stream, or of all of them; see the module docstring."""

    __slots__ = (
        "config",
        "counts",
        "rcodes",
        "rrtypes",
        "clients",
        "domains",
        "client_hits",
        "client_bytes",
        "tlds",
        "domain_tables",
        "first",
        "last",
    )

    def __init__(self, config: StatsConfig | None = None) -> None:
        config = config or StatsConfig()
        self.config = config
        cap = config.top_capacity
        self.counts: Counter = Counter()
        self.rcodes: Counter = Counter()  # (qr, rcode) -> n, at most MAX_RCODES names
        self.rrtypes: Counter = Counter()  # (qr, rrtype) -> n, at most MAX_RRTYPES names
        self.clients: HyperLogLog | int = HyperLogLog(config.hll_precision)  # an int once frozen
        self.domains: HyperLogLog | int = HyperLogLog(config.hll_precision)
        self.client_hits = SpaceSaving(cap)
        self.client_bytes = SpaceSaving(cap)
        self.tlds = {qr: SpaceSaving(cap) for qr in _QR}
        self.domain_tables: dict[tuple[str, str], SpaceSaving] = {}  # (qr, rcode) -> qnames
        self.first = math.inf
        self.last = -math.inf

    # -- adding -------------------------------------------------------------

    def add_batch(self, records: Sequence[dict]) -> None:
        self.apply(summarize(records, self.config))

    def apply(self, s: BatchSummary) -> None:
        counts = self.counts
        for key, n in s.counts.items():  # Counter.update costs more on few keys
            counts[key] += n
        if s.rcodes:
            _add_capped(self.rcodes, s.rcodes, MAX_RCODES, _RCODE_OTHER)
        if s.rrtypes:
            _add_capped(self.rrtypes, s.rrtypes, MAX_RRTYPES, _RRTYPE_OTHER)
        if s.clients:
            self.clients.apply(s.clients)
        if s.domains:
            self.domains.apply(s.domains)
        if s.client_hits:
            self.client_hits.update(s.client_hits)
            self.client_bytes.update(s.client_bytes)
        for qr, by_tld in s.tlds.items():
            if by_tld:
                self.tlds[qr].update(by_tld)
        for key, qnames in s.domain_tables.items():
            self._domain_table(key).update(qnames)
        if s.first < self.first:
            self.first = s.first
        if s.last > self.last:
            self.last = s.last

    def _domain_table(self, key: tuple[str, str]) -> SpaceSaving:
        table = self.domain_tables.get(key)
        if table is None:
            qr = key[0]
            if sum(1 for k in self.domain_tables if k[0] == qr) >= MAX_DOMAIN_TABLES:
                key = (qr, _RCODE_OTHER)
                table = self.domain_tables.get(key)
            if table is None:
                table = self.domain_tables[key] = SpaceSaving(self.config.top_capacity)
        return table

    def merge(self, other: StreamStats) -> None:
        """Become the statistics of both streams of records."""
        self.counts.update(other.counts)
        _add_capped(self.rcodes, other.rcodes, MAX_RCODES, _RCODE_OTHER)
        _add_capped(self.rrtypes, other.rrtypes, MAX_RRTYPES, _RRTYPE_OTHER)
        if isinstance(self.clients, int) or isinstance(other.clients, int):
            raise ValueError("frozen statistics cannot be merged")
        self.clients.merge(other.clients)
        self.domains.merge(other.domains)
        self.client_hits.merge(other.client_hits)
        self.client_bytes.merge(other.client_bytes)
        for qr in _QR:
            self.tlds[qr].merge(other.tlds[qr])
        for key, table in other.domain_tables.items():
            self._domain_table(key).merge(table)
        self.first = min(self.first, other.first)
        self.last = max(self.last, other.last)

    def copy(self) -> StreamStats:
        new = StreamStats.__new__(StreamStats)
        new.config = self.config
        new.counts = Counter(self.counts)
        new.rcodes = Counter(self.rcodes)
        new.rrtypes = Counter(self.rrtypes)
        new.clients = self.clients if isinstance(self.clients, int) else self.clients.copy()
        new.domains = self.domains if isinstance(self.domains, int) else self.domains.copy()
        new.client_hits = self.client_hits.copy()
        new.client_bytes = self.client_bytes.copy()
        new.tlds = {qr: t.copy() for qr, t in self.tlds.items()}
        new.domain_tables = {k: t.copy() for k, t in self.domain_tables.items()}
        new.first, new.last = self.first, self.last
        return new

    def freeze(self) -> None:
        """For statistics that will only be read (closed windows): replace the
        distinct-count sketches by their counts (2 ints instead of 2 * 2**p
        bytes) and compact the tables (at most top_capacity entries each,
        instead of 3 times that). A frozen StreamStats can be read and copied,
        not added to or merged."""
        if not isinstance(self.clients, int):
            self.clients = self.clients.count()
        if not isinstance(self.domains, int):
            self.domains = self.domains.count()
        for table in (self.client_hits, self.client_bytes, *self.tlds.values(), *self.domain_tables.values()):
            table.compact()

    # -- reading ------------------------------------------------------------

    @property
    def messages(self) -> int:
        return self.counts["query"] + self.counts["response"]

    def distinct_clients(self) -> int:
        c = self.clients
        return c if isinstance(c, int) else c.count()

    def distinct_domains(self) -> int:
        d = self.domains
        return d if isinstance(d, int) else d.count()

    def counters(self, qps_seconds: float | None = None) -> dict[str, Any]:
        """4.7.0's counters: "query", "response", "clients", "domains",
        "query/bytes", "query/inet", "query/udp", "response/noerror",
        "query/a", "response/latency0_1", ..., plus "malformed" and
        "unanswered". "qps", "rps", "pps" are queries, responses and both
        per second over ``qps_seconds`` (a window's length); 0 without it.
        Keys of families, protocols, rcodes and rrtypes are those seen (the
        base keys always)."""
        c = self.counts
        out: dict[str, Any] = {
            "query": c["query"],
            "response": c["response"],
            "qps": 0,
            "rps": 0,
            "pps": 0,
            "clients": self.distinct_clients(),
            "domains": self.distinct_domains(),
            "query/bytes": c["query/bytes"],
            "response/bytes": c["response/bytes"],
            "query/inet": c["query/inet"],
            "query/inet6": c["query/inet6"],
            "response/inet": c["response/inet"],
            "response/inet6": c["response/inet6"],
            "query/udp": c["query/udp"],
            "query/tcp": c["query/tcp"],
            "response/udp": c["response/udp"],
            "response/tcp": c["response/tcp"],
        }
        for bucket in LATENCY_BUCKETS:
            out[f"response/{bucket}"] = c[f"response/{bucket}"]
        out["malformed"] = c["malformed"]
        out["unanswered"] = c["unanswered"]
        for key, n in c.items():
            if key not in out:
                out[key] = n
        for (qr, name), n in self.rcodes.items():
            key = f"{qr}/{name}"
            out[key] = out.get(key, 0) + n  # 4.7.0 sums names shared by two kinds
        for (qr, name), n in self.rrtypes.items():
            key = f"{qr}/{name}"
            out[key] = out.get(key, 0) + n
        # 4.7.0 also listed "<qr>/<tld>" here. A TLD spelled like a counter
        # above (".mx" and rrtype MX) is left out rather than summed into it,
        # as 4.7.0 did; it stays in the tables.
        for qr in _QR:
            for tld, n in self.tlds[qr].top():
                key = f"{qr}/{tld}"
                if key not in out:
                    out[key] = n
        if qps_seconds:
            qps = c["query"] / qps_seconds
            rps = c["response"] / qps_seconds
            out["qps"], out["rps"], out["pps"] = round(qps, 3), round(rps, 3), round(qps + rps, 3)
        return out

    def tables(self, n: int, domains: Iterable[str] | None = None) -> dict[str, dict[str, list]]:
        """The top ``n`` of each table, in 4.7.0's layout (its ``/tables``):
        tlds, rcodes and rrtypes by "hit/query" and "hit/response", listed
        as ("query/com", count) like 4.7.0; clients by "hit/ip" and
        "length/ip"; domains by "<rcode>/<qr>" ("noerror/query",
        "nxdomain/response") and "hit/<qr>" (all rcodes): those named in
        ``domains`` (one not counted, such as 4.7.0's "length/query", gives
        []), or every table present. Counts of Space-Saving tables are upper
        bounds, exact while the table never dropped a key."""
        out: dict[str, dict[str, list]] = {}
        out["tlds"] = {f"hit/{qr}": [(f"{qr}/{k}", v) for k, v in self.tlds[qr].top(n)] for qr in _QR}
        if domains is None:
            names = [f"{rc}/{qr}" for qr, rc in sorted(self.domain_tables)]
            names += [f"hit/{qr}" for qr in _QR if any(k[0] == qr for k in self.domain_tables)]
        else:
            names = list(domains)
        dom: dict[str, list] = {}
        for name in names:
            by, _, qr = name.partition("/")
            table = self.domain_tables.get((qr, by))
            if table is None and by == "hit" and qr in _QR:
                table = self._hits(qr)
            dom[name] = table.top(n) if table is not None else []
        out["domains"] = dom
        out["clients"] = {"hit/ip": self.client_hits.top(n), "length/ip": self.client_bytes.top(n)}
        out["rcodes"] = _exact_tables(self.rcodes, n)
        out["rrtypes"] = _exact_tables(self.rrtypes, n)
        return out

    def _hits(self, qr: str) -> SpaceSaving | None:
        """4.7.0's "hit/<qr>" domain table (all rcodes): the merge of the
        per-rcode tables, made when read (a name counted under two rcodes
        is summed; the guarantees of merged tables hold)."""
        tables = [t for (q, _rc), t in sorted(self.domain_tables.items()) if q == qr]
        if len(tables) <= 1:
            return tables[0] if tables else None
        merged = tables[0].copy()
        for t in tables[1:]:
            merged.merge(t)
        return merged

    def __getstate__(self) -> dict:
        return {name: getattr(self, name) for name in self.__slots__}

    def __setstate__(self, state: dict) -> None:
        for name, value in state.items():
            setattr(self, name, value)


def _add_capped(target: Counter, add: dict[tuple[str, str], int], cap: int, other: str) -> None:
    """Add counts keyed (qr, name); names past ``cap`` distinct ones per
    direction are counted under (qr, other)."""
    for key, n in add.items():
        if key in target:
            target[key] += n
        elif sum(1 for k in target if k[0] == key[0]) < cap:
            target[key] = n
        else:
            target[(key[0], other)] += n


def _exact_tables(counts: Counter, n: int) -> dict[str, list]:
    out = {}
    for qr in _QR:
        items = sorted(
            ((f"{qr}/{name}", v) for (q, name), v in counts.items() if q == qr), key=lambda kv: (-kv[1], kv[0])
        )
        out[f"hit/{qr}"] = items[: max(n, 0)]
    return out


class StatsSet:
    """Statistics per identity (``streams``) and of all of them (``total``).

    Batches are added to their identity's stats only; ``total`` is the merge
    of the streams, computed when read and kept until the next change: the
    adding path (every message) pays once, reads (a window closing, an API
    request) pay the merge. Space-Saving tables merged this way keep their
    guarantee (error at most N / capacity for the total N)."""

    __slots__ = ("config", "streams", "_total")

    def __init__(self, config: StatsConfig | None = None) -> None:
        self.config = config or StatsConfig()
        self.streams: dict[str, StreamStats] = {}
        self._total: StreamStats | None = None

    @property
    def total(self) -> StreamStats:
        total = self._total
        if total is None:
            total = StreamStats(self.config)
            for name in sorted(self.streams):  # a fixed order: same result on every path
                total.merge(self.streams[name])
            self._total = total
        return total

    def add_batch(self, records: Sequence[dict]) -> None:
        for identity, group in _by_identity(records):
            self.apply(identity, summarize(group, self.config))

    def apply(self, identity: str, summary: BatchSummary) -> None:
        self._total = None
        self.stream(identity).apply(summary)

    def stream(self, identity: str) -> StreamStats:
        """The stats of ``identity`` (created; OTHER once the set is full)."""
        stats = self.streams.get(identity)
        if stats is None:
            if not self._room():
                identity = OTHER
                stats = self.streams.get(OTHER)
            if stats is None:
                stats = self.streams[identity] = StreamStats(self.config)
        return stats

    def merge(self, other: StatsSet) -> None:
        self._total = None
        for identity, stats in other.streams.items():
            if identity not in self.streams and (identity == OTHER or self._room()):
                self.streams[identity] = stats.copy()
            else:
                self.stream(identity).merge(stats)

    def _room(self) -> bool:
        """Whether one more identity gets a stream of its own."""
        named = len(self.streams) - (OTHER in self.streams)
        return named < self.config.max_identities

    def copy(self) -> StatsSet:
        new = StatsSet.__new__(StatsSet)
        new.config = self.config
        new.streams = {k: v.copy() for k, v in self.streams.items()}
        new._total = None if self._total is None else self._total.copy()
        return new

    def freeze(self) -> None:
        """See StreamStats.freeze; the total is computed first."""
        self.total.freeze()
        for stats in self.streams.values():
            stats.freeze()

    def __bool__(self) -> bool:
        return bool(self.streams)

    def get(self, stream: str | None = None) -> StreamStats:
        """``total`` for None, else that stream; KeyError if unknown."""
        return self.total if stream is None else self.streams[stream]

    def names(self) -> list[str]:
        return sorted(self.streams)

    def __getstate__(self) -> tuple:
        return (self.config, self.streams, self._total)

    def __setstate__(self, state: tuple) -> None:
        self.config, self.streams, self._total = state


def _by_identity(records: Sequence[dict]) -> list[tuple[str, Sequence[dict]]]:
    if not records:
        return []
    ids = list(map(_IDENTITY, records))
    first = ids[0]
    if ids.count(first) == len(ids):  # the common case: one sender per batch
        return [(first, records)]
    # Senders come in runs (a socket read each): gather runs, not records.
    groups: dict[str, list] = {}
    for identity, run in groupby(records, _IDENTITY):
        group = groups.get(identity)
        if group is None:
            group = groups[identity] = []
        group.extend(run)
    return list(groups.items())


# -- windows and the live store ----------------------------------------------


def window_index(timestamp: float, window_seconds: float) -> int:
    """The tumbling window of a timestamp: [index * window, (index + 1) * window)."""
    return math.floor(timestamp / window_seconds)


def split_by_window(records: Sequence[dict], window_seconds: float) -> list[tuple[int, Sequence[dict]]]:
    """``records`` grouped by window index (one group, ``records`` itself,
    in the common case of a batch inside one window)."""
    if not records:
        return []
    stamps = list(map(_TIMESTAMP, records))
    lo = window_index(min(stamps), window_seconds)
    if lo == window_index(max(stamps), window_seconds):
        return [(lo, records)]
    groups: dict[int, list] = {}
    for ts, rec in zip(stamps, records):
        index = math.floor(ts / window_seconds)
        group = groups.get(index)
        if group is None:
            group = groups[index] = []
        group.append(rec)
    return sorted(groups.items(), key=itemgetter(0))


@dataclass(frozen=True, eq=False)
class WindowView:
    """One tumbling window [start, end) of event time and its statistics.
    The live store's ``closed`` windows no longer change (their distinct
    counts are frozen into ints); Beam's (transforms/statistics.py) are
    complete windows too."""

    start: float
    end: float
    closed: bool
    stats: StatsSet

    def counters(self, stream: str | None = None) -> dict[str, Any]:
        """Counters of the window; qps over the window's length (for the
        open window: partial counts over the full length)."""
        return self.stats.get(stream).counters(round(self.end - self.start, 6))

    def tables(self, n: int, stream: str | None = None, domains: Iterable[str] | None = None) -> dict:
        return self.stats.get(stream).tables(n, domains)

    def streams(self) -> list[str]:
        return self.stats.names()


class _OpenWindow:
    __slots__ = ("index", "stats", "since_reset")

    def __init__(self, index: int, config: StatsConfig) -> None:
        self.index = index
        self.stats = StatsSet(config)
        # After a reset, the part of this window that belongs to the new
        # cumulative statistics (the rest came before the reset).
        self.since_reset: StatsSet | None = None

    def cumulative_part(self) -> StatsSet:
        return self.stats if self.since_reset is None else self.since_reset


class StatsSnapshot:
    """A consistent, immutable view of a StatsStore for readers.

    ``counters``/``tables``/``streams`` answer for the cumulative statistics
    (since start or reset, including the windows still open); their
    qps/rps/pps are the rates of the last closed window (4.7.0's are the
    rates of the last second), 0 before one closed. ``windows(last)`` lists
    the last closed windows, oldest first, then the open ones.
    """

    def __init__(
        self,
        window_seconds: float,
        since: float,
        cumulative: StatsSet,
        pending: list[StatsSet],
        windows: list[WindowView],
        store_counters: dict[str, int],
    ) -> None:
        self.window_seconds = window_seconds
        self.since = since  # wall time of the start or of the last reset
        self.store_counters = store_counters
        self._base = cumulative
        self._pending = pending
        self._windows = windows
        self._cumulative: StatsSet | None = None
        self._lock = threading.Lock()

    @property
    def cumulative(self) -> StatsSet:
        """The cumulative StatsSet (merged on first use; do not modify)."""
        with self._lock:
            if self._cumulative is None:
                if self._pending:
                    merged = self._base.copy()
                    for part in self._pending:
                        merged.merge(part)
                else:
                    merged = self._base
                self._cumulative = merged
            return self._cumulative

    def streams(self) -> list[str]:
        return self.cumulative.names()

    def counters(self, stream: str | None = None) -> dict[str, Any]:
        """Cumulative counters of all streams (None) or of one (KeyError if unknown)."""
        out = self.cumulative.get(stream).counters()
        last = self.last_closed()
        if last is not None and (stream is None or stream in last.stats.streams):
            rates = last.counters(stream)
            out["qps"], out["rps"], out["pps"] = rates["qps"], rates["rps"], rates["pps"]
        return out

    def tables(self, n: int, stream: str | None = None, domains: Iterable[str] | None = None) -> dict:
        return self.cumulative.get(stream).tables(n, domains)

    def windows(self, last: int | None = None) -> list[WindowView]:
        closed = [w for w in self._windows if w.closed]
        open_ = [w for w in self._windows if not w.closed]
        if last is not None:
            closed = closed[-last:] if last > 0 else []
        return closed + open_

    def last_closed(self) -> WindowView | None:
        closed = [w for w in self._windows if w.closed]
        return closed[-1] if closed else None


class StatsStore:
    """Cumulative and windowed statistics of the live receiver, thread-safe:
    the pipeline thread adds batches, HTTP threads take snapshots.

    Windows are tumbling windows of event time (the records' timestamps):
    window k holds [k * window, (k + 1) * window). The event clock is the
    newest timestamp seen, advanced by wall time while no record comes in
    (``close_idle``), so a replay of an old capture is windowed like the live
    stream it was recorded from, and an idle receiver still closes its last
    window. A window closes when the clock passes its end plus
    ``grace_seconds`` (room for senders whose batches interleave slightly
    out of order); the last ``keep_windows`` closed windows are kept.

    Records of a window already closed ("late") and records stamped more
    than ``future_slack`` seconds ahead of the wall clock ("future": one of
    them would otherwise close every window at once) count in the cumulative
    statistics only.

    Readers: ``snapshot()`` (current, immutable), or counters()/tables()/
    windows()/streams() (what pipeline/http_api.py's StatsView asks), which
    share one snapshot while nothing was added or it is at most
    ``snapshot_max_age`` seconds old.

    Cost: a batch is added to its open window only; a window is merged into
    the cumulative statistics when it closes (copy-on-write when a snapshot
    still holds the cumulative statistics), and snapshots merge the open
    windows in.

    Memory, bounded whatever the traffic: the cumulative set, the open
    window(s) (one; more within ``grace_seconds`` of a boundary) and the
    ``keep_windows`` closed ones each hold at most 1 + max_identities
    StreamStats, and a StreamStats at most 2 HyperLogLogs (2 * 2**p bytes)
    and its tables of at most 3 * top_capacity entries (top_capacity once
    closed). Measured with full tables of capacity 1000 (5 tables): about
    0.9 MB per StreamStats, 0.5 MB once closed.
    """

    def __init__(
        self,
        window_seconds: float = 10.0,
        keep_windows: int = 6,
        config: StatsConfig | None = None,
        grace_seconds: float = 1.0,
        future_slack: float = 300.0,
        snapshot_max_age: float = SNAPSHOT_MAX_AGE,
    ) -> None:
        if not window_seconds > 0:
            raise ValueError(f"window_seconds must be > 0, got {window_seconds!r}")
        if keep_windows < 0:
            raise ValueError(f"keep_windows must be >= 0, got {keep_windows!r}")
        if grace_seconds < 0:
            raise ValueError(f"grace_seconds must be >= 0, got {grace_seconds!r}")
        self.window_seconds = float(window_seconds)
        self.keep_windows = keep_windows
        self.config = config or StatsConfig()
        self.grace_seconds = float(grace_seconds)
        self.future_slack = float(future_slack)
        self.snapshot_max_age = float(snapshot_max_age)
        self._version = 0  # changes with every batch: a snapshot of the same version is current
        self._lock = threading.Lock()
        self._reset_state(time.time())
        self._closed: deque[WindowView] = deque(maxlen=keep_windows)
        self._open: dict[int, _OpenWindow] = {}
        self._newest = -math.inf  # event clock: newest timestamp seen...
        self._newest_wall = 0.0  # ...and the wall time it was seen at
        self._watermark = -math.inf  # windows ending (with grace) before this are closed
        self._counts: Counter = Counter(dict.fromkeys(STORE_COUNTERS, 0))
        self._view_cache: tuple[int, float, StatsSnapshot] | None = None

    def _reset_state(self, now: float) -> None:
        self._cumulative = StatsSet(self.config)
        self._shared = False  # a snapshot holds _cumulative: copy before changing it
        self._outside = StatsSet(self.config)  # late and future records, folded in at the next close
        self._since = now

    # -- writer side ---------------------------------------------------------

    def add_batch(self, records: Sequence[dict], now: float | None = None) -> None:
        """Add a batch (any identities and times); ``now``: wall time."""
        if not records:
            return
        if now is None:
            now = time.time()
        window = self.window_seconds
        horizon = now + self.future_slack
        # Summaries are computed outside the lock: readers wait only for the
        # (cheaper) application to the accumulators.
        parts: list[tuple[int | None, str, BatchSummary]] = []
        newest = -math.inf
        future = 0
        for index, group in split_by_window(records, window):
            if (index + 1) * window > horizon:
                ahead = [rec for rec in group if rec["timestamp"] > horizon]
                group = [rec for rec in group if rec["timestamp"] <= horizon]
                future += len(ahead)
                for identity, sub in _by_identity(ahead):
                    parts.append((None, identity, summarize(sub, self.config)))
            for identity, sub in _by_identity(group):
                summary = summarize(sub, self.config)
                parts.append((index, identity, summary))
                if summary.last > newest:
                    newest = summary.last
        with self._lock:
            self._version += 1
            self._counts["records"] += len(records)
            if future:
                self._counts["future"] += future
            for index, identity, summary in parts:
                self._apply(index, identity, summary)
            if newest > self._newest:
                self._newest = newest
                self._newest_wall = now
                self._advance(newest)

    def _apply(self, index: int | None, identity: str, summary: BatchSummary) -> None:
        if index is None or (index + 1) * self.window_seconds + self.grace_seconds <= self._watermark:
            if index is not None:
                self._counts["late"] += sum(map(summary.counts.get, ("query", "response", "unanswered"), repeat(0)))
            self._outside.apply(identity, summary)
            return
        w = self._open.get(index)
        if w is None:
            w = self._open[index] = _OpenWindow(index, self.config)
        w.stats.apply(identity, summary)
        if w.since_reset is not None:
            w.since_reset.apply(identity, summary)

    def close_idle(self, now: float | None = None) -> None:
        """Advance the event clock by the wall time elapsed since the newest
        record and close the windows it passed (call it from a timer or at
        each bundle end)."""
        if now is None:
            now = time.time()
        with self._lock:
            if self._newest > -math.inf:
                self._advance(self._newest + max(0.0, now - self._newest_wall))

    def _advance(self, clock: float) -> None:
        if clock <= self._watermark:
            return
        self._watermark = clock
        window, grace = self.window_seconds, self.grace_seconds
        for index in sorted(self._open):
            if (index + 1) * window + grace <= clock:
                self._close(self._open.pop(index))

    def _close(self, w: _OpenWindow) -> None:
        self._version += 1
        if self._shared:
            self._cumulative = self._cumulative.copy()
            self._shared = False
        self._cumulative.merge(w.cumulative_part())
        if self._outside:
            self._cumulative.merge(self._outside)
            self._outside = StatsSet(self.config)
        stats = w.stats
        stats.freeze()
        self._closed.append(self._view(w.index, True, stats))
        self._counts["windows_closed"] += 1

    def _view(self, index: int, closed: bool, stats: StatsSet) -> WindowView:
        # Rounded to the microsecond: index * 0.1 is not exactly a tenth.
        w = self.window_seconds
        return WindowView(round(index * w, 6), round((index + 1) * w, 6), closed, stats)

    def reset(self) -> None:
        """Restart the cumulative statistics (windows are kept: they describe
        their own time span)."""
        with self._lock:
            self._view_cache = None
            self._version += 1
            self._reset_state(time.time())
            for w in self._open.values():
                w.since_reset = StatsSet(self.config)

    # -- reader side ---------------------------------------------------------

    def snapshot(self) -> StatsSnapshot:
        """A consistent view for readers: closed windows and the cumulative
        statistics are shared (they no longer change), open windows copied."""
        with self._lock:
            return self._snapshot()

    def _snapshot(self) -> StatsSnapshot:
        self._shared = True
        windows = list(self._closed)
        pending = []
        for index, w in sorted(self._open.items()):
            stats = w.stats.copy()
            windows.append(self._view(index, False, stats))
            pending.append(stats if w.since_reset is None else w.since_reset.copy())
        if self._outside:
            pending.append(self._outside.copy())
        return StatsSnapshot(self.window_seconds, self._since, self._cumulative, pending, windows, dict(self._counts))

    # -- what the HTTP API reads (pipeline/http_api.py StatsView) -------------

    def view(self, max_age: float | None = None) -> StatsSnapshot:
        """The last snapshot if nothing was added since, or if it is at most
        ``max_age`` seconds old (default ``snapshot_max_age``); else a new one.
        Reads lag the stream by at most that; reset() is seen at once."""
        if max_age is None:
            max_age = self.snapshot_max_age
        now = time.monotonic()
        cached = self._view_cache
        if cached is not None and (cached[0] == self._version or now - cached[1] <= max_age):
            return cached[2]
        with self._lock:
            snap = self._snapshot()
            self._view_cache = (self._version, now, snap)
        return snap

    def counters(self, stream: str | None = None) -> dict[str, Any]:
        """Cumulative counters, all streams (None) or one; KeyError if unknown."""
        return self.view().counters(stream)

    def tables(self, n: int, stream: str | None = None, domains: Iterable[str] | None = None) -> dict:
        """Cumulative top-n tables; KeyError for an unknown stream."""
        return self.view().tables(n, stream, domains)

    def windows(self, last: int, stream: str | None = None, n: int = 10, include_open: bool = False) -> list[dict]:
        """The ``last`` closed windows, oldest first (then the open ones if
        asked): {"start", "end", "closed", "counters", "tables" (top n)}.
        KeyError for a stream never seen; a stream silent in a window has
        zero counters there."""
        snap = self.view()
        if stream is not None and stream not in snap.cumulative.streams:
            raise KeyError(stream)
        out = []
        for w in snap.windows(last):
            if w.closed or include_open:
                stats = w.stats.total if stream is None else w.stats.streams.get(stream)
                if stats is None:
                    stats = StreamStats(self.config)
                out.append(
                    {
                        "start": w.start,
                        "end": w.end,
                        "closed": w.closed,
                        "counters": stats.counters(round(w.end - w.start, 6)),
                        "tables": stats.tables(n),
                    }
                )
        return out

    def store_counters(self) -> dict[str, int]:
        """records (added), windows_closed, late and future (counted in the
        cumulative statistics only, see the class docstring)."""
        with self._lock:
            return dict(self._counts)

    def streams(self) -> list[str]:
        """Names of the streams in the cumulative statistics (from view():
        the names counters() and tables() know)."""
        return self.view().streams()
