"""output.kafka against a real Kafka-protocol broker (tansu, see kafka_broker.py).

- the encoding: values parse back to the records, keys are the chosen field;
- the Beam transform: every record reaches the topic, in every format and key;
- compression from rdkafka-config (gzip): fewer bytes on the wire, same messages;
- a send that fails half-way: only what the broker did not acknowledge goes again,
  and what it acknowledged counts as delivered even if the rest is dropped later;
- the broker SIGKILLed mid-stream and restarted: every message delivered exactly once;
- an outage with a small buffer: the oldest are dropped and counted, delivery resumes;
- the receiver itself (``python -m pipeline``) with output.kafka enabled.
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter

import apache_beam as beam
import orjson
import pytest
import yaml
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from hypothesis import given, settings
from hypothesis import strategies as st

import peers
from conftest import start_receiver
from core.formats import format_text, get_format
from fstrm_client import FstrmClient, capture_frames, free_tcp_port
from kafka_broker import Broker, ProduceGate, TopicReader, read_topic
from pipeline.config import config_from_dict
from sinks.delivery import Delivery
from sinks.kafka import KafkaSendError, KafkaTransport, WriteToKafka, encode_messages, producer_settings
from transforms.batches import RecordBatch
from transforms.decode import decode_batch

# Outages are noticed in seconds, not kafka-python's minutes.
FAST = {
    "request_timeout_ms": 1_500,
    "delivery_timeout_ms": 2_000,
    "bootstrap_timeout_ms": 1_000,
    "max_block_ms": 2_000,
    "reconnect_backoff_max_ms": 200,
}
RECORDS = decode_batch(capture_frames())  # 1003 CLIENT_QUERY + 1003 CLIENT_RESPONSE


def numbered(n: int) -> list[dict]:
    """``n`` records from the capture, cycled, each with its own "seq" so
    that a duplicate is visible."""
    return [dict(RECORDS[i % len(RECORDS)], seq=i) for i in range(n)]


def seqs(messages) -> list[int]:
    return [orjson.loads(value)["seq"] for _, value in messages]


def wait_until(predicate, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.fixture
def new_delivery():
    """``new_delivery(transport, name, **options)``: a Delivery for the test, closed at
    its end even when the test fails (its thread and producer stop)."""
    made = []

    def make(transport, name: str = "kafka-test", **options):
        options.setdefault("retry", 0.2)
        made.append(Delivery(name, transport, **options))
        return made[-1]

    yield make
    for d in made:
        d.close(timeout=0)


@pytest.fixture
def broker(tmp_path):
    b = Broker(tmp_path / "tansu", "dnstap")
    b.start()
    yield b
    b.kill()


@pytest.fixture
def gated(tmp_path):
    """A broker whose clients all go through a ProduceGate."""
    gate_port = peers.free_port()
    b = Broker(tmp_path / "tansu", "dnstap", advertised=gate_port)
    gate = ProduceGate(b.port, gate_port)
    b.start()
    yield b, gate
    gate.close()
    b.kill()


def kafka_options(bootstrap: str, topic: str = "dnstap", **section):
    """output.kafka as the receiver reads it from its configuration."""
    rdkafka = {"bootstrap.servers": bootstrap, **section.pop("rdkafka", {})}
    data = {"enable": True, "topic": topic, "rdkafka-config": rdkafka, **section}
    return config_from_dict({"output": {"kafka": data}}, require_input=False).output.kafka


# --------------------------------------------------------------------------- encoding

printable = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)


@settings(max_examples=50, deadline=None)
@given(qnames=st.lists(printable, min_size=1, max_size=20), key=st.sampled_from([None, "qname", "identity"]))
def test_encode_messages_one_value_per_record_keyed_by_field(qnames, key):
    records = [dict(RECORDS[i % len(RECORDS)], qname=q, identity=q[::-1]) for i, q in enumerate(qnames)]
    chunk = encode_messages(records, get_format("json"), key)
    assert isinstance(chunk, list) and len(chunk) == len(records)
    for rec, (k, value) in zip(records, chunk):
        assert orjson.loads(value) == rec
        assert not value.endswith(b"\n")
        assert k == (None if key is None else rec[key].encode("utf-8"))


def test_encode_messages_text_and_yaml():
    records = RECORDS[:50]
    text = encode_messages(records, get_format("text"), "query-ip")
    assert [v for _, v in text] == [format_text(r) for r in records]
    assert [k for k, _ in text] == [r["query-ip"].encode() for r in records]
    for rec, (_, value) in zip(records, encode_messages(records, get_format("yaml"), None)):
        assert yaml.safe_load(value) == rec


def test_producer_settings_defaults_and_overrides():
    s = producer_settings({"bootstrap_servers": ["h:1"]})
    # kafka-python's own acknowledgement defaults (acks=all, idempotent) are kept.
    assert "acks" not in s and "enable_idempotence" not in s
    assert s["request_timeout_ms"] == s["delivery_timeout_ms"] == 10_000 and s["batch_size"] == 524_288
    s = producer_settings({"acks": "1", "request_timeout_ms": "5000", "linger_ms": 20, "batch_size": 1000,
                           "enable_idempotence": "false"})
    assert s["acks"] == 1 and s["request_timeout_ms"] == 5_000 and s["delivery_timeout_ms"] == 5_020
    assert s["batch_size"] == 1000 and s["enable_idempotence"] is False
    assert producer_settings({"acks": "-1"})["acks"] == "all"
    assert producer_settings({"delivery_timeout_ms": 60_000})["delivery_timeout_ms"] == 60_000
    # From the configuration: librdkafka names mapped by pipeline/config.py.
    opts = kafka_options("a:1,b:2", rdkafka={"compression.type": "gzip", "acks": "all"})
    assert opts.producer == {"bootstrap_servers": ["a:1", "b:2"], "compression_type": "gzip", "acks": "all"}


# --------------------------------------------------------------------------- Beam


@pytest.mark.parametrize("fmt,key", [("json", "qname"), ("text", None), ("yaml", "identity"),
                                     ("json", "response-ip")])
def test_write_to_kafka_in_a_pipeline(broker, fmt, key):
    options = kafka_options(broker.bootstrap, format=fmt, key=key, retry=0.2)
    batches = [RecordBatch(RECORDS[i : i + 300]) for i in range(0, len(RECORDS), 300)]
    with beam.Pipeline(runner=FnApiRunner()) as p:
        _ = p | beam.Create(batches) | WriteToKafka(options)
    # The last DoFn torn down closes the Delivery, which has sent everything.
    got = read_topic(broker.bootstrap, "dnstap", len(RECORDS))
    assert len(got) == len(RECORDS)
    fmt_ = get_format(fmt)
    want = Counter((None if key is None else str(r[key]).encode(), fmt_.record(r)) for r in RECORDS)
    assert Counter(got) == want
    if fmt == "json":
        assert sorted(orjson.loads(v)["timestamp"] for _, v in got) == sorted(r["timestamp"] for r in RECORDS)
    if fmt == "yaml":
        assert Counter(yaml.safe_load(v)["qname"] for _, v in got) == Counter(r["qname"] for r in RECORDS)


# --------------------------------------------------------------------------- compression


def test_gzip_from_rdkafka_config(gated, new_delivery):
    broker, gate = gated
    records = numbered(3000)
    sizes = {}
    for compression in ("none", "gzip"):
        topic = f"c-{compression}"
        broker.create_topic(topic)
        options = kafka_options(broker.bootstrap, topic, rdkafka={"compression.type": compression})
        assert options.producer.get("compression_type") == (None if compression == "none" else "gzip")
        sender = new_delivery(KafkaTransport(topic, options.producer), f"kafka-{compression}")
        before = gate.produce_bytes
        for i in range(0, len(records), 500):
            sender.put(encode_messages(records[i : i + 500], get_format("json"), "qname"), 500)
        sender.close()
        assert sender.counts["delivered"] == len(records)
        sizes[compression] = gate.produce_bytes - before
        got = read_topic(broker.bootstrap, topic, len(records))
        assert seqs(got) == list(range(len(records)))  # decompressed by the consumer, in order
        assert [k for k, _ in got] == [r["qname"].encode() for r in records]
    # JSON records compress well: gzip must show on the wire.
    assert sizes["gzip"] * 4 < sizes["none"], sizes


# --------------------------------------------------------------------------- failures


def test_failed_send_keeps_only_unacknowledged_messages(gated):
    """The broker answers the first two produce requests and never the rest:
    send fails, the chunks keep exactly the messages not in the topic, and
    sending them again completes the topic without a duplicate."""
    broker, gate = gated
    records = numbered(1000)
    chunks = [encode_messages(records[i : i + 100], get_format("json"), None) for i in range(0, 1000, 100)]
    # Small produce batches: the 1000 messages take ~100 requests.
    transport = KafkaTransport("dnstap", {"bootstrap_servers": [broker.bootstrap], "batch_size": 5_000, **FAST})
    transport.connect()
    gate.hold(after=2)
    with pytest.raises(KafkaSendError, match="not acknowledged"):
        transport.send(chunks)
    transport.close(False)
    gate.cut()
    gate.release()
    first = TopicReader(broker.bootstrap, "dnstap").settle(quiet=0.5)
    left = [seq for chunk in chunks for seq in seqs(chunk)]
    assert 0 < len(first) < 1000 and gate.held >= 1
    assert transport.acknowledged_before_failure == len(first)
    assert seqs(first) + left == list(range(1000))  # acknowledged: a prefix; kept: the rest

    transport.connect()
    transport.send(chunks)
    transport.close(True)
    assert seqs(read_topic(broker.bootstrap, "dnstap", 1000)) == list(range(1000))


def test_broker_killed_mid_stream_every_message_once(gated, new_delivery):
    """Delivery + KafkaTransport while the broker is SIGKILLed in the middle of
    a send and restarted: delivered + dropped == sent, and nothing arrives twice.

    tansu keeps its log in memory, so what it acknowledged before the kill is
    read before killing it (see ProduceGate): produce requests are held from a
    point inside a send, the topic is read to its end, then the broker dies
    with the held requests; the rest of the stream goes to the new broker."""
    broker, gate = gated
    total, burst, chunk = 12_000, 3_000, 100
    records = numbered(total)
    fmt = get_format("json")
    transport = KafkaTransport("dnstap", {"bootstrap_servers": [broker.bootstrap], "batch_size": 5_000, **FAST})
    delivery = new_delivery(transport, "kafka-kill-test", retry=0.3, buffer_size=total, flush_timeout=30)

    def put(start: int, end: int, pause: float = 0.0) -> None:
        for i in range(start, end, chunk):
            delivery.put(encode_messages(records[i : i + chunk], fmt, None), chunk)
            time.sleep(pause)

    reader = TopicReader(broker.bootstrap, "dnstap")
    put(0, 3_000, pause=0.005)  # a steady stream
    wait_until(lambda: delivery.counts["delivered"] == 3_000, what="the first 3000")
    put(3_000, 3_000 + burst)  # a burst: the Delivery sends 1000 at a time
    gate.hold(after=2)  # ...of which the broker answers two produce requests
    before_kill = reader.settle(quiet=1.0)
    broker.kill()
    gate.cut()
    assert gate.held >= 1

    feeder = threading.Thread(target=put, args=(3_000 + burst, total, 0.002))
    feeder.start()  # the stream goes on while the broker is down
    # Down past delivery_timeout_ms: the send in progress fails, reconnecting too.
    wait_until(lambda: delivery.counts["send_errors"] >= 1 and delivery.counts["connect_errors"] >= 1,
               what="the outage to be noticed")
    gate.release()
    broker.start()
    after = TopicReader(broker.bootstrap, "dnstap")
    feeder.join()
    delivery.close()
    after_restart = after.settle(quiet=1.0)

    counts = delivery.counts
    got = seqs(before_kill) + seqs(after_restart)
    assert counts["queued"] == total
    assert counts["delivered"] + counts["dropped"] == total, counts
    assert len(set(got)) + counts["dropped"] == total, (len(set(got)), counts)
    duplicates = [seq for seq, n in Counter(got).items() if n > 1]
    assert not duplicates, f"{len(duplicates)} messages delivered twice, e.g. {duplicates[:5]}"
    assert counts["dropped"] == 0 and sorted(got) == list(range(total))
    # The kill came in the middle of a send whose first part was acknowledged.
    assert transport.acknowledged_before_failure > 0
    assert 3_000 < len(before_kill) < 3_000 + burst


def test_partly_acknowledged_chunk_dropped_later_counts_its_acknowledged(gated, new_delivery):
    """A send fails after the broker acknowledged part of it; what came back
    is then dropped by a buffer overflow. The acknowledged messages must count
    as delivered and only the others as dropped: the Delivery asks the
    transport how many messages a chunk still holds (KafkaTransport.pending)."""
    broker, gate = gated
    records = numbered(3_000)
    fmt = get_format("json")
    transport = KafkaTransport("dnstap", {"bootstrap_servers": [broker.bootstrap], "batch_size": 5_000, **FAST})
    delivery = new_delivery(transport, "kafka-partial-test", buffer_size=1_000)
    gate.hold(after=3)
    for i in range(0, 1_000, 100):
        delivery.put(encode_messages(records[i : i + 100], fmt, None), 100)
    wait_until(lambda: delivery.counts["send_errors"] >= 1, what="the failed send")
    for i in range(1_000, 3_000, 100):  # overflows: the oldest, sent in part, go
        delivery.put(encode_messages(records[i : i + 100], fmt, None), 100)
    gate.cut()
    gate.release()
    wait_until(lambda: delivery.snapshot()["buffered"] == 0, what="the newest 1000")
    delivery.close()
    got = seqs(TopicReader(broker.bootstrap, "dnstap").settle(quiet=0.5))
    counts = delivery.counts
    assert transport.acknowledged_before_failure > 0
    assert got[-1_000:] == list(range(2_000, 3_000)) and len(set(got)) == len(got)
    assert counts["delivered"] + counts["dropped"] == 3_000
    assert counts["delivered"] == len(got), (counts, len(got))


def test_outage_small_buffer_drops_oldest_then_resumes(broker, new_delivery):
    records = numbered(2_200)
    fmt = get_format("json")
    transport = KafkaTransport("dnstap", {"bootstrap_servers": [broker.bootstrap], **FAST})
    delivery = new_delivery(transport, "kafka-outage-test", buffer_size=300)
    for i in range(0, 200, 50):
        delivery.put(encode_messages(records[i : i + 50], fmt, None), 50)
    wait_until(lambda: delivery.counts["delivered"] == 200, what="the first 200")
    before = read_topic(broker.bootstrap, "dnstap", 200)
    broker.kill()

    started = time.monotonic()
    for i in range(200, 2_200, 50):
        delivery.put(encode_messages(records[i : i + 50], fmt, None), 50)
    assert time.monotonic() - started < 1.0  # never blocks the pipeline
    wait_until(lambda: delivery.counts["send_errors"] >= 1, what="the failed send")
    assert delivery.counts["dropped"] == 1_700  # only the newest 300 are kept
    assert delivery.snapshot()["connected"] == 0

    broker.start()
    wait_until(lambda: delivery.counts["delivered"] == 500, what="delivery to resume")
    delivery.close()
    after = read_topic(broker.bootstrap, "dnstap", 300)
    counts = delivery.counts
    assert seqs(before) == list(range(200))
    assert seqs(after) == list(range(1_900, 2_200))  # the newest, in order, once
    assert counts["delivered"] + counts["dropped"] == 2_200 == len(before) + len(after) + counts["dropped"]
    assert counts["connects"] >= 2


def test_broker_down_at_start_connects_later(tmp_path, new_delivery):
    b = Broker(tmp_path / "tansu", "dnstap")
    transport = KafkaTransport("dnstap", {"bootstrap_servers": [b.bootstrap], **FAST})
    delivery = new_delivery(transport, "kafka-late-test", buffer_size=1_000)
    try:
        delivery.put(encode_messages(numbered(100), get_format("json"), None), 100)
        wait_until(lambda: delivery.counts["connect_errors"] >= 1, what="a failed connection")
        assert "cannot connect" in delivery.last_error
        b.start()
        wait_until(lambda: delivery.counts["delivered"] == 100, what="delivery")
        delivery.close()
        assert seqs(read_topic(b.bootstrap, "dnstap", 100)) == list(range(100))
    finally:
        b.kill()


# --------------------------------------------------------------------------- the receiver


def test_receiver_forwards_every_message_to_kafka(broker, tmp_path):
    port = free_tcp_port()
    receiver = start_receiver(tmp_path / "rx", {
        "input": {"tcp-socket": {"enable": True, "local-address": "127.0.0.1", "local-port": port}},
        "output": {
            "file": {"enable": True, "format": "json", "file": str(tmp_path / "file.jsonl")},
            "kafka": {"enable": True, "format": "json", "topic": "dnstap", "key": "qname", "retry": 1,
                      "rdkafka-config": {"bootstrap.servers": broker.bootstrap, "compression.type": "gzip"}},
        },
    })
    frames = capture_frames()
    reader = TopicReader(broker.bootstrap, "dnstap")
    with FstrmClient.tcp("127.0.0.1", port) as client:
        client.handshake()
        client.send_frames(frames)
        client.stop()
    seen = reader.wait_for(len(frames), timeout=20)
    code = receiver.stop()
    messages = reader.settle(quiet=0.5)
    assert code == 0, receiver.logs()
    assert seen == len(messages) == len(frames) == 2006, receiver.logs()
    # The output's counters are in the receiver's last log line.
    assert re.search(r"output\.kafka: queued=2006, delivered=2006\b", receiver.logs()), receiver.logs()
    written = (tmp_path / "file.jsonl").read_bytes().split(b"\n")
    assert sorted(v for _, v in messages) == sorted(line for line in written if line)
    for key, value in messages:
        assert key == orjson.loads(value)["qname"].encode()
    assert Counter(orjson.loads(v)["message"] for _, v in messages) == {"CLIENT_QUERY": 1003, "CLIENT_RESPONSE": 1003}
