"""Delivery (sinks/delivery.py): bounded buffer, drop-oldest, retry, resend, flush."""

from __future__ import annotations

import threading
import time

import pytest

from core import counters
from sinks.delivery import Delivery


class FakeTransport:
    """Records what it was sent; ``up`` decides whether connect/send work."""

    def __init__(self, confirms: bool = True, up: bool = True, graceful_ok: bool = True) -> None:
        self.confirms = confirms
        self.up = up
        self.graceful_ok = graceful_ok
        self.connected = False
        self.received: list = []
        self.connects = 0
        self.closes: list[bool] = []
        self.sent_event = threading.Event()
        self.block = threading.Event()
        self.block.set()

    def connect(self) -> None:
        if not self.up:
            raise ConnectionRefusedError("down")
        self.connects += 1
        self.connected = True

    def send(self, chunks: list) -> None:
        self.block.wait()
        if not self.up or not self.connected:
            raise ConnectionResetError("reset")
        for chunk in chunks:
            self.received.extend(chunk)
        self.sent_event.set()

    def close(self, graceful: bool) -> bool:
        self.closes.append(graceful)
        self.connected = False
        return graceful and self.graceful_ok


def wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


def put_range(d: Delivery, start: int, stop: int, per_chunk: int = 10) -> None:
    for i in range(start, stop, per_chunk):
        chunk = list(range(i, min(stop, i + per_chunk)))
        d.put(chunk, len(chunk))


def test_delivers_in_order_and_counts():
    t = FakeTransport()
    d = Delivery("t-order", t, retry=0.05, batch_size=25)
    put_range(d, 0, 1000)
    d.close()
    assert t.received == list(range(1000))
    snap = d.counts
    assert snap["queued"] == snap["delivered"] == 1000 and snap["dropped"] == 0
    assert t.closes == [True]


def test_outage_buffers_drops_oldest_and_resumes():
    t = FakeTransport(up=False)
    d = Delivery("t-outage", t, retry=0.05, buffer_size=100)
    started = time.monotonic()
    put_range(d, 0, 1000)
    assert time.monotonic() - started < 1.0  # put never blocks on a dead server
    wait_for(lambda: d.counts["connect_errors"] >= 2)
    snap = d.snapshot()
    assert snap["dropped"] == 900 and snap["buffered"] == 100 and snap["connected"] == 0
    t.up = True
    wait_for(lambda: len(t.received) == 100)
    assert t.received == list(range(900, 1000))  # the newest were kept
    put_range(d, 1000, 1050)
    d.close()
    assert t.received[100:] == list(range(1000, 1050))
    assert d.counts["delivered"] + d.counts["dropped"] == 1050


def test_failed_send_is_resent_after_reconnecting():
    t = FakeTransport()
    d = Delivery("t-resend", t, retry=0.05)
    put_range(d, 0, 50)
    wait_for(lambda: len(t.received) == 50)
    t.up = False
    put_range(d, 50, 100)
    wait_for(lambda: d.counts["send_errors"] >= 1)
    t.up = True
    d.close()
    assert t.received == list(range(100))
    assert d.counts["delivered"] == 100 and d.counts["dropped"] == 0


def test_unconfirmed_stream_resends_what_was_in_flight():
    """A plain stream may have lost what it wrote just before failing: it
    goes out again (at least once), and counts as delivered only once."""
    t = FakeTransport(confirms=False)
    d = Delivery("t-inflight", t, retry=0.05, settle=30.0)
    put_range(d, 0, 50)
    wait_for(lambda: len(t.received) == 50)
    assert d.snapshot()["buffered"] == 50  # in flight, not yet settled
    t.up = False
    put_range(d, 50, 60)
    wait_for(lambda: d.counts["send_errors"] >= 1)
    t.up = True
    d.close()
    assert t.received[:50] == list(range(50))
    assert t.received[50:] == list(range(60))  # the in-flight 50 again, then the rest
    assert d.counts["resent"] == 50
    assert d.counts["delivered"] == 60 and d.counts["dropped"] == 0


def test_unconfirmed_stream_settles_after_the_delay():
    t = FakeTransport(confirms=False)
    d = Delivery("t-settle", t, retry=0.05, settle=0.1)
    put_range(d, 0, 20)
    wait_for(lambda: d.counts["delivered"] == 20)
    assert d.snapshot()["buffered"] == 0
    d.close()


def test_close_counts_undeliverable_messages_as_dropped():
    t = FakeTransport(up=False)
    d = Delivery("t-close", t, retry=0.05, flush_timeout=0.2)
    put_range(d, 0, 30)
    d.close()
    assert d.counts["dropped"] == 30 and d.counts["delivered"] == 0
    d.put([1], 1)  # after close: dropped, not queued
    assert d.counts["dropped"] == 31


def test_graceful_close_failing_means_in_flight_is_dropped():
    t = FakeTransport(confirms=False, graceful_ok=False)
    d = Delivery("t-nofinish", t, retry=0.05, settle=60.0)
    put_range(d, 0, 10)
    wait_for(lambda: len(t.received) == 10)
    d.close()
    assert d.counts["dropped"] == 10 and d.counts["delivered"] == 0


def test_slow_server_never_blocks_the_producer():
    t = FakeTransport()
    t.block.clear()  # the transport hangs in send
    d = Delivery("t-slow", t, retry=0.05, buffer_size=50, flush_timeout=0.1)
    started = time.monotonic()
    put_range(d, 0, 5000)
    assert time.monotonic() - started < 1.0
    assert d.counts["dropped"] >= 4900
    t.block.set()
    d.close()
    assert d.counts["delivered"] + d.counts["dropped"] == 5000


def test_counters_are_registered_per_output():
    t = FakeTransport()
    d = Delivery("t-registered", t, retry=0.05)
    put_range(d, 0, 5)
    wait_for(lambda: d.counts["delivered"] == 5)
    assert counters.snapshot()["output.t-registered"]["delivered"] == 5
    d.close()
    assert counters.snapshot()["output.t-registered"]["delivered"] == 5  # still there for the last log line


def test_bad_arguments():
    with pytest.raises(ValueError):
        Delivery("t-bad", FakeTransport(), retry=0)


def test_closing_with_the_server_down_retries_at_the_retry_pace():
    t = FakeTransport(up=False)
    d = Delivery("t-pace", t, retry=0.2, flush_timeout=0.5)
    put_range(d, 0, 10)
    d.close()
    assert d.counts["connect_errors"] <= 5  # not a busy loop until the deadline
    assert d.counts["dropped"] == 10


def test_data_does_not_hurry_the_retry_pace():
    t = FakeTransport(up=False)
    d = Delivery("t-hurry", t, retry=0.5, flush_timeout=0.1)
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        d.put([0], 1)
        time.sleep(0.005)
    assert d.counts["connect_errors"] <= 3
    d.close()


def test_refused_messages_count_as_dropped():
    class Refusing(FakeTransport):
        def send(self, chunks):
            super().send(chunks)
            return 2  # the server refused two messages of the batch

    t = Refusing()
    d = Delivery("t-refused", t, retry=0.05)
    d.put([1, 2, 3, 4, 5], 5)
    d.close()
    assert d.counts["delivered"] == 3 and d.counts["dropped"] == 2
