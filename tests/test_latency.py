"""Query/response latency matching: core/latency.py and transforms/latency.py."""

from __future__ import annotations

import time
from pathlib import Path

import apache_beam as beam
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.util import assert_that
from hypothesis import given, settings
from hypothesis import strategies as st

from core import counters
from core.batches import RecordBatch
from core.framestream import ReaderSession
from core.latency import COUNTER_NAMES, LatencyMatcher
from core.message import FIELDS, DnstapRecord, decode
from pipeline.config import LatencyOptions
from transforms.latency import MatchLatency

CAPTURES = Path(__file__).parent / "data" / "captures"


def _rec(message: str = "CLIENT_QUERY", ts: float = 100.0, **fields) -> DnstapRecord:
    rec = DnstapRecord(FIELDS)
    rec.raw = b"raw"
    rec.update(
        {
            "message": message,
            "type": "query" if message.endswith("QUERY") else "response",
            "timestamp": ts,
            "identity": "ns1",
            "query-ip": "192.0.2.1",
            "query-port": 40000,
            "id": 4242,
            "qname": "www.example.test.",
        }
    )
    for name, value in fields.items():
        rec[name.replace("_", "-")] = value
    return rec


def _resp(ts: float = 100.0, message: str = "CLIENT_RESPONSE", **fields) -> DnstapRecord:
    return _rec(message, ts, **fields)


def _matcher(timeout: float = 10.0, max_entries: int = 1000, emit: bool = True) -> LatencyMatcher:
    return LatencyMatcher(timeout=timeout, max_entries=max_entries, emit_unanswered=emit)


# --- the real capture ---------------------------------------------------------


def _capture(name: str) -> list[DnstapRecord]:
    frames: list = []
    ReaderSession().receive((CAPTURES / name).read_bytes(), frames)
    return [decode(f) for f in frames]


@pytest.mark.parametrize("batch_size", [2006, 512, 7, 1])
def test_unbound_client_responses_all_get_latency(batch_size):
    records = _capture("unbound-tcp.fstrm")
    responses = [r for r in records if r["message"] == "CLIENT_RESPONSE"]
    assert len(responses) == 1003
    assert all(r["latency"] == "-" and r["query-time"] is None for r in responses)
    m = _matcher()
    out = []
    for i in range(0, len(records), batch_size):
        out += m.process(RecordBatch(records[i : i + batch_size]))
    assert out == records  # nothing added, order kept
    assert all(isinstance(r["latency"], float) and r["latency"] >= 0 for r in responses)
    assert responses[0]["latency"] == round(1795936917.09115 - 1795936917.091122, 6)
    assert m.counters == {"matched": 1003}
    assert len(m) == 0
    assert m.flush(None) == [] and m.counters["unanswered"] == 0


# --- keys ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "part, other",
    [
        ("identity", "ns2"),
        ("query_ip", "192.0.2.2"),
        ("query_port", 40001),
        ("id", 4243),
        ("qname", "www.example.test2."),
        ("message", "RESOLVER_RESPONSE"),  # same family of types, other pair
    ],
)
def test_every_key_part_must_match(part, other):
    m = _matcher()
    fields = {part: other}
    message = fields.pop("message", "CLIENT_RESPONSE")
    resp = _resp(100.5, message, **fields)
    m.process([_rec(ts=100.0), resp])
    assert resp["latency"] == "-"
    assert m.counters == {"late": 1}
    assert len(m) == 1
    same = _resp(100.25)
    m.process([same])
    assert same["latency"] == 0.25 and len(m) == 0


@pytest.mark.parametrize(
    "query, response",
    [
        ("AUTH_QUERY", "AUTH_RESPONSE"),
        ("RESOLVER_QUERY", "RESOLVER_RESPONSE"),
        ("FORWARDER_QUERY", "FORWARDER_RESPONSE"),
        ("STUB_QUERY", "STUB_RESPONSE"),
        ("TOOL_QUERY", "TOOL_RESPONSE"),
        ("UPDATE_QUERY", "UPDATE_RESPONSE"),
    ],
)
def test_each_message_pair(query, response):
    m = _matcher()
    r = _resp(100.125, response)
    m.process([_rec(query, 100.0), r])
    assert r["latency"] == 0.125


def test_identities_are_kept_apart():
    m = _matcher()
    r1, r2 = _resp(100.3, identity="a"), _resp(100.4, identity="b")
    m.process([_rec(ts=100.0, identity="a"), _rec(ts=100.2, identity="b"), r2, r1])
    assert r1["latency"] == 0.3 and r2["latency"] == 0.2
    assert m.counters == {"matched": 2}


def test_identity_unknown_is_still_a_key():
    m = _matcher()
    r = _resp(100.1, identity="-")
    m.process([_rec(identity="-"), r])
    assert r["latency"] == 0.1


@pytest.mark.parametrize(
    "fields",
    [
        {"id": "-"},
        {"qname": "-"},
        {"query_ip": "-"},
        {"query_port": "-"},
        {"message": "-"},
        {"ts": 0.0},
    ],
)
def test_unkeyed_records_are_not_cached(fields):
    fields = dict(fields)
    q = _rec(fields.pop("message", "CLIENT_QUERY"), fields.pop("ts", 100.0), **fields)
    m = _matcher()
    m.process([q])
    assert len(m) == 0 and m.counters == {"unkeyed": 1}


# --- timeout, unanswered ------------------------------------------------------


def test_unanswered_after_timeout_is_emitted_once():
    m = _matcher(timeout=10)
    q = _rec(ts=100.0)
    assert m.process([q]) == [q]
    other = _rec(ts=110.0, id=1)  # exactly at the timeout: still waiting
    assert m.process([other]) == [other] and len(m) == 2
    trigger = _rec(ts=110.5, id=2)
    out = m.process(RecordBatch([trigger]))
    assert isinstance(out, RecordBatch)
    assert len(out) == 2 and out[0] is trigger
    unanswered = out[1]
    assert unanswered is not q and isinstance(unanswered, DnstapRecord)
    assert unanswered["type"] == "unanswered" and unanswered["latency"] == "-"
    assert unanswered.raw == b"raw"
    assert {k: v for k, v in unanswered.items() if k != "type"} == {k: v for k, v in q.items() if k != "type"}
    assert q["type"] == "query"  # the original, already passed on, is not touched
    assert m.counters["unanswered"] == 1
    late = _resp(111.0)
    assert m.process([late]) == [late]  # not emitted again; its response is late
    assert late["latency"] == "-" and m.counters["late"] == 1
    assert [r["id"] for r in m.flush(None)] == [1, 2]

    assert m.flush(None) == [] and m.counters["unanswered"] == 3


def test_unanswered_copy_of_a_plain_record_is_plain():
    m = _matcher(timeout=10)
    q = dict(_rec(ts=100.0))  # decoded without keep_raw
    m.process([q])
    (unanswered,) = m.process([_rec(ts=111.0, id=3)])[1:]
    assert type(unanswered) is dict and unanswered["type"] == "unanswered"
    assert q["type"] == "query"


def test_unanswered_copy_is_taken_on_arrival():
    m = _matcher(timeout=1)
    q = _rec(ts=100.0)
    m.process([q])
    q["query-ip"] = "192.0.2.0"  # a later step (e.g. privacy) changing the original in place
    (unanswered,) = m.flush(None)
    assert unanswered["query-ip"] == "192.0.2.1"


def test_unanswered_counted_but_not_emitted_when_disabled():
    m = _matcher(timeout=10, emit=False)
    m.process([_rec(ts=100.0)])
    trigger = _rec(ts=111.0, id=1)
    assert m.process([trigger]) == [trigger]
    assert m.flush(None) == []
    assert m.counters == {"unanswered": 2}


def test_response_after_timeout_is_late():
    m = _matcher(timeout=10)
    r = _resp(110.001)
    out = m.process([_rec(ts=100.0), r])
    assert r["latency"] == "-"
    assert [x["type"] for x in out] == ["query", "response", "unanswered"]
    assert m.counters == {"unanswered": 1, "late": 1}


def test_flush_expires_by_the_given_clock():
    m = _matcher(timeout=10)
    m.process([_rec(ts=100.0), _rec(ts=105.0, id=1)])
    assert m.flush(109.0) == []
    assert [r["id"] for r in m.flush(112.0)] == [4242]
    assert len(m) == 1
    assert [r["id"] for r in m.flush(None)] == [1]
    assert len(m) == 0 and m.counters == {"unanswered": 2}
    assert m.newest == 105.0  # flush does not move the event clock


# --- bound, duplicates, late, order --------------------------------------------


def test_eviction_at_max_entries_is_counted_never_unanswered():
    m = _matcher(max_entries=2)
    m.process([_rec(ts=100.0, id=1), _rec(ts=100.1, id=2), _rec(ts=100.2, id=3)])
    assert len(m) == 2 and m.counters == {"evicted": 1}
    r1, r3 = _resp(100.3, id=1), _resp(100.4, id=3)
    m.process([r1, r3])
    assert r1["latency"] == "-" and r3["latency"] == 0.2
    assert [r["id"] for r in m.flush(None)] == [2]
    assert m.counters == {"evicted": 1, "late": 1, "matched": 1, "unanswered": 1}


def test_duplicate_query_overwrites_and_moves_to_the_end():
    m = _matcher(max_entries=2, timeout=10)
    m.process([_rec(ts=100.0), _rec(ts=100.5, id=1), _rec(ts=101.0)])
    assert m.counters == {"duplicate": 1}
    # the renewed query went to the end: the other one is the oldest now
    m.process([_rec(ts=101.2, id=2)])
    r, r1 = _resp(101.5), _resp(101.6, id=1)
    m.process([r, r1])
    assert r["latency"] == 0.5 and r1["latency"] == "-"
    assert m.counters == {"duplicate": 1, "evicted": 1, "matched": 1, "late": 1}


def test_response_with_latency_set_forgets_its_query():
    m = _matcher()
    r = _resp(100.5, latency=0.25, query_time=100.25)
    m.process([_rec(ts=100.0), r])
    assert r["latency"] == 0.25  # the dnstap times win
    assert len(m) == 0 and m.counters == {"matched": 1}
    alone = _resp(101.0, latency=0.1)
    m.process([alone])
    assert m.counters == {"matched": 1}  # needed no matching: not late


def test_late_response_without_query():
    m = _matcher()
    r = _resp(100.0)
    assert m.process([r]) == [r]
    assert r["latency"] == "-" and m.counters == {"late": 1}


def test_out_of_order_arrival_within_timeout_still_matches():
    m = _matcher(timeout=1)
    q1, q2 = _rec(ts=100.000, id=1), _rec(ts=100.002, id=2)
    r1, r2 = _resp(100.001, id=1), _resp(100.003, id=2)
    m.process([q2, r2, r1, q1])  # r1 before q1: late, q1 waits
    assert r1["latency"] == "-" and r2["latency"] == 0.001
    assert m.counters == {"matched": 1, "late": 1} and len(m) == 1
    r1["latency"] = "-"
    m = _matcher(timeout=1)
    m.process([q2, q1, r2, r1])
    assert r1["latency"] == 0.001 and r2["latency"] == 0.001


def test_response_older_than_its_query_gives_negative_latency():
    m = _matcher()
    r = _resp(100.2)
    m.process([_rec(ts=100.5), r])
    assert r["latency"] == -0.3


def test_bad_arguments():
    with pytest.raises(ValueError):
        LatencyMatcher(0, 10, False)
    with pytest.raises(ValueError):
        LatencyMatcher(1.0, 0, False)


# --- properties -----------------------------------------------------------------

# Few keys, each differing from the first in one part, so that queries and
# responses meet often.
_CQ, _RQ = ("CLIENT_QUERY", "CLIENT_RESPONSE"), ("RESOLVER_QUERY", "RESOLVER_RESPONSE")
_KEYS = st.sampled_from(
    [
        ("a", "192.0.2.1", 1, 7, "x.test.", _CQ),
        ("b", "192.0.2.1", 1, 7, "x.test.", _CQ),
        ("a", "2001:db8::1", 1, 7, "x.test.", _CQ),
        ("a", "192.0.2.1", 2, 7, "x.test.", _CQ),
        ("a", "192.0.2.1", 1, 8, "x.test.", _CQ),
        ("a", "192.0.2.1", 1, 7, "y.test.", _CQ),
        ("a", "192.0.2.1", 1, 7, "x.test.", _RQ),
    ]
)
_EVENTS = st.lists(
    st.tuples(
        st.sampled_from(["query", "response", "response-with-latency", "unkeyed"]),
        _KEYS,
        st.floats(-1.0, 2.0),  # time step: out of order sometimes
    ),
    max_size=80,
)


def _records(events) -> list[DnstapRecord]:
    records, ts = [], 1000.0
    for seq, (kind, (identity, ip, port, qid, qname, (qmsg, rmsg)), step) in enumerate(events):
        ts = round(ts + step, 6)
        fields = dict(identity=identity, query_ip=ip, query_port=port, id=qid, qname=qname, extra=seq)
        if kind == "query":
            records.append(_rec(qmsg, ts, **fields))
        elif kind == "unkeyed":
            records.append(_rec(qmsg, ts, **{**fields, "id": "-"}))
        else:
            rec = _resp(ts, rmsg, **fields)
            if kind == "response-with-latency":
                rec["latency"] = 0.5
            records.append(rec)
    return records


def _key(rec) -> tuple:
    pair = rec["message"].split("_")[0]
    return (rec["identity"], rec["query-ip"], rec["query-port"], rec["id"], rec["qname"], pair)


@settings(max_examples=300, deadline=None)
@given(
    events=_EVENTS,
    cuts=st.lists(st.integers(0, 80), max_size=10),
    timeout=st.sampled_from([0.5, 2.0, 5.0]),
    max_entries=st.integers(1, 6),
    emit=st.booleans(),
)
def test_properties(events, cuts, timeout, max_entries, emit):
    records = _records(events)
    m = _matcher(timeout=timeout, max_entries=max_entries, emit=emit)
    bounds = sorted({0, len(records), *(c for c in cuts if c < len(records))})
    out: list = []
    for start, end in zip(bounds, bounds[1:]):
        out += m.process(RecordBatch(records[start:end]))
        assert len(m) <= max_entries  # the memory bound
    emitted = [r for r in out if r["type"] == "unanswered"]
    assert [r for r in out if r["type"] != "unanswered"] == records

    # latency equals response time - time of the latest query of its key
    last_query: dict = {}
    for rec in records:
        if rec["type"] == "query" and rec["id"] != "-":
            last_query[_key(rec)] = rec["timestamp"]
        elif rec["type"] == "response" and rec["latency"] not in ("-", 0.5):
            assert rec["latency"] == round(rec["timestamp"] - last_query[_key(rec)], 6)

    # conservation: every keyed query is matched, unanswered, evicted, overwritten or waiting
    queries = sum(1 for r in records if r["type"] == "query" and r["id"] != "-")
    c = m.counters
    assert set(c) <= set(COUNTER_NAMES)
    assert queries == c["matched"] + c["unanswered"] + c["evicted"] + c["duplicate"] + len(m)
    assert c["unkeyed"] == sum(1 for r in records if r["id"] == "-")
    assert c["late"] == sum(1 for r in records if r["type"] == "response" and r["latency"] == "-")
    emitted += m.flush(None)
    assert len(m) == 0
    assert queries == c["matched"] + c["unanswered"] + c["evicted"] + c["duplicate"]
    # each unanswered query reported exactly once, and only when asked to
    seqs = [r["extra"] for r in emitted]
    assert len(seqs) == len(set(seqs))
    assert len(emitted) == (c["unanswered"] if emit else 0)


@settings(max_examples=200, deadline=None)
@given(events=_EVENTS, max_entries=st.integers(1, 4))
def test_batching_does_not_change_the_result(events, max_entries):
    """Expiry is checked per record, so batch boundaries make no difference
    (but to where the unanswered records go: the end of their batch)."""
    one, each = _records(events), _records(events)
    m1 = _matcher(timeout=2.0, max_entries=max_entries)
    out1 = m1.process(RecordBatch(one))
    m2 = _matcher(timeout=2.0, max_entries=max_entries)
    out2: list = []
    for rec in each:
        out2 += m2.process(RecordBatch([rec]))
        assert len(m2) <= max_entries
    assert m1.counters == m2.counters
    for kept in (lambda r: r["type"] != "unanswered", lambda r: r["type"] == "unanswered"):
        assert list(filter(kept, out1)) == list(filter(kept, out2))


# --- Beam -------------------------------------------------------------------------


def _run(batches, options: LatencyOptions, check) -> dict:
    p = beam.Pipeline(runner=FnApiRunner())
    out = p | beam.Create(batches, reshuffle=False) | MatchLatency(options)
    assert_that(out, check)
    result = p.run()
    result.wait_until_finish()
    counts = result.metrics().query(MetricsFilter().with_namespace("dnstap_receiver"))["counters"]
    return {c.key.metric.name: c.committed for c in counts}


def _flat(batches) -> list[tuple]:
    return sorted((r["id"], r["type"], r["latency"]) for batch in batches for r in batch)


def test_beam_match_latency_live():
    """Times close to wall time: the idle queries expire at the bundle end."""
    t0 = time.time() - 60
    batches = [
        RecordBatch([_rec(ts=t0, id=1), _rec(ts=t0 + 0.001, id=2)]),
        RecordBatch([_resp(t0 + 0.0025, id=1), _resp(t0 + 0.003, id=9)]),
    ]

    def check(actual):
        assert all(isinstance(b, RecordBatch) for b in actual)
        assert _flat(actual) == [
            (1, "query", "-"),
            (1, "response", 0.0025),
            (2, "query", "-"),
            (2, "unanswered", "-"),  # emitted from finish_bundle
            (9, "response", "-"),
        ]

    group = counters.counter_group("latency")
    before = dict(group)
    counts = _run(batches, LatencyOptions(timeout=10.0, unanswered=True), check)
    assert counts == {"latency_matched": 1, "latency_unanswered": 1, "latency_late": 1}
    # the in-process worker also feeds the periodic counters line
    assert {k: group[k] - before.get(k, 0) for k in group if group[k] != before.get(k, 0)} == {
        "matched": 1,
        "unanswered": 1,
        "late": 1,
    }


def test_beam_replay_of_old_capture_keeps_waiting():
    """Old capture: wall time is far ahead, so no wall-clock expiry."""
    records = _capture("unbound-tcp.fstrm")
    batches = [RecordBatch(records[i : i + 500]) for i in range(0, len(records), 500)]
    batches.append(RecordBatch([_rec(ts=1_700_000_000.0, id=1)]))  # never answered

    def check(actual):
        flat = [r for b in actual for r in b]
        assert len(flat) == len(records) + 1
        latencies = [r["latency"] for r in flat if r["message"] == "CLIENT_RESPONSE"]
        assert len(latencies) == 1003 and all(isinstance(x, float) and x >= 0 for x in latencies)

    counts = _run(batches, LatencyOptions(unanswered=True), check)
    assert counts == {"latency_matched": 1003}


def test_beam_disabled_is_a_pass_through():
    r = _resp(100.5)

    def check(actual):
        assert [x["latency"] for b in actual for x in b] == ["-", "-"]

    counts = _run([RecordBatch([_rec(ts=100.0), r])], LatencyOptions(enable=False), check)
    assert counts == {}
