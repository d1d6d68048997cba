"""The running receiver's HTTP API and Prometheus metrics, fed real dnstap frames."""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.request

import pytest

import peers
from fstrm_client import FstrmClient, capture_frames, free_tcp_port

LOGIN, PASSWORD = "ops", "n0t-the-default"


def _get(port: int, path: str, auth: bool = True) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if auth:
        token = base64.b64encode(f"{LOGIN}:{PASSWORD}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def _wait_for(port: int, path: str, ready, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status, body = _get(port, path)
        if status == 200 and ready(body):
            return body
        assert time.monotonic() < deadline, f"{path}: {status} {body}"
        time.sleep(0.2)


@pytest.fixture
def running(receiver, tmp_path):
    """A receiver with the API on, fed the 2006 frames of the unbound capture."""
    port, api_port = free_tcp_port(), free_tcp_port()
    rx = receiver(
        tmp_path,
        {
            "input": {"tcp-socket": {"enable": True, "local-address": "127.0.0.1", "local-port": port}},
            "web-api": {"enable": True, "local-port": api_port, "login": LOGIN, "password": PASSWORD,
                        "api-key": "also-not-the-default"},
            "statistics": {"window": 1},
        },
    )
    with FstrmClient.tcp("127.0.0.1", port) as client:
        client.handshake()
        client.send_frames(capture_frames("unbound-tcp.fstrm"))
        client.stop()  # waits for FINISH
    yield rx, api_port
    assert rx.stop() == 0, rx.logs()


def test_api_serves_the_live_statistics(running):
    rx, api = running
    body = _wait_for(api, "/counters?more=query/aaaa", lambda b: b["counters"]["response"] == 1003)
    counters = body["counters"]
    assert counters["query"] == 1003 and counters["clients"] == 1
    assert counters["response/noerror"] + counters["response/nxdomain"] == 1003
    assert _get(api, "/streams") == (200, {"streams": ["unbound-probe"]})
    tables = _get(api, "/tables?n=2&stream=unbound-probe")[1]["tables"]
    assert tables["clients"]["hit/ip"] == [["127.0.0.1", 2006]]
    windows = _wait_for(api, "/windows?last=5", lambda b: b["windows"])["windows"]
    assert sum(w["counters"]["query"] for w in windows) <= 1003
    assert _get(api, "/counters", auth=False)[0] == 401
    assert _get(api, "/tables?n=abc")[0] == 400
    assert _get(api, "/counters?stream=nope")[0] == 400


@pytest.mark.integration
def test_real_prometheus_scrapes_the_running_receiver(running, tmp_path):
    rx, api = running
    _wait_for(api, "/counters", lambda b: b["counters"]["query"] == 1003)
    found, targets, logs = peers.prometheus_scrape(
        tmp_path, api, LOGIN, PASSWORD, "dnstap_queries_total",
        lambda values: values.get("unbound-probe") == 1003,
    )
    assert found == {None: 1003.0, "unbound-probe": 1003.0}, f"{found}\n{targets}\n{logs}"
