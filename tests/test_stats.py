"""StreamStats / StatsSet / StatsStore against a naive reference of 4.7.0's
counters and tables, on the unbound capture and on synthetic traffic."""

from __future__ import annotations

import pickle
import threading
import time

import pytest
from stats_data import (
    batches,
    capture_records,
    reference_counters,
    reference_tables,
    synthetic_records,
    top,
)

from core import stats as stats_mod
from core.stats import OTHER, StatsConfig, StatsSet, StatsStore, StreamStats, split_by_window

APPROX = ("clients", "domains")  # HyperLogLog: checked within its error
RATES = ("qps", "rps", "pps")


def assert_counters(ours: dict, expected: dict) -> None:
    for key in set(ours) | set(expected):
        if key in RATES:
            continue
        got, want = ours.get(key, 0), expected.get(key, 0)
        if key in APPROX:
            assert abs(got - want) <= max(2, 0.03 * want), (key, got, want)
        else:
            assert got == want, (key, got, want)


def assert_tables_exact(stats: StreamStats, records, n: int = 1000, lowercase: bool = False) -> None:
    ref = reference_tables(records, lowercase)
    t = stats.tables(n)
    for qr in ("query", "response"):
        assert t["tlds"][f"hit/{qr}"] == top(ref["tlds"][qr], n)
        assert t["rcodes"][f"hit/{qr}"] == top(ref["rcodes"][qr], n)
        assert t["rrtypes"][f"hit/{qr}"] == top(ref["rrtypes"][qr], n)
    assert set(t["domains"]) == set(ref["domains"])
    for name, counter in ref["domains"].items():
        assert t["domains"][name] == top(counter, n), name
    for name in ("hit/ip", "length/ip"):
        assert t["clients"][name] == top(ref["clients"][name], n)


# -- the capture --------------------------------------------------------------


@pytest.fixture(scope="module")
def capture():
    return capture_records()


def test_capture_counters_are_exact(capture):
    s = StreamStats()
    for batch in batches(capture, 512):
        s.add_batch(batch)
    c = s.counters()
    assert c["query"] == 1003 and c["response"] == 1003
    assert c["query/udp"] == 1003 and c["query/inet"] == 1003
    assert c["response/noerror"] == 602 and c["response/nxdomain"] == 401
    assert c["query/a"] == 503 and c["query/aaaa"] == 400 and c["query/mx"] == 100
    assert c["clients"] == 1
    assert sum(c[f"response/{b}"] for b in stats_mod.LATENCY_BUCKETS) == 1003  # every response matched
    assert_counters(c, reference_counters(capture))
    assert_tables_exact(s, capture)


def test_capture_tables_layout_is_4_7_0s(capture):
    s = StreamStats()
    s.add_batch(capture)
    t = s.tables(2)
    assert set(t) == {"tlds", "domains", "clients", "rcodes", "rrtypes"}
    assert t["rcodes"]["hit/response"] == [("response/noerror", 602), ("response/nxdomain", 401)]
    assert t["tlds"]["hit/query"] == [("query/test", 803), ("query/invalid", 200)]
    assert t["clients"] == {"hit/ip": [("127.0.0.1", 2006)], "length/ip": [("127.0.0.1", 105600)]}
    assert t["domains"]["noerror/query"][0] == ("www.example.test.", 201)
    # 4.7.0's default-top asks for these; an unknown one gives an empty list.
    asked = s.tables(3, domains=["noerror/query", "nxdomain/response", "servfail/query"])["domains"]
    assert list(asked) == ["noerror/query", "nxdomain/response", "servfail/query"]
    assert len(asked["nxdomain/response"]) == 3 and asked["servfail/query"] == []


def test_qps_over_the_given_seconds(capture):
    s = StreamStats()
    s.add_batch(capture)
    c = s.counters(qps_seconds=10)
    assert (c["qps"], c["rps"], c["pps"]) == (100.3, 100.3, 200.6)
    assert s.counters()["qps"] == 0


# -- synthetic traffic --------------------------------------------------------


@pytest.fixture(scope="module")
def traffic():
    return synthetic_records(6000, seed=3)


def test_synthetic_counters_and_tables_are_exact(traffic):
    s = StatsSet()
    for batch in batches(traffic, 128):
        s.add_batch(batch)
    assert_counters(s.total.counters(), reference_counters(traffic))
    assert_tables_exact(s.total, traffic)
    assert s.names() == ["ns1", "ns2", "ns3"]
    for name in s.names():
        mine = [r for r in traffic if r["identity"] == name]
        assert_counters(s.get(name).counters(), reference_counters(mine))
        assert_tables_exact(s.get(name), mine)


def test_latency_buckets_are_lower_inclusive():
    recs = synthetic_records(2, seed=1)
    s = StreamStats()
    for lat, bucket in [
        (-0.5, "latency0_1"),
        (0.0, "latency0_1"),
        (0.000999, "latency0_1"),
        (0.001, "latency1_10"),
        (0.05, "latency50_100"),
        (0.1, "latency100_1000"),
        (0.999, "latency100_1000"),
        (1.0, "latency_slow"),
    ]:
        rec = dict(recs[1], latency=lat, type="response")
        before = s.counters()[f"response/{bucket}"]
        s.add_batch([rec])
        assert s.counters()[f"response/{bucket}"] == before + 1, (lat, bucket)


def test_unanswered_and_unknown_values():
    base = synthetic_records(2, seed=2)[0]
    recs = [
        dict(base, type="unanswered"),
        dict(base, type="unanswered"),
        dict(base, qname="-", **{"query-ip": "-"}),
        dict(base, malformed=True),
    ]
    s = StreamStats()
    s.add_batch(recs)
    c = s.counters()
    assert c["unanswered"] == 2 and c["query"] == 2 and c["malformed"] == 1
    assert c["clients"] == 1 and c["domains"] == 1  # "-" is neither
    only = StreamStats()
    only.add_batch(recs[:2])
    assert only.counters()["unanswered"] == 2 and only.counters()["query"] == 0


def test_tld_field_from_normalisation_wins():
    base = synthetic_records(2, seed=2)[0]
    s = StreamStats()
    s.add_batch([dict(base, qname="www.example.co.uk.", tld="co.uk"), dict(base, qname="a.b.", tld="-")])
    assert s.tables(5)["tlds"]["hit/query"] == [("query/co.uk", 1)]


def test_qname_lowercase(traffic):
    # 0x20 randomisation: resolvers send the same name in mixed case.
    recs = traffic + [dict(r, qname=r["qname"].upper()) for r in traffic[:1000]]
    lower, asis = StreamStats(StatsConfig(qname_lowercase=True)), StreamStats()
    lower.add_batch(recs)
    asis.add_batch(recs)
    assert_counters(lower.counters(), reference_counters(recs, lowercase=True))
    assert_tables_exact(lower, recs, lowercase=True)
    assert_counters(asis.counters(), reference_counters(recs))
    assert lower.counters()["domains"] < asis.counters()["domains"]


def test_merge_equals_adding_everything(traffic):
    half = len(traffic) // 2
    a, b, both = StatsSet(), StatsSet(), StatsSet()
    a.add_batch(traffic[:half])
    b.add_batch(traffic[half:])
    for batch in batches(traffic, 200):
        both.add_batch(batch)
    a.merge(b)
    assert a.names() == both.names()
    for name in [None, *both.names()]:
        # HyperLogLog merges exactly: even the distinct counts are equal.
        assert a.get(name).counters() == both.get(name).counters()
        assert a.get(name).tables(1000) == both.get(name).tables(1000)


def test_merge_of_approximate_tables_keeps_heavy_hitters():
    recs = synthetic_records(8000, seed=5, names=5000, clients=3000)
    config = StatsConfig(top_capacity=20)
    parts = [StatsSet(config) for _ in range(4)]
    for i, batch in enumerate(batches(recs, 100)):
        parts[i % 4].add_batch(batch)
    merged = parts[0]
    for p in parts[1:]:
        merged.merge(p)
    ref = reference_tables(recs)
    table = dict(merged.total.tables(20)["clients"]["hit/ip"])
    n = sum(ref["clients"]["hit/ip"].values())
    for ip, count in ref["clients"]["hit/ip"].items():
        if count > n / 20:
            assert count <= table[ip] <= count + n / 20


def test_identities_are_bounded():
    recs = synthetic_records(400, seed=4, identities=tuple(f"id{i}" for i in range(10)))
    s = StatsSet(StatsConfig(max_identities=4))
    s.add_batch(recs)
    assert len(s.names()) == 5 and OTHER in s.names()
    assert sum(s.get(n).counters()["query"] for n in s.names()) == s.total.counters()["query"]
    kept = [n for n in s.names() if n != OTHER]
    folded = [r for r in recs if r["identity"] not in kept]
    assert_counters(s.get(OTHER).counters(), reference_counters(folded))


def test_rrtype_and_rcode_names_are_bounded(monkeypatch):
    monkeypatch.setattr(stats_mod, "MAX_RRTYPES", 3)
    base = synthetic_records(2, seed=2)[0]
    s = StreamStats()
    s.add_batch([dict(base, rrtype=f"TYPE{i}") for i in range(10)])
    c = s.counters()
    assert c["query/rrtype-other"] == 7
    assert sum(1 for k in c if k.startswith("query/type")) == 3


def test_pickle_round_trip(traffic):
    s = StatsSet()
    s.add_batch(traffic)
    again = pickle.loads(pickle.dumps(s))
    assert again.total.counters() == s.total.counters()
    assert again.get("ns2").tables(10) == s.get("ns2").tables(10)


def test_split_by_window():
    recs = [{"timestamp": t} for t in (10.5, 19.99, 20.0, 9.0, 35.0)]
    assert split_by_window(recs, 10) == [
        (0, [recs[3]]),
        (1, [recs[0], recs[1]]),
        (2, [recs[2]]),
        (3, [recs[4]]),
    ]
    same = recs[:2]
    assert split_by_window(same, 10) == [(1, same)]


# -- StatsStore ---------------------------------------------------------------

T0 = 1_700_000_000.0  # a multiple of 10: window boundaries fall on round numbers


def _store(**kw) -> StatsStore:
    kw.setdefault("window_seconds", 10)
    kw.setdefault("keep_windows", 3)
    kw.setdefault("grace_seconds", 0)
    return StatsStore(**kw)


def test_windows_close_when_the_clock_passes_them():
    recs = synthetic_records(6000, seed=6, start=T0, rate=100.0)  # 60 s: 6 windows
    st = _store(grace_seconds=2)
    now = T0 + 1000
    for batch in batches(recs, 50):
        st.add_batch(batch, now=now)
    snap = st.snapshot()
    windows = snap.windows()
    # 3 kept closed windows (of the 5 closed), then the open last one.
    assert [w.closed for w in windows] == [True, True, True, False]
    assert [w.start for w in windows] == [T0 + 20, T0 + 30, T0 + 40, T0 + 50]
    assert st.store_counters()["windows_closed"] == 5
    for w in windows:
        mine = [r for r in recs if w.start <= r["timestamp"] < w.end]
        assert_counters(w.counters(), reference_counters(mine))
        assert w.counters()["qps"] == round(sum(r["type"] == "query" for r in mine) / 10, 3)
        if w.closed:
            assert isinstance(w.stats.total.clients, int)  # sketches dropped: bounded memory
    assert snap.windows(last=1)[0].start == T0 + 40
    # Cumulative: everything, open window included; rates of the last closed window.
    assert_counters(snap.counters(), reference_counters(recs))
    assert snap.counters()["qps"] == windows[2].counters()["qps"]
    assert snap.streams() == ["ns1", "ns2", "ns3"]
    assert_counters(snap.counters("ns2"), reference_counters([r for r in recs if r["identity"] == "ns2"]))
    with pytest.raises(KeyError):
        snap.counters("nope")


def test_close_idle_follows_the_wall_clock():
    recs = synthetic_records(500, seed=7, start=T0, rate=100.0)  # [T0, T0 + 5)
    st = _store(grace_seconds=1)
    st.add_batch(recs, now=T0 + 5)  # the newest record, T0 + 4.99, arrives at wall time T0 + 5
    st.close_idle(T0 + 10)  # event clock T0 + 9.99: still open
    assert [w.closed for w in st.snapshot().windows()] == [False]
    st.close_idle(T0 + 12)  # T0 + 11.99 > end + grace
    assert [w.closed for w in st.snapshot().windows()] == [True]


def test_late_and_future_records_count_only_cumulatively():
    st = _store()
    first = synthetic_records(1000, seed=8, start=T0, rate=100.0)  # [T0, T0 + 10)
    st.add_batch(first, now=T0 + 100)
    st.add_batch(synthetic_records(10, seed=9, start=T0 + 25, rate=100.0), now=T0 + 100)  # closes T0's window
    late = synthetic_records(100, seed=10, start=T0 + 5, rate=100.0)
    future = synthetic_records(10, seed=11, start=T0 + 100 + 400, rate=100.0)
    st.add_batch(late + future, now=T0 + 100)
    counts = st.store_counters()
    assert counts["late"] == sum(r["type"] in ("query", "response", "unanswered") for r in late)
    assert counts["future"] == 10
    snap = st.snapshot()
    assert [w.start for w in snap.windows()] == [T0, T0 + 20]
    assert snap.windows()[0].counters()["query"] == sum(r["type"] == "query" for r in first)
    everything = first + synthetic_records(10, seed=9, start=T0 + 25, rate=100.0) + late + future
    assert_counters(snap.counters(), reference_counters(everything))


def test_reset_restarts_the_cumulative_statistics_only():
    recs = synthetic_records(3000, seed=12, start=T0, rate=100.0)  # 30 s
    st = _store()
    st.add_batch(recs[:1500], now=T0)  # T0 .. T0 + 15: window T0 closed, T0 + 10 open
    st.reset()
    assert st.snapshot().counters()["query"] == 0
    st.add_batch(recs[1500:], now=T0)
    snap = st.snapshot()
    assert_counters(snap.counters(), reference_counters(recs[1500:]))
    # The windows still describe their whole time span.
    w = {w.start: w for w in snap.windows()}
    assert w[T0 + 10].counters()["query"] == sum(r["type"] == "query" for r in recs[1000:2000])
    st.close_idle(time.time() + 10_000)
    assert_counters(st.snapshot().counters(), reference_counters(recs[1500:]))


def test_snapshots_do_not_change_afterwards():
    recs = synthetic_records(3000, seed=13, start=T0, rate=100.0)
    st = _store()
    st.add_batch(recs[:1000], now=T0)
    snap = st.snapshot()
    before = (snap.counters(), [w.counters() for w in snap.windows()])
    st.add_batch(recs[1000:], now=T0)  # closes windows, folds into the cumulative
    st.reset()
    assert (snap.counters(), [w.counters() for w in snap.windows()]) == before


def test_keep_windows_bounds_memory():
    st = _store(keep_windows=2)
    recs = synthetic_records(5000, seed=14, start=T0, rate=50.0)  # 100 s: 10 windows
    for batch in batches(recs, 100):
        st.add_batch(batch, now=T0)
    st.close_idle(time.time() + 10_000)
    snap = st.snapshot()
    assert len(snap.windows()) == 2 and all(w.closed for w in snap.windows())
    assert st.store_counters()["windows_closed"] == 10


def test_store_is_thread_safe():
    recs = synthetic_records(20_000, seed=15, start=T0, rate=500.0)  # 40 s
    st = _store(keep_windows=10)
    errors: list[BaseException] = []
    done = threading.Event()

    def reader() -> None:
        try:
            while not done.is_set():
                snap = st.snapshot()
                c = snap.counters()
                assert c["query"] + c["response"] + c["unanswered"] <= len(recs)
                for w in snap.windows():
                    w.counters()
                    w.tables(5)
                snap.tables(5)
                st.streams()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for batch in batches(recs, 200):
            st.add_batch(batch, now=T0)
    finally:
        done.set()
        for t in threads:
            t.join()
    assert not errors, errors[0]
    st.close_idle(time.time() + 10_000)
    assert_counters(st.snapshot().counters(), reference_counters(recs))


def test_store_reads_for_the_http_api():
    recs = synthetic_records(3000, seed=16, start=T0, rate=100.0)  # 30 s
    recs += synthetic_records(10, seed=17, start=T0 + 25, rate=100.0, identities=("late-joiner",))
    st = _store()
    st.add_batch(recs, now=T0)
    c = st.counters()
    assert_counters(c, reference_counters(recs))
    assert st.counters() is not c and st.view() is st.view()  # one snapshot per second
    assert st.streams() == ["late-joiner", "ns1", "ns2", "ns3"]
    assert st.tables(3, "ns1")["domains"]["hit/query"] == st.view().tables(3, "ns1")["domains"]["hit/query"]
    with pytest.raises(KeyError):
        st.counters("nope")
    with pytest.raises(KeyError):
        st.windows(5, "nope")
    windows = st.windows(5)
    assert [w["start"] for w in windows] == [T0, T0 + 10] and all(w["closed"] for w in windows)
    assert windows[-1]["counters"]["qps"] == round(sum(r["type"] == "query" for r in recs[1000:2000]) / 10, 3)
    assert set(windows[0]["tables"]) == {"tlds", "domains", "clients", "rcodes", "rrtypes"}
    assert len(windows[0]["tables"]["clients"]["hit/ip"]) <= 10
    # A stream silent in a window has zero counters there.
    assert [w["counters"]["query"] for w in st.windows(5, "late-joiner")] == [0, 0]
    assert [w["closed"] for w in st.windows(1, include_open=True)] == [True, False]
    st.reset()
    assert st.counters()["query"] == 0  # reset is visible at once


def test_store_reads_share_one_snapshot_for_a_while():
    first = synthetic_records(100, seed=18, start=T0)
    more = synthetic_records(100, seed=19, start=T0 + 1)
    queries = sum(r["type"] == "query" for r in first)
    lagging = _store(snapshot_max_age=3600)
    lagging.add_batch(first, now=T0)
    assert lagging.counters()["query"] == queries
    lagging.add_batch(more, now=T0)
    assert lagging.counters()["query"] == queries  # the same snapshot, within max age
    assert lagging.view(max_age=0).counters()["query"] == queries + sum(r["type"] == "query" for r in more)
    fresh = _store(snapshot_max_age=0)
    fresh.add_batch(first, now=T0)
    assert fresh.counters()["query"] == queries
    view = fresh.view()
    assert fresh.view() is view  # nothing added since: no new snapshot
    fresh.add_batch(more, now=T0)
    assert fresh.view() is not view
