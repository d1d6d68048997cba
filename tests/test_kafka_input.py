"""input.kafka (sources/kafka_io.py): the central job's source, against a real
Kafka-protocol broker (tansu, see kafka_broker.py).

- the configuration: defaults, the rdkafka-config mapping, what is refused;
- the wiring: input.kafka runs alone, never feeds the raw-dnstap outputs,
  and the live graph has no decode step and no GroupByKey;
- parsing the values (hypothesis): records written by output.kafka come back
  equal, anything else is counted and skipped, never raised;
- ReadFromKafka on the FnApiRunner over a 3-partition topic filled by
  output.kafka's own transport and encoding: every record exactly once with
  its fields; offsets committed (a second run of the group reads only the
  new messages); auto-offset-reset latest; partitions read in turn by one
  reader (a kafka-python stall, avoided); malformed values skipped and
  counted; a broker down at start, a topic created after the start; the
  stop event of the receiver's ListenerHub;
- the receiver (``python -m pipeline``) with input.kafka -> output.file json,
  stopped by SIGTERM with its offsets committed, on the DirectRunner and on
  the portable runner (LOOPBACK).
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from types import SimpleNamespace

import apache_beam as beam
import orjson
import peers
import pytest
import yaml
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from conftest import REPO, start_receiver, wait_for_lines
from fstrm_client import capture_frames
from hypothesis import given, settings
from hypothesis import strategies as st
from kafka_broker import Broker

from core.errors import ConfigError
from core.formats import format_json, get_format
from pipeline.build import build_live_pipeline, check_kafka_input, hub_spec
from pipeline.config import Config, KafkaInput, config_from_dict, load_config
from sinks.kafka import KafkaTransport, encode_messages
from sources import kafka_io
from sources.kafka_io import (
    ReadFromKafka,
    StopOnHubShutdown,
    parse_values,
    request_stop,
)
from sources.listener import HubSpec, forget_hub, get_hub
from transforms.decode import decode_batch

RECORDS = decode_batch(capture_frames())  # 1003 CLIENT_QUERY + 1003 CLIENT_RESPONSE
TOPIC = "dnstap"
PORTABLE = ("--runner=PortableRunner", "--job_endpoint=embed", "--environment_type=LOOPBACK")


def numbered(n: int, first: int = 0) -> list[dict]:
    """``n`` records of the capture, cycled, each with its own "seq"."""
    return [dict(RECORDS[i % len(RECORDS)], seq=i) for i in range(first, first + n)]


def produce(bootstrap: str, records: list[dict], key: str | None = "qname") -> list[bytes]:
    """Send ``records`` as output.kafka does (its transport and encoding, json,
    keyed by ``key``); the values sent."""
    transport = KafkaTransport(TOPIC, {"bootstrap_servers": [bootstrap]})
    transport.connect()
    try:
        chunk = encode_messages(records, get_format("json"), key)
        values = [value for _, value in chunk]
        transport.send([chunk])
    finally:
        transport.close(graceful=True)
    return values


def produce_raw(bootstrap: str, messages: list[tuple[int, bytes | None]]) -> None:
    """(partition, value) messages as they are, e.g. values that are not records."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap)
    try:
        for partition, value in messages:
            producer.send(TOPIC, value=value, key=b"k", partition=partition)
        producer.flush(10)
    finally:
        producer.close(5)


def committed(bootstrap: str, group: str, partitions: int = 3) -> list[int | None]:
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        return [consumer.committed(TopicPartition(TOPIC, p), timeout_ms=5_000) for p in range(partitions)]
    finally:
        consumer.close(autocommit=False)


def kafka_input(bootstrap: str, **section) -> KafkaInput:
    """input.kafka as the receiver reads it from its configuration."""
    data = {"enable": True, "topic": TOPIC, "rdkafka-config": {"bootstrap.servers": bootstrap}, **section}
    return config_from_dict({"input": {"tcp-socket": {"enable": False}, "kafka": data}}).input.kafka


# Records the pipelines collect, by run name (the DoFn runs in this process).
_COLLECTED: dict[str, list] = {}


class _Collect(beam.DoFn):
    def __init__(self, name: str) -> None:
        self._name = name

    def process(self, batch):
        _COLLECTED[self._name].extend(batch)


def run_source(options: KafkaInput, until, *, timeout: float = 30.0, quiet: float = 0.5, during=None) -> list:
    """Run ReadFromKafka(options) on the FnApiRunner until ``until(records)``
    holds (or ``timeout`` passed), plus ``quiet`` seconds in which a duplicate
    would show, then stop it; the records. ``during()`` runs in a thread
    meanwhile."""
    name = f"test-{uuid.uuid4().hex}"
    records = _COLLECTED[name] = []

    def stopper() -> None:
        if during is not None:
            during()
        deadline = time.monotonic() + timeout
        while not until(records) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(quiet)
        request_stop(name)

    thread = threading.Thread(target=stopper, daemon=True)
    thread.start()
    with beam.Pipeline(runner=FnApiRunner()) as p:
        _ = p | ReadFromKafka(options, stop=name) | beam.ParDo(_Collect(name))
    thread.join(5)
    return _COLLECTED.pop(name)


@pytest.fixture
def broker(tmp_path):
    b = Broker(tmp_path / "tansu", TOPIC, partitions=3)
    b.start()
    yield b
    b.kill()


# --------------------------------------------------------------------------- configuration


def test_defaults_off_json_latest():
    kafka = Config().input.kafka
    assert kafka == KafkaInput(enable=False, topic=None, group_id="dnstap-receiver", auto_offset_reset="latest",
                               format="json")
    assert kafka.rdkafka_config == Config().output.kafka.rdkafka_config  # the same mapping as output.kafka
    # input.kafka alone is an input.
    config_from_dict({"input": {"tcp-socket": {"enable": False},
                                "kafka": {"enable": True, "topic": "t", "rdkafka-config": {"bootstrap.servers": "h:1"}}}})


def test_rdkafka_config_maps_connection_security_and_fetch_settings(tmp_path):
    conf = tmp_path / "central.conf"
    conf.write_text("""
input:
  tcp-socket: {enable: false}
  kafka:
    enable: true
    topic: dnstap
    group-id: central
    auto-offset-reset: earliest
    rdkafka-config:
      "bootstrap.servers": "k1:9092, k2:9092"
      "client.id": central-1
      "security.protocol": sasl_ssl
      "sasl.mechanisms": PLAIN
      "sasl.username": u
      "sasl.password": p
      "ssl.ca.location": /etc/ca.pem
      "request.timeout.ms": "15000"
      "fetch.wait.max.ms": 50
      "max.partition.fetch.bytes": "8388608"
""")
    kafka = load_config(str(conf)).input.kafka
    assert (kafka.enable, kafka.topic, kafka.group_id, kafka.auto_offset_reset) == (True, "dnstap", "central", "earliest")
    assert kafka.consumer == {
        "bootstrap_servers": ["k1:9092", "k2:9092"], "client_id": "central-1", "security_protocol": "SASL_SSL",
        "sasl_mechanism": "PLAIN", "sasl_plain_username": "u", "sasl_plain_password": "p",
        "ssl_cafile": "/etc/ca.pem", "request_timeout_ms": 15_000, "fetch_max_wait_ms": 50,
        "max_partition_fetch_bytes": 8_388_608,
    }
    settings_ = kafka_io.consumer_settings(kafka)
    assert settings_["group_id"] == "central" and settings_["auto_offset_reset"] == "earliest"
    assert settings_["enable_auto_commit"] is False and settings_["request_timeout_ms"] == 15_000
    assert settings_["fetch_max_wait_ms"] == 50 and settings_["reconnect_backoff_max_ms"] == 1_000


@pytest.mark.parametrize("section,message", [
    ({"format": "text"}, "input.kafka.format: expected json (text and yaml values cannot be read back"),
    ({"format": "yaml"}, "input.kafka.format: expected json"),
    ({"topic": None}, "input.kafka.topic: required when input.kafka.enable is true"),
    ({"rdkafka-config": {"bootstrap.servers": None}}, "input.kafka.rdkafka-config.bootstrap.servers: required"),
    ({"rdkafka-config": {"acks": "all"}}, "input.kafka.rdkafka-config.acks: a producer setting (output.kafka only)"),
    ({"rdkafka-config": {"group.id": "g"}}, "input.kafka.rdkafka-config.group.id: set input.kafka.group-id instead"),
    ({"rdkafka-config": {"auto.offset.reset": "earliest"}}, "set input.kafka.auto-offset-reset instead"),
    ({"rdkafka-config": {"enable.auto.commit": "true"}}, "enable.auto.commit: not supported: the source commits"),
    ({"rdkafka-config": {"fetch.wait.max": 5}},
     "fetch.wait.max: not supported (no kafka-python equivalent); did you mean 'fetch.wait.max.ms'?"),
    ({"rdkafka-config": {"fetch.min.bytes": "lots"}}, "fetch.min.bytes: expected a positive integer, got 'lots'"),
    ({"rdkafka-config": "h:1"}, "input.kafka.rdkafka-config: expected a mapping"),
    ({"auto-offset-reset": "smallest"}, "input.kafka.auto-offset-reset: expected one of earliest, latest"),
    ({"group-id": None}, "input.kafka.group-id: expected a consumer group name"),
    ({"bootstrap-servers": "h:1"}, "input.kafka.bootstrap-servers: unknown key"),
])
def test_refused_settings_name_the_key(section, message):
    rdkafka = {"bootstrap.servers": "h:1"}
    if isinstance(section.get("rdkafka-config"), dict):
        rdkafka.update(section.pop("rdkafka-config"))
    data = {"enable": True, "topic": TOPIC, "rdkafka-config": rdkafka, **section}
    with pytest.raises(ConfigError) as err:
        config_from_dict({"input": {"tcp-socket": {"enable": False}, "kafka": data}})
    assert message in str(err.value)


# --------------------------------------------------------------------------- wiring


def central(**over) -> Config:
    data = {"input": {"tcp-socket": {"enable": False},
                      "kafka": {"enable": True, "topic": TOPIC, "rdkafka-config": {"bootstrap.servers": "h:1"}}},
            "web-api": {"enable": False}}
    for section, value in over.items():
        data.setdefault(section, {}).update(value)
    return config_from_dict(data)


def test_kafka_runs_alone():
    config = config_from_dict({"input": {"kafka": {"enable": True, "topic": TOPIC,
                                                   "rdkafka-config": {"bootstrap.servers": "h:1"}}}})
    with pytest.raises(ConfigError, match=r"input\.kafka: runs alone, but input\.tcp-socket is enabled too "
                                          r"\(input\.tcp-socket is enabled by default\)"):
        build_live_pipeline(config, PipelineOptions([]))
    both = central(input={"unix-socket": {"enable": True, "path": "/tmp/x.sock"}})
    with pytest.raises(ConfigError, match=r"input\.unix-socket is enabled too"):
        check_kafka_input(both)


@pytest.mark.parametrize("output", ["dnstap-file", "dnstap"])
def test_raw_dnstap_outputs_refused_naming_both_keys(tmp_path, output):
    section = {"enable": True, "file": str(tmp_path / "d.fstrm")} if output == "dnstap-file" else {
        "enable": True, "remote-address": "127.0.0.1", "remote-port": 6000}
    with pytest.raises(ConfigError, match=rf"^output\.{output}: cannot be fed by input\.kafka"):
        build_live_pipeline(central(output={output: section}), PipelineOptions([]))


def test_live_graph_reads_records_without_decode_or_group_by_key(tmp_path):
    config = central(output={"file": {"enable": True, "format": "json", "file": str(tmp_path / "o")}})
    spec = hub_spec(config)
    assert spec.tcp == () and spec.unix == () and spec.feeders == (StopOnHubShutdown(),)
    proto = build_live_pipeline(config, PipelineOptions([]), spec).to_runner_api()
    transforms = proto.components.transforms.values()
    names = [t.unique_name for t in transforms]
    # The one GroupByKey spreads the (bounded) partition list, before the reads.
    groups = [t.unique_name for t in transforms if t.spec.urn == "beam:transform:group_by_key:v1"]
    assert len(groups) == 1 and groups[0].startswith("ReadFromKafka/SpreadPartitions/"), groups
    assert any(n.startswith("ReadFromKafka/ReadPartitions") for n in names)
    assert not any("Decode" in n or "ReadFromFrameStream" in n for n in names)
    assert any(n.startswith("PublishStatistics") for n in names) and any(n.startswith("WriteToFile") for n in names)


def test_hub_shutdown_sets_the_stop_event():
    name = f"hub-{uuid.uuid4().hex}"
    spec = HubSpec(feeders=(StopOnHubShutdown(name),))
    request_stop(name)  # left over from an earlier run: cleared when the hub opens
    hub = get_hub(spec)
    try:
        assert not kafka_io._stop_event(name).is_set()
        hub.shutdown()
        assert hub.stopped.wait(10)
        assert kafka_io._stop_event(name).is_set()
    finally:
        forget_hub(spec)


# --------------------------------------------------------------------------- values


def message(value, offset: int = 0):
    return SimpleNamespace(topic=TOPIC, partition=0, offset=offset, value=value)


@settings(max_examples=60, deadline=None)
@given(picks=st.lists(st.integers(0, len(RECORDS) - 1), max_size=30),
       junk=st.lists(st.binary(max_size=60), max_size=10))
def test_parse_values_returns_records_and_counts_the_rest(picks, junk):
    good = [RECORDS[i] for i in picks]
    messages = [message(format_json(r)) for r in good] + [message(v) for v in junk]
    records: list = []
    skipped = parse_values(messages, records)
    assert records[: len(good)] == good
    assert [list(r) for r in records[: len(good)]] == [list(r) for r in good]  # field order kept
    assert skipped + len(records) == len(messages)


@pytest.mark.parametrize("value", [
    None, b"", b"not json", b"\xff\xfe", b"[1, 2]", b'"text"', b"42",
    b'{"timestamp": 1.5, "qname": "a."}',
])
def test_parse_values_skips_what_is_not_a_record(value):
    records: list = []
    assert parse_values([message(value)], records) == 1 and records == []
    bad_time = dict(RECORDS[0], timestamp="yesterday")
    assert parse_values([message(orjson.dumps(bad_time))], records) == 1 and records == []


@pytest.mark.parametrize("timestamp", [1.7e12, 2**33, -1, -9.2e12, 9.2e12, 1e300])
def test_parse_values_skips_timestamps_out_of_range(timestamp):
    """Milliseconds (1.7e12) pushed the watermark ~50,000 years ahead; +-9.2e12
    made Beam's timestamp coder raise, failing the bundle and re-reading it for ever."""
    records: list = []
    assert parse_values([message(orjson.dumps(dict(RECORDS[0], timestamp=timestamp)))], records) == 1
    assert records == []
    edge = [dict(RECORDS[0], timestamp=t) for t in (0, 2**33 - 1, 1_700_000_000.25)]
    assert parse_values([message(orjson.dumps(r)) for r in edge], records) == 0 and records == edge


# --------------------------------------------------------------------------- the source


def test_every_record_once_and_a_second_run_reads_only_new_messages(broker):
    first = numbered(3000)
    values = produce(broker.bootstrap, first)
    options = kafka_input(broker.bootstrap, **{"group-id": "g1", "auto-offset-reset": "earliest"})
    got = run_source(options, lambda r: len(r) >= len(first))
    assert sorted(r["seq"] for r in got) == list(range(3000))
    assert sorted(map(format_json, got)) == sorted(values)  # every field, as output.kafka wrote it
    offsets = committed(broker.bootstrap, "g1")
    assert all(offsets) and sum(offsets) == 3000, offsets  # 3 partitions, each read and committed

    second = numbered(500, first=3000)
    produce(broker.bootstrap, second)
    again = run_source(options, lambda r: len(r) >= len(second))
    assert sorted(r["seq"] for r in again) == list(range(3000, 3500))
    assert sum(committed(broker.bootstrap, "g1")) == 3500
    # Another group with auto-offset-reset earliest reads everything.
    other = kafka_input(broker.bootstrap, **{"group-id": "g2", "auto-offset-reset": "earliest"})
    assert len(run_source(other, lambda r: len(r) >= 3500)) == 3500


def wait_for_log(caplog, text: str, count: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while sum(text in r.getMessage() for r in list(caplog.records)) < count and time.monotonic() < deadline:
        time.sleep(0.05)


def test_latest_starts_a_new_group_at_the_end(broker, caplog):
    # One message per partition, so one batch each: tansu 0.6 reports the end
    # of a partition right only then (see kafka_broker.TopicReader.settle).
    produce_raw(broker.bootstrap, [(p, orjson.dumps(dict(RECORDS[0], seq=-1))) for p in range(3)])
    caplog.set_level(logging.INFO, logger="dnstap_receiver.input")

    def after_start() -> None:
        wait_for_log(caplog, "from offset 1 (no committed offset, auto-offset-reset latest)", 3)
        produce(broker.bootstrap, numbered(300))

    options = kafka_input(broker.bootstrap, **{"group-id": "new", "auto-offset-reset": "latest"})
    got = run_source(options, lambda r: len(r) >= 300, during=after_start)
    assert sorted(r["seq"] for r in got) == list(range(300))


def test_topic_created_after_the_start_is_waited_for(tmp_path, caplog):
    b = Broker(tmp_path / "tansu", TOPIC, partitions=3)
    b.start(create_topic=False)

    def create_later() -> None:
        time.sleep(1.5)
        b.create_topic()
        produce(b.bootstrap, numbered(100))

    caplog.set_level(logging.INFO, logger="dnstap_receiver.input")
    options = kafka_input(b.bootstrap, **{"group-id": "g", "auto-offset-reset": "earliest"})
    try:
        got = run_source(options, lambda r: len(r) >= 100, during=create_later)
    finally:
        b.kill()
    assert sorted(r["seq"] for r in got) == list(range(100))
    lines = [r.getMessage() for r in caplog.records if r.name == "dnstap_receiver.input"]
    assert sum(f"topic {TOPIC} does not exist (yet)" in line for line in lines) == 1, lines


def test_partitions_read_in_turn_with_fetches_in_flight(broker, monkeypatch):
    """One DoFn instance switches partitions every few batches, while
    fetches ahead are in flight: no partition may stall (kafka-python's
    pause/resume parked such a fetch for good, and the read never ended)."""
    monkeypatch.setattr(kafka_io._ReadPartitionFn, "BUNDLE_SECONDS", 0.02)
    produce(broker.bootstrap, numbered(12_000))
    options = kafka_input(broker.bootstrap, **{"group-id": "g", "auto-offset-reset": "earliest"})
    got = run_source(options, lambda r: len(r) >= 12_000, timeout=30, quiet=0.2)
    assert len(got) == 12_000 and len({r["seq"] for r in got}) == 12_000


def test_malformed_values_counted_and_skipped(broker):
    before = kafka_io.STATS["invalid"]
    good = numbered(300)
    produce(broker.bootstrap, good[:150])
    bad = [b"not json", b"[1, 2, 3]", b'{"timestamp": 1}', orjson.dumps(dict(RECORDS[0], timestamp="x")), None]
    produce_raw(broker.bootstrap, [(p, v) for v in bad for p in range(3)])
    produce(broker.bootstrap, good[150:])
    options = kafka_input(broker.bootstrap, **{"group-id": "g", "auto-offset-reset": "earliest"})
    got = run_source(options, lambda r: len(r) >= 300)
    assert sorted(r["seq"] for r in got) == list(range(300))
    assert kafka_io.STATS["invalid"] - before == 15
    assert sum(committed(broker.bootstrap, "g")) == 300 + 15  # skipped values are not read again


def test_broker_down_at_start_then_back(tmp_path, caplog):
    b = Broker(tmp_path / "tansu", TOPIC, partitions=3)
    records = numbered(900)

    def start_later() -> None:
        time.sleep(2.5)
        b.start()
        produce(b.bootstrap, records)

    caplog.set_level(logging.INFO, logger="dnstap_receiver.input")
    options = kafka_input(b.bootstrap, **{"group-id": "g", "auto-offset-reset": "earliest"})
    try:
        got = run_source(options, lambda r: len(r) >= 900, during=start_later, timeout=40)
    finally:
        b.kill()
    assert sorted(r["seq"] for r in got) == list(range(900))
    lines = [r.getMessage() for r in caplog.records if r.name == "dnstap_receiver.input"]
    down = [line for line in lines if "unreachable" in line]
    assert len(down) == 1, lines  # once per outage, not per attempt
    assert f"127.0.0.1:{b.port} unreachable while listing the partitions" in down[0]
    assert any("reachable again after" in line for line in lines), lines


# --------------------------------------------------------------------------- the receiver


def receiver_config(broker: Broker, out, group: str) -> dict:
    return {
        "input": {"kafka": {"enable": True, "topic": TOPIC, "group-id": group, "auto-offset-reset": "earliest",
                            "rdkafka-config": {"bootstrap.servers": broker.bootstrap}}},
        "latency": {"enable": False},  # matched at the edge
        "output": {"file": {"enable": True, "format": "json", "file": str(out)}},
    }


@pytest.mark.parametrize("runner", ["direct", "portable"])
def test_receiver_reads_kafka_to_a_file_and_commits_on_sigterm(broker, tmp_path, runner):
    out = tmp_path / "central.jsonl"
    receiver = start_receiver(tmp_path / "rx", receiver_config(broker, out, "central"),
                              extra_args=PORTABLE if runner == "portable" else (), timeout=90)
    values = produce(broker.bootstrap, numbered(len(RECORDS)))
    assert wait_for_lines(out, len(values), timeout=60, receiver=receiver) == len(values), receiver.logs()
    assert receiver.stop(timeout=60) == 0, receiver.logs()
    assert Counter(out.read_bytes().splitlines()) == Counter(values)
    assert sum(committed(broker.bootstrap, "central")) == len(values)
    logs = receiver.stderr_path.read_text()
    assert f"input kafka: topic {TOPIC} has 3 partition(s)" in logs
    if runner == "portable":
        assert "runner: PortableRunner" in logs


def test_receiver_refuses_kafka_with_the_default_tcp_input(broker, tmp_path):
    conf = tmp_path / "c.yaml"
    config = receiver_config(broker, tmp_path / "o.jsonl", "g")
    config["input"]["tcp-socket"] = {"local-port": peers.free_port()}  # enabled, as by default
    conf.write_text(yaml.safe_dump(config))
    proc = subprocess.run([sys.executable, "-m", "pipeline", "-c", str(conf)], cwd=REPO, capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 2
    assert "input.kafka: runs alone, but input.tcp-socket is enabled too" in proc.stderr
