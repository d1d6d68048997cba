"""Records for the statistics tests: the unbound capture, synthetic traffic,
and a naive reference implementation of 4.7.0's counters and tables."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

from core.batches import RecordBatch
from core.framestream import ReaderSession
from core.latency import LatencyMatcher
from core.message import FIELDS, DnstapRecord, decode

CAPTURES = Path(__file__).resolve().parent / "data" / "captures"

RCODES = ("NOERROR", "NOERROR", "NOERROR", "NXDOMAIN", "SERVFAIL", "REFUSED")
RRTYPES = ("A", "AAAA", "MX", "TXT", "HTTPS", "TYPE65280")
PROTOCOLS = ("UDP", "UDP", "UDP", "TCP", "DOT", "DOH", "DOQ")
LATENCIES = (0.0, 0.0009, 0.001, 0.005, 0.01, 0.02, 0.05, 0.07, 0.1, 0.5, 1.0, 3.0, -0.002)


def capture_records(name: str = "unbound-tcp.fstrm", match_latency: bool = True) -> list[DnstapRecord]:
    """The decoded capture; responses get their latency from their query
    (unbound's CLIENT_RESPONSE carries no query time)."""
    frames: list[bytes] = []
    ReaderSession().receive((CAPTURES / name).read_bytes(), frames)
    records = [decode(f) for f in frames]
    if match_latency:
        records = list(LatencyMatcher(10.0, 100_000, False).process(records))
    return records


def synthetic_records(
    n: int,
    seed: int = 1,
    start: float = 1_700_000_000.0,
    rate: float = 1000.0,
    identities: tuple[str, ...] = ("ns1", "ns2", "ns3"),
    names: int = 300,
    clients: int = 200,
    jitter: float = 0.0,
) -> list[DnstapRecord]:
    """``n`` records, ``rate`` per second of event time from ``start``
    (shuffled by up to ``jitter`` seconds), skewed over names and clients,
    with every field the statistics read and a few oddities: unanswered
    copies, malformed messages, unknown qname/client, IPv6, mixed case."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        query = i % 2 == 0
        name = min(int(rng.paretovariate(1.0)) - 1, names - 1)
        ip = min(int(rng.paretovariate(1.2)) - 1, clients - 1)
        rec = DnstapRecord(FIELDS)
        ts = start + i / rate + (rng.uniform(-jitter, jitter) if jitter else 0.0)
        inet6 = ip % 7 == 0
        rec.update(
            {
                "timestamp": ts,
                "identity": rng.choice(identities),
                "type": "query" if query else "response",
                "message": "CLIENT_QUERY" if query else "CLIENT_RESPONSE",
                "family": "INET6" if inet6 else "INET",
                "protocol": rng.choice(PROTOCOLS),
                "query-ip": f"2001:db8::{ip:x}"
                if inet6
                else f"192.0.2.{ip % 256}"
                if ip < 256
                else f"198.51.{ip // 256}.{ip % 256}",
                "length": rng.randint(30, 90) if query else rng.randint(40, 600),
                "rcode": "NOERROR" if query else rng.choice(RCODES),
                "qname": (f"host{name}.Example{name % 13}.{('com', 'net', 'org', 'co.uk', 'test')[name % 5]}."),
                "rrtype": rng.choice(RRTYPES),
                "latency": "-" if query else rng.choice(LATENCIES),
            }
        )
        roll = rng.random()
        if roll < 0.01:
            rec["malformed"] = True
            rec["qname"] = "-"
        elif roll < 0.02:
            rec["query-ip"] = "-"
        elif roll < 0.03 and query:
            rec["type"] = "unanswered"
        out.append(rec)
    return out


def batches(records: list, size: int = 100) -> list[RecordBatch]:
    return [RecordBatch(records[i : i + size]) for i in range(0, len(records), size)]


# -- reference: plain loops over the records, 4.7.0's rules -------------------

BUCKETS = (
    (0.001, "latency0_1"),
    (0.010, "latency1_10"),
    (0.050, "latency10_50"),
    (0.100, "latency50_100"),
    (1.000, "latency100_1000"),
)


def reference_counters(records, lowercase: bool = False) -> dict:
    c: Counter = Counter()
    clients, domains = set(), set()
    for r in records:
        qr = r["type"]
        if qr == "unanswered":
            c["unanswered"] += 1
            continue
        if qr not in ("query", "response"):
            continue
        c[qr] += 1
        c[f"{qr}/bytes"] += r["length"]
        c[f"{qr}/{r['family'].lower()}"] += 1
        c[f"{qr}/{r['protocol'].lower()}"] += 1
        c[f"{qr}/{r['rcode'].lower()}"] += 1
        c[f"{qr}/{r['rrtype'].lower()}"] += 1
        if r["malformed"]:
            c["malformed"] += 1
        lat = r["latency"]
        if isinstance(lat, float):
            for bound, name in BUCKETS:
                if lat < bound:
                    c[f"{qr}/{name}"] += 1
                    break
            else:
                c[f"{qr}/latency_slow"] += 1
        if r["query-ip"] != "-":
            clients.add(r["query-ip"])
        if r["qname"] != "-":
            domains.add(r["qname"].lower() if lowercase else r["qname"])
    out = dict(c)
    out["clients"] = len(clients)
    out["domains"] = len(domains)
    # "<qr>/<tld>" as 4.7.0, unless a counter above has that name.
    base = {f"{qr}/{k}" for qr in ("query", "response") for k in ("inet", "inet6", "udp", "tcp")}
    base |= {f"response/{name}" for _, name in BUCKETS} | {"response/latency_slow"}
    for counter in reference_tables(records, lowercase)["tlds"].values():
        for key, n in counter.items():
            if key not in out and key not in base:
                out[key] = n
    return out


def reference_tables(records, lowercase: bool = False) -> dict:
    """Exact Counters of every table (4.7.0's key formats)."""
    tlds = {"query": Counter(), "response": Counter()}
    rcodes = {"query": Counter(), "response": Counter()}
    rrtypes = {"query": Counter(), "response": Counter()}
    domains: dict[str, Counter] = {}
    hits, length = Counter(), Counter()
    for r in records:
        qr = r["type"]
        if qr not in ("query", "response"):
            continue
        rcodes[qr][f"{qr}/{r['rcode'].lower()}"] += 1
        rrtypes[qr][f"{qr}/{r['rrtype'].lower()}"] += 1
        if r["query-ip"] != "-":
            hits[r["query-ip"]] += 1
            length[r["query-ip"]] += r["length"]
        qname = r["qname"]
        if qname != "-":
            qname = qname.lower() if lowercase else qname
            domains.setdefault(f"{r['rcode'].lower()}/{qr}", Counter())[qname] += 1
            domains.setdefault(f"hit/{qr}", Counter())[qname] += 1
            tld = r["tld"] if "tld" in r else qname.rstrip(".").rpartition(".")[2].lower()
            if tld:
                tlds[qr][f"{qr}/{tld}"] += 1
    return {
        "tlds": tlds,
        "rcodes": rcodes,
        "rrtypes": rrtypes,
        "domains": domains,
        "clients": {"hit/ip": hits, "length/ip": length},
    }


def top(counter: Counter, n: int) -> list[tuple]:
    return sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))[:n]
