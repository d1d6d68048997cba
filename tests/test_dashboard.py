"""The web dashboard (pipeline/dashboard.py, pipeline/dashboard/): login, session cookie and
its scope, the page's files, the data endpoint and its history, over HTTP with a fake store;
then the page itself in a real headless Chromium against a running receiver fed generated
traffic (login, empty state, charts filling, stream switch, numbers against /counters,
phone width, stale state, logout, no console errors). Screenshots go to
``test-artifacts/dashboard/`` (or $DASHBOARD_ARTIFACTS)."""

from __future__ import annotations

import base64
import os
import re
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import peers
import pytest
from fake_stats import FakeStatsView
from test_http_api import Reply, check_schema

from core import counters
from core.stats import StatsStore
from pipeline import dashboard
from pipeline.dashboard import STATIC_DIR, History, Sessions, window_counts
from pipeline.http_api import ApiServer

KEY, LOGIN, PASSWORD = "k3y-of-the-dashboard-test", "ops", "pa55-of-the-dashboard"
REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get("DASHBOARD_ARTIFACTS", REPO / "test-artifacts" / "dashboard"))


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def request(port: int, method: str, path: str, headers: dict | None = None, form: dict | None = None) -> Reply:
    data = urllib.parse.urlencode(form).encode() if form is not None else None
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method, headers=headers or {})
    try:
        with _OPENER.open(req, timeout=10) as resp:
            return Reply(resp.status, resp.headers, resp.read())
    except urllib.error.HTTPError as err:
        return Reply(err.code, err.headers, err.read())


def basic(login: str = LOGIN, password: str = PASSWORD) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{login}:{password}".encode()).decode()}


def session_cookie(reply: Reply) -> str:
    return reply.headers["Set-Cookie"].split(";")[0]


@pytest.fixture
def server():
    srv = ApiServer(FakeStatsView(), address="127.0.0.1", port=0, api_key=KEY, login=LOGIN, password=PASSWORD)
    srv.start()
    yield srv
    srv.stop()


def login(port: int, login_: str = LOGIN, password: str = PASSWORD) -> Reply:
    return request(port, "POST", "/login", form={"login": login_, "password": password})


# --------------------------------------------------------------------------- login and session


def test_a_browser_without_credentials_is_sent_to_the_login_form_and_an_api_client_gets_401(server):
    for path in ("/", "/dashboard"):
        reply = request(server.port, "GET", path, {"Accept": "text/html,application/xhtml+xml"})
        assert (reply.status, reply.headers["Location"]) == (303, "login"), path
        reply = request(server.port, "GET", path)
        assert reply.status == 401 and reply.headers["WWW-Authenticate"].startswith("Basic")
    form = request(server.port, "GET", "/login")
    assert form.status == 200 and b'<form method="post" action="login"' in form.body
    assert b"Wrong login" not in form.body


def test_login_sets_an_httponly_strict_session_cookie_that_opens_the_dashboard_only(server):
    reply = login(server.port)
    assert (reply.status, reply.headers["Location"]) == (303, "dashboard")
    flags = [part.strip().lower() for part in reply.headers["Set-Cookie"].split(";")]
    assert flags[0].startswith("dnstap_session=") and len(flags[0]) > 40
    assert {"httponly", "samesite=strict", "path=/"} <= set(flags)
    cookie = {"Cookie": session_cookie(reply)}
    page = request(server.port, "GET", "/dashboard", cookie)
    assert page.status == 200 and b'id="chart-rates"' in page.body
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    assert request(server.port, "GET", "/", cookie).status == 200
    assert request(server.port, "GET", "/dashboard/data", cookie).json()["streams"] == ["unbound", "dnsdist01"]
    # Not the API: the cookie is no API credential.
    assert request(server.port, "GET", "/counters", cookie).status == 401
    assert request(server.port, "DELETE", "/reset", cookie).status == 401
    # Every credential sent must be right: a cookie does not rescue a wrong key.
    assert request(server.port, "GET", "/dashboard/data", {**cookie, "X-API-Key": "wrong"}).status == 401


def test_the_api_key_as_password_signs_in_too(server):
    assert login(server.port, "anyone", KEY).status == 303


@pytest.mark.parametrize("login_,password", [(LOGIN, "wrong"), ("root", PASSWORD), (LOGIN, ""), ("", ""), (LOGIN, KEY + "x")])
def test_a_wrong_password_fails_without_a_cookie(server, login_, password):
    reply = login(server.port, login_, password)
    assert reply.status == 401
    assert "Set-Cookie" not in reply.headers
    assert b"Wrong login or password" in reply.body
    assert request(server.port, "GET", "/dashboard/data", {"Cookie": "dnstap_session=guess"}).status == 401


def test_the_page_data_without_a_session_gets_no_basic_challenge_and_logout_is_public(server):
    """An expired session (or a restarted receiver) must not pop up the browser's password
    dialog: the page's data request gets a 401 without WWW-Authenticate, and so does having
    no cookie at all; logging out without a session just clears the cookie."""
    for headers in ({}, {"Cookie": "dnstap_session=expired-or-from-before-a-restart"}):
        reply = request(server.port, "GET", "/dashboard/data", headers)
        assert reply.status == 401 and "WWW-Authenticate" not in reply.headers, headers
        assert reply.json() == {"error": "not signed in"}
        check_schema(reply, "GET", "/dashboard/data")
    # Wrong API credentials are the API's business: its 401, with the challenge.
    wrong = request(server.port, "GET", "/dashboard/data", {"X-API-Key": "wrong"})
    assert wrong.status == 401 and wrong.headers["WWW-Authenticate"].startswith("Basic")
    for headers in ({}, {"Cookie": "dnstap_session=gone"}):
        reply = request(server.port, "POST", "/logout", headers)
        assert (reply.status, reply.headers["Location"]) == (303, "login")
        assert "WWW-Authenticate" not in reply.headers and "Max-Age=0" in reply.headers["Set-Cookie"]


def test_wrong_passwords_wait_one_after_the_other_and_a_right_one_does_not_wait(server, monkeypatch):
    delay, guesses = 0.15, 8
    monkeypatch.setattr(dashboard, "FAILED_LOGIN_DELAY", delay)
    with ThreadPoolExecutor(guesses + 1) as pool:
        started = time.monotonic()
        wrong = [pool.submit(login, server.port, LOGIN, f"guess-{i}") for i in range(guesses)]
        time.sleep(delay)  # the guesses queue up behind the first
        right_started = time.monotonic()
        right = pool.submit(login, server.port).result()
        right_took = time.monotonic() - right_started
        assert all(f.result().status == 401 for f in wrong)
        took = time.monotonic() - started
    assert right.status == 303 and right_took < 2 * delay
    assert took >= guesses * delay * 0.95, f"{guesses} parallel wrong logins took {took:.2f} s"


@pytest.mark.parametrize("headers", [
    {"Origin": "http://evil.example"},
    {"Origin": "null"},
    {"Origin": "http://127.0.0.1.evil.example"},
    {"Sec-Fetch-Site": "cross-site"},
    {"Sec-Fetch-Site": "same-site"},
])
def test_a_login_posted_from_another_origin_is_refused(server, headers):
    group = counters.counter_group(dashboard.COUNTERS)
    refused = group["cross_site_logins"]
    data = urllib.parse.urlencode({"login": LOGIN, "password": PASSWORD}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{server.port}/login", data=data, method="POST", headers=headers)
    try:
        reply = _OPENER.open(req, timeout=10)
        status, reply_headers, body = reply.status, reply.headers, reply.read()
    except urllib.error.HTTPError as err:
        status, reply_headers, body = err.code, err.headers, err.read()
    assert status == 403 and "Set-Cookie" not in reply_headers, body
    assert group["cross_site_logins"] == refused + 1
    check_schema(Reply(status, reply_headers, body), "POST", "/login")


def test_a_login_from_the_page_itself_is_accepted(server):
    for headers in ({"Origin": f"http://127.0.0.1:{server.port}", "Sec-Fetch-Site": "same-origin"},
                    {"Sec-Fetch-Site": "none"}, {}):
        data = urllib.parse.urlencode({"login": LOGIN, "password": PASSWORD}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{server.port}/login", data=data, method="POST", headers=headers)
        try:
            status = _OPENER.open(req, timeout=10).status
        except urllib.error.HTTPError as err:
            status = err.code
        assert status == 303, headers


def test_signing_in_again_revokes_the_previous_session(server):
    first = {"Cookie": session_cookie(login(server.port))}
    assert request(server.port, "GET", "/dashboard/data", first).status == 200
    again = request(server.port, "POST", "/login", first, {"login": LOGIN, "password": PASSWORD})
    second = {"Cookie": session_cookie(again)}
    assert second != first
    assert request(server.port, "GET", "/dashboard/data", first).status == 401
    assert request(server.port, "GET", "/dashboard/data", second).status == 200


def test_logins_and_failures_are_counted(server):
    group = counters.counter_group(dashboard.COUNTERS)
    before = dict(group)
    login(server.port, LOGIN, "wrong")
    login(server.port)
    assert group["failed_logins"] == before.get("failed_logins", 0) + 1
    assert group["logins"] == before.get("logins", 0) + 1


def test_a_failing_store_breaks_neither_the_page_nor_the_server(caplog):
    fake = FakeStatsView()
    fake.fail = RuntimeError("store is gone")
    srv = ApiServer(fake, address="127.0.0.1", port=0, api_key=KEY, login=LOGIN, password=PASSWORD)
    group = counters.counter_group(dashboard.COUNTERS)
    errors = group["poll_errors"]
    with srv, caplog.at_level("ERROR", logger="dnstap_receiver.api"):
        key = {"X-API-Key": KEY}
        assert request(srv.port, "GET", "/dashboard", key).status == 200
        reply = request(srv.port, "GET", "/dashboard/data", key)
        assert (reply.status, reply.json()) == (500, {"error": "internal error"})
        _wait("a failed poll", lambda: group["poll_errors"] > errors, timeout=5)
        fake.fail = None
        assert request(srv.port, "GET", "/dashboard/data", key).status == 200
    assert "dashboard: reading the statistics windows failed: RuntimeError('store is gone')" in caplog.text


def test_logout_ends_the_session(server):
    cookie = {"Cookie": session_cookie(login(server.port))}
    assert request(server.port, "GET", "/dashboard/data", cookie).status == 200
    reply = request(server.port, "POST", "/logout", cookie)
    assert (reply.status, reply.headers["Location"]) == (303, "login")
    assert "dnstap_session=" in reply.headers["Set-Cookie"] and "Max-Age=0" in reply.headers["Set-Cookie"]
    gone = request(server.port, "GET", "/dashboard/data", cookie)
    # The page's own request: 401 without a Basic challenge (no browser password dialog).
    assert gone.status == 401 and "WWW-Authenticate" not in gone.headers
    assert request(server.port, "GET", "/dashboard", {**cookie, "Accept": "text/html"}).headers["Location"] == "login"


def test_sessions_expire_and_are_bounded(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(dashboard.time, "monotonic", lambda: now[0])
    sessions = Sessions(lifetime=60, limit=3)
    tokens = [sessions.create() for _ in range(4)]
    assert len(sessions) == 3 and not sessions.valid(tokens[0]) and sessions.valid(tokens[3])
    now[0] += 61
    assert not sessions.valid(tokens[3])
    sessions.create()
    assert len(sessions) == 1
    assert not sessions.valid(None) and not sessions.valid("")


def test_no_secret_and_no_external_address_in_the_page_or_its_files(server):
    cookie = {"Cookie": session_cookie(login(server.port))}
    bodies = [request(server.port, "GET", "/dashboard", cookie).body, request(server.port, "GET", "/login").body]
    names = sorted(p.name for p in STATIC_DIR.iterdir() if p.suffix in (".js", ".css"))
    assert names == ["app.js", "charts.js", "style.css"]
    for name in names:
        reply = request(server.port, "GET", f"/dashboard/static/{name}")  # public: no secret in them
        assert reply.status == 200 and reply.body == (STATIC_DIR / name).read_bytes()
        bodies.append(reply.body)
    for body in bodies:
        text = body.decode()
        assert KEY not in text and PASSWORD not in text
        # Offline: nothing loaded from elsewhere (the SVG namespace is a name, not a fetch).
        assert set(re.findall(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text)) <= {"http://www.w3.org"}, text[:200]


@pytest.mark.parametrize("path", ["/dashboard/static/nope.js", "/dashboard/static/..%2Fdashboard.py", "/dashboard/static/index.html"])
def test_only_the_packaged_static_files_are_served(server, path):
    assert request(server.port, "GET", path).status == 404


def test_data_matches_the_openapi_schema(server):
    reply = request(server.port, "GET", "/dashboard/data?stream=unbound", {"X-API-Key": KEY})
    check_schema(reply, "GET", "/dashboard/data")
    body = reply.json()
    assert body["stream"] == "unbound"
    assert body["cumulative"]["counters"]["query"] == 1000
    assert "query/test" not in body["cumulative"]["counters"]  # tld counters stay in /counters
    assert body["cumulative"]["tables"]["qtypes"] == [["a", 500], ["aaaa", 300]]
    assert body["receiver"] == {
        "decoded": 2006, "malformed": 2, "undecodable": 1, "filtered": 4, "dropped": 0, "unanswered": 4,
        "outputs": [{"name": "file", "dropped": 0, "connected": None, "buffered": None, "delivered": 2002}],
    }
    unknown = request(server.port, "GET", "/dashboard/data?stream=nope", {"X-API-Key": KEY})
    assert unknown.status == 400 and "unknown stream 'nope'" in unknown.json()["error"]
    check_schema(unknown, "GET", "/dashboard/data")


def test_the_dashboard_routes_answer_as_documented(server):
    cookie = {"Cookie": session_cookie(login(server.port))}
    html = {"Accept": "text/html"}
    cases = [
        ("GET", "/", "/", {"X-API-Key": KEY}, None, 200),
        ("GET", "/dashboard", "/dashboard", html, None, 303),
        ("GET", "/dashboard", "/dashboard", {}, None, 401),
        ("GET", "/dashboard/data", "/dashboard/data", cookie, None, 200),
        ("GET", "/dashboard/static/app.js", "/dashboard/static/{name}", {}, None, 200),
        ("GET", "/dashboard/static/style.css", "/dashboard/static/{name}", {}, None, 200),
        ("GET", "/dashboard/static/x.js", "/dashboard/static/{name}", {}, None, 404),
        ("GET", "/login", "/login", {}, None, 200),
        ("POST", "/login", "/login", {}, {"login": LOGIN, "password": "nope"}, 401),
        ("POST", "/login", "/login", {}, {"login": LOGIN, "password": PASSWORD}, 303),
        ("POST", "/logout", "/logout", {}, None, 303),
        ("POST", "/logout", "/logout", cookie, None, 303),
    ]
    for method, path, documented, headers, form, status in cases:
        reply = request(server.port, method, path, headers, form)
        assert reply.status == status, (method, path)
        check_schema(reply, method, documented)


def test_the_receiver_card_counts_every_stream_and_every_drop():
    """"Receiver: all streams": the unanswered queries of all streams whatever stream is
    selected, and the frames the sniffer input dropped counted with the other drops."""
    fake = FakeStatsView()
    fake.per_stream["dnsdist01"]["unanswered"] = 3.0
    fake.receiver["input"].update(partial_frames_dropped=2, feed_dropped=5)
    fake.receiver["output.file"]["dropped"] = 7
    with ApiServer(fake, address="127.0.0.1", port=0, api_key=KEY, login=LOGIN, password=PASSWORD) as srv:
        for stream in ("", "?stream=dnsdist01", "?stream=unbound"):
            reply = request(srv.port, "GET", "/dashboard/data" + stream, {"X-API-Key": KEY})
            receiver = reply.json()["receiver"]
            assert (receiver["unanswered"], receiver["dropped"]) == (4 + 3, 2 + 5 + 7), stream
            check_schema(reply, "GET", "/dashboard/data")


# --------------------------------------------------------------------------- history


class WindowsView:
    """Closed windows of 10 s for two streams, added by the test; counts as the store's."""

    def __init__(self) -> None:
        self.closed: list[tuple[float, dict[str, tuple[int, int, int]]]] = []  # start, stream -> q, r, nx
        self.calls: list[tuple] = []

    def add(self, start: float, **streams: tuple[int, int, int]) -> None:
        self.closed.append((start, streams))

    def _window(self, start: float, counts: tuple[int, int, int]) -> dict:
        q, r, nx = counts
        rcodes = [["response/noerror", r - nx], ["response/nxdomain", nx]]
        return {"start": start, "end": start + 10, "counters": {"query": q, "response": r},
                "tables": {"rcodes": {"hit/response": rcodes}}}

    def windows(self, last: int, stream: str | None = None) -> list[dict]:
        self.calls.append(("windows", last, stream))
        out = []
        for start, streams in self.closed[-last:]:
            if stream is None:
                total = tuple(sum(c[i] for c in streams.values()) for i in range(3))
                out.append(self._window(start, total))
            else:
                out.append(self._window(start, streams.get(stream, (0, 0, 0))))
        return out

    def streams(self) -> list[str]:
        return sorted({name for _, streams in self.closed for name in streams})

    def receiver_counters(self) -> dict:
        return {"statistics": {"windows_closed": len(self.closed)}}


def test_history_rates_fill_gaps_with_zero_and_follow_each_stream():
    view, clock = WindowsView(), [5000.0]
    history = History(view, clock=lambda: clock[0])
    assert history.state(clock[0]) == ("empty", None)
    history.poll()
    view.add(100, a=(50, 40, 10), b=(10, 10, 0))
    view.add(130, a=(100, 100, 20))  # 110 and 120: no traffic, no window
    history.poll()
    series = history.series(None)
    assert series["start"] == [100, 110, 120, 130] and series["step"] == 10
    assert series["query"] == [6.0, 0, 0, 10.0] and series["response"] == [5.0, 0, 0, 10.0]
    assert series["rcodes"] == {"noerror": [4.0, 0, 0, 8.0], "nxdomain": [1.0, 0, 0, 2.0]}
    assert list(series["streams"]) == ["a", "b"]  # busiest first
    assert series["streams"]["b"]["query"] == [1.0, 0, 0, 0]
    one = history.series("b")
    assert one["query"] == [1.0, 0, 0, 0] and one["streams"] == {}
    assert history.state(clock[0]) == ("live", 0.0)
    clock[0] += 2 * 10 + 3.5
    assert history.state(clock[0]) == ("stale", 23.5)


def test_history_polls_cheaply_catches_up_after_a_gap_and_keeps_one_hour():
    view, clock = WindowsView(), [0.0]
    history = History(view, monotonic=lambda: clock[0])
    view.add(0, a=(1, 1, 0))
    history.poll()
    clock[0] += 0.5
    history.poll()  # read again: the store's snapshot may not have had the window yet
    clock[0] += 0.5
    history.poll()
    view.calls.clear()
    clock[0] += 0.5
    history.poll()
    assert view.calls == []  # windows_closed unchanged and read since it settled: nothing read
    for start in range(10, 400 * 10, 10):  # 399 windows closed while not polled
        view.add(start, a=(10, 10, 0))
    history.poll()
    assert ("windows", dashboard.MAX_HISTORY_POINTS, None) in view.calls
    series = history.series(None)
    assert len(series["start"]) == 360  # one hour of 10 s windows
    assert series["start"][0] == 3990 - 3590 and series["query"][-1] == 1.0


class CountsView(WindowsView):
    """A view with window_counts (as ReceiverStatsView): History must read that only."""

    def window_counts(self, last: int, streams: int) -> list[dict]:
        self.calls.append(("window_counts", last, streams))
        out = []
        for start, by_stream in self.closed[-last:]:
            def counts(q, r, nx):
                return {"query": q, "response": r, "rcodes": {"noerror": r - nx, "nxdomain": nx}}
            total = tuple(sum(c[i] for c in by_stream.values()) for i in range(3))
            busiest = sorted(by_stream, key=lambda n: -(by_stream[n][0] + by_stream[n][1]))[:streams]
            out.append({"start": start, "end": start + 10, "total": counts(*total),
                        "streams": {n: counts(*by_stream[n]) for n in busiest}})
        return out


@pytest.mark.parametrize("view_class", [WindowsView, CountsView])
def test_history_keeps_the_busiest_streams_of_each_window_only(view_class):
    view = view_class()
    for start in (0, 10, 20):
        view.add(start, **{f"s{i:02}": (i + 1, i + 1, 0) for i in range(30)})  # s29 the busiest
    history = History(view)
    history.poll()
    points = history._points.values()
    assert len(points) == 3
    kept = {f"s{i:02}" for i in range(30 - dashboard.TOP_STREAMS, 30)}
    assert all(set(point.streams) == kept for point in points)
    series = history.series(None)
    assert series["query"] == [sum(range(1, 31)) / 10] * 3  # the total still counts every stream
    assert list(series["streams"]) == sorted(kept, reverse=True)
    assert history.series("s29")["query"] == [3.0] * 3


def test_history_reads_counters_only_from_a_view_that_offers_them():
    view = CountsView()
    view.add(0, a=(10, 8, 2), b=(5, 5, 0))
    history = History(view)
    history.poll()
    view.add(10, a=(20, 20, 0))
    history.poll()
    assert view.calls and all(call[0] == "window_counts" for call in view.calls), view.calls
    assert history.series(None)["rcodes"] == {"noerror": [1.1, 2.0], "nxdomain": [0.2, 0]}


def test_window_counts_reads_one_snapshot_of_the_real_store():
    from stats_data import synthetic_records

    t0 = 1_700_000_000.0
    identities = tuple(f"ns{i:02}" for i in range(20) for _ in range(i + 1))  # ns19 the busiest
    records = synthetic_records(6000, seed=3, start=t0, rate=200.0, identities=identities)  # 30 s
    store = StatsStore(window_seconds=10, keep_windows=5, grace_seconds=0)
    store.add_batch(records, now=t0 + 100)
    snapshot = store.view()
    read = window_counts(snapshot, 5, streams=8)
    closed = [w for w in snapshot.windows(5) if w.closed]
    assert [w["start"] for w in read] == [w.start for w in closed] == [t0, t0 + 10]  # the open one left out
    for got, w in zip(read, closed):
        total = w.counters()
        assert (got["total"]["query"], got["total"]["response"]) == (total["query"], total["response"])
        assert got["total"]["rcodes"] == {k: total[f"response/{k}"] for k in got["total"]["rcodes"]}
        assert set(got["total"]["rcodes"]) >= {"noerror", "nxdomain", "servfail", "refused"}
        busy = {s: w.counters(s)["query"] + w.counters(s)["response"] for s in w.streams()}
        assert len(got["streams"]) == 8
        assert sorted(busy[s] for s in got["streams"]) == sorted(busy.values())[-8:]
        for name, counts in got["streams"].items():
            assert counts["query"] == w.counters(name)["query"]
    assert all(set(w) == {"start", "end", "total", "streams"} for w in read)  # no tables


# --------------------------------------------------------------------------- the page in Chromium


def _driver(tmp: Path):
    chromium = peers.require("chromium")
    chromedriver = peers.require("chromedriver")
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never download a driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp}", "--window-size=1280,900"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(chromedriver), options=options)


def _wait(what: str, check, timeout: float = 20.0, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)


def _api(port: int, path: str) -> dict:
    reply = request(port, "GET", path, basic())
    assert reply.status == 200, (path, reply.status, reply.body)
    return reply.json()


def _screenshot(driver, name: str, width: int) -> Path:
    """The whole page at ``width`` CSS pixels."""
    driver.set_window_size(width, 900)
    _wait("the charts redrawn at the new width", lambda: driver.execute_script(
        "const c = document.getElementById('chart-rates');"
        "return c.querySelector('svg').viewBox.baseVal.width === Math.max(c.clientWidth, 200)"))
    height = driver.execute_script("return document.documentElement.scrollHeight")
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1},
    })
    path = ARTIFACTS / f"{name}.png"
    path.write_bytes(base64.b64decode(shot["data"]))
    return path


def test_the_dashboard_in_chromium(receiver, tmp_path):
    from dnstap_traffic import (
        HOSTILE_IDENTITY,
        HOSTILE_QNAME,
        Traffic,
        start_watched_receiver,
    )

    rx, port, api = start_watched_receiver(receiver, tmp_path, LOGIN, PASSWORD, KEY,
                                           statistics={"keep-windows": 30})
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in ARTIFACTS.glob("*.png"):
        old.unlink()
    print(f"dashboard screenshots: {ARTIFACTS}")
    base = f"http://127.0.0.1:{api}"
    profile = Path(tempfile.mkdtemp(prefix="chromium-", dir=tmp_path))
    driver = _driver(profile)
    traffic = None
    try:
        js = driver.execute_script
        value = lambda node_id: float(js(f"return document.getElementById('{node_id}').dataset.value"))

        def shown(stream: str, since: float) -> bool:
            """The page shows ``stream`` from data the server made at ``since`` or later."""
            drawn, made = js("return [document.body.dataset.stream, +document.body.dataset.now]")
            return drawn == stream and made >= since

        # Login: the page sends the browser to the form; a wrong password stays there.
        driver.get(base + "/")
        assert driver.current_url == base + "/login"
        driver.find_element("id", "login").send_keys(LOGIN)
        driver.find_element("id", "password").send_keys("wrong")
        driver.find_element("id", "sign-in").click()
        _wait("the login error", lambda: "Wrong login or password" in driver.page_source)
        assert driver.get_cookies() == []
        driver.find_element("id", "login").send_keys(LOGIN)
        driver.find_element("id", "password").send_keys(PASSWORD)
        driver.find_element("id", "sign-in").click()
        _wait("the dashboard", lambda: driver.current_url == base + "/dashboard")
        (cookie,) = driver.get_cookies()
        assert cookie["name"] == "dnstap_session" and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        assert PASSWORD not in driver.page_source and KEY not in driver.page_source
        assert js("return document.cookie") == ""  # HttpOnly: the page's scripts cannot read it

        # Empty state before any traffic.
        _wait("the empty state", lambda: js("return document.body.dataset.state") == "empty")
        assert driver.find_element("id", "banner-empty").is_displayed()
        assert js("return document.querySelector('#chart-rates svg').dataset.points") == "0"
        shots = [_screenshot(driver, "1-empty-laptop", 1280)]

        # Traffic: the charts fill, the streams appear (one exchange from a hostile identity).
        traffic = Traffic(port, {"unbound01": 300, "dnsdist01": 100}, hostile=True).start()
        _wait("three windows on the chart",
              lambda: int(js("return document.querySelector('#chart-rates svg').dataset.points")) >= 3)
        streams = ["", HOSTILE_IDENTITY, "dnsdist01", "unbound01"]
        _wait("the streams", lambda: js("return Array.from(document.querySelectorAll('#stream option'))"
                                        ".map(o => o.value)") == streams)
        assert js("return document.body.dataset.state") == "live"
        assert value("kpi-qps") > 0 and value("kpi-queries") > 0
        assert js("return document.querySelectorAll('#chart-rates polyline').length") == 5  # 2 totals + 3 streams
        assert js("return document.querySelectorAll('#chart-rcodes polyline').length") == 2  # noerror, nxdomain
        assert js("return document.querySelector('#top-domains tr').dataset.name") in (
            "www.example.test.", "mail.example.test.", "api.example.org.", "cdn.example.net.", "db.example.test.")
        assert js("return document.querySelector('#outputs tr[data-output=\"tcp-socket\"] td:nth-child(2)').textContent") == "disconnected"
        _wait("the filter's drops", lambda: value("rx-filtered") > 0)
        # Markup in an identity and a qname is shown as text, never parsed (the page's
        # Content-Security-Policy would also stop an inline handler: no element is the check).
        driver.find_element("id", "scope-cumulative").click()
        _wait("the hostile qname in the top domains", lambda: HOSTILE_QNAME in js(
            "return Array.from(document.querySelectorAll('#top-domains td.name')).map(td => td.textContent)"))
        assert HOSTILE_IDENTITY in js("return document.getElementById('stream').textContent")
        assert HOSTILE_IDENTITY + " queries" in js("return document.getElementById('legend-rates').textContent")
        assert js("return document.querySelectorAll('body img').length") == 0
        assert js("return window.__xss") is None
        driver.find_element("id", "scope-window").click()
        shots.append(_screenshot(driver, "2-live-laptop", 1280))
        shots.append(_screenshot(driver, "3-live-phone", 390))
        assert js("return window.innerWidth") <= 420
        assert js("return document.documentElement.scrollWidth <= window.innerWidth"), "horizontal scroll on a phone"
        driver.set_window_size(1280, 900)

        # Switch stream.
        from selenium.webdriver.support.ui import Select

        Select(driver.find_element("id", "stream")).select_by_value("dnsdist01")
        _wait("the dnsdist01 view", lambda: js("return document.body.dataset.stream") == "dnsdist01")
        assert js("return document.querySelectorAll('#chart-rates polyline').length") == 2

        # Traffic stops: the page turns stale; its numbers are then those of /counters.
        traffic.stop()
        _wait("the stale state", lambda: js("return document.body.dataset.state") == "stale", timeout=30)
        assert driver.find_element("id", "banner-stale").is_displayed()
        shots.append(_screenshot(driver, "4-stale-laptop", 1280))
        driver.set_window_size(1280, 900)
        for stream in ("dnsdist01", ""):
            Select(driver.find_element("id", "stream")).select_by_value(stream)
            query = f"?stream={stream}" if stream else ""
            counters = _api(api, "/counters" + query)["counters"]
            asked = time.time()
            _wait(f"stream {stream!r} drawn from data newer than /counters",
                  lambda s=stream, t=asked: shown(s, t))
            page = {k: value(f"kpi-{k}") for k in ("queries", "responses", "clients", "domains", "qps")}
            assert page == {"queries": counters["query"], "responses": counters["response"],
                            "clients": counters["clients"], "domains": counters["domains"], "qps": counters["qps"]}
            sent = traffic.sent["dnsdist01"] if stream else sum(traffic.sent.values())
            assert 0 < page["queries"] <= sent  # the blocked name is filtered out
            driver.find_element("id", "scope-cumulative").click()
            nx = _api(api, "/tables" + query)["tables"]["domains"]["nxdomain/response"]
            rows = js("return Array.from(document.querySelectorAll('#top-nxdomains tr')).map(r => [r.dataset.name, +r.dataset.value])")
            assert rows == nx
            driver.find_element("id", "scope-window").click()

        # A proxy answering HTML instead of the data: "offline", and the polling goes on.
        js("""const real = window.fetch; let bad = 1;
              window.fetch = (...args) => bad-- > 0
                ? Promise.resolve(new Response("<html>a proxy's error page</html>", {headers: {"Content-Type": "text/html"}}))
                : real(...args);""")
        _wait("offline on an answer that is not JSON", lambda: js("return document.body.dataset.state") == "offline")
        _wait("polling again", lambda: js("return document.body.dataset.state") == "stale", timeout=10)

        # A late answer for the stream selected before is not drawn over the new selection.
        js("""window.__drawn = []; window.__late = 0;
              new MutationObserver(() => window.__drawn.push(document.body.dataset.stream))
                .observe(document.body, {attributes: true, attributeFilter: ["data-stream"]});
              const real = window.fetch;
              window.fetch = (url, ...rest) => String(url).includes("stream=dnsdist01")
                ? (window.__late++, new Promise((ok) => setTimeout(ok, 1500)).then(() => real(url, ...rest)))
                : real(url, ...rest);""")
        Select(driver.find_element("id", "stream")).select_by_value("dnsdist01")
        _wait("the request for dnsdist01", lambda: js("return window.__late") >= 1, interval=0.02)
        Select(driver.find_element("id", "stream")).select_by_value("")
        switched = time.time()
        _wait("data made after the late answer", lambda: shown("", switched + 2.0))
        assert "dnsdist01" not in js("return window.__drawn"), js("return window.__drawn")

        # The session ends under the page (expiry, a restart): it says so, with no password
        # dialog (no Basic challenge), and links to the form.
        driver.delete_all_cookies()
        _wait("the signed-out state", lambda: js("return document.body.dataset.state") == "signed-out")
        assert driver.find_element("id", "banner-signed-out").is_displayed()
        driver.find_element("id", "sign-in-again").click()
        _wait("the login form", lambda: driver.current_url == base + "/login")
        driver.find_element("id", "login").send_keys(LOGIN)
        driver.find_element("id", "password").send_keys(PASSWORD)
        driver.find_element("id", "sign-in").click()
        _wait("the dashboard again", lambda: js("return document.body.dataset.state") == "stale")
        (cookie,) = driver.get_cookies()

        # Logout: back to the form; the old cookie opens nothing.
        driver.find_element("id", "logout").click()
        _wait("the login form", lambda: driver.current_url == base + "/login")
        old = {"Cookie": f"dnstap_session={cookie['value']}"}
        assert request(api, "GET", "/dashboard/data", old).status == 401

        # Expected: the wrong password's 401, and the data requests of the signed-out page.
        expected = re.compile(r"/(login|dashboard/data)\b.*\b401\b")
        problems = [e for e in driver.get_log("browser") if e["level"] == "SEVERE" and not expected.search(e["message"])]
        assert problems == [], problems
        for shot in shots:
            assert shot.stat().st_size > 10_000, shot
    finally:
        if traffic is not None:
            traffic.stop()
        driver.quit()
    assert rx.stop() == 0, rx.logs()
