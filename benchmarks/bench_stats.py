#!/usr/bin/env python3
"""Statistics benchmark: bounded memory and exact heavy hitters at scale.

Feeds N synthetic records (default 10,000,000; 2,000,000 distinct qnames,
500,000 distinct clients) in batches of 512 through a StatsStore (10 s
windows of event time at 50,000 messages/s, the last 6 kept; cumulative and
per identity, 4 identities in runs of 128 records) and reports:
- the cost per message of the statistics (generation excluded),
- RSS sampled along the run (it should stay flat),
- the top 10 domains and clients against the exact answer,
- the distinct clients and domains (HyperLogLog) against the truth.

Traffic: half of the records draw their qname and client from a Zipf law
(exponent 1) over all names/clients, so the first ranks are clear heavy
hitters; the other half walk through every name and every client in a
shuffled order, so that all 2,000,000 names and 500,000 clients appear.
Records are generated lazily, chunk by chunk; only the exact counts of the
first 10,000 Zipf ranks and two bitmaps of the names/clients seen are kept
for the exact answer.

    .venv/bin/python benchmarks/bench_stats.py [--messages N] [--names N] [--clients N]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from core.stats import StatsConfig, StatsStore  # noqa: E402

BATCH = 512
STEP = 2e-5  # seconds of event time between two records: 50,000 messages/s
EXACT_RANKS = 10_000
IDENTITIES = ("ns1", "ns2", "ns3", "ns4")
RRTYPES = ("A", "AAAA", "A", "AAAA", "MX", "TXT", "HTTPS", "A")
TLDS = ("com", "net", "org", "de", "fr", "uk", "io", "test")


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def qname(i: int) -> str:
    return f"h{i}.d{i % 50_000}.{TLDS[i % len(TLDS)]}."


def client(i: int) -> str:
    return f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"


class Traffic:
    """Lazily generated records, plus the exact answers."""

    def __init__(self, messages: int, names: int, clients: int, seed: int = 1, walk: float = 0.5) -> None:
        self.messages, self.names, self.clients = messages, names, clients
        self.walk = walk  # fraction of the records that walk through every name and client
        self.rng = np.random.default_rng(seed)
        self.name_cdf = self._zipf_cdf(names)
        self.client_cdf = self._zipf_cdf(clients)
        self.name_order = self.rng.permutation(names)
        self.client_order = self.rng.permutation(clients)
        self.name_hits = np.zeros(EXACT_RANKS, dtype=np.int64)  # exact counts, ranks < EXACT_RANKS
        self.client_hits = np.zeros(EXACT_RANKS, dtype=np.int64)
        self.names_seen = np.zeros(names, dtype=bool)
        self.clients_seen = np.zeros(clients, dtype=bool)
        self.query_names = 0  # name hits of queries only, for the "noerror/query" table

    @staticmethod
    def _zipf_cdf(n: int) -> np.ndarray:
        weights = 1.0 / np.arange(1, n + 1)
        cdf = np.cumsum(weights)
        return cdf / cdf[-1]

    def batches(self, start_time: float) -> Iterator[list[dict]]:
        rng = self.rng
        chunk = BATCH * 64
        walked = 0
        for base in range(0, self.messages, chunk):
            size = min(chunk, self.messages - base)
            heavy = rng.random(size) >= self.walk
            n_heavy = int(heavy.sum())
            n_walk = size - n_heavy
            names = np.empty(size, dtype=np.int64)
            clients = np.empty(size, dtype=np.int64)
            names[heavy] = np.searchsorted(self.name_cdf, rng.random(n_heavy))
            clients[heavy] = np.searchsorted(self.client_cdf, rng.random(n_heavy))
            walk = np.arange(walked, walked + n_walk)
            walked += n_walk
            names[~heavy] = self.name_order[walk % self.names]
            clients[~heavy] = self.client_order[walk % self.clients]
            names = np.minimum(names, self.names - 1)
            clients = np.minimum(clients, self.clients - 1)
            # Queries and responses alternate; a response repeats its query's name and client.
            is_query = (np.arange(base, base + size) % 2) == 0
            self.names_seen[names] = True
            self.clients_seen[clients] = True
            # Exact counts of the head ranks: queries only for domains (the
            # noerror/query table), queries and responses for clients.
            qn = names[is_query & (names < EXACT_RANKS)]
            self.name_hits += np.bincount(qn, minlength=EXACT_RANKS)
            self.client_hits += np.bincount(clients[clients < EXACT_RANKS], minlength=EXACT_RANKS)
            # Several servers share a batch in runs (one socket read each).
            idents = np.repeat(rng.integers(0, len(IDENTITIES), size // 128 + 1), 128)[:size]
            rr = rng.integers(0, len(RRTYPES), size)
            lat = rng.exponential(0.02, size)
            records = []
            append = records.append
            for j in range(size):
                query = bool(is_query[j])
                name = int(names[j])
                append(
                    {
                        "timestamp": start_time + (base + j) * STEP,
                        "identity": IDENTITIES[idents[j]],
                        "type": "query" if query else "response",
                        "family": "INET",
                        "protocol": "UDP" if j % 16 else "TCP",
                        "query-ip": client(int(clients[j])),
                        "length": 40 + (name & 31) if query else 120 + (name & 127),
                        "rcode": "NOERROR" if query or name % 10 else "NXDOMAIN",
                        "qname": qname(name),
                        "rrtype": RRTYPES[rr[j]],
                        "latency": "-" if query else float(lat[j]),
                        "malformed": False,
                    }
                )
                if len(records) == BATCH:
                    yield records
                    records = []
                    append = records.append
            if records:
                yield records


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=10_000_000)
    parser.add_argument("--names", type=int, default=2_000_000)
    parser.add_argument("--clients", type=int, default=500_000)
    parser.add_argument("--walk", type=float, default=0.5, help="fraction of records walking every name/client")
    parser.add_argument("--samples", type=int, default=20, help="RSS samples along the run")
    args = parser.parse_args()

    traffic = Traffic(args.messages, args.names, args.clients, walk=args.walk)
    store = StatsStore(window_seconds=10.0, keep_windows=6, config=StatsConfig(top_capacity=1000))
    start_time = time.time() - args.messages * STEP - 60  # event time ends a minute ago
    rss_start = rss_mb()
    every = max(1, args.messages // BATCH // args.samples)
    samples: list[tuple[int, float]] = []
    spent = 0.0
    done = 0
    wall = time.perf_counter()
    for i, batch in enumerate(traffic.batches(start_time)):
        t0 = time.perf_counter()
        store.add_batch(batch)
        spent += time.perf_counter() - t0
        done += len(batch)
        if i % every == every - 1:
            samples.append((done, rss_mb()))
    t0 = time.perf_counter()
    store.close_idle(time.time() + 3600)
    snap = store.snapshot()
    top_domains = snap.tables(10, domains=["noerror/query"])["domains"]["noerror/query"]
    top_clients = snap.tables(10)["clients"]["hit/ip"]
    counters = snap.counters()
    spent += time.perf_counter() - t0
    wall = time.perf_counter() - wall

    print(f"messages {done:,}  statistics {spent:.1f} s = {spent / done * 1e6:.2f} us/message  (run {wall:.0f} s)")
    print(f"windows closed {store.store_counters()['windows_closed']}, kept {len(snap.windows())}")
    print("\nRSS (MB) along the run")
    print(f"  before the run: {rss_start:.0f}")
    for n, rss in samples:
        print(f"  {n:>12,} messages: {rss:.0f}")

    exact_names = sorted(((int(c), r) for r, c in enumerate(traffic.name_hits)), key=lambda x: (-x[0], x[1]))[:10]
    exact_clients = sorted(((int(c), r) for r, c in enumerate(traffic.client_hits)), key=lambda x: (-x[0], x[1]))[:10]
    print("\ntop 10 domains (noerror/query)       sketch     exact")
    same = 0
    for (name, est), (count, rank) in zip(top_domains, exact_names):
        ok = name == qname(rank) and est == count
        same += ok
        expected = qname(rank) if name != qname(rank) else ""
        print(f"  {name:<32} {est:>9,} {count:>9,}  {expected}{'' if ok else ' DIFFERS'}")
    print(f"  {same}/10 equal (name and count)")
    print("\ntop 10 clients (hit/ip)               sketch     exact")
    same_c = 0
    for (ip, est), (count, rank) in zip(top_clients, exact_clients):
        ok = ip == client(rank) and est == count
        same_c += ok
        print(f"  {ip:<32} {est:>9,} {count:>9,}{'' if ok else ' DIFFERS'}")
    print(f"  {same_c}/10 equal (name and count)")

    true_domains = int(traffic.names_seen.sum())
    true_clients = int(traffic.clients_seen.sum())
    print("\ndistinct      HyperLogLog       true   error")
    for label, est, true in (
        ("domains", counters["domains"], true_domains),
        ("clients", counters["clients"], true_clients),
    ):
        print(f"  {label:<9} {est:>12,} {true:>10,}  {100 * (est - true) / true:+.2f} %")
    print(f"  (stated standard error 1.04/sqrt(2^14) = {104 / 128:.2f} %)")
    # The first windows_kept windows fill up first; after that RSS must stay put.
    second_half = [rss for n, rss in samples if n >= done // 2]
    spread = max(second_half) - min(second_half) if second_half else float("nan")
    print(f"\nqueries {counters['query']:,} responses {counters['response']:,}")
    low, high = min(second_half), max(second_half)
    print(f"RSS over the second half of the run: {low:.0f}-{high:.0f} MB (spread {spread:.1f} MB)")
    return 0 if same == 10 and same_c == 10 else 1


if __name__ == "__main__":
    sys.exit(main())
