"""The Beam side of the network outputs: a DoFn that encodes each batch of
records into one chunk and hands it to the output's ``Delivery``
(sinks/delivery.py), which sends it from a thread of its own.

One Delivery per output per process, shared by every instance of the DoFn
(a runner may run several) and closed, which flushes it, when the last one is
torn down: at the end of a replay or when the live receiver stops.
"""

from __future__ import annotations

from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics

from core.formats import get_format
from sinks.delivery import Delivery, DeliveryOptions, Transport
from sinks.shared import SharedRegistry

__all__ = ["DeliverFn", "DeliveryOptions", "acquire", "release"]


_SHARED = SharedRegistry()


def acquire(name: str, transport: Any, options: DeliveryOptions, describe: str = "") -> Delivery:
    """The process's Delivery for output ``name``, created with
    ``transport()`` (a Transport factory) on first use."""
    return _SHARED.acquire(
        name,
        lambda: Delivery(
            name,
            transport(),
            retry=options.retry,
            buffer_size=options.buffer_size,
            flush_timeout=options.flush_timeout,
            describe=describe,
        ),
    )


def release(delivery: Delivery) -> None:
    """Give ``delivery`` back; the last user closes (flushes) it."""
    last = _SHARED.release(delivery.name)
    if last is not None:
        last.close()


class DeliverFn(beam.DoFn):
    """Base of the network outputs' DoFns. Subclasses set NAME and define
    ``make_transport()`` (a new Transport; runs on the worker) and
    ``encode(records)`` -> (chunk, messages) or None to skip the batch;
    with ``fmt`` (text, json, yaml) ``self._format`` is that core.formats
    Format on the worker."""

    NAME = "network"

    def __init__(self, options: DeliveryOptions, describe: str = "", fmt: str | None = None) -> None:
        self._options = options
        self._describe = describe
        if fmt is not None:
            get_format(fmt)  # a bad name fails when the pipeline is built
        self._fmt = fmt

    def make_transport(self) -> Transport:
        raise NotImplementedError

    def encode(self, records: list) -> tuple[Any, int] | None:
        raise NotImplementedError

    def setup(self) -> None:
        if self._fmt is not None:
            self._format = get_format(self._fmt)
        self._delivery = acquire(self.NAME, self.make_transport, self._options, self._describe)
        self._queued = Metrics.counter("dnstap_receiver", f"output_{self.NAME}_queued")

    def process(self, records):
        encoded = self.encode(records)
        if encoded is not None:
            chunk, messages = encoded
            self._delivery.put(chunk, messages)
            self._queued.inc(messages)

    def teardown(self) -> None:
        delivery = getattr(self, "_delivery", None)
        if delivery is not None:
            self._delivery = None
            release(delivery)
