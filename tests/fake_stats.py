"""FakeStatsView: a StatsView (pipeline/http_api.py) with fixed numbers, for the web API and
Prometheus tests. It records how it was called, and can be told to fail."""

from __future__ import annotations

import copy

GLOBAL_QUERIES = 1003

_UNBOUND = {
    "query": 1000.0,  # floats: the API must still answer JSON integers
    "response": 998.0,
    "qps": 25.5,
    "clients": 3.0,
    "domains": 9.0,
    "query/inet": 990.0,
    "query/inet6": 10.0,
    "query/udp": 995.0,
    "query/tcp": 5.0,
    "response/udp": 993.0,
    "response/doh": 5.0,
    "query/bytes": 56000.0,
    "response/bytes": 90000.0,
    "response/noerror": 800.0,
    "response/nxdomain": 198.0,
    "query/a": 500.0,
    "query/aaaa": 300.0,
    "query/mx": 200.0,
    "query/type65280": 0.0,
    "response/3841": 0.0,
    "query/test": 1000.0,  # a tld: in /counters, not in Prometheus
    "response/latency0_1": 900.0,
    "response/latency1_10": 50.0,
    "response/latency10_50": 20.0,
    "response/latency50_100": 10.0,
    "response/latency100_1000": 15.0,
    "response/latency_slow": 3.0,
    "malformed": 2.0,
    "unanswered": 4.0,
    "response/rcode-other": 1.0,  # the store's bucket past its cap on distinct rcodes
    "query/rrtype-other": 2.0,
    "x-store-extra": 5.0,  # a name only the store knows: /counters?more= accepts it
}
_DNSDIST = {"query": 3.0, "response": 3.0, "clients": 1.0, "domains": 1.0, "query/inet": 3.0,
            "response/servfail": 3.0, "response/latency_slow": 3.0}


def _tables(scale: int) -> dict:
    # The interface's layout: "hit/client" and "top-rcodes" as 4.7.0's README spelled them.
    return {
        "tlds": {"hit/query": [["query/test", 1000 * scale], ["query/invalid", 3]], "hit/response": [["response/test", 998]]},
        "domains": {
            "noerror/query": [["www.example.test.", 400 * scale], ["mail.example.test.", 300], ["api.example.test.", 100]],
            "nxdomain/response": [["host.invalid.", 198.0]],
            "hit/query": [["www.example.test.", 410]],
        },
        "clients": {"hit/client": [["192.0.2.1", 1500], ["2001:db8::1", 500]], "length/ip": [["192.0.2.1", 120000]]},
        "rrtypes": {"hit/query": [["query/a", 500], ["query/aaaa", 300]], "hit/response": [["response/a", 499]]},
        "top-rcodes": {"hit/query": [["query/noerror", 1000]], "hit/response": [["response/noerror", 800], ["response/nxdomain", 198]]},
    }


class FakeStatsView:
    """Two streams, "unbound" and "dnsdist01"; the global counters are their sum (distinct
    counts excepted)."""

    def __init__(self, streams: dict[str, dict[str, float]] | None = None) -> None:
        self.per_stream = copy.deepcopy(streams if streams is not None else {"unbound": _UNBOUND, "dnsdist01": _DNSDIST})
        self.resets = 0
        self.calls: list[tuple] = []
        self.fail: Exception | None = None  # raised by every method when set
        self.receiver = {
            "input": {"frames": 2006, "bytes": 300000, "active": 2, "blocked_seconds": 1.25,
                      "blocked_episodes": 1, "errors_by_reason": {"FrameTooLarge": 1}},
            "decode": {"decoded": 2006, "malformed": 2, "undecodable": 1},
            "filter": {"message-type": 4, "kept": 2002},
            "output.file": {"lines": 2002, "bytes": 400000, "dropped": 0},
        }

    def _check(self, name: str, *args: object) -> None:
        self.calls.append((name, *args))
        if self.fail is not None:
            raise self.fail

    def streams(self) -> list[str]:
        self._check("streams")
        return list(self.per_stream)

    def counters(self, stream: str | None = None) -> dict[str, float]:
        self._check("counters", stream)
        if stream is not None:
            return dict(self.per_stream[stream])
        total: dict[str, float] = {}
        for values in self.per_stream.values():
            for key, value in values.items():
                total[key] = total.get(key, 0) + value
        total["clients"] = 3.0  # distinct over all streams: not a sum
        return total

    def tables(self, n: int, stream: str | None = None) -> dict:
        self._check("tables", n, stream)
        if stream is not None and stream not in self.per_stream:
            raise KeyError(stream)
        tables = _tables(2 if stream is None else 1)
        return {k: {name: rows[:n] for name, rows in group.items()} for k, group in tables.items()}

    def windows(self, last: int, stream: str | None = None) -> list[dict]:
        self._check("windows", last, stream)
        if stream is not None and stream not in self.per_stream:
            raise KeyError(stream)
        windows = [
            {"start": 1795936900.0 + 10 * i, "end": 1795936910.0 + 10 * i,
             "counters": {"query": 10.0 * i, "qps": i / 10}, "tables": _tables(1) if i else {}}
            for i in range(3)
        ]
        return windows[-last:]

    def reset(self) -> None:
        self._check("reset")
        self.resets += 1

    def receiver_counters(self) -> dict[str, dict]:
        self._check("receiver_counters")
        return copy.deepcopy(self.receiver)
