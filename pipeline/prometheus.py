"""Prometheus metrics of the statistics store and of the receiver's own counters.

A custom collector reads a :class:`~pipeline.http_api.StatsView` at each scrape and
builds one metric family per name, with one sample per identity (label ``identity``) plus
the global value *without* the label, as 4.7.0 did. Sum a family with
``sum(dnstap_queries_total{identity!=""})`` or read the global series with
``dnstap_queries_total{identity=""}``: a sum over every series would count twice. The global
series is needed at all because distinct clients and domains do not add up over streams.
Every metric is listed in ``pipeline/METRICS.md``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import TYPE_CHECKING

import dns.rcode
import dns.rdatatype
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

if TYPE_CHECKING:  # http_api imports this module
    from pipeline.http_api import StatsView

__all__ = ["LATENCY_BUCKETS", "RECEIVER_GAUGES", "StatsCollector", "new_registry"]

# counter name -> (family, type, help). Always exported (0 when the store has no value yet),
# so that rate() has a starting point.
_FIXED: dict[str, tuple[str, str, str]] = {
    "query": ("dnstap_queries", "counter", "DNS queries received"),
    "response": ("dnstap_responses", "counter", "DNS responses received"),
    "query/bytes": ("dnstap_queries_bytes", "counter", "Bytes of DNS query messages received"),
    "response/bytes": ("dnstap_responses_bytes", "counter", "Bytes of DNS response messages received"),
    "qps": ("dnstap_qps", "gauge", "Queries per second over the last second"),
    "rps": ("dnstap_rps", "gauge", "Responses per second over the last second"),
    "pps": ("dnstap_pps", "gauge", "Queries and responses per second over the last second"),
    "clients": ("dnstap_clients", "gauge", "Distinct client addresses since start or reset"),
    "domains": ("dnstap_domains", "gauge", "Distinct query names since start or reset"),
}
# Exported only when the store counts them (new in this receiver).
_OPTIONAL: dict[str, tuple[str, str, str]] = {
    "malformed": ("dnstap_malformed", "counter", "Messages whose DNS payload could not be fully parsed"),
    "unanswered": ("dnstap_unanswered", "counter", "Queries not answered within the latency timeout"),
}
_DIRECTIONS = {"query": "queries", "response": "responses"}
# Labelled counters: label -> values always exported (the others when the store has them).
_FAMILIES = ("inet", "inet6")
_PROTOCOLS = ("udp", "tcp")
_MORE_PROTOCOLS = frozenset({"dot", "doh", "doq", "dnscryptudp", "dnscrypttcp"})  # when seen
_RCODES = frozenset(r.name.lower() for r in dns.rcode.Rcode)
_RRTYPES = frozenset(t.name.lower() for t in dns.rdatatype.RdataType)
# 4.7.0's latency counters are the buckets of a histogram: each counts latencies in
# (previous bound, bound], so the cumulative sums are Prometheus' "le" buckets.
LATENCY_BUCKETS = (
    ("latency0_1", "0.001"),
    ("latency1_10", "0.01"),
    ("latency10_50", "0.05"),
    ("latency50_100", "0.1"),
    ("latency100_1000", "1.0"),
    ("latency_slow", "+Inf"),
)
_LATENCY_NAMES = frozenset(name for name, _ in LATENCY_BUCKETS)
# Receiver counters that go down as well as up.
RECEIVER_GAUGES = frozenset({"active", "buffered", "connected"})
# HELP texts: "group.name" first, then "name" (the same name in several groups).
_RECEIVER_HELP = {
    "latency.matched": "Waiting queries answered (latency matching)",
    "latency.unanswered": "Queries expired without a response",
    "latency.evicted": "Queries pushed out of the full latency cache",
    "latency.duplicate": "Queries that replaced a waiting query with the same key",
    "latency.unkeyed": "Messages without the fields needed to match query and response",
    "latency.late": "Responses needing a latency whose query was not waiting",
    "geoip.lookups": "GeoIP lookups",
    "geoip.cache_hits": "GeoIP lookups answered from the cache",
    "geoip.invalid": "Client addresses GeoIP could not parse",
    "geoip.private": "Private or reserved client addresses (no GeoIP lookup)",
    "geoip.not_found": "Client addresses not in the GeoIP database",
    "geoip.errors": "GeoIP lookup errors",
    "privacy.invalid_address": "Addresses privacy could not parse",
    "records": "Messages processed",
    "frames": "Frame Streams data frames received",
    "bytes": "Bytes received (input) or written (output)",
    "connections": "Connections accepted",
    "active": "Connections open now",
    "refused": "Connections refused by the access control list",
    "batches": "Batches of frames handed to the pipeline",
    "protocol_errors": "Connections closed on a Frame Streams protocol error",
    "errors": "Errors (by reason when labelled)",
    "partial_frames_dropped": "Half-received frames dropped at disconnect",
    "closed_without_stop": "Connections closed without a STOP frame",
    "ignored_controls": "Unknown control frames ignored",
    "blocked_seconds": "Seconds the input spent blocked by back-pressure",
    "blocked_episodes": "Times the input was blocked by back-pressure",
    "input.feed_dropped": "Frames dropped by an input that cannot be paused (sniffer) while the pipeline was behind",
    "input.client_attempts": "tcp-client connection attempts",
    "input.client_connects": "Connections the tcp-client made",
    "input.client_connect_errors": "tcp-client connection attempts that failed",
    "input.sniffer.packets": "Packets captured by the sniffer",
    "input.sniffer.dns_messages": "DNS messages the sniffer turned into dnstap messages",
    "input.sniffer.kernel_drops": "Packets the sniffer's capture ring had no room for",
    "input.sniffer.malformed": "Captured packets with a bad IP/UDP/TCP header or a DNS payload shorter than a header",
    "input.sniffer.fragments": "IP fragments captured",
    "input.sniffer.fragments_reassembled": "IP datagrams put back together from fragments",
    "input.sniffer.fragments_dropped": "IP fragments that made no datagram (overlapping, timed out, not DNS, over the bounds)",
    "input.sniffer.foreign": "DNS messages between addresses that are not in eth-ip",
    "input.kafka.messages": "Kafka messages read",
    "input.kafka.records": "Records read from Kafka and passed on",
    "input.kafka.batches": "Batches of Kafka records passed on",
    "input.kafka.invalid": "Kafka values that are not records, skipped",
    "input.kafka.commits": "Kafka offset commits",
    "input.kafka.commit_errors": "Kafka offset commits that failed (a later one carries the offset)",
    "input.kafka.outages": "Kafka broker outages",
    "input.kafka.rewound": "Kafka messages below the read position after a log truncation",
    "decoded": "dnstap messages decoded",
    "malformed": "Messages whose DNS payload could not be fully parsed",
    "undecodable": "Frames that were not a decodable dnstap message, skipped",
    "kept": "Messages kept by the filters",
    "dropped": "Messages dropped",
    "lines": "Lines written",
    "queued": "Messages queued for a network output",
    "delivered": "Messages a network output delivered",
    "resent": "Messages a network output sent again after a failure",
    "send_errors": "Failed sends of a network output (connection lost)",
    "connect_errors": "Failed connection attempts of a network output",
    "connects": "Connections made by a network output",
    "buffered": "Messages a network output holds (queued or in flight)",
    "connected": "1 while a network output is connected",
}


def _metric_name(text: str) -> str:
    """A metric name component: "output.file" -> "output_file", "message-type" -> "message_type"."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", text).strip("_").lower()


class _Families:
    """Metric families by name, so that each gets one HELP/TYPE whatever the identities."""

    def __init__(self) -> None:
        self._by_name: dict[str, Metric] = {}

    def _family(self, name: str, kind: str, doc: str) -> Metric:
        family = self._by_name.get(name)
        if family is None:
            family = self._by_name[name] = Metric(name, doc, kind)
        return family

    def add(self, name: str, kind: str, doc: str, labels: dict[str, str], value: float) -> None:
        sample = f"{name}_total" if kind == "counter" else name
        self._family(name, kind, doc).add_sample(sample, labels, float(value))

    def add_histogram(self, name: str, doc: str, labels: dict[str, str], buckets: list[tuple[str, float]]) -> None:
        # No _sum: 4.7.0's bucket counters do not keep the sum of latencies. Prometheus
        # accepts that; histogram_quantile() needs only the buckets.
        family = self._family(name, "histogram", doc)
        total = 0.0
        for le, count in buckets:
            total += count
            family.add_sample(f"{name}_bucket", {**labels, "le": le}, total)
        family.add_sample(f"{name}_count", labels, total)

    def __iter__(self) -> Iterator[Metric]:
        return iter(sorted(self._by_name.values(), key=lambda f: f.name))


def _stream_metrics(out: _Families, counters: dict[str, float], labels: dict[str, str]) -> None:
    for key, (name, kind, doc) in _FIXED.items():
        out.add(name, kind, doc, labels, counters.get(key, 0))
    for key, (name, kind, doc) in _OPTIONAL.items():
        if key in counters:
            out.add(name, kind, doc, labels, counters[key])
    for qr, plural in _DIRECTIONS.items():
        for family in _FAMILIES:
            out.add(f"dnstap_{plural}_family", "counter", f"DNS {plural} by socket family",
                    {**labels, "family": family}, counters.get(f"{qr}/{family}", 0))
        for protocol in _PROTOCOLS:
            out.add(f"dnstap_{plural}_protocol", "counter", f"DNS {plural} by transport protocol",
                    {**labels, "protocol": protocol}, counters.get(f"{qr}/{protocol}", 0))
    for key, value in counters.items():
        qr, _, what = key.partition("/")
        plural = _DIRECTIONS.get(qr)
        if plural is None:
            continue
        if what in _MORE_PROTOCOLS:
            out.add(f"dnstap_{plural}_protocol", "counter", f"DNS {plural} by transport protocol",
                    {**labels, "protocol": what}, value)
        elif what in _RCODES or what.isdigit() or what == "rcode-other":  # unknown rcodes are numbers
            out.add(f"dnstap_{plural}_rcode", "counter", f"DNS {plural} by rcode",
                    {**labels, "rcode": what.removeprefix("rcode-")}, value)
        elif what in _RRTYPES or re.fullmatch(r"type[0-9]+", what) or what == "rrtype-other":
            # "other": the store's bucket for names past its cap on distinct rcodes/rrtypes
            out.add(f"dnstap_{plural}_rrtype", "counter", f"DNS {plural} by question type",
                    {**labels, "rrtype": what.removeprefix("rrtype-")}, value)
        # Other names (tlds) are not exported: unbounded label values; /tables has them.
    out.add_histogram(
        "dnstap_responses_latency_seconds",
        "Response latency (response time minus query time), seconds",
        labels,
        [(le, float(counters.get(f"response/{name}", 0))) for name, le in LATENCY_BUCKETS],
    )


def _receiver_metrics(out: _Families, groups: dict[str, dict]) -> None:
    for group, values in groups.items():
        prefix = f"dnstap_receiver_{_metric_name(group)}"
        for key, value in values.items():
            name = _metric_name(key)
            if isinstance(value, dict):
                # "errors_by_reason": {"FrameTooLarge": 2} -> ..._errors_total{reason="FrameTooLarge"}
                base, _, label = name.partition("_by_")
                doc = _receiver_help(group, base)
                for sub, count in value.items():
                    if _is_number(count):
                        out.add(f"{prefix}_{base}", "counter", doc, {label or "key": str(sub)}, count)
            elif _is_number(value):
                kind = "gauge" if key in RECEIVER_GAUGES else "counter"
                doc = _receiver_help(group, name)
                out.add(f"{prefix}_{name}", kind, doc, {}, value)


def _receiver_help(group: str, name: str) -> str:
    text = _RECEIVER_HELP.get(f"{group}.{name}") or _RECEIVER_HELP.get(name)
    if text:
        return text
    if group == "filter":
        return f"Messages dropped by the filter step {name}"
    return f"Receiver counter {group}.{name}"


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class StatsCollector:
    """prometheus_client collector: reads the view afresh at every scrape."""

    def __init__(self, view: StatsView) -> None:
        self._view = view

    def collect(self) -> Iterator[Metric]:
        out = _Families()
        _stream_metrics(out, self._view.counters(None), {})
        for stream in self._view.streams():
            try:
                counters = self._view.counters(stream)
            except KeyError:
                continue  # reset between streams() and counters()
            _stream_metrics(out, counters, {"identity": stream})
        _receiver_metrics(out, self._view.receiver_counters())
        return iter(out)

    def describe(self) -> list[Metric]:
        return []  # names depend on the data; and register() must not read the view


def new_registry(view: StatsView) -> CollectorRegistry:
    """A registry of its own (not prometheus_client's global one, which holds the Python
    process metrics and would refuse a second server's collector)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatsCollector(view))
    return registry
