"""ReadFromKafka: the records edge receivers wrote to Kafka (``output.kafka``,
format json) as an unbounded Beam source, the input of the central job of the
scale-out layout (deploy/flink/README.md).

One Splittable DoFn element per partition of the topic: a first DoFn lists
the partitions, and each one's restriction is an ``OffsetRange`` of Kafka
offsets, from the consumer group's committed offset (or the start or end of
the partition per ``auto-offset-reset`` when the group has none) to 2**63-1.
A restriction is never split further: offsets of one partition are read in
order by one reader. A reshuffle after the listing spreads the partitions over
the workers, as Beam's Java KafkaIO does (on Flink, ``--parallelism`` up to
the partition count); the list is bounded, so on the local runner that
grouping is done before the reads start.

Speed: about 60,000-80,000 records/s per process on the project's machine
(benchmarks/bench_kafka_input.py), most of it kafka-python's own record
decoding; more partitions read by more workers scale it.

Each ``process`` call polls its partition for at most ``BUNDLE_SECONDS``
(blocking at most ``POLL_SECONDS`` when nothing comes), claims every offset,
yields the records as RecordBatches, advances the watermark and defers the
rest of its restriction, as the socket source does (sources/framestream_io.py).

Records: each value is one JSON object written by output.kafka, parsed with
orjson into the dict ``core.message.decode`` produced at the edge (same
fields, same order, plus what the edge's transforms added). A value that is
not such a record (not JSON, not an object, a field of core.message.FIELDS
missing, a timestamp that is not a number of seconds in [0, 2**33), i.e.
before the year 2242: a timestamp in milliseconds would push the watermark
thousands of years ahead, and one past Beam's range fails the bundle, which
would then be read again for ever) is counted (``input.kafka``
``invalid``), logged (rate-limited) and skipped. text and yaml values do not
parse back into records, so the configuration accepts json only.

Watermark: the oldest "timestamp" of the last records read, never moving
back; on an idle partition it follows the wall clock less
``IDLE_WATERMARK_DELAY``. Each batch carries the timestamp of its oldest
record.

Offsets (at-least-once): each process call registers a bundle finalizer that
commits, to the consumer group, the offset after the last record it claimed.
Runners call finalizers once the bundle's output is durable: the
FnApiRunner (and so ``--runner=PortableRunner --job_endpoint=embed``) right
after the bundle, when the fused outputs have written and flushed it
(verified: tests/test_kafka_input.py); Flink when the checkpoint that holds
the bundle completes, so only with checkpointing on. A restart therefore
reads again at most what was read since the last finalized bundle: nothing
is lost, a few batches can come twice.

Outages: the consumer is created lazily per DoFn instance (closed in
teardown) and reconnects by itself; a broker that cannot be reached is
logged once per outage (and once when it is back), counted, and retried for
as long as it takes, while the DoFn keeps deferring.

End: on the local runners the job runs in the receiver's process, whose
SIGTERM handler shuts the ListenerHub down; the hub closes its feeders, and
``StopOnHubShutdown`` (a feeder that feeds nothing) then sets this process's
stop event. Each DoFn sees it within ``POLL_SECONDS``, claims the rest of its
restriction (after a finalizer for what it read) and the pipeline finishes.
On a cluster the job ends when it is cancelled.

Partitions are listed once, when the job starts: partitions added to the
topic later are read after a restart.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

import apache_beam as beam
import orjson
from apache_beam.io.restriction_trackers import OffsetRange, OffsetRestrictionTracker
from apache_beam.io.watermark_estimators import ManualWatermarkEstimator
from apache_beam.metrics import Metrics
from apache_beam.transforms.core import RestrictionProvider
from apache_beam.utils.timestamp import Timestamp

from core import counters
from core.message import FIELDS
from core.ratelimit import RateLimitedLog
from transforms.batches import RecordBatch

__all__ = ["LIVE", "ReadFromKafka", "StopOnHubShutdown", "consumer_settings", "parse_values", "request_stop"]

log = logging.getLogger("dnstap_receiver.input")

STATS = counters.counter_group("input.kafka")
_warn_invalid = RateLimitedLog(log)
_warn_commit = RateLimitedLog(log)

END_OFFSET = 2**63 - 1  # restrictions run to here: never reached
IDLE_WATERMARK_DELAY = 10.0  # seconds behind the wall clock an idle partition's watermark stays
LIVE = "receiver"  # the stop event of the receiver's own job

# Consumer settings this module chooses when rdkafka-config does not set them.
DEFAULTS = {
    "bootstrap_timeout_ms": 2_000,  # connecting fails fast, and is retried
    "request_timeout_ms": 10_000,
    "fetch_max_wait_ms": 100,  # an idle partition answers within a poll
    "max_partition_fetch_bytes": 4 * 1024 * 1024,
    "reconnect_backoff_max_ms": 1_000,  # kafka-python's 30 s would delay the recovery
}
# Settings the source owns: offsets are committed by the bundle finalizer,
# topics are never created by reading them.
FIXED = {"enable_auto_commit": False, "allow_auto_create_topics": False}


def consumer_settings(options) -> dict:
    """KafkaConsumer arguments for ``options`` (a pipeline.config.KafkaInput):
    its ``consumer`` mapping (from rdkafka-config) over DEFAULTS, the group
    and offset reset policy, and FIXED."""
    return {
        **DEFAULTS,
        **options.consumer,
        "group_id": options.group_id,
        "auto_offset_reset": options.auto_offset_reset,
        **FIXED,
    }


# -- stopping -----------------------------------------------------------------

_STOP_EVENTS: dict[str, threading.Event] = {}
_STOP_LOCK = threading.Lock()


def _stop_event(name: str) -> threading.Event:
    with _STOP_LOCK:
        event = _STOP_EVENTS.get(name)
        if event is None:
            event = _STOP_EVENTS[name] = threading.Event()
        return event


def request_stop(name: str = LIVE) -> None:
    """End the Kafka sources of this process started with ``stop=name``:
    each commits what it read and claims the rest of its restriction."""
    _stop_event(name).set()


@dataclass(frozen=True)
class StopOnHubShutdown:
    """A ListenerHub feeder (sources/listener.py) that feeds nothing: the hub
    opens it when the receiver's inputs start and closes it when they shut
    down (SIGTERM), which stops the Kafka sources named ``name``."""

    name: str = LIVE

    async def open(self, hub) -> StopOnHubShutdown:
        _stop_event(self.name).clear()
        return self

    async def close(self) -> None:
        request_stop(self.name)


# -- records ------------------------------------------------------------------

_REQUIRED = FIELDS.keys()
MAX_TIMESTAMP = 2**33  # seconds: the year 2242


def parse_values(messages: Iterable, records: list) -> int:
    """Append to ``records`` the record of each Kafka message (a
    ConsumerRecord: topic, partition, offset, value); a value that is not a
    record is logged (rate-limited) and skipped. Returns how many were skipped."""
    append = records.append
    loads = orjson.loads
    skipped = 0
    for message in messages:
        value = message.value
        try:
            rec = loads(value)
        except (orjson.JSONDecodeError, TypeError) as exc:
            skipped += 1
            _skip(message, f"not JSON ({exc})")
            continue
        if type(rec) is not dict:
            skipped += 1
            _skip(message, f"a JSON {type(rec).__name__}, not an object")
            continue
        if not rec.keys() >= _REQUIRED or type(rec["timestamp"]) not in (float, int):
            skipped += 1
            missing = [name for name in FIELDS if name not in rec]
            _skip(message, f"missing fields {', '.join(missing[:5])}" if missing else "timestamp is not a number")
            continue
        if not 0 <= rec["timestamp"] < MAX_TIMESTAMP:  # NaN and inf cannot come from JSON
            skipped += 1
            _skip(message, f"timestamp {rec['timestamp']!r} is not seconds since 1970 (0 to 2**33)")
            continue
        append(rec)
    return skipped


def _skip(message, reason: str) -> None:
    size = len(message.value) if message.value is not None else 0
    _warn_invalid(logging.WARNING, "input kafka: skipping the message at %s/%d offset %d (%d bytes): %s",
                  message.topic, message.partition, message.offset, size, reason)


# -- outages ------------------------------------------------------------------


class _Outage:
    """Whether the brokers of one bootstrap list are reachable from this
    process; logs the first failure of an outage and the recovery."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.down_since: float | None = None
        self._lock = threading.Lock()

    def failed(self, doing: str, exc: BaseException) -> None:
        with self._lock:
            if self.down_since is not None:
                return
            self.down_since = time.monotonic()
        STATS["outages"] += 1
        log.warning("input kafka: %s unreachable while %s (%s: %s); retrying until it is back",
                    self.where, doing, type(exc).__name__, exc)

    def ok(self) -> None:
        if self.down_since is None:
            return
        with self._lock:
            since, self.down_since = self.down_since, None
        if since is not None:
            log.info("input kafka: %s reachable again after %.1f s", self.where, time.monotonic() - since)


_OUTAGES: dict[str, _Outage] = {}


def _outage(settings: dict) -> _Outage:
    servers = settings.get("bootstrap_servers")
    where = ",".join(servers) if isinstance(servers, (list, tuple)) else str(servers)
    with _STOP_LOCK:
        return _OUTAGES.setdefault(where, _Outage(where))


def _new_consumer(settings: dict):
    from kafka import KafkaConsumer

    from sinks.kafka import quiet_kafka_python

    quiet_kafka_python()
    return KafkaConsumer(**settings)


def _until_answered(settings: dict, stop: threading.Event, doing: str, ask, retry: float):
    """``ask(consumer)`` with a new consumer (closed after) until it returns
    something other than None: a failure is an outage (logged once), retried
    every ``retry`` seconds. None once ``stop`` is set."""
    outage = _outage(settings)
    while not stop.is_set():
        consumer = None
        try:
            consumer = _new_consumer(settings)
            answer = ask(consumer)
        except Exception as exc:  # noqa: BLE001 - any client error: broker not there yet
            outage.failed(doing, exc)
        else:
            outage.ok()
            if answer is not None:
                return answer
        finally:
            if consumer is not None:
                _close(consumer)
        stop.wait(retry)
    return None


def _close(consumer) -> None:
    try:
        consumer.close(autocommit=False, timeout_ms=1_000)
    except Exception as exc:  # noqa: BLE001 - closing must not raise
        log.debug("input kafka: closing a consumer: %s", exc)


# Last known end of each partition (topic, partition) -> offset, from the
# fetch responses: the backlog behind a restriction, for its size.
_HIGHWATER: dict[tuple[str, int], int] = {}


# -- the DoFns ----------------------------------------------------------------


class _ListPartitionsFn(beam.DoFn):
    """Impulse -> (topic, partition) for every partition of the topic, once the
    broker answers (retried every RETRY_SECONDS until then, or until stopped)."""

    RETRY_SECONDS = 1.0

    def __init__(self, settings: dict, topic: str, stop: str) -> None:
        self._settings = settings
        self._topic = topic
        self._stop = stop

    def process(self, _impulse):
        reported_missing = False

        def ask(consumer):
            nonlocal reported_missing
            partitions = consumer.partitions_for_topic(self._topic)
            if partitions:
                return partitions
            if not reported_missing:
                reported_missing = True
                log.warning("input kafka: topic %s does not exist (yet); waiting for it", self._topic)
            return None

        partitions = _until_answered(self._settings, _stop_event(self._stop), "listing the partitions",
                                     ask, self.RETRY_SECONDS)
        if partitions:
            log.info("input kafka: topic %s has %d partition(s)", self._topic, len(partitions))
            for partition in sorted(partitions):
                yield self._topic, partition


class _ReadPartitionFn(beam.DoFn, RestrictionProvider):
    """(topic, partition) with an OffsetRange restriction -> RecordBatches.
    The DoFn is its own restriction provider (it needs the consumer settings)."""

    BUNDLE_SECONDS = 1.0
    POLL_SECONDS = 0.2
    RETRY_SECONDS = 1.0  # between attempts to create the consumer
    PROBE_SECONDS = 5.0  # an idle partition checks the broker this often
    PROBE_TIMEOUT_MS = 1_000
    COMMIT_TIMEOUT_MS = 5_000

    def __init__(self, settings: dict, batch_size: int, stop: str) -> None:
        self._settings = settings
        self._batch_size = batch_size
        self._stop = stop

    # -- restrictions -------------------------------------------------------

    def initial_restriction(self, element) -> OffsetRange:
        """From the group's committed offset, else per auto_offset_reset;
        retried until the broker answers. Stopped before: an empty range."""
        from kafka import TopicPartition

        tp = TopicPartition(*element)

        def ask(consumer) -> tuple[int, str]:
            start = consumer.committed(tp, timeout_ms=self.COMMIT_TIMEOUT_MS)
            if start is not None:
                return start, "committed offset"
            reset = self._settings["auto_offset_reset"]
            if reset == "earliest":
                start = consumer.beginning_offsets([tp], timeout_ms=self.COMMIT_TIMEOUT_MS)[tp]
            else:
                start = consumer.end_offsets([tp], timeout_ms=self.COMMIT_TIMEOUT_MS)[tp]
            return start, f"no committed offset, auto-offset-reset {reset}"

        found = _until_answered(self._settings, _stop_event(self._stop),
                                f"reading the offsets of {tp.topic}/{tp.partition}", ask, self.RETRY_SECONDS)
        if found is None:
            return OffsetRange(END_OFFSET, END_OFFSET)
        start, origin = found
        log.info("input kafka: %s/%d from offset %d (%s)", tp.topic, tp.partition, start, origin)
        return OffsetRange(start, END_OFFSET)

    def create_tracker(self, restriction: OffsetRange) -> OffsetRestrictionTracker:
        return OffsetRestrictionTracker(restriction)

    def split(self, element, restriction):
        yield restriction  # one reader per partition, in offset order

    def restriction_size(self, element, restriction: OffsetRange) -> int:
        highwater = _HIGHWATER.get(tuple(element))
        if highwater is None:
            return 0
        return max(0, min(highwater, restriction.stop) - restriction.start)

    # -- life cycle -----------------------------------------------------------

    def setup(self) -> None:
        self._consumer = None
        self._retry_at = 0.0
        self._assigned = None  # the TopicPartition the consumer is assigned
        self._positions: dict = {}  # TopicPartition -> offset the consumer returns next
        self._committed: dict = {}  # TopicPartition -> offset committed by this instance
        self._last_contact = time.monotonic()
        self._lock = threading.Lock()  # the consumer: process and finalizers
        self._outage = _outage(self._settings)
        self._records = Metrics.counter("dnstap_receiver", "kafka_records")
        self._invalid = Metrics.counter("dnstap_receiver", "kafka_invalid")

    def teardown(self) -> None:
        with self._lock:
            consumer, self._consumer = self._consumer, None
        if consumer is not None:
            _close(consumer)

    def _connect(self):
        """The consumer, or None while the broker cannot be reached."""
        if self._consumer is None and time.monotonic() >= self._retry_at:
            try:
                self._consumer = _new_consumer(self._settings)
            except Exception as exc:  # noqa: BLE001 - any client error: retried
                self._retry_at = time.monotonic() + self.RETRY_SECONDS
                self._outage.failed("connecting", exc)
            else:
                self._outage.ok()
                self._last_contact = time.monotonic()
        return self._consumer

    def _prepare(self, consumer, tp, start: int) -> None:
        """Fetch ``tp`` only, from ``start``. An instance that reads several
        partitions in turn (the local runner) reassigns the consumer at each
        switch, losing what was fetched ahead (one fetch per call of up to
        BUNDLE_SECONDS); one that reads a single partition (a worker per
        partition) keeps its assignment and its prefetching. Not pause/resume:
        kafka-python 3.0.12 restores the records it parked for a paused
        partition only when no drained record set is in line (``is None``
        where an empty one is meant) and never fetches that partition
        meanwhile, so a resumed partition could stall for good."""
        if self._assigned != tp:
            consumer.assign([tp])
            self._assigned = tp
            self._positions.clear()
        if self._positions.get(tp) != start:
            consumer.seek(tp, start)
            self._positions[tp] = start

    # -- reading --------------------------------------------------------------

    @beam.DoFn.unbounded_per_element()
    def process(
        self,
        element,
        finalizer=beam.DoFn.BundleFinalizerParam,  # before the SDF parameters, which Beam passes by name
        tracker=beam.DoFn.RestrictionParam(),
        watermark=beam.DoFn.WatermarkEstimatorParam(ManualWatermarkEstimator.default_provider()),
    ):
        from kafka import TopicPartition

        restriction = tracker.current_restriction()
        if restriction.start >= restriction.stop:
            return
        tp = TopicPartition(*element)
        stop = _stop_event(self._stop)
        last = None  # last offset claimed by this call
        oldest = None  # oldest timestamp of the last batch
        consumer = None if stop.is_set() else self._connect()
        if consumer is None and not stop.is_set():
            stop.wait(self.POLL_SECONDS)
        deadline = time.monotonic() + self.BUNDLE_SECONDS
        while consumer is not None and not stop.is_set():
            try:
                with self._lock:
                    self._prepare(consumer, tp, restriction.start if last is None else last + 1)
                    polled = consumer.poll(timeout_ms=int(self.POLL_SECONDS * 1000), max_records=self._batch_size)
                    messages = polled.get(tp)
                    if messages:
                        self._positions[tp] = messages[-1].offset + 1
                        highwater = consumer.highwater(tp)
                        if highwater is not None:
                            _HIGHWATER[tp.topic, tp.partition] = highwater
            except Exception as exc:  # noqa: BLE001 - a client error must not fail the pipeline
                self._positions.pop(tp, None)  # where the consumer stands is unknown: seek again
                self._outage.failed(f"reading {tp.topic}/{tp.partition}", exc)
                stop.wait(self.POLL_SECONDS)
                break
            if not messages:
                self._probe(consumer, tp)
                break
            self._last_contact = time.monotonic()
            self._outage.ok()
            claimed = []
            refused = False  # a claim failed: the runner took the rest of the restriction
            below = restriction.start if last is None else last + 1
            for message in messages:
                if message.offset < below:
                    # Only after the log was truncated under the consumer (the
                    # broker lost data) and it reset to an earlier offset.
                    STATS["rewound"] += 1
                    continue
                if not tracker.try_claim(message.offset):
                    refused = True
                    break
                claimed.append(message)
            if claimed:
                last = claimed[-1].offset
                batch = RecordBatch()
                skipped = parse_values(claimed, batch)
                STATS["messages"] += len(claimed)
                if skipped:
                    STATS["invalid"] += skipped
                    self._invalid.inc(skipped)
                if batch:
                    STATS["records"] += len(batch)
                    STATS["batches"] += 1
                    self._records.inc(len(batch))
                    oldest = min(rec["timestamp"] for rec in batch)
                    yield beam.window.TimestampedValue(batch, Timestamp.of(oldest))
            if refused:
                self._positions.pop(tp, None)  # fetched past the restriction: seek next time
                self._finalize(finalizer, tp, last)
                return
            if time.monotonic() >= deadline:
                break
        self._finalize(finalizer, tp, last)
        if stop.is_set():
            end = tracker.current_restriction().stop - 1
            if last is None or end > last:
                tracker.try_claim(end)
            return
        if oldest is not None or (consumer is not None and self._outage.down_since is None):
            self._advance(watermark, oldest)
        tracker.defer_remainder()

    @staticmethod
    def _advance(watermark, oldest: float | None) -> None:
        """To the oldest record of the last batch, or, idle, to the wall clock
        less IDLE_WATERMARK_DELAY (not during an outage: what the brokers hold
        meanwhile would all be late); never back."""
        if oldest is not None:
            candidate = Timestamp.of(oldest)
        else:
            candidate = Timestamp.of(time.time() - IDLE_WATERMARK_DELAY)
        current = watermark.current_watermark()
        if current is None or candidate > current:
            watermark.set_watermark(candidate)

    def _probe(self, consumer, tp) -> None:
        """After an empty poll: every PROBE_SECONDS without news from the
        broker, ask it for the partition's end to tell idle from unreachable
        (kafka-python's poll reconnects silently)."""
        if time.monotonic() - self._last_contact < self.PROBE_SECONDS:
            return
        try:
            with self._lock:
                end = consumer.end_offsets([tp], timeout_ms=self.PROBE_TIMEOUT_MS)[tp]
        except Exception as exc:  # noqa: BLE001 - any client error means unreachable
            self._outage.failed("reading", exc)
            return
        self._last_contact = time.monotonic()
        self._outage.ok()
        _HIGHWATER.setdefault((tp.topic, tp.partition), end)

    # -- offsets --------------------------------------------------------------

    def _finalize(self, finalizer, tp, last: int | None) -> None:
        if last is not None:
            finalizer.register(functools.partial(self._commit, tp, last + 1))

    def _commit(self, tp, offset: int) -> None:
        """Bundle finalizer: commit ``offset`` (the next to read) for ``tp``.
        Never raises (the runner would fail the pipeline); a failed commit is
        counted and logged, and a later one carries the offset forward."""
        from kafka.structs import OffsetAndMetadata

        with self._lock:
            if offset <= self._committed.get(tp, -1):
                return
            consumer = self._connect()
            if consumer is None:
                STATS["commit_errors"] += 1
                return
            try:
                consumer.commit({tp: OffsetAndMetadata(offset, "", -1)}, timeout_ms=self.COMMIT_TIMEOUT_MS)
            except Exception as exc:  # noqa: BLE001 - retried by the next commit
                STATS["commit_errors"] += 1
                _warn_commit(logging.WARNING, "input kafka: committing offset %d of %s/%d failed: %s: %s",
                             offset, tp.topic, tp.partition, type(exc).__name__, exc)
                return
            self._committed[tp] = offset
        STATS["commits"] += 1


class ReadFromKafka(beam.PTransform):
    """RecordBatches of the records in Kafka topic ``options.topic`` (a
    pipeline.config.KafkaInput: JSON values written by output.kafka), read
    by consumer group ``options.group_id``.

    ``batch_size``: most records per poll (and so per batch). ``stop``: the
    name of the stop event that ends the source (:func:`request_stop`);
    the receiver's own job uses LIVE, which StopOnHubShutdown sets.
    """

    def __init__(self, options, *, batch_size: int = 512, stop: str = LIVE) -> None:
        super().__init__()
        if options.format != "json":
            raise ValueError(f"ReadFromKafka reads json values only, not {options.format}")
        if not options.topic or not options.group_id:
            raise ValueError("ReadFromKafka needs a topic and a group id")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        settings = consumer_settings(options)
        self._list = _ListPartitionsFn(settings, options.topic, stop)
        self._read = _ReadPartitionFn(settings, batch_size, stop)

    def expand(self, pbegin):
        partitions = (
            pbegin
            | "Impulse" >> beam.Impulse()
            | "ListPartitions" >> beam.ParDo(self._list).with_output_types(beam.typehints.Tuple[str, int])
            # Spreads the partitions over the workers, as Java's KafkaIO does; the
            # partition list is bounded, so on the local runner this grouping is
            # complete before the reads start and nothing after it waits on it.
            | "SpreadPartitions" >> beam.Reshuffle()
        )
        return partitions | "ReadPartitions" >> beam.ParDo(self._read).with_output_types(RecordBatch)
