"""The web API (pipeline/http_api.py) over real HTTP on loopback, with a fake statistics
store: authentication, the default-credentials rule, parameters, response shapes (validated
against pipeline/openapi.yaml), errors."""

from __future__ import annotations

import base64
import hmac
import json
import logging
import socket
import urllib.error
import urllib.request
from pathlib import Path

import jsonschema
import pytest
import yaml
from fake_stats import GLOBAL_QUERIES, FakeStatsView

from core.errors import ConfigError
from pipeline.http_api import (
    OPENAPI_PATH,
    ApiServer,
    build_app,
    check_exposure,
    is_loopback,
)

KEY, LOGIN, PASSWORD = "k3y-0f-the-test", "admin", "pa55-w0rd"
DEFAULT_MESSAGE = (
    "web-api: refusing to listen on {} with the default credentials; set web-api.api-key and web-api.password"
)

# Every route with a request that succeeds, and its status.
ROUTES = [
    ("GET", "/counters", 200),
    ("GET", "/tables", 200),
    ("GET", "/streams", 200),
    ("DELETE", "/reset", 204),
    ("GET", "/windows", 200),
    ("GET", "/metrics", 200),
    ("GET", "/openapi.yaml", 200),
]
# The dashboard's routes (pipeline/dashboard.py): some public, some opened by its session
# cookie too; tested in tests/test_dashboard.py.
DASHBOARD_ROUTES = {
    ("GET", "/"), ("GET", "/dashboard"), ("GET", "/dashboard/data"), ("GET", "/dashboard/static/{name}"),
    ("GET", "/login"), ("POST", "/login"), ("POST", "/logout"),
}


class Reply:
    def __init__(self, status: int, headers, body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        assert self.headers["Content-Type"].startswith("application/json"), self.headers["Content-Type"]
        return json.loads(self.body)


def basic(login: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{login}:{password}".encode()).decode()


def call(port: int, method: str, path: str, *, key: str | None = KEY, auth: str | None = None) -> Reply:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    if key is not None:
        req.add_header("X-API-Key", key)
    if auth is not None:
        req.add_header("Authorization", auth)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return Reply(resp.status, resp.headers, resp.read())
    except urllib.error.HTTPError as err:
        return Reply(err.code, err.headers, err.read())


@pytest.fixture
def view() -> FakeStatsView:
    return FakeStatsView()


@pytest.fixture
def server(view):
    srv = ApiServer(view, address="127.0.0.1", port=0, api_key=KEY, login=LOGIN, password=PASSWORD,
                    default_counters=["clients", "domains", "query", "response", "qps", "response/noerror",
                                      "response/nxdomain"],
                    default_top=["noerror/query", "nxdomain/response"], max_items=2)
    srv.start()
    yield srv
    srv.stop()


# --------------------------------------------------------------------------- OpenAPI


def openapi() -> dict:
    return yaml.safe_load(OPENAPI_PATH.read_text())


def _resolve(node, doc: dict):
    """An OpenAPI 3.0 schema as JSON Schema: $ref inlined, ``nullable`` as a "null" type."""
    if isinstance(node, list):
        return [_resolve(item, doc) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = doc
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part.replace("~1", "/").replace("~0", "~")]
        return _resolve(target, doc)
    out = {k: _resolve(v, doc) for k, v in node.items() if k not in ("nullable", "example")}
    if node.get("nullable"):
        out["type"] = [node["type"], "null"]
    return out


def check_schema(reply: Reply, method: str, path: str) -> None:
    doc = openapi()
    responses = doc["paths"][path][method.lower()]["responses"]
    assert str(reply.status) in responses, f"{method} {path} {reply.status} is not documented"
    spec = _resolve(responses[str(reply.status)], doc)
    if "content" not in spec:
        assert reply.body == b""
        return
    ctype = reply.headers["Content-Type"].split(";")[0]
    assert ctype in spec["content"], f"{method} {path}: {ctype} not documented"
    schema = spec["content"][ctype]["schema"]
    body = reply.json() if ctype == "application/json" else reply.body.decode()
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.validate(body, schema, cls=jsonschema.Draft7Validator)


def test_every_route_is_documented_and_every_documented_route_exists():
    app = build_app(FakeStatsView(), api_key=KEY, login=LOGIN, password=PASSWORD)
    routes = {(r.method, r.resource.canonical) for r in app.router.routes()}
    documented = {(m.upper(), p) for p, ops in openapi()["paths"].items() for m in ops}
    assert routes == documented
    assert routes == {(m, p) for m, p, _ in ROUTES} | DASHBOARD_ROUTES


def test_openapi_document_declares_both_security_schemes():
    doc = openapi()
    assert doc["openapi"].startswith("3.0")
    schemes = doc["components"]["securitySchemes"]
    assert schemes["apiKey"] == {"type": "apiKey", "in": "header", "name": "X-API-Key"}
    assert schemes["basicAuth"] == {"type": "http", "scheme": "basic"}
    assert doc["security"] == [{"apiKey": []}, {"basicAuth": []}]
    for schema in doc["components"]["schemas"].values():
        jsonschema.Draft7Validator.check_schema(_resolve(schema, doc))


@pytest.mark.parametrize(
    "method,path",
    [
        ("GET", "/counters"), ("GET", "/counters?stream=unbound&more=query/inet,response/latency0_1,query/xyz"),
        ("GET", "/tables"), ("GET", "/tables?n=1&stream=dnsdist01&more=hit/query"),
        ("GET", "/streams"), ("DELETE", "/reset"),
        ("GET", "/windows"), ("GET", "/windows?last=3&stream=unbound"),
        ("GET", "/metrics"), ("GET", "/openapi.yaml"),
        ("GET", "/tables?n=abc"), ("GET", "/counters?stream=nope"), ("GET", "/windows?last=0"),
    ],
)
def test_real_responses_match_the_openapi_schemas(server, method, path):
    reply = call(server.port, method, path)
    check_schema(reply, method, path.split("?")[0])


def test_unauthorized_responses_match_the_openapi_schema(server):
    for method, path, _ in ROUTES:
        reply = call(server.port, method, path, key=None)
        check_schema(reply, method, path)


def test_openapi_is_served_as_the_file(server):
    reply = call(server.port, "GET", "/openapi.yaml")
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("application/yaml")
    assert reply.body == Path(OPENAPI_PATH).read_bytes()


# --------------------------------------------------------------------------- authentication


@pytest.mark.parametrize("method,path,ok_status", ROUTES)
@pytest.mark.parametrize(
    "case,key,auth,allowed",
    [
        ("none", None, None, False),
        ("wrong key", "wrong", None, False),
        ("empty key", "", None, False),
        ("wrong password", None, basic(LOGIN, "wrong"), False),
        ("wrong login", None, basic("root", PASSWORD), False),
        ("key as password", None, basic(LOGIN, KEY), False),
        ("not basic", None, "Bearer " + KEY, False),
        ("garbage basic", None, "Basic !!!not-base64", False),
        ("good key, wrong basic", KEY, basic(LOGIN, "wrong"), False),
        ("good key", KEY, None, True),
        ("good basic", None, basic(LOGIN, PASSWORD), True),
        ("good key and basic", KEY, basic(LOGIN, PASSWORD), True),
    ],
)
def test_authentication(server, view, method, path, ok_status, case, key, auth, allowed):
    reply = call(server.port, method, path, key=key, auth=auth)
    if allowed:
        assert reply.status == ok_status, case
    else:
        assert reply.status == 401, case
        assert reply.headers["WWW-Authenticate"].startswith("Basic")
        assert reply.json() == {"error": "authentication required"}
        assert view.resets == 0


def test_unknown_route_needs_credentials_too(server):
    assert call(server.port, "GET", "/nope", key=None).status == 401


def test_credentials_are_compared_in_constant_time(server, monkeypatch):
    seen = []
    real = hmac.compare_digest

    def spy(a, b):
        seen.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    assert call(server.port, "GET", "/streams", key="guess").status == 401
    assert (b"guess", KEY.encode()) in seen
    seen.clear()
    assert call(server.port, "GET", "/streams", key=None, auth=basic(LOGIN, "x")).status == 401
    # Login and password are both compared even when the first is already wrong.
    assert (LOGIN.encode(), LOGIN.encode()) in seen and (b"x", PASSWORD.encode()) in seen
    seen.clear()
    assert call(server.port, "GET", "/streams", key=None, auth=basic("bob", PASSWORD)).status == 401
    assert len(seen) == 2


def test_non_ascii_credentials_are_refused_not_crashed(server):
    req = urllib.request.Request(f"http://127.0.0.1:{server.port}/streams")
    req.add_header("X-API-Key", "clé".encode().decode("latin-1"))
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    assert err.value.code == 401


# --------------------------------------------------------------------------- exposure rule


@pytest.mark.parametrize("address", ["127.0.0.1", "127.3.2.1", "::1", "[::1]", "localhost", "::ffff:127.0.0.1"])
def test_loopback_addresses(address):
    assert is_loopback(address)
    check_exposure(address, "changeme", "changeme")


@pytest.mark.parametrize("address", ["0.0.0.0", "::", "", "192.0.2.1", "2001:db8::1", "dns.example.test"])
@pytest.mark.parametrize("api_key,password", [("changeme", "changeme"), ("changeme", "S3cret"), ("S3cret", "changeme")])
def test_default_credentials_are_refused_off_loopback(address, api_key, password):
    assert not is_loopback(address)
    with pytest.raises(ConfigError) as err:
        check_exposure(address, api_key, password)
    assert str(err.value) == DEFAULT_MESSAGE.format(address)


def test_changed_credentials_may_listen_anywhere():
    check_exposure("0.0.0.0", "S3cret-key", "S3cret-password")


def test_start_refuses_default_credentials_on_all_interfaces():
    srv = ApiServer(FakeStatsView(), address="0.0.0.0", port=0, api_key="changeme", login="admin", password="changeme")
    with pytest.raises(ConfigError, match="refusing to listen on 0.0.0.0 with the default credentials"):
        srv.start()
    assert srv.port is None
    srv.stop()  # harmless after a refused start


def test_default_credentials_are_accepted_on_loopback():
    srv = ApiServer(FakeStatsView(), address="127.0.0.1", port=0, api_key="changeme", login="admin", password="changeme")
    with srv:
        assert call(srv.port, "GET", "/streams", key="changeme").status == 200
        assert call(srv.port, "GET", "/streams", key=None, auth=basic("admin", "changeme")).status == 200


def test_port_in_use_is_a_config_error():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        srv = ApiServer(FakeStatsView(), address="127.0.0.1", port=port, api_key=KEY, login=LOGIN, password=PASSWORD)
        with pytest.raises(ConfigError, match=rf"web-api: cannot listen on 127.0.0.1:{port}: "):
            srv.start()


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"port": 70000}, "web-api.local-port"),
        ({"max_items": 0}, "statistics.max-items"),
        ({"default_counters": ["query", "bogus"]}, "statistics.default-counters: unknown counter 'bogus'"),
        ({"default_top": ["noerror"]}, "statistics.default-top: unknown domain table 'noerror'"),
    ],
)
def test_bad_settings_are_config_errors(kwargs, message):
    args = {"address": "127.0.0.1", "port": 0, "api_key": KEY, "login": LOGIN, "password": PASSWORD, **kwargs}
    with pytest.raises(ConfigError, match=message):
        ApiServer(FakeStatsView(), **args)


def test_stop_closes_the_port_and_is_idempotent(view):
    srv = ApiServer(view, address="127.0.0.1", port=0, api_key=KEY, login=LOGIN, password=PASSWORD)
    srv.start()
    port = srv.port
    assert call(port, "GET", "/streams").status == 200
    srv.stop()
    srv.stop()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


# --------------------------------------------------------------------------- bad requests


@pytest.mark.parametrize(
    "path,fragment",
    [
        ("/tables?n=-1", "n: expected an integer from 1 to 1000, got '-1'"),
        ("/tables?n=abc", "got 'abc'"),
        ("/tables?n=0", "got '0'"),
        ("/tables?n=1001", "got '1001'"),
        ("/tables?n=99999999999999999999999", "n: expected"),
        ("/tables?n=1.5", "got '1.5'"),
        ("/tables?n=%D9%A3", "n: expected"),  # an Arabic-Indic digit: int() would take it
        ("/tables?stream=nope", "stream: unknown stream 'nope'"),
        ("/tables?more=noerror", "more: unknown domain table 'noerror'"),
        ("/tables?more=noerror/query,hit/client", "unknown domain table 'hit/client'"),
        ("/counters?stream=nope", "stream: unknown stream 'nope'"),
        ("/counters?more=query,bogus", "more: unknown counter 'bogus'"),
        ("/counters?more=query/", "unknown counter 'query/'"),
        ("/counters?more=Query/A", "unknown counter 'Query/A'"),
        ("/windows?last=abc", "last: expected an integer from 1 to 1000, got 'abc'"),
        ("/windows?last=-2", "got '-2'"),
        ("/windows?last=5000", "got '5000'"),
        ("/windows?stream=nope", "stream: unknown stream 'nope'"),
    ],
)
def test_malformed_parameters_are_400_with_a_message(server, path, fragment):
    reply = call(server.port, "GET", path)
    assert reply.status == 400
    body = reply.json()
    assert set(body) == {"error"}
    assert fragment in body["error"]


def test_unknown_route_is_a_json_404(server):
    reply = call(server.port, "GET", "/nope")
    assert reply.status == 404
    assert reply.json() == {"error": "not found"}


def test_wrong_method_is_a_json_405(server, view):
    reply = call(server.port, "GET", "/reset")
    assert reply.status == 405
    assert reply.headers["Allow"] == "DELETE"
    assert reply.json() == {"error": "method not allowed"}
    assert view.resets == 0


def test_a_failing_store_is_a_logged_500_without_details(server, view, caplog):
    view.fail = RuntimeError("secret detail of the store")
    with caplog.at_level(logging.ERROR, logger="dnstap_receiver.api"):
        for method, path, _ in ROUTES:
            if path == "/openapi.yaml":
                continue
            reply = call(server.port, method, path)
            assert reply.status == 500, path
            assert reply.json() == {"error": "internal error"}
            assert b"secret" not in reply.body and b"Traceback" not in reply.body
    assert "secret detail of the store" in caplog.text
    assert "GET /counters failed" in caplog.text


def test_a_keyerror_for_all_streams_is_a_500_not_a_400(server, view):
    view.fail = KeyError("oops")
    assert call(server.port, "GET", "/counters").status == 500
    assert call(server.port, "GET", "/counters?stream=unbound").status == 400  # unknown stream


# --------------------------------------------------------------------------- shapes


def test_streams(server):
    reply = call(server.port, "GET", "/streams")
    assert reply.json() == {"streams": ["unbound", "dnsdist01"]}


def test_reset_calls_the_store(server, view):
    reply = call(server.port, "DELETE", "/reset")
    assert reply.status == 204 and reply.body == b""
    assert view.resets == 1


def test_counters_default_list_as_integers(server):
    body = call(server.port, "GET", "/counters").json()
    assert body == {
        "stream": None,
        "counters": {"clients": 3, "domains": 10, "query": GLOBAL_QUERIES, "response": 1001, "qps": 25.5,
                     "response/noerror": 800, "response/nxdomain": 198},
    }
    assert isinstance(body["counters"]["query"], int)
    assert list(body["counters"]) == ["clients", "domains", "query", "response", "qps", "response/noerror",
                                      "response/nxdomain"]


def test_counters_of_one_stream_with_more(server, view):
    body = call(server.port, "GET", "/counters?stream=dnsdist01&more=query/inet,%20response/servfail,query,query/doq").json()
    assert body["stream"] == "dnsdist01"
    assert body["counters"]["query"] == 3
    assert body["counters"]["query/inet"] == 3
    assert body["counters"]["response/servfail"] == 3
    assert body["counters"]["query/doq"] == 0  # well-formed, not counted yet: 0 as in 4.7.0
    assert body["counters"]["clients"] == 1
    assert len(body["counters"]) == 10
    assert ("counters", "dnsdist01") in view.calls


def test_more_accepts_new_counters_and_names_the_store_has(server):
    body = call(server.port, "GET", "/counters?stream=unbound&more=malformed,unanswered,x-store-extra").json()
    assert {k: body["counters"][k] for k in ("malformed", "unanswered", "x-store-extra")} == {
        "malformed": 2, "unanswered": 4, "x-store-extra": 5}
    assert call(server.port, "GET", "/counters?stream=dnsdist01&more=x-store-extra").status == 400


def test_more_does_not_stick_to_the_next_request(server):
    call(server.port, "GET", "/counters?more=query/inet")
    assert "query/inet" not in call(server.port, "GET", "/counters").json()["counters"]


def test_empty_stream_means_all_streams(server):
    assert call(server.port, "GET", "/counters?stream=").json()["stream"] is None


def test_tables_layout_of_4_7_0(server, view):
    body = call(server.port, "GET", "/tables").json()
    assert body["stream"] is None
    tables = body["tables"]
    assert set(tables) == {"tlds", "domains", "clients", "rcodes", "rrtypes"}
    # n defaults to statistics.max-items (2 here) and is passed to the store.
    assert ("tables", 2, None) in view.calls
    assert tables["tlds"] == {"hit/query": [["query/test", 2000], ["query/invalid", 3]],
                              "hit/response": [["response/test", 998]]}
    # 4.7.0's code served "hit/ip" and "rcodes" (its README said "hit/client", "top-rcodes").
    assert tables["clients"] == {"hit/ip": [["192.0.2.1", 1500], ["2001:db8::1", 500]],
                                 "length/ip": [["192.0.2.1", 120000]]}
    assert tables["rcodes"]["hit/response"] == [["response/noerror", 800], ["response/nxdomain", 198]]
    assert tables["rrtypes"]["hit/query"] == [["query/a", 500], ["query/aaaa", 300]]
    # domain tables: statistics.default-top only
    assert tables["domains"] == {"noerror/query": [["www.example.test.", 800], ["mail.example.test.", 300]],
                                 "nxdomain/response": [["host.invalid.", 198]]}
    assert isinstance(tables["domains"]["nxdomain/response"][0][1], int)


def test_tables_n_stream_and_more(server, view):
    body = call(server.port, "GET", "/tables?n=1&stream=unbound&more=hit/query,servfail/response").json()
    assert body["stream"] == "unbound"
    assert ("tables", 1, "unbound") in view.calls
    domains = body["tables"]["domains"]
    assert domains == {"noerror/query": [["www.example.test.", 400]], "nxdomain/response": [["host.invalid.", 198]],
                       "hit/query": [["www.example.test.", 410]], "servfail/response": []}
    assert all(len(rows) <= 1 for group in body["tables"].values() for rows in group.values())


def test_tables_n_up_to_1000(server, view):
    assert call(server.port, "GET", "/tables?n=1000").status == 200
    assert ("tables", 1000, None) in view.calls


def test_windows(server, view):
    body = call(server.port, "GET", "/windows").json()
    assert ("windows", 1, None) in view.calls
    assert body["stream"] is None
    assert len(body["windows"]) == 1
    newest = body["windows"][0]
    assert newest["start"] == 1795936920.0 and newest["end"] == 1795936930.0
    assert newest["counters"] == {"query": 20, "qps": 0.2}
    assert newest["tables"]["clients"]["hit/ip"][0] == ["192.0.2.1", 1500]

    body = call(server.port, "GET", "/windows?last=3&stream=unbound").json()
    assert ("windows", 3, "unbound") in view.calls
    assert [w["start"] for w in body["windows"]] == [1795936900.0, 1795936910.0, 1795936920.0]  # newest last
    empty = body["windows"][0]["tables"]
    assert empty == {"tlds": {}, "domains": {}, "clients": {}, "rcodes": {}, "rrtypes": {}}


def test_metrics_endpoint(server):
    reply = call(server.port, "GET", "/metrics")
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert f"dnstap_queries_total {float(GLOBAL_QUERIES)}" in reply.body.decode()


def test_two_servers_at_once(view):
    a = ApiServer(view, address="127.0.0.1", port=0, api_key=KEY, login=LOGIN, password=PASSWORD)
    b = ApiServer(view, address="127.0.0.1", port=0, api_key="other-key", login=LOGIN, password=PASSWORD)
    with a, b:
        assert call(a.port, "GET", "/metrics").status == 200
        assert call(b.port, "GET", "/metrics", key="other-key").status == 200
        assert call(b.port, "GET", "/metrics").status == 401
