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
from pathlib import Path

import peers
import pytest
from fake_stats import FakeStatsView
from test_http_api import Reply, check_schema

from core import counters
from pipeline import dashboard
from pipeline.dashboard import STATIC_DIR, History, Sessions
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
        "decoded": 2006, "malformed": 2, "undecodable": 1, "filtered": 4, "dropped": 0,
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
        ("POST", "/logout", "/logout", {}, None, 401),
        ("POST", "/logout", "/logout", cookie, None, 303),
    ]
    for method, path, documented, headers, form, status in cases:
        reply = request(server.port, method, path, headers, form)
        assert reply.status == status, (method, path)
        check_schema(reply, method, documented)


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
    time.sleep(0.4)  # the charts redraw on resize
    height = driver.execute_script("return document.documentElement.scrollHeight")
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1},
    })
    path = ARTIFACTS / f"{name}.png"
    path.write_bytes(base64.b64decode(shot["data"]))
    return path


def test_the_dashboard_in_chromium(receiver, tmp_path):
    from dnstap_traffic import Traffic, start_watched_receiver

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

        # Traffic: the charts fill, both streams appear.
        traffic = Traffic(port, {"unbound01": 300, "dnsdist01": 100}).start()
        _wait("three windows on the chart",
              lambda: int(js("return document.querySelector('#chart-rates svg').dataset.points")) >= 3)
        _wait("both streams", lambda: js("return Array.from(document.querySelectorAll('#stream option'))"
                                         ".map(o => o.value).join(',')") == ",dnsdist01,unbound01")
        assert js("return document.body.dataset.state") == "live"
        assert value("kpi-qps") > 0 and value("kpi-queries") > 0
        assert js("return document.querySelectorAll('#chart-rates polyline').length") == 4  # 2 totals + 2 streams
        assert js("return document.querySelectorAll('#chart-rcodes polyline').length") == 2  # noerror, nxdomain
        assert js("return document.querySelector('#top-domains tr').dataset.name") in (
            "www.example.test.", "mail.example.test.", "api.example.org.", "cdn.example.net.", "db.example.test.")
        assert js("return document.querySelector('#outputs tr[data-output=\"tcp-socket\"] td:nth-child(2)').textContent") == "disconnected"
        _wait("the filter's drops", lambda: value("rx-filtered") > 0)
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
            _wait(f"stream {stream!r}", lambda s=stream: js("return document.body.dataset.stream") == s)
            time.sleep(0.6)  # one more poll
            query = f"?stream={stream}" if stream else ""
            counters = _api(api, "/counters" + query)["counters"]
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

        # Logout: back to the form; the old cookie opens nothing.
        driver.find_element("id", "logout").click()
        _wait("the login form", lambda: driver.current_url == base + "/login")
        old = {"Cookie": f"dnstap_session={cookie['value']}"}
        assert request(api, "GET", "/dashboard/data", old).status == 401

        problems = [e for e in driver.get_log("browser")
                    if e["level"] == "SEVERE" and not ("/login" in e["message"] and "401" in e["message"])]
        assert problems == [], problems
        for shot in shots:
            assert shot.stat().st_size > 10_000, shot
    finally:
        if traffic is not None:
            traffic.stop()
        driver.quit()
    assert rx.stop() == 0, rx.logs()
