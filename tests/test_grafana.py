"""deploy/grafana/: the dashboard JSON and the provisioning example. Every metric a PromQL
expression names must be in the ``/metrics`` of a real receiver that has seen traffic (with
the labels the expression matches on), and every expression must run in a real Prometheus
scraping that receiver and return data."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import peers
import pytest
import yaml
from dnstap_traffic import Traffic, start_watched_receiver
from prometheus_client.parser import text_string_to_metric_families

GRAFANA = Path(__file__).resolve().parent.parent / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dnstap-receiver.json"
LOGIN, PASSWORD = "grafana", "n0t-the-default-either"
STREAMS = {"unbound01": 200, "dnsdist01": 50}

# Grafana's variables, as Grafana would substitute them for a short range; $identity as
# Grafana writes "All" (the variable's allValue), one stream, and a multi-selection (a regex
# alternation of the escaped values).
VARIABLES = {"$__rate_interval": "30s", "$__range": "5m"}
IDENTITIES = [".+", "unbound01", "(unbound01|dnsdist01)"]
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset"}
_MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def expressions() -> list[str]:
    exprs = [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 20
    return exprs


def substitute(expr: str, identity: str = ".+") -> str:
    for name, value in {**VARIABLES, "$identity": identity}.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, expr
    return expr


def selectors(expr: str) -> list[tuple[str | None, list[tuple[str, str, str]]]]:
    """Every series selector of a PromQL expression: (metric name or None, matchers)."""
    found = []
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)  # label lists
    for match in re.finditer(r"([a-zA-Z_:][a-zA-Z0-9_:]*)?\s*\{([^}]*)\}", text):
        found.append((match.group(1), _MATCHER.findall(match.group(2))))
    text = re.sub(r"([a-zA-Z_:][a-zA-Z0-9_:]*)?\s*\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges
    text = re.sub(r'"(?:[^"\\]|\\.)*"', " ", text)
    for match in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", text):
        if match.group(1) not in _KEYWORDS:
            found.append((match.group(1), []))
    return found


def test_selectors_are_found_in_promql():
    expr = ('histogram_quantile(0.9, sum by (le) (rate(a_bucket{identity=~".+"}[1m]))) '
            '+ on (x) b or vector(0) + sum({__name__=~"c_.+", __name__!="c_d"})')
    assert selectors(expr) == [
        ("a_bucket", [("identity", "=~", ".+")]),
        (None, [("__name__", "=~", "c_.+"), ("__name__", "!=", "c_d")]),
        ("b", []),
    ]


@pytest.fixture(scope="module")
def receiver_with_traffic(receiver_factory, tmp_path_factory):
    """A receiver with a filter and a network output whose server is down (so that their
    metrics exist), fed generated traffic (kept flowing for the test's Prometheus)."""
    tmp = tmp_path_factory.mktemp("grafana")
    rx, port, api = start_watched_receiver(receiver_factory, tmp, LOGIN, PASSWORD, "k3y-k3y-k3y")
    traffic = Traffic(port, STREAMS).start()
    try:
        yield rx, api, tmp
    finally:
        traffic.stop()
        assert rx.stop() == 0, rx.logs()


def scrape(api: int) -> str:
    request = urllib.request.Request(f"http://127.0.0.1:{api}/metrics")
    request.add_header("Authorization", "Basic " + base64.b64encode(f"{LOGIN}:{PASSWORD}".encode()).decode())
    with urllib.request.urlopen(request, timeout=5) as resp:
        return resp.read().decode()


def test_every_metric_of_the_dashboard_is_exported(receiver_with_traffic):
    _, api, _ = receiver_with_traffic
    deadline = time.monotonic() + 20
    while True:  # until the filter dropped a message and every stream was counted
        text = scrape(api)
        if "dnstap_receiver_filter_drop_domains_total" in text and all(f'identity="{s}"' in text for s in STREAMS):
            break
        assert time.monotonic() < deadline, text[-2000:]
        time.sleep(0.3)
    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    checked = set()
    for expr in expressions():
        for name, matchers in selectors(substitute(expr)):
            if name is None:  # {__name__=~"..."}: some exported metric must match
                named = [(op, value) for label, op, value in matchers if label == "__name__"]
                hits = [m for m in labels if all((re.fullmatch(v, m) is not None) == (op in ("=~", "=")) for op, v in named)]
                assert hits, f"no exported metric matches {matchers} in {expr}"
                checked.update(hits)
                continue
            assert name in labels, f"{name} (in {expr}) is not in /metrics"
            for label, _op, _value in matchers:
                assert label in labels[name], f"{name} has no label {label!r} (in {expr})"
            checked.add(name)
    variable = next(v for v in dashboard()["templating"]["list"] if v["name"] == "identity")
    metric, label = re.fullmatch(r"label_values\((\w+), (\w+)\)", variable["definition"]).groups()
    assert label in labels[metric]
    # The panels of the page: traffic, rcodes, latency, qtypes, protocols, families, distinct
    # counts, the receiver's own counts and per-output health.
    for name in ("dnstap_queries_total", "dnstap_responses_total", "dnstap_responses_rcode_total",
                 "dnstap_responses_latency_seconds_bucket", "dnstap_queries_rrtype_total",
                 "dnstap_queries_protocol_total", "dnstap_queries_family_total", "dnstap_clients", "dnstap_domains",
                 "dnstap_receiver_decode_malformed_total", "dnstap_receiver_decode_undecodable_total",
                 "dnstap_receiver_filter_drop_domains_total", "dnstap_receiver_input_feed_dropped_total",
                 "dnstap_receiver_output_tcp_socket_connected",
                 "dnstap_receiver_output_tcp_socket_buffered", "dnstap_receiver_output_tcp_socket_dropped_total"):
        assert name in checked, name


def test_every_expression_runs_in_a_real_prometheus(receiver_with_traffic):
    prometheus = peers.require("prometheus")
    _, api, tmp = receiver_with_traffic
    web = peers.free_port()
    config = tmp / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "dnstap", "scrape_timeout": "1s",
                            "basic_auth": {"username": LOGIN, "password": PASSWORD},
                            "static_configs": [{"targets": [f"127.0.0.1:{api}"]}]}],
    }))
    log_path = tmp / "prometheus.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'prometheus-data'}",
             f"--web.listen-address=127.0.0.1:{web}"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )

    def query(expr: str, at: float | None = None) -> dict:
        params = {"query": expr} if at is None else {"query": expr, "time": f"{at:.3f}"}
        url = f"http://127.0.0.1:{web}/api/v1/query?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return json.loads(exc.read())

    try:
        deadline = time.monotonic() + 30
        while True:  # four scrapes: rate() needs two samples inside its range
            try:
                result = query('count_over_time(dnstap_queries_total{identity=""}[1m])')["data"]["result"]
            except OSError:
                result = []
            if result and float(result[0]["value"][1]) >= 4:
                break
            assert proc.poll() is None and time.monotonic() < deadline, peers.file_tail(log_path)
            time.sleep(0.5)
        for identity in IDENTITIES:
            for expr in expressions():
                answer = query(substitute(expr, identity))
                assert answer["status"] == "success", (identity, expr, answer)
                assert answer["data"]["result"], f"no data for identity {identity}: {expr}"
        # The selector narrows what it should: one stream's queries are fewer than all of them,
        # and the two-stream selection is the same as "All" here.
        queries = next(t["expr"] for p in dashboard()["panels"] if p["id"] == 4 for t in p["targets"])
        at = time.time() - 2  # one instant, already scraped: the three answers agree
        counts = {i: float(query(substitute(queries, i), at)["data"]["result"][0]["value"][1]) for i in IDENTITIES}
        assert 0 < counts["unbound01"] < counts[".+"]
        assert counts["(unbound01|dnsdist01)"] == counts[".+"]
        streams = query("group by (identity) (dnstap_queries_total)")["data"]["result"]
        assert {r["metric"].get("identity") for r in streams} == {None, *STREAMS}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_dashboard_layout_and_provisioning():
    doc = dashboard()
    assert doc["uid"] == "dnstap-receiver" and doc["schemaVersion"] >= 36
    panels = doc["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        for target in p.get("targets", []):
            assert target["datasource"] == p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert target["refId"]
    row = ""
    for p in panels:  # a row's panels follow it
        if p["type"] == "row":
            row = p["title"]
        elif "all streams" in row:  # what the row says: the stream selector does not apply
            assert all("$identity" not in t["expr"] for t in p.get("targets", [])), p["title"]
    dropped = next(p for p in panels if p["title"] == "Dropped")["targets"][0]["expr"]
    for part in ("output_.+_dropped_total", "input_partial_frames_dropped_total", "input_feed_dropped_total"):
        assert part in dropped
    names = {v["name"]: v for v in doc["templating"]["list"]}
    assert names["datasource"]["type"] == "datasource" and names["datasource"]["query"] == "prometheus"
    assert names["identity"]["allValue"] == ".+"  # "All" leaves the global series out of sums
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "dnstap.yaml").read_text())
    assert provider["apiVersion"] == 1 and provider["providers"][0]["type"] == "file"
    assert provider["providers"][0]["options"]["path"] in (GRAFANA / "README.md").read_text()
    source = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "dnstap.yaml").read_text())
    assert source["datasources"][0]["type"] == "prometheus"
