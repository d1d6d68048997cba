"""WriteToKafka: one Kafka message per record (4.7.0's ``output.kafka``), and
``KafkaTransport``, the kafka-python producer it delivers with.

Each message value is one record in ``format`` (text, json or yaml, no
trailing newline); its key is the record's ``key`` field in UTF-8 (qname,
query-ip, response-ip or identity) or none. A chunk is the list of
``(key, value)`` pairs of one batch of records.

Acknowledgements: unless ``rdkafka-config`` sets them, the producer keeps
kafka-python's defaults, ``acks=all`` with the idempotent producer
(kafka-python turns idempotence off, with a warning, when ``acks`` is set to
0 or 1). ``send`` hands every message to the producer and waits for all of
them: ``send`` returning means the broker acknowledged every one, and the
transport confirms (``confirms = True``, see sinks/delivery.py).

A failed send must not deliver twice what the broker already acknowledged,
yet the Delivery puts the whole chunk list back and sends it again. So before
raising, ``send`` removes the acknowledged messages from the chunk lists *in
place*: after the reconnection ``send`` gets back only what the broker did not
confirm, and ``pending(chunk)`` tells the Delivery how many messages a chunk
still holds, so that the acknowledged ones count as delivered even when the
rest is dropped later. A
message whose acknowledgement was lost with the connection (written by the
broker, answer never received) can still arrive twice: the idempotent
producer removes such duplicates while it retries on its own, not across the
new producer a reconnection creates.

Settings chosen here when ``rdkafka-config`` does not set them:

- ``batch.size`` 512 KiB: kafka-python's 16 KiB divides the throughput by 2
  to 3 (many small requests); librdkafka, which 4.7.0 used, batches up to
  1 MB, Kafka's default ``message.max.bytes``, which a full batch plus its
  overhead would exceed;
- ``request.timeout.ms`` 10 s, and a message not acknowledged within
  ``request_timeout_ms + linger_ms`` fails the send (kafka-python's
  ``delivery_timeout_ms``, else 2 min): a send in progress when the broker
  goes away ends within the Delivery's shutdown wait (``flush-timeout`` + 5 s)
  with the default ``flush-timeout`` of 10 s;
- connecting (creating the producer, then reading the topic's metadata) fails
  after 5 s + 5 s at most, and the Delivery tries again ``retry`` s later.

librdkafka settings are strings as often as not ("linger.ms": "5"): numbers
and booleans written as strings are converted for kafka-python.

Speed: kafka-python checksums every record batch (CRC-32C) in pure Python
unless the ``crc32c`` package is installed, which then quadruples the
messages/s of JSON records (see benchmarks/bench_kafka.py); connecting logs
a warning when it is missing.
"""

from __future__ import annotations

import logging

import apache_beam as beam

from sinks.network import DeliverFn

__all__ = [
    "KafkaSendError", "KafkaTransport", "WriteToKafka", "encode_messages", "producer_settings", "quiet_kafka_python",
]

log = logging.getLogger("dnstap_receiver.output")

# Producer settings this module chooses when rdkafka-config does not.
DEFAULTS = {
    "bootstrap_timeout_ms": 5_000,  # the producer's first connection, in connect()
    "max_block_ms": 5_000,  # metadata waits in connect() and send()
    "request_timeout_ms": 10_000,
    "batch_size": 524_288,
}
CLOSE_TIMEOUT = 5.0  # seconds a graceful close may take (nothing is pending by then)
FLUSH_MARGIN = 1.0  # seconds past delivery_timeout_ms before send stops waiting

_INTEGERS = frozenset({
    "linger_ms", "batch_size", "max_request_size", "retries", "retry_backoff_ms", "request_timeout_ms",
    "metadata_max_age_ms", "connections_max_idle_ms", "max_in_flight_requests_per_connection",
    "delivery_timeout_ms",
})
_BOOLEANS = {"true": True, "false": False}


def producer_settings(producer: dict) -> dict:
    """KafkaProducer arguments: ``producer`` (pipeline.config's mapping of
    rdkafka-config) over this module's DEFAULTS, strings converted, and the
    delivery timeout derived from the request timeout when not set."""
    settings = {**DEFAULTS, **producer}
    for key, value in settings.items():
        if not isinstance(value, str):
            continue
        if key in _INTEGERS and value.lstrip("-").isdigit():
            settings[key] = int(value)
        elif key == "enable_idempotence" and value.lower() in _BOOLEANS:
            settings[key] = _BOOLEANS[value.lower()]
        elif key == "acks" and value.lstrip("-").isdigit():
            settings[key] = "all" if int(value) == -1 else int(value)
    if "delivery_timeout_ms" not in settings:
        # kafka-python's minimum: a broker that does not answer is noticed
        # as soon as allowed.
        settings["delivery_timeout_ms"] = settings["request_timeout_ms"] + settings.get("linger_ms", 0)
    return settings


def quiet_kafka_python() -> None:
    """kafka-python logs every failed attempt of an outage (connection lost,
    request timed out, batch expired, retrying...) at WARNING and ERROR; the
    Delivery logs the outage once, with the error, and counts the retries.
    Its logger is left alone when the configuration set a level for it."""
    kafka_log = logging.getLogger("kafka")
    if kafka_log.level == logging.NOTSET:
        kafka_log.setLevel(logging.CRITICAL)


def _key_bytes(value) -> bytes | None:
    if value is None:
        return None
    return str(value).encode("utf-8", "backslashreplace")


def encode_messages(records: list, fmt, key: str | None) -> list[tuple[bytes | None, bytes]]:
    """The chunk for ``records``: a (key, value) pair per record, value in
    format ``fmt`` (a core.formats.Format), key the record's ``key`` field.

    JSON values are cut from one serialisation of the whole batch (no JSON
    text holds a raw newline): 3x faster than one orjson call per record, and
    each value is an exact-size copy, where a single orjson result keeps a
    block of about 8 KB allocated (100,000 buffered messages took 900 MB)."""
    values = None
    if fmt.name == "json":
        values = fmt.batch(records, b"\n").split(b"\n")
        values.pop()  # after the last delimiter
        if len(values) != len(records):  # pragma: no cover - a serialiser bug
            values = None
    if values is None:
        values = map(fmt.record, records)
    if key is None:
        return [(None, value) for value in values]
    return [(_key_bytes(rec.get(key)), value) for rec, value in zip(records, values)]


class KafkaSendError(Exception):
    """Some messages of a send were not acknowledged; the chunks now hold only
    those (see the module docstring)."""


class KafkaTransport:
    """A kafka-python producer sending chunks of (key, value) messages to one
    topic (see Transport in sinks/delivery.py)."""

    confirms = True

    def __init__(self, topic: str, settings: dict) -> None:
        self.topic = topic
        self.settings = producer_settings(settings)
        self._wait = self.settings["delivery_timeout_ms"] / 1000 + FLUSH_MARGIN
        self._producer = None
        quiet_kafka_python()
        # Messages acknowledged during sends that failed, kept out of the resend.
        self.acknowledged_before_failure = 0

    def connect(self) -> None:
        from kafka import (
            KafkaProducer,  # kafka-python is only needed with this output on
        )

        # Raises NoBrokersAvailable / KafkaTimeoutError while the broker is down.
        producer = KafkaProducer(**self.settings)
        try:
            # The topic's metadata (created here when the broker auto-creates
            # topics): a topic that cannot be written fails the connection.
            if not producer.partitions_for(self.topic):
                raise ConnectionError(f"topic {self.topic!r} has no partitions")
        except Exception as exc:
            _abandon(producer)
            raise ConnectionError(f"topic {self.topic!r} is not available: {exc}") from exc
        self._producer = producer
        _warn_slow_checksums()

    def send(self, chunks: list[list]) -> None:
        producer = self._producer
        if producer is None:
            raise ConnectionError("not connected")
        sent: list[tuple[list, list]] = []  # (chunk, its futures so far)
        error: Exception | None = None
        try:
            for chunk in chunks:
                futures: list = []
                sent.append((chunk, futures))
                for key, value in chunk:
                    futures.append(producer.send(self.topic, value=value, key=key))
        except Exception as exc:  # noqa: BLE001 - e.g. no metadata within max_block_ms
            error = exc
        try:
            # Once: flush's timeout applies to each batch in turn, and a
            # batch can stay pending past its delivery timeout (kafka-python
            # 3.0.12, idempotent producer, request timed out while retried).
            producer.flush(self._wait)
        except Exception as exc:  # noqa: BLE001 - what is still pending counts as failed
            error = error or exc
        self._keep_unacknowledged(sent, chunks, error)

    def _keep_unacknowledged(self, sent: list[tuple[list, list]], chunks: list[list], error) -> None:
        """Return if the broker acknowledged every message; else leave in each
        chunk only the messages it did not acknowledge and raise KafkaSendError."""
        total = sum(map(len, chunks))
        acknowledged = 0
        cause = error
        remaining = []  # (chunk, what it keeps)
        for chunk, futures in sent:
            keep = []
            for message, future in zip(chunk, futures):
                if future.is_done and future.succeeded():
                    continue
                keep.append(message)
                if cause is None and future.is_done:
                    cause = future.exception
            keep += chunk[len(futures):]  # never handed to the producer
            acknowledged += len(chunk) - len(keep)
            remaining.append((chunk, keep))
        if acknowledged == total:
            return  # an error after the last acknowledgement changes nothing
        for chunk, keep in remaining:
            if len(keep) != len(chunk):
                chunk[:] = keep
        self.acknowledged_before_failure += acknowledged
        raise KafkaSendError(
            f"{total - acknowledged} of {total} messages not acknowledged "
            f"({cause or 'no answer in time'}); the {acknowledged} acknowledged are not sent again"
        )

    @staticmethod
    def pending(chunk: list) -> int:
        """Messages of ``chunk`` still to send: fewer than were put once a
        failed send removed the acknowledged ones."""
        return len(chunk)

    def close(self, graceful: bool) -> bool:
        producer, self._producer = self._producer, None
        if producer is None:
            return False
        if graceful:
            try:
                producer.flush(CLOSE_TIMEOUT)
                producer.close(timeout=CLOSE_TIMEOUT)
                return True
            except Exception as exc:  # noqa: BLE001 - must not raise
                log.warning("output kafka: closing the producer failed: %s", exc)
        _abandon(producer)
        return False


_checked_crc32c = False


def _warn_slow_checksums() -> None:
    global _checked_crc32c
    if _checked_crc32c:
        return
    _checked_crc32c = True
    try:
        from kafka.record import util
    except ImportError:
        return
    if getattr(util, "crc32c_c", True) is None:
        log.warning("output kafka: the crc32c package is not installed: kafka-python checksums "
                    "record batches in pure Python, about 4x slower (pip install crc32c)")


def _abandon(producer) -> None:
    """Stop ``producer`` now, sending nothing more. kafka-python's close(0)
    flushes first and raises if anything is pending, leaving its sender
    thread running: that thread could then deliver messages the Delivery is
    about to send again, so it is stopped directly."""
    try:
        producer.close(timeout=0)
    except Exception:  # noqa: BLE001 - must not raise
        sender = getattr(producer, "_sender", None)
        if sender is not None:
            sender.force_close()


class _WriteKafkaFn(DeliverFn):
    NAME = "kafka"

    def __init__(self, topic: str, producer: dict, fmt: str, key: str | None, options) -> None:
        servers = producer.get("bootstrap_servers")
        if isinstance(servers, (list, tuple)):
            servers = ",".join(servers)
        super().__init__(options, describe=f"kafka {servers} topic {topic}", fmt=fmt)
        self._topic = topic
        self._producer = dict(producer)
        self._key = key

    def make_transport(self) -> KafkaTransport:
        return KafkaTransport(self._topic, self._producer)

    def encode(self, records):
        if not records:
            return None
        return encode_messages(records, self._format, self._key), len(records)


class WriteToKafka(beam.PTransform):
    """Send every record to Kafka topic ``options.topic`` as one message in
    ``options.format``, keyed by ``options.key`` (a pipeline.config.KafkaOutput)."""

    def __init__(self, options) -> None:
        super().__init__()
        self._fn = _WriteKafkaFn(options.topic, options.producer, options.format, options.key, options.delivery())

    def expand(self, batches):
        return batches | "Write" >> beam.ParDo(self._fn)
