"""Delivery to a remote server for the network outputs (TCP, syslog, dnstap,
Kafka, PostgreSQL): a bounded buffer drained by a thread of its own.

The pipeline thread formats a batch of records into one *chunk* (bytes, a list
of frames or rows: whatever the output's ``Transport`` sends) and ``put``s it
with its message count. It never blocks: when the buffer holds more than
``buffer_size`` messages the oldest chunks are dropped and counted, so an
outage or a slow server costs that output its own copy and nothing else.

The thread connects (again every ``retry`` seconds while that fails), takes up
to ``batch_size`` messages of chunks at a time and hands them to the
transport. A failed send closes the connection and puts the chunks back in
front of the buffer: they go out again after the reconnection.

Transports that confirm delivery (Kafka acknowledgements, a PostgreSQL commit)
count their chunks delivered when ``send`` returns. Plain streams (TCP lines,
syslog over TCP, Frame Streams) have no acknowledgements: a server that dies
loses what it had received and not yet processed, and the sender only learns
of it at its next write. Their chunks stay *in flight* for ``settle`` seconds
after being written, and go out again if the connection fails meanwhile. Every
message is thus delivered at least once or counted as dropped; a failure can
deliver the last ``settle`` seconds twice on these transports.

``close`` (at shutdown) keeps sending for up to ``flush_timeout`` seconds,
closes the transport gracefully (which confirms what is in flight, see
``Transport.close``) and counts what is left as dropped.

Counters per output, in core.counters under ``output.<name>`` and in the
periodic log line: queued, delivered, dropped, resent, send_errors,
connect_errors, connects, buffered, connected (1/0).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol

from core import counters
from core.ratelimit import RateLimitedLog

__all__ = ["Delivery", "DeliveryOptions", "Transport"]

log = logging.getLogger("dnstap_receiver.output")

_COUNTERS = ("queued", "delivered", "dropped", "resent", "send_errors", "connect_errors", "connects")


@dataclass(frozen=True)
class DeliveryOptions:
    """What every network output has in its config section.

    retry          seconds between connection attempts (4.7.0's ``retry``)
    buffer_size    messages kept while the server is slow or down; past it
                   the oldest are dropped and counted (``buffer-size``)
    flush_timeout  seconds spent delivering the buffer at shutdown
                   (``flush-timeout``)
    """

    retry: float = 5.0
    buffer_size: int = 100_000
    flush_timeout: float = 10.0


class Transport(Protocol):
    """One connection to the remote side, used by one thread at a time.

    confirms  True when ``send`` returning means the server has the chunks
              (acknowledged or committed); False for plain streams
    """

    confirms: bool

    def connect(self) -> None:
        """Open the connection; raise an exception if it fails."""

    def send(self, chunks: list[Any]) -> int | None:
        """Send the chunks in order; raise an exception if it fails. May
        return how many of their messages the server refused (e.g. rows a
        database rejected): those count as dropped, not delivered."""

    # Optional: pending(chunk) -> int. A transport whose failed send still
    # got some messages acknowledged removes them from the chunks and says
    # how many each has left: only those are resent (Kafka).

    def close(self, graceful: bool) -> bool:
        """Close the connection. ``graceful`` (at shutdown, after the last
        send): end the stream properly and return True if the server
        confirmed having everything sent (e.g. Frame Streams FINISH, or the
        TCP send queue drained); False otherwise. Must not raise."""


class Delivery:
    """A bounded buffer of chunks and the thread that delivers them."""

    def __init__(
        self,
        name: str,
        transport: Transport,
        *,
        retry: float,
        buffer_size: int = 100_000,
        batch_size: int = 1_000,
        settle: float = 0.5,
        flush_timeout: float = 10.0,
        describe: str = "",
    ) -> None:
        if retry <= 0 or buffer_size < 1 or batch_size < 1:
            raise ValueError("retry must be > 0, buffer_size and batch_size >= 1")
        self.name = name
        self._transport = transport
        self._retry = float(retry)
        self._buffer_size = buffer_size
        self._batch_size = batch_size
        self._settle = float(settle)
        self._flush_timeout = float(flush_timeout)
        self._describe = describe or name
        self._chunks: deque[tuple[Any, int]] = deque()  # (chunk, messages), oldest first
        self._buffered = 0  # messages in _chunks
        self._inflight: deque[tuple[float, Any, int]] = deque()  # (sent at, chunk, messages)
        self._inflight_count = 0
        self._cond = threading.Condition()
        self._closing = False
        self._deadline = float("inf")  # when closing: give up sending at this monotonic time
        self.connected = False
        self.last_error: str | None = None
        self.counts = dict.fromkeys(_COUNTERS, 0)
        self._down_logged = False
        self._drop_log = RateLimitedLog(log)  # the counter has the total
        counters.register(f"output.{name}", self.snapshot)
        self._thread = threading.Thread(target=self._run, name=f"output-{name}", daemon=True)
        self._thread.start()

    # -- pipeline side ---------------------------------------------------------

    def put(self, chunk: Any, messages: int) -> None:
        """Queue ``chunk`` (``messages`` messages); never blocks."""
        if messages <= 0:
            return
        with self._cond:
            if self._closing:
                self._drop(messages, "the output is closed")
                return
            self._chunks.append((chunk, messages))
            self._buffered += messages
            self.counts["queued"] += messages
            self._trim()
            self._cond.notify()

    def snapshot(self) -> dict[str, int]:
        """Counters for logs, the API and Prometheus (see the module docstring)."""
        with self._cond:
            out = dict(self.counts)
            out["buffered"] = self._buffered + self._inflight_count
            out["connected"] = int(self.connected)
        return out

    def close(self, timeout: float | None = None) -> None:
        """Deliver what is buffered for up to ``timeout`` seconds (default
        ``flush_timeout``), then stop; what could not be sent is dropped and
        counted. Idempotent."""
        timeout = self._flush_timeout if timeout is None else timeout
        with self._cond:
            if not self._closing:
                self._closing = True
                self._deadline = time.monotonic() + timeout
            self._cond.notify_all()
        self._thread.join(timeout + 5.0)
        # The counters stay registered: the receiver's last log line shows them.

    # -- delivery thread -------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._closing and (not self._chunks or time.monotonic() >= self._deadline):
                    break
            if not self.connected and not self._connect():
                self._wait(self._retry)
                continue
            batch = self._take()
            if batch:
                self._send(batch)
            self._settle_inflight(time.monotonic())
        self._finish()

    def _connect(self) -> bool:
        try:
            self._transport.connect()
        except Exception as exc:  # noqa: BLE001 - any failure: retry later
            with self._cond:
                self.counts["connect_errors"] += 1
            self._note_down(f"cannot connect to {self._describe}: {exc}")
            return False
        with self._cond:
            self.connected = True
            self.counts["connects"] += 1
        if not self._down_logged:
            log.info("output %s: connected to %s", self.name, self._describe)
        return True

    def _note_down(self, message: str) -> None:
        """Log an outage once, not at every retry."""
        self.last_error = message
        if not self._down_logged:
            log.warning("output %s: %s; retrying every %g s, buffering up to %d messages",
                        self.name, message, self._retry, self._buffer_size)
            self._down_logged = True

    def _take(self) -> list[tuple[Any, int]]:
        """Up to batch_size messages of chunks (at least one chunk); waits a
        little for the first."""
        with self._cond:
            if not self._chunks and not self._closing:
                self._cond.wait(0.2)
            batch = []
            taken = 0
            while self._chunks and (not batch or taken + self._chunks[0][1] <= self._batch_size):
                chunk = self._chunks.popleft()
                batch.append(chunk)
                taken += chunk[1]
            self._buffered -= taken
            return batch

    def _send(self, batch: list[tuple[Any, int]]) -> None:
        try:
            refused = self._transport.send([chunk for chunk, _ in batch])
        except Exception as exc:  # noqa: BLE001 - any failure: reconnect and resend
            self._failed(batch, f"sending to {self._describe} failed: {exc}")
            return
        if self._down_logged:  # after a send, not a connect: a UDP "connect" always works
            log.info("output %s: delivering to %s again", self.name, self._describe)
            self._down_logged = False
        messages = sum(n for _, n in batch)
        with self._cond:
            if refused:
                self.counts["dropped"] += refused
                messages -= refused
            if self._transport.confirms:
                self.counts["delivered"] += messages
            else:
                now = time.monotonic()
                self._inflight.extend((now, chunk, n) for chunk, n in batch)
                self._inflight_count += messages

    def _failed(self, batch: list[tuple[Any, int]], message: str) -> None:
        self._transport.close(False)
        acknowledged = 0
        pending = getattr(self._transport, "pending", None)
        if pending is not None:  # the transport took what the server confirmed out of the chunks
            kept = []
            for chunk, n in batch:
                left = pending(chunk)
                acknowledged += n - left
                if left:
                    kept.append((chunk, left))
            batch = kept
        with self._cond:
            self.counts["delivered"] += acknowledged
            self.connected = False
            self.counts["send_errors"] += 1
            # What may not have arrived goes back in front, oldest first.
            again = [(chunk, n) for _, chunk, n in self._inflight] + batch
            resent = self._inflight_count
            self._inflight.clear()
            self._inflight_count = 0
            self._chunks.extendleft(reversed(again))
            self._buffered += resent + sum(n for _, n in batch)
            self.counts["resent"] += resent
            self._trim()
        self._note_down(message)

    def _settle_inflight(self, now: float) -> None:
        if not self._inflight:
            return
        with self._cond:
            limit = now - self._settle
            while self._inflight and self._inflight[0][0] <= limit:
                _, _, n = self._inflight.popleft()
                self._inflight_count -= n
                self.counts["delivered"] += n

    def _trim(self) -> None:
        """Drop the oldest chunks past buffer_size (lock held). What is in
        flight does not count: it was sent, and only waits to settle (at most
        `settle` seconds of the output's rate)."""
        over = self._buffered - self._buffer_size
        dropped = 0
        while over > 0 and self._chunks:
            _, n = self._chunks.popleft()
            self._buffered -= n
            over -= n
            dropped += n
        if dropped:
            self._drop(dropped, "its buffer is full")

    def _drop(self, messages: int, why: str) -> None:
        self.counts["dropped"] += messages
        self._drop_log(logging.WARNING, "output %s: dropped the %d oldest messages because %s",
                       self.name, messages, why)

    def _wait(self, seconds: float) -> None:
        """Sleep until the next connection attempt: ``put`` wakes the thread
        for data, not this; ``close`` cuts it to the flush deadline."""
        end = time.monotonic() + seconds
        with self._cond:
            while True:
                if self._closing:
                    end = min(end, self._deadline)
                left = end - time.monotonic()
                if left <= 0:
                    return
                self._cond.wait(left)

    def _finish(self) -> None:
        confirmed = self.connected and self._transport.close(True)
        with self._cond:
            self.connected = False
            if confirmed or self._transport.confirms:
                lost = 0
                self.counts["delivered"] += self._inflight_count
            else:
                lost = self._inflight_count
            lost += self._buffered
            self._inflight.clear()
            self._inflight_count = 0
            self._chunks.clear()
            self._buffered = 0
            if lost:
                self.counts["dropped"] += lost
        if lost:
            log.error("output %s: %d messages could not be delivered to %s before shutdown",
                      self.name, lost, self._describe)
