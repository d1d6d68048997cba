"""Query/response latency matching in bounded memory (engine-free).

Some servers send responses without the query time (unbound's CLIENT_RESPONSE
carries only response_time), so the latency of those responses can only come
from pairing them with their query. ``LatencyMatcher`` remembers each waiting
query under (identity, client address, client port, DNS id, qname, message
pair: CLIENT_QUERY with CLIENT_RESPONSE, RESOLVER_QUERY with RESOLVER_RESPONSE,
...) and sets ``latency`` on the response that comes back.

Clock: event time, the newest record timestamp seen so far, so that a replay of
an old capture behaves like the live stream it was recorded from. A query
older than ``newest - timeout`` is expired as unanswered. The cache is an
insertion-ordered dict (oldest first): expiry pops from the front, in
O(expired), and when it holds ``max_entries`` a new query evicts the oldest
(counted "evicted"; that query may still have been answered, so it is never
reported as unanswered).

Frames from one producer are not always in time order (several server threads
share a connection), so:
- a response older than the newest timestamp still finds its query while that
  query waits; if it is even older than its query, the latency is negative and
  kept as is: it shows the server's clocks, and hiding it would hide that;
- expiry follows arrival order, so a query that arrived after a newer one may
  wait up to that disorder longer than ``timeout``.
One clock serves every identity: servers feeding one receiver should keep
their clocks synchronised (NTP); a server lagging by more than ``timeout``
sees its queries expire before their responses arrive (counted unanswered and
late), and one record stamped far in the future expires everything.

Counters (``LatencyMatcher.counters``):
  matched     a waiting query was answered (latency set here, or already set
              from the dnstap times: the query is forgotten either way)
  unanswered  a query expired without response
  evicted     a query pushed out of the full cache
  duplicate   a query replaced a waiting one with the same key
  unkeyed     a record that cannot be matched: no client address/port, DNS id,
              qname, known message type or time ("-" or 0); never cached
  late        a response that needed a latency but whose query was not waiting
"""

from __future__ import annotations

import collections
from collections.abc import Iterable
from operator import itemgetter

from core.batches import RecordBatch
from core.message import MESSAGE_TYPES, UNKNOWN, DnstapRecord

__all__ = ["COUNTER_NAMES", "LatencyMatcher"]

COUNTER_NAMES = ("matched", "unanswered", "evicted", "duplicate", "unkeyed", "late")

# message name -> (pair number, is a query): types 2k-1 and 2k pair up as k.
_KINDS: dict[str, tuple[int, bool]] = {
    name: ((number + 1) // 2, number % 2 == 1) for number, name in MESSAGE_TYPES.items()
}
# One C call instead of seven subscripts of a dict subclass (not specialised).
_FIELDS = itemgetter("timestamp", "message", "identity", "query-ip", "query-port", "id", "qname")


class LatencyMatcher:
    """Pairs responses with their queries; see the module docstring."""

    def __init__(self, timeout: float, max_entries: int, emit_unanswered: bool) -> None:
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0, got {timeout!r}")
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries!r}")
        self.timeout = float(timeout)
        self.max_entries = max_entries
        self.emit_unanswered = emit_unanswered
        self.counters: collections.Counter = collections.Counter()
        # Newest event time seen; -inf before the first timed record.
        self.newest = float("-inf")
        # key -> (query timestamp, snapshot of the query record or None).
        # OrderedDict: popping its front is O(1), where a plain dict's front
        # can sit behind the holes left by matched entries.
        self._cache: collections.OrderedDict = collections.OrderedDict()
        # A lower bound of the front query's timestamp, so that the front is
        # looked at only when the expiry cutoff passes it. A front popped (by
        # a match, a duplicate, an eviction) is followed by a newer query when
        # the input is in order; out of order, that query only expires later,
        # by at most the disorder (see above).
        self._front = float("inf")

    def __len__(self) -> int:
        """Queries waiting for their response."""
        return len(self._cache)

    def process(self, records: Iterable[dict]) -> RecordBatch:
        """Match ``records`` in arrival order; return them (responses' latency
        set in place, the records being the pipeline's own) followed by the
        unanswered queries expired meanwhile, if ``emit_unanswered``."""
        out = records if type(records) is RecordBatch else RecordBatch(records)
        unanswered: list = []
        cache = self._cache
        timeout = self.timeout
        full = self.max_entries
        snapshot = self.emit_unanswered
        kinds = _KINDS
        fields = _FIELDS
        newest = self.newest
        front = self._front
        matched = duplicate = unkeyed = late = evicted = 0
        for rec in out:
            ts, message, identity, ip, port, qid, qname = fields(rec)
            if ts > newest:
                newest = ts
                # Checked on every advance of the clock, so the result does not
                # depend on batch boundaries.
                if newest - timeout > front:
                    front = self._expire(newest - timeout, unanswered)
            kind = kinds.get(message)
            if (
                kind is None
                or not ts
                or ip == UNKNOWN
                or port == UNKNOWN
                or qid == UNKNOWN
                or qname == UNKNOWN
            ):
                unkeyed += 1
                continue
            # identity may be "-": a server without one still has its own queries.
            key = (identity, ip, port, qid, qname, kind[0])
            if kind[1]:
                if cache.pop(key, None) is not None:
                    duplicate += 1
                elif len(cache) >= full:
                    cache.popitem(last=False)
                    evicted += 1
                cache[key] = (ts, _copy(rec) if snapshot else None)
                if ts < front and len(cache) == 1:
                    front = ts
            else:
                waiting = cache.pop(key, None)
                if waiting is not None:
                    matched += 1
                    if rec["latency"] == UNKNOWN:
                        # round(x, 6) goes through decimal digits (0.4 us); this
                        # differs from it only within 1 ulp of a half
                        # microsecond, far below the 0.24 us resolution of
                        # epoch seconds in a float.
                        rec["latency"] = round((ts - waiting[0]) * 1e6) / 1e6
                elif rec["latency"] == UNKNOWN:
                    late += 1
        self.newest = newest
        self._front = front
        c = self.counters
        for name, n in (
            ("matched", matched),
            ("duplicate", duplicate),
            ("unkeyed", unkeyed),
            ("late", late),
            ("evicted", evicted),
        ):
            if n:
                c[name] += n
        if unanswered:
            out = RecordBatch(out)
            out.extend(unanswered)
        return out

    def flush(self, now: float | None = None) -> RecordBatch:
        """Expire the queries older than ``now - timeout`` (``now``: wall time
        during idle periods, when no record advances the event clock); with
        ``now=None`` (shutdown, no response can come any more) expire all.
        Returns the unanswered records, if ``emit_unanswered``."""
        unanswered = RecordBatch()
        self._front = self._expire(float("inf") if now is None else now - self.timeout, unanswered)
        return unanswered

    def _expire(self, cutoff: float, out: list) -> float:
        """Pop the front queries older than ``cutoff``; returns the
        timestamp of the new front (inf when empty)."""
        cache = self._cache
        n = 0
        while cache:
            ts, rec = next(iter(cache.values()))
            if ts >= cutoff:
                break
            cache.popitem(last=False)
            n += 1
            if rec is not None:
                out.append(rec)
        if n:
            self.counters["unanswered"] += n
        return ts if cache else float("inf")


def _copy(rec: dict) -> dict:
    """The unanswered record of a query: a copy taken on arrival, so that the
    later steps changing the original in place (e.g. privacy) do not reach it;
    a DnstapRecord keeps its ``raw``."""
    raw = getattr(rec, "raw", None)
    if raw is None:
        copy = dict(rec)
    else:
        copy = DnstapRecord(rec)
        copy.raw = raw
    copy["type"] = "unanswered"
    copy["latency"] = UNKNOWN
    return copy
