"""pipeline/build.py: the shape of the live graph, the runner it picks, and a real
in-process run (sockets -> decode -> JSON file) on the FnApiRunner.

Each in-process run uses its own free port (a spec of its own in the hub registry)
and forgets its hub afterwards.
"""

from __future__ import annotations

import threading
import time

import orjson
import pytest
from pathlib import Path
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.portability import common_urns
from apache_beam.runners.portability import prism_runner
from apache_beam.runners.portability.fn_api_runner import FnApiRunner

from core.formats import format_json
from core.latency import LatencyMatcher
from core.message import decode
from fstrm_client import FstrmClient, capture_frames, data_stream, free_tcp_port
from pipeline.build import build_live_pipeline, hub_spec, make_runner
from pipeline.config import config_from_dict
from sources.listener import forget_hub, get_hub
from transforms.decode import STATS as DECODE_STATS

RUN_TIMEOUT = 60.0

FORBIDDEN_URNS = {
    common_urns.primitives.GROUP_BY_KEY.urn,
    common_urns.composites.COMBINE_PER_KEY.urn,
    common_urns.composites.RESHUFFLE.urn,
    common_urns.combine_components.COMBINE_GROUPED_VALUES.urn,
    "beam:transform:group_by_key:v1",
    "beam:transform:combine_per_key:v1",
    "beam:transform:reshuffle:v1",
}


def live_config(port: int, out=None, *, fmt: str = "json", stdout: bool = False, unix: str | None = None):
    data: dict = {
        "input": {"tcp-socket": {"enable": True, "local-address": "127.0.0.1", "local-port": port}},
        "output": {"stdout": {"enable": stdout, "format": fmt}},
    }
    if unix is not None:
        data["input"]["unix-socket"] = {"enable": True, "path": unix}
    if out is not None:
        data["output"]["file"] = {"enable": True, "format": fmt, "file": str(out), "file-max-size": "1G"}
    return config_from_dict(data)


def all_urns(pipeline) -> dict[str, str]:
    proto = pipeline.to_runner_api()
    return {t.unique_name: t.spec.urn for t in proto.components.transforms.values()}


def test_live_graph_has_no_group_by_key(tmp_path):
    config = live_config(free_tcp_port(), tmp_path / "out.json", stdout=True)
    p = build_live_pipeline(config, PipelineOptions(["--runner=DirectRunner"]))
    urns = all_urns(p)
    bad = {name: urn for name, urn in urns.items() if urn in FORBIDDEN_URNS}
    assert not bad, f"grouping transforms in the live graph: {bad}"
    names = set(urns)
    for expected in ("ReadFromFrameStream", "DecodeDnstap", "WriteToFile", "WriteToStdout"):
        assert expected in names, f"{expected} missing from {sorted(names)}"
    assert common_urns.primitives.IMPULSE.urn in urns.values()
    assert common_urns.primitives.PAR_DO.urn in urns.values()


def test_live_graph_with_every_transform_has_no_group_by_key_and_keeps_the_order(tmp_path):
    geoip = Path(__file__).parent / "data" / "geoip"
    config = live_config(free_tcp_port(), tmp_path / "out.json")
    config = config_from_dict(
        {
            "input": {"tcp-socket": {"local-address": "127.0.0.1", "local-port": config.input.tcp_socket.local_port}},
            "output": {"file": {"enable": True, "format": "json", "file": str(tmp_path / "out.json")}},
            "normalize": {"qname-lowercase": True, "add-tld": True},
            "filter": {"drop-rcodes": ["REFUSED"]},
            "geoip": {"enable": True, "city-database": str(geoip / "GeoIP2-City-Test.mmdb")},
            "privacy": {"anonymize-ip": True},
        }
    )
    p = build_live_pipeline(config, PipelineOptions(["--runner=DirectRunner"]))
    urns = all_urns(p)
    assert not {name for name, urn in urns.items() if urn in FORBIDDEN_URNS}
    order = ["DecodeDnstap", "NormalizeQnames", "MatchLatency", "FilterMessages", "EnrichGeoIP", "ApplyPrivacy", "WriteToFile"]
    proto = p.to_runner_api()
    (root,) = proto.root_transform_ids
    top = [proto.components.transforms[i].unique_name for i in proto.components.transforms[root].subtransforms]
    assert [name for name in top if name in order] == order


@pytest.mark.parametrize("argv", [["--runner=DirectRunner"], [], ["--runner=FnApiRunner"]])
def test_local_runner_is_fn_api_runner(tmp_path, argv):
    config = live_config(free_tcp_port(), tmp_path / "out.json")
    p = build_live_pipeline(config, PipelineOptions(argv))
    assert isinstance(p.runner, FnApiRunner)
    assert isinstance(make_runner(PipelineOptions(argv)), FnApiRunner)


def test_other_runner_names_are_left_to_beam():
    assert make_runner(PipelineOptions(["--runner=PrismRunner"])) is None


class PipelineThread:
    """``pipeline.run().wait_until_finish()`` in a background thread."""

    def __init__(self, pipeline) -> None:
        self.pipeline = pipeline
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="pipeline-under-test", daemon=True)

    def _run(self) -> None:
        try:
            self.pipeline.run().wait_until_finish()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def start(self) -> "PipelineThread":
        self.thread.start()
        return self

    def join(self, timeout: float = RUN_TIMEOUT) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"the pipeline did not finish within {timeout} s of shutdown"
        if self.error is not None:
            raise self.error


def connect_when_listening(port: int, runner: PipelineThread, timeout: float = RUN_TIMEOUT) -> FstrmClient:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return FstrmClient.tcp("127.0.0.1", port)
        except ConnectionRefusedError:
            if not runner.thread.is_alive():
                runner.join(0)
                raise AssertionError("the pipeline ended before listening") from None
            assert time.monotonic() < deadline, f"nothing listening on port {port} after {timeout} s"
            time.sleep(0.05)


@pytest.fixture
def no_prism(monkeypatch):
    """Fail if anything tries to run (and so download) Prism."""

    def refuse(*_args, **_kwargs):
        raise AssertionError("Prism was used")

    monkeypatch.setattr(prism_runner.PrismRunner, "run_pipeline", refuse, raising=False)
    monkeypatch.setattr(prism_runner.PrismJobServer, "local_bin", refuse)


def run_live(config, send, *, argv=("--runner=DirectRunner",)) -> None:
    """Run the live pipeline of ``config``; ``send(port)`` talks to it; then shut down."""
    spec = hub_spec(config)
    port = spec.tcp[0].port
    pipeline = build_live_pipeline(config, PipelineOptions(list(argv)), spec)
    runner = PipelineThread(pipeline).start()
    try:
        client = connect_when_listening(port, runner)
        client.close()
        send(port)
        get_hub(spec).shutdown()
        runner.join()
    finally:
        if runner.thread.is_alive():
            get_hub(spec).shutdown()
            runner.thread.join(RUN_TIMEOUT)
        forget_hub(spec)


def test_in_process_run_writes_every_message(tmp_path, no_prism):
    frames = capture_frames("unbound-tcp.fstrm")
    assert len(frames) == 2006
    out = tmp_path / "out.json"
    config = live_config(free_tcp_port(), out)

    def send(port: int) -> None:
        with FstrmClient.tcp("127.0.0.1", port) as client:
            client.handshake()
            client.send_frames(frames)
            client.stop()

    run_live(config, send)
    lines = out.read_bytes().splitlines()
    assert len(lines) == 2006
    records = [orjson.loads(line) for line in lines]
    # The default config matches responses to queries (unbound's responses carry no query time).
    expected = LatencyMatcher(timeout=10.0, max_entries=100000, emit_unanswered=False).process(
        [decode(f) for f in frames]
    )
    assert all(isinstance(e["latency"], float) for e in expected if e["type"] == "response")
    assert [(r["qname"], r["rrtype"]) for r in records] == [(e["qname"], e["rrtype"]) for e in expected]
    assert records == [orjson.loads(format_json(e)) for e in expected]


def test_in_process_run_two_inputs_and_undecodable_frames(tmp_path, no_prism):
    """TCP and unix inputs at once; frames that are not dnstap are skipped, the rest kept."""
    frames = capture_frames("named.fstrm")
    out = tmp_path / "out.json"
    sock = tmp_path / "in.sock"
    if len(str(sock)) > 100:
        pytest.fail(f"tmp_path too long for a unix socket: {sock}")
    config = live_config(free_tcp_port(), out, unix=str(sock))
    undecodable_before = DECODE_STATS["undecodable"]

    def send(port: int) -> None:
        with FstrmClient.tcp("127.0.0.1", port) as tcp, FstrmClient.unix(sock) as unix:
            tcp.handshake()
            unix.handshake()
            tcp.send_frames(frames[:50])
            unix.send(data_stream([b"\xff\xff\xff not dnstap"]))
            unix.send_frames(frames[50:])
            tcp.stop()
            unix.stop()

    run_live(config, send)
    records = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert len(records) == len(frames)
    got = sorted((r["qname"], r["rrtype"], r["timestamp"]) for r in records)
    want = sorted((e["qname"], e["rrtype"], e["timestamp"]) for e in map(decode, frames))
    assert got == want
    assert DECODE_STATS["undecodable"] == undecodable_before + 1


def test_idle_pipeline_stops_on_shutdown(tmp_path, no_prism):
    out = tmp_path / "idle.json"
    config = live_config(free_tcp_port(), out)
    started = time.monotonic()
    run_live(config, lambda port: None)
    assert time.monotonic() - started < 30
    assert not out.exists() or out.read_bytes() == b""
