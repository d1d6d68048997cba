"""core/ratelimit.py: one log line per interval, saying how many were held back."""

from __future__ import annotations

import logging

from core import ratelimit
from core.ratelimit import RateLimitedLog


def test_one_line_per_interval_with_the_suppressed_count(monkeypatch, caplog):
    clock = [100.0]
    monkeypatch.setattr(ratelimit.time, "monotonic", lambda: clock[0])
    warn = RateLimitedLog(logging.getLogger("test.ratelimit"), every=10.0)
    with caplog.at_level(logging.WARNING, logger="test.ratelimit"):
        for i in range(5):
            warn(logging.WARNING, "bad frame %d", i)
        clock[0] = 110.0
        warn(logging.ERROR, "bad frame %d", 5)
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, "bad frame 0"),
        (logging.ERROR, "bad frame 5 (4 similar messages suppressed)"),
    ]
