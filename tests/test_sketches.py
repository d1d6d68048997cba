"""HyperLogLog and Space-Saving: stated error bounds, merges, determinism."""

from __future__ import annotations

import hashlib
import math
import pickle
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core import sketches
from core.sketches import HyperLogLog, SpaceSaving

# -- HyperLogLog --------------------------------------------------------------


def _items(start: int, stop: int) -> list[str]:
    return [f"client-{i}.example." for i in range(start, stop)]


@pytest.mark.parametrize("n", [100_000, 1_000_000])
def test_hll_error_within_three_sigma(n):
    h = HyperLogLog(14)
    for i in range(0, n, 50_000):
        h.update(_items(i, min(n, i + 50_000)))
    sigma = 1.04 / math.sqrt(1 << 14)
    assert abs(h.count() - n) / n < 3 * sigma


@pytest.mark.parametrize("n", [0, 1, 10, 1000, 20_000])
def test_hll_small_counts_are_nearly_exact(n):
    h = HyperLogLog(14)
    h.update(_items(0, n))
    h.update(_items(0, n))  # repeats change nothing
    assert abs(h.count() - n) <= max(1, n * 0.01)


def test_hll_merge_is_the_union():
    a, b, union = HyperLogLog(12), HyperLogLog(12), HyperLogLog(12)
    a.update(_items(0, 30_000))
    b.update(_items(20_000, 60_000))
    union.update(_items(0, 60_000))
    a.merge(b)
    assert a.registers == union.registers
    assert a.count() == union.count()
    assert abs(a.count() - 60_000) / 60_000 < 3 * 1.04 / math.sqrt(1 << 12)


def test_hll_merge_needs_same_precision():
    with pytest.raises(ValueError):
        HyperLogLog(12).merge(HyperLogLog(14))
    with pytest.raises(ValueError):
        HyperLogLog(3)


def test_hll_hash_is_stable_md5():
    """The same registers in every process (no salted hash): the register and
    rank of an item come from its MD5."""
    h = HyperLogLog(10)
    h.add("www.example.com.")
    value = int.from_bytes(hashlib.md5(b"www.example.com.").digest(), "big")
    index = value >> (128 - 10)
    rank = 65 - (value & ((1 << 64) - 1)).bit_length()
    assert h.registers[index] == rank
    assert sum(1 for r in h.registers if r) == 1


def test_hll_pickle_and_copy():
    h = HyperLogLog(14)
    h.update(_items(0, 5000))
    again = pickle.loads(pickle.dumps(h))
    assert again.registers == h.registers and again.p == 14
    before = bytes(h.registers)
    c = h.copy()
    c.update(_items(5000, 10_000))
    assert bytes(h.registers) == before and c.count() > h.count()


def test_hll_cached_ranks_equal_fresh_ones(monkeypatch):
    """Items met again are answered from the cache: same registers as hashing."""
    items = _items(0, 3000)
    monkeypatch.setattr(sketches, "_CACHES", {})
    fresh = HyperLogLog.register_updates(items, 14)
    assert len(sketches._CACHES[14]) == 3000
    again = HyperLogLog.register_updates(list(reversed(items)), 14)
    mixed = HyperLogLog.register_updates(_items(2000, 4000), 14)
    assert again == fresh
    expected = {}
    for item in _items(2000, 4000):
        value = int.from_bytes(hashlib.md5(item.encode()).digest(), "big")
        index, rank = value >> (128 - 14), 65 - (value & ((1 << 64) - 1)).bit_length()
        expected[index] = max(expected.get(index, 0), rank)
    assert mixed == expected


def test_hll_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(sketches, "_CACHES", {})
    monkeypatch.setattr(sketches, "_CACHE_LIMIT", 500)
    cached = HyperLogLog(12)
    for i in range(0, 5000, 300):
        cached.update(_items(i, i + 300))
        assert len(sketches._CACHES[12]) <= 500
    monkeypatch.setattr(sketches, "_CACHES", {})
    monkeypatch.setattr(sketches, "_CACHE_LIMIT", 1 << 20)
    plain = HyperLogLog(12)
    plain.update(_items(0, 5100))
    assert cached.registers == plain.registers


def test_hll_odd_strings():
    h = HyperLogLog(8)
    h.update(["\udcff-lone-surrogate", "ünïcødé.", ""])
    assert h.count() == 3


# -- Space-Saving -------------------------------------------------------------

# Skewed streams: small key space with heavy hitters, weights mostly 1.
_keys = st.integers(min_value=0, max_value=60).map(lambda k: f"k{k * k % 61}")
_stream = st.lists(st.tuples(_keys, st.integers(min_value=1, max_value=5)), max_size=400)


def _feed(ss: SpaceSaving, stream, chunk: int) -> Counter:
    """Feed in batches (as the statistics do); return the true counts."""
    true: Counter = Counter()
    for i in range(0, len(stream), chunk):
        batch: Counter = Counter()
        for key, w in stream[i : i + chunk]:
            batch[key] += w
        ss.update(batch)
        true.update(batch)
    return true


def _check_guarantees(ss: SpaceSaving, true: Counter) -> None:
    total = sum(true.values())
    assert ss.total == total
    table = dict(ss.top())
    assert len(table) <= ss.capacity
    bound = total / ss.capacity
    for key, count in true.items():
        if count > bound:
            assert key in table, (key, count, bound)
    for key, est in table.items():
        assert true[key] <= est <= true[key] + bound
    if len(true) <= ss.capacity:
        assert table == dict(true)
        assert ss.exact


@settings(max_examples=200, deadline=None)
@given(_stream, st.integers(min_value=1, max_value=12), st.integers(min_value=1, max_value=40))
def test_space_saving_heavy_hitters(stream, capacity, chunk):
    ss = SpaceSaving(capacity)
    true = _feed(ss, stream, chunk)
    _check_guarantees(ss, true)


@settings(max_examples=200, deadline=None)
@given(_stream, _stream, st.integers(min_value=1, max_value=12), st.integers(min_value=1, max_value=40))
def test_space_saving_merge_keeps_the_guarantees(first, second, capacity, chunk):
    a, b = SpaceSaving(capacity), SpaceSaving(capacity)
    true = _feed(a, first, chunk) + _feed(b, second, chunk)
    a.merge(b)
    _check_guarantees(a, true)


def test_space_saving_merge_is_exact_when_it_fits():
    a, b, both = SpaceSaving(10), SpaceSaving(10), SpaceSaving(10)
    a.update({"x": 3, "y": 1})
    b.update({"y": 4, "z": 2})
    both.update({"x": 3, "y": 5, "z": 2})
    a.merge(b)
    assert a.top() == both.top() == [("y", 5), ("x", 3), ("z", 2)]


def test_space_saving_top_order_and_n():
    ss = SpaceSaving(10)
    ss.update({"b": 2, "a": 2, "c": 5})
    ss.add("d")
    assert ss.top() == [("c", 5), ("a", 2), ("b", 2), ("d", 1)]
    assert ss.top(2) == [("c", 5), ("a", 2)]
    assert ss.top(0) == [] and ss.top(-1) == []


def test_space_saving_long_tail_keeps_the_heavy_hitters_exact():
    """Heavy keys seen early stay exact however long the tail of one-off keys."""
    ss = SpaceSaving(50)
    for i in range(2000):
        ss.update({"heavy-1": 10, "heavy-2": 5, f"tail-{i}": 1, f"tail-{i}-b": 1})
    assert ss.top(2) == [("heavy-1", 20_000), ("heavy-2", 10_000)]
    assert len(ss) <= 3 * 50
    assert not ss.exact


def test_space_saving_reading_does_not_change_it():
    ss = SpaceSaving(3)
    for i in range(10):
        ss.update({f"k{i}": i + 1})
    state = pickle.dumps(ss)
    ss.top()
    ss.estimate("k9")
    assert pickle.dumps(ss) == state


def test_space_saving_pickle_and_copy():
    ss = SpaceSaving(4)
    for i in range(20):
        ss.update({f"k{i % 7}": i})
    again = pickle.loads(pickle.dumps(ss))
    assert again.top() == ss.top() and again.total == ss.total and again.floor == ss.floor
    before = ss.top()
    c = ss.copy()
    c.add("new", 100)
    assert ss.top() == before and c.top(1) == [("new", 100 + ss.floor)]


def test_space_saving_capacity_must_be_positive():
    with pytest.raises(ValueError):
        SpaceSaving(0)
