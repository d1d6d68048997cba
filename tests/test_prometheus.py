"""Prometheus metrics (pipeline/prometheus.py): the exposition text parsed back with
prometheus_client's parser, and scraped by a real Prometheus server."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import peers
import pytest
from fake_stats import GLOBAL_QUERIES, FakeStatsView
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pipeline.http_api import ApiServer
from pipeline.prometheus import StatsCollector, new_registry

METRICS_DOC = Path(__file__).resolve().parent.parent / "pipeline" / "METRICS.md"
ODD_IDENTITY = 'dns "01"\\east\nrack'  # quote, backslash, newline: all escaped in label values


def exposition(view: FakeStatsView) -> str:
    return generate_latest(new_registry(view)).decode()


def families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(text: str, name: str) -> dict:
    """sample labels (as a sorted tuple of items) -> value, for the samples called ``name``."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


@pytest.fixture
def view() -> FakeStatsView:
    return FakeStatsView()


@pytest.fixture
def text(view) -> str:
    return exposition(view)


def test_global_and_per_identity_values(text):
    queries = samples(text, "dnstap_queries_total")
    assert queries == {(): GLOBAL_QUERIES, (("identity", "unbound"),): 1000, (("identity", "dnsdist01"),): 3}
    assert samples(text, "dnstap_clients") == {(): 3, (("identity", "unbound"),): 3, (("identity", "dnsdist01"),): 1}
    assert samples(text, "dnstap_qps")[(("identity", "unbound"),)] == 25.5
    assert samples(text, "dnstap_queries_bytes_total")[()] == 56000


def test_labelled_counters(text):
    rcodes = samples(text, "dnstap_responses_rcode_total")
    assert rcodes[(("rcode", "nxdomain"),)] == 198
    assert rcodes[(("identity", "dnsdist01"), ("rcode", "servfail"))] == 3
    assert rcodes[(("rcode", "3841"),)] == 0  # an unknown rcode, as a number
    assert rcodes[(("identity", "unbound"), ("rcode", "other"))] == 1  # past the store's cap
    assert samples(text, "dnstap_queries_rrtype_total")[(("rrtype", "other"),)] == 2
    rrtypes = samples(text, "dnstap_queries_rrtype_total")
    assert rrtypes[(("identity", "unbound"), ("rrtype", "aaaa"))] == 300
    assert rrtypes[(("rrtype", "type65280"),)] == 0
    family = samples(text, "dnstap_queries_family_total")
    assert family[(("family", "inet6"),)] == 10
    assert family[(("family", "inet6"), ("identity", "dnsdist01"))] == 0  # always there, 0 when unseen
    protocol = samples(text, "dnstap_responses_protocol_total")
    assert protocol[(("protocol", "doh"),)] == 5
    assert protocol[(("identity", "dnsdist01"), ("protocol", "udp"))] == 0
    assert (("identity", "dnsdist01"), ("protocol", "doh")) not in protocol  # others only when seen
    # tlds ("query/test") are not metrics: unbounded label values.
    values = {v for f in text_string_to_metric_families(text) for s in f.samples for v in s.labels.values()}
    assert "test" not in values


def test_malformed_and_unanswered_when_the_store_counts_them(text):
    assert samples(text, "dnstap_malformed_total") == {(): 2, (("identity", "unbound"),): 2}
    assert samples(text, "dnstap_unanswered_total") == {(): 4, (("identity", "unbound"),): 4}
    assert "x_store_extra" not in text


def test_latency_histogram_is_cumulative(text):
    buckets = samples(text, "dnstap_responses_latency_seconds_bucket")
    unbound = {dict(k)["le"]: v for k, v in buckets.items() if ("identity", "unbound") in k}
    assert unbound == {"0.001": 900, "0.01": 950, "0.05": 970, "0.1": 980, "1.0": 995, "+Inf": 998}
    assert samples(text, "dnstap_responses_latency_seconds_count")[(("identity", "unbound"),)] == 998
    assert families(text)["dnstap_responses_latency_seconds"].type == "histogram"


def test_receiver_counters(text):
    assert samples(text, "dnstap_receiver_input_frames_total") == {(): 2006}
    assert samples(text, "dnstap_receiver_input_blocked_seconds_total") == {(): 1.25}
    assert samples(text, "dnstap_receiver_decode_malformed_total") == {(): 2}
    assert samples(text, "dnstap_receiver_decode_undecodable_total") == {(): 1}
    assert samples(text, "dnstap_receiver_filter_message_type_total") == {(): 4}
    assert samples(text, "dnstap_receiver_output_file_dropped_total") == {(): 0}
    assert samples(text, "dnstap_receiver_input_errors_total") == {(("reason", "FrameTooLarge"),): 1}
    active = families(text)["dnstap_receiver_input_active"]
    assert active.type == "gauge" and active.samples[0].value == 2


def test_every_counter_family_ends_with_total(text):
    typed = re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE)
    kinds = Counter(kind for _, kind in typed)
    assert kinds["counter"] > 20 and kinds["gauge"] >= 5 and kinds["histogram"] == 1
    for name, kind in typed:
        if kind == "counter":
            assert name.endswith("_total"), name
        else:
            assert not name.endswith("_total"), name
    for family in text_string_to_metric_families(text):
        if family.type == "counter":
            assert all(s.name.endswith("_total") for s in family.samples), family.name


def test_help_and_type_once_per_family_with_several_identities(view):
    view.per_stream[ODD_IDENTITY] = {"query": 7.0}
    view.per_stream["third"] = {"query": 1.0}
    text = exposition(view)
    helps = Counter(re.findall(r"^# HELP (\S+) ", text, re.MULTILINE))
    types = Counter(re.findall(r"^# TYPE (\S+) ", text, re.MULTILINE))
    assert helps and set(helps.values()) == {1}
    assert types and set(types.values()) == {1}
    assert set(helps) == set(types)
    # Each family's samples follow its TYPE line, none elsewhere.
    assert len(families(text)) == len(types)
    assert len(samples(text, "dnstap_queries_total")) == 5


def test_label_values_are_escaped(view):
    view.per_stream[ODD_IDENTITY] = {"query": 7.0}
    text = exposition(view)
    assert 'identity="dns \\"01\\"\\\\east\\nrack"' in text
    assert samples(text, "dnstap_queries_total")[(("identity", ODD_IDENTITY),)] == 7


def test_metrics_of_an_empty_store():
    text = exposition(FakeStatsView(streams={}))
    assert samples(text, "dnstap_queries_total") == {(): 0}
    assert samples(text, "dnstap_responses_latency_seconds_count") == {(): 0}


def test_a_stream_reset_while_scraping_is_skipped(view):
    class Racy(FakeStatsView):
        def counters(self, stream=None):
            if stream == "dnsdist01":
                raise KeyError(stream)
            return super().counters(stream)

    racy = Racy()
    text = exposition(racy)
    assert (("identity", "dnsdist01"),) not in samples(text, "dnstap_queries_total")


def test_own_registry_not_the_global_one(view):
    before = generate_latest(REGISTRY)
    a, b = new_registry(view), new_registry(view)  # a second one does not clash with the first
    assert not view.calls  # registering does not read the store
    assert generate_latest(a) == generate_latest(b)
    assert b"dnstap_" not in generate_latest(REGISTRY) and b"dnstap_" not in before
    assert list(StatsCollector(view).collect())


def test_every_metric_is_documented(text):
    doc = METRICS_DOC.read_text()
    for name in {n for n, _ in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE)}:
        if name.startswith("dnstap_receiver_"):
            continue  # one generic row per group, the names follow the counter names
        assert f"`{name}`" in doc, name


# --------------------------------------------------------------------------- real Prometheus


@pytest.mark.integration
def test_real_prometheus_scrapes_the_api(tmp_path):
    peers.require("prometheus")
    view = FakeStatsView()
    api = ApiServer(view, address="127.0.0.1", port=0, api_key="k3y", login="scraper", password="S3cret pass")
    api.start()
    try:
        found, targets, logs = peers.prometheus_scrape(
            tmp_path, api.port, "scraper", "S3cret pass", "dnstap_queries_total",
            lambda values: values.get(None) == GLOBAL_QUERIES,
        )
    finally:
        api.stop()
    assert found.get(None) == GLOBAL_QUERIES, f"query returned {found}\ntargets: {targets}\nprometheus log:\n{logs}"
    assert found == {None: GLOBAL_QUERIES, "unbound": 1000, "dnsdist01": 3}
    (target,) = targets["data"]["activeTargets"]
    assert target["health"] == "up" and target["lastError"] == ""
    # The scrapes went through Basic auth (without it the target would be down with a 401).
    assert ("receiver_counters",) in view.calls
