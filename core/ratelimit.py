"""Log lines about bad input or failing outputs, at most one per interval.

A stream of bad frames or a full disk would otherwise write a line per batch;
the first line of each interval says how many were held back since.
"""

from __future__ import annotations

import logging
import time

__all__ = ["RateLimitedLog"]


class RateLimitedLog:
    def __init__(self, logger: logging.Logger, every: float = 10.0) -> None:
        self._logger = logger
        self._every = every
        self._next = 0.0
        self._suppressed = 0

    def __call__(self, level: int, msg: str, *args) -> None:
        now = time.monotonic()
        if now < self._next:
            self._suppressed += 1
            return
        if self._suppressed:
            msg += f" ({self._suppressed} similar messages suppressed)"
        self._suppressed = 0
        self._next = now + self._every
        self._logger.log(level, msg, *args)
