"""The live web dashboard: a page served by the web API at ``/`` and ``/dashboard`` that shows
what the DNS traffic is doing, updated every statistics window.

Why in the receiver: 4.7.0's users needed a separate terminal tool; this page needs nothing
but a browser. Everything it loads is in ``pipeline/dashboard/`` (HTML, CSS, a hand-made SVG
chart module, no fonts: the system's), so it works on a closed network; its
Content-Security-Policy allows this origin only.

Authentication is the API's: a request with the API key or Basic credentials reaches the page
and its data. A browser signs in with a form instead (``POST /login``: login and password, or
the API key as the password), which sets an HttpOnly, SameSite=Strict session cookie; the key
and password never appear in a URL or in the page. The cookie opens the page, its data and
``/logout`` only, not the API (``DELETE /reset`` needs real credentials). A browser without
credentials asking for the page (``Accept: text/html``) is sent to the login form; other
clients get the API's 401.

The page polls ``GET /dashboard/data`` (one JSON document per stream selection) every half
window. Per-window rates of the last hour come from :class:`History`, which gathers the
closed windows of the statistics store as they close (the store keeps only
``statistics.keep-windows`` of them, ten minutes by default), from the first time the
dashboard is opened on.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import secrets
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import hdrs, web

from core import counters
from core.ratelimit import RateLimitedLog

if TYPE_CHECKING:  # http_api imports this module
    from pipeline.http_api import StatsView

__all__ = [
    "HISTORY_SECONDS",
    "MAX_HISTORY_POINTS",
    "PAGE_PATHS",
    "SESSION_COOKIE",
    "STATIC_DIR",
    "Dashboard",
    "History",
    "Sessions",
]

log = logging.getLogger("dnstap_receiver.api")

STATIC_DIR = Path(__file__).with_name("dashboard")
COUNTERS = "dashboard"  # counter group: logins, failed_logins, poll_errors (created when first counted)
SESSION_COOKIE = "dnstap_session"
SESSION_SECONDS = 12 * 3600
MAX_SESSIONS = 1000  # the oldest session is dropped past this: bounded memory whoever logs in
FAILED_LOGIN_DELAY = 0.5  # seconds before answering a wrong password: slows guessing
HISTORY_SECONDS = 3600.0
MAX_HISTORY_POINTS = 720  # an hour of 5 s windows; shorter windows keep a shorter span
TOP_STREAMS = 8  # streams drawn one by one in the all-streams rate chart
TOP_ROWS = 10
PAGE_PATHS = frozenset({"/", "/dashboard"})
DATA_PATH = "/dashboard/data"
STATIC_PREFIX = "/dashboard/static/"
# What a session cookie opens: the page, its data, and logging out.
SESSION_PATHS = PAGE_PATHS | {DATA_PATH, "/logout"}
STATIC_TYPES = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}

# Every page: this origin only, no inline script, no framing.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

# Counters the page shows (the store's dict also holds one per TLD: hundreds).
_COUNTER_KEYS = re.compile(
    r"query|response|qps|rps|pps|clients|domains|malformed|unanswered"
    r"|(query|response)/(bytes|inet6?|udp|tcp|dot|doh|doq|dnscryptudp|dnscrypttcp|latency[0-9_a-z]+)"
)
_LOGIN_ERROR = '<p class="error" role="alert">Wrong login or password.</p>'


def _counters(values: dict) -> dict[str, float]:
    return {k: v for k, v in values.items() if _COUNTER_KEYS.fullmatch(k) and isinstance(v, (int, float))}


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


# --------------------------------------------------------------------------- sessions


class Sessions:
    """Session tokens of the login form, in memory (a restart signs everyone out). Only a
    hash of each token is kept: a lookup reveals nothing about the tokens by its timing."""

    def __init__(self, lifetime: float = SESSION_SECONDS, limit: int = MAX_SESSIONS) -> None:
        self._lifetime = lifetime
        self._limit = limit
        self._expiry: dict[str, float] = {}  # sha256(token) -> monotonic expiry, oldest first

    @staticmethod
    def _key(token: str) -> str:
        return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()

    def create(self) -> str:
        now = time.monotonic()
        for key in [k for k, t in self._expiry.items() if t <= now]:
            del self._expiry[key]
        while len(self._expiry) >= self._limit:
            del self._expiry[next(iter(self._expiry))]
        token = secrets.token_urlsafe(32)
        self._expiry[self._key(token)] = now + self._lifetime
        return token

    def valid(self, token: str | None) -> bool:
        if not token:
            return False
        expiry = self._expiry.get(self._key(token))
        return expiry is not None and expiry > time.monotonic()

    def drop(self, token: str | None) -> None:
        if token:
            self._expiry.pop(self._key(token), None)

    def __len__(self) -> int:
        return len(self._expiry)


# --------------------------------------------------------------------------- history


class _Point:
    """One closed window: counts of queries, responses and responses per rcode, per stream
    and in total."""

    __slots__ = ("end", "start", "streams", "total")

    def __init__(self, start: float, end: float) -> None:
        self.start, self.end = start, end
        self.total: tuple[float, float, dict[str, float]] = (0.0, 0.0, {})
        self.streams: dict[str, tuple[float, float, dict[str, float]]] = {}


def _counts(window: dict) -> tuple[float, float, dict[str, float]]:
    counters = window.get("counters", {})
    rows = window.get("tables", {}).get("rcodes", {}).get("hit/response", [])
    rcodes = {str(name).removeprefix("response/"): _number(n) for name, n in rows}
    return _number(counters.get("query")), _number(counters.get("response")), rcodes


class History:
    """Query, response and rcode counts of the closed windows of the last hour (at most
    MAX_HISTORY_POINTS windows), per stream and in total, read from the view's
    ``windows()`` as they close. ``poll()`` is cheap when no window closed: one read of the
    store's ``windows_closed`` counter when the view has it; the windows are read again
    until a read comes SETTLE seconds after the counter changed (the store serves reads
    from a snapshot up to half a second old)."""

    SETTLE = 1.0

    def __init__(
        self, view: StatsView, clock: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        self._view = view
        self._clock = clock
        self._monotonic = monotonic
        self._points: dict[float, _Point] = {}  # by start, oldest first
        self._closed_seen: object = None  # the store's windows_closed at the last change...
        self._changed_at = 0.0  # ...when it changed (monotonic)...
        self._settled = False  # ...and whether the windows were read SETTLE seconds after
        self.window: float | None = None  # seconds, from the newest window
        self.new_window_at: float | None = None  # wall time a new window was last seen

    def poll(self) -> None:
        closed = self._view.receiver_counters().get("statistics", {}).get("windows_closed")
        now = self._monotonic()
        if closed is not None:
            if closed != self._closed_seen:
                self._closed_seen, self._changed_at, self._settled = closed, now, False
            elif self._settled:
                return
            self._settled = now - self._changed_at >= self.SETTLE
        newest = max(self._points) if self._points else None
        recent = self._view.windows(MAX_HISTORY_POINTS if newest is None else 3, None)
        if newest is not None and recent and recent[0]["start"] > newest:
            recent = self._view.windows(MAX_HISTORY_POINTS, None)  # more than 3 closed since the last poll
        fresh = [w for w in recent if newest is None or w["start"] > newest]
        if not fresh:
            return
        added: dict[float, _Point] = {}
        for w in fresh:
            point = _Point(float(w["start"]), float(w["end"]))
            point.total = _counts(w)
            added[point.start] = point
        for stream in self._view.streams():
            try:
                windows = self._view.windows(len(fresh), stream)
            except KeyError:
                continue  # reset since streams()
            for w in windows:
                point = added.get(float(w["start"]))
                if point is not None:
                    point.streams[stream] = _counts(w)
        self._points.update(added)
        last = fresh[-1]
        self.window = float(last["end"]) - float(last["start"])
        self.new_window_at = self._clock()
        self._trim()

    def _trim(self) -> None:
        newest = max(self._points)
        for start in [s for s in self._points if s <= newest - HISTORY_SECONDS]:
            del self._points[start]
        excess = len(self._points) - MAX_HISTORY_POINTS
        for start in sorted(self._points)[: max(excess, 0)]:
            del self._points[start]

    def series(self, stream: str | None) -> dict:
        """Per-second rates on a grid of one window per point, oldest first; a window with no
        traffic (the store makes none) is 0. For all streams (None), also the TOP_STREAMS
        busiest streams one by one."""
        empty = {"start": [], "step": self.window, "query": [], "response": [], "rcodes": {}, "streams": {}}
        if not self._points or not self.window:
            return empty
        step = self.window
        newest = max(self._points)
        count = min(MAX_HISTORY_POINTS, round((newest - min(self._points)) / step) + 1)
        starts = [round(newest - (count - 1 - i) * step, 6) for i in range(count)]
        index = {start: i for i, start in enumerate(starts)}

        def pick(point: _Point, name: str | None):
            return point.total if name is None else point.streams.get(name)

        def rates(name: str | None, with_rcodes: bool) -> tuple[list[float], list[float], dict[str, list[float]]]:
            queries, responses = [0.0] * count, [0.0] * count
            rcodes: dict[str, list[float]] = {}
            for start, point in self._points.items():
                i = index.get(round(start, 6))
                counts = pick(point, name)
                if i is None or counts is None:
                    continue
                length = (point.end - point.start) or step
                queries[i] = round(counts[0] / length, 3)
                responses[i] = round(counts[1] / length, 3)
                if with_rcodes:
                    for rcode, n in counts[2].items():
                        rcodes.setdefault(rcode, [0.0] * count)[i] = round(n / length, 3)
            return queries, responses, rcodes

        queries, responses, rcodes = rates(stream, True)
        out = {"start": starts, "step": step, "query": queries, "response": responses, "rcodes": rcodes, "streams": {}}
        if stream is None:
            busy: dict[str, float] = {}
            for point in self._points.values():
                for name, counts in point.streams.items():
                    busy[name] = busy.get(name, 0.0) + counts[0] + counts[1]
            for name in sorted(busy, key=lambda n: (-busy[n], n))[:TOP_STREAMS]:
                q, r, _ = rates(name, False)
                out["streams"][name] = {"query": q, "response": r}
        return out

    def state(self, now: float) -> tuple[str, float | None]:
        """("empty", None) before any window; ("stale", age) once no new window was seen for
        two windows and a few seconds (the store closes a window a second after its end);
        else ("live", age)."""
        if self.new_window_at is None or self.window is None:
            return "empty", None
        age = max(0.0, now - self.new_window_at)
        return ("stale" if age > 2 * self.window + 3.0 else "live"), round(age, 3)

    def poll_interval(self) -> float:
        return 1.0 if self.window is None else min(5.0, max(0.5, self.window / 2))


# --------------------------------------------------------------------------- receiver counters


def _receiver(groups: dict[str, dict]) -> dict:
    """What the page shows of the receiver's own counters."""
    decode = groups.get("decode", {})
    filters = groups.get("filter", {})
    inputs = groups.get("input", {})
    outputs = []
    dropped = _number(inputs.get("partial_frames_dropped"))
    for group, values in sorted(groups.items()):
        name = group.removeprefix("output.")
        if not group.startswith("output.") or "." in name:
            continue  # not an output, or a sub-group of one (output.syslog.encode)
        row: dict[str, Any] = {"name": name, "dropped": _number(values.get("dropped"))}
        if "connected" in values:
            row["connected"] = bool(values["connected"])
            row["buffered"] = _number(values.get("buffered"))
            row["delivered"] = _number(values.get("delivered"))
        else:
            row["connected"] = None  # a local output: no connection
            row["buffered"] = None
            row["delivered"] = _number(values.get("lines", values.get("delivered")))
        dropped += row["dropped"]
        outputs.append(row)
    return {
        "decoded": _number(decode.get("decoded")),
        "malformed": _number(decode.get("malformed")),
        "undecodable": _number(decode.get("undecodable")),
        "filtered": sum(_number(v) for k, v in filters.items() if k != "kept"),
        "dropped": dropped,
        "outputs": outputs,
    }


# --------------------------------------------------------------------------- the application part


class Dashboard:
    """Routes, login and data of the dashboard; ``build_app`` in pipeline/http_api.py adds
    them to the API's application and asks :meth:`allows` / :meth:`refuse` from its
    authentication middleware."""

    def __init__(self, view: StatsView, check_login: Callable[[str, str], bool]) -> None:
        self._view = view
        self._check_login = check_login
        self.sessions = Sessions()
        self.history = History(view)
        self._files = {p.name: p for p in STATIC_DIR.iterdir() if p.suffix in STATIC_TYPES}
        self._log = RateLimitedLog(log)  # failed logins and store errors can come in floods
        self._poller: asyncio.Task | None = None

    # -- authentication (called by the API's middleware) -----------------------

    @staticmethod
    def public(request: web.Request) -> bool:
        """The login form and the static files: no secret in them, needed before login."""
        return request.path == "/login" or request.path.startswith(STATIC_PREFIX)

    def session(self, request: web.Request) -> bool:
        """A valid session cookie on a path it opens, and no other credential (every
        credential sent must be right: a wrong key is not saved by a cookie)."""
        if request.path not in SESSION_PATHS:
            return False
        if hdrs.AUTHORIZATION in request.headers or "X-API-Key" in request.headers:
            return False
        return self.sessions.valid(request.cookies.get(SESSION_COOKIE))

    @staticmethod
    def refuse(request: web.Request) -> web.StreamResponse | None:
        """The answer to an unauthenticated request of the dashboard, or None for the API's
        401: a browser is sent to the login form; the page's own data requests get a 401
        without a Basic challenge, which would pop up the browser's password dialog."""
        if request.method == "GET" and request.path in PAGE_PATHS and "text/html" in request.headers.get(hdrs.ACCEPT, ""):
            return _redirect("login")
        if request.path == DATA_PATH and SESSION_COOKIE in request.cookies:
            return web.json_response({"error": "session expired"}, status=401, headers={"Cache-Control": "no-store"})
        return None

    # -- routes ----------------------------------------------------------------

    def add_routes(self, app: web.Application) -> None:
        for path in sorted(PAGE_PATHS):
            app.router.add_get(path, self.page, allow_head=False)
        app.router.add_get(DATA_PATH, self.data, allow_head=False)
        app.router.add_get("/login", self.login_form, allow_head=False)
        app.router.add_post("/login", self.login)
        app.router.add_post("/logout", self.logout)
        app.router.add_get(STATIC_PREFIX + "{name}", self.static, allow_head=False)
        app.on_cleanup.append(self._stop_polling)

    def _start_polling(self) -> None:
        """From the first time the page or its data is asked for: a receiver whose dashboard
        is never opened pays nothing. The history then starts with the windows the store
        still keeps."""
        if self._poller is None:
            self._poll()
            self._poller = asyncio.get_running_loop().create_task(self._poll_forever())

    async def _stop_polling(self, app: web.Application) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller

    def _poll(self) -> None:
        try:
            self.history.poll()
        except Exception as exc:  # noqa: BLE001 - the page shows no history; the API goes on
            counters.counter_group(COUNTERS)["poll_errors"] += 1
            self._log(logging.ERROR, "dashboard: reading the statistics windows failed: %r", exc)

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.history.poll_interval())
            self._poll()

    def _html(self, name: str, status: int = 200, error: bool = False) -> web.Response:
        text = (STATIC_DIR / name).read_text(encoding="utf-8")
        if error:
            text = text.replace("<!--error-->", _LOGIN_ERROR)
        return web.Response(text=text, status=status, content_type="text/html", headers=SECURITY_HEADERS)

    async def page(self, request: web.Request) -> web.Response:
        self._start_polling()
        return self._html("index.html")

    async def login_form(self, request: web.Request) -> web.Response:
        return self._html("login.html")

    async def login(self, request: web.Request) -> web.Response:
        form = await request.post()
        login, password = form.get("login", ""), form.get("password", "")
        if not (isinstance(login, str) and isinstance(password, str) and self._check_login(login, password)):
            counters.counter_group(COUNTERS)["failed_logins"] += 1
            self._log(logging.WARNING, "dashboard: failed login from %s", request.remote)
            await asyncio.sleep(FAILED_LOGIN_DELAY)
            return self._html("login.html", status=401, error=True)
        response = _redirect("dashboard")
        response.set_cookie(
            SESSION_COOKIE, self.sessions.create(), max_age=SESSION_SECONDS, path="/",
            httponly=True, samesite="Strict", secure=request.secure,
        )
        counters.counter_group(COUNTERS)["logins"] += 1
        log.info("dashboard: login from %s", request.remote)
        return response

    async def logout(self, request: web.Request) -> web.Response:
        self.sessions.drop(request.cookies.get(SESSION_COOKIE))
        response = _redirect("login")
        response.del_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="Strict")
        return response

    async def static(self, request: web.Request) -> web.Response:
        path = self._files.get(request.match_info["name"])  # names listed at start: no traversal
        if path is None:
            raise web.HTTPNotFound()
        headers = {**SECURITY_HEADERS, "Cache-Control": "no-cache"}
        return web.Response(body=path.read_bytes(), content_type=STATIC_TYPES[path.suffix], headers=headers)

    async def data(self, request: web.Request) -> web.Response:
        self._start_polling()
        stream = request.query.get("stream") or None
        view = self._view
        try:
            counters = view.counters(stream)
            tables = view.tables(TOP_ROWS, stream)
            windows = view.windows(1, stream)
        except KeyError:
            if stream is None:
                raise
            return web.json_response({"error": f"stream: unknown stream {stream!r}"}, status=400)
        now = time.time()
        state, age = self.history.state(now)
        if state == "empty" and (_number(counters.get("query")) or _number(counters.get("response"))):
            state = "live"  # traffic counted, its first window not closed yet
        window = windows[-1] if windows else None
        body = {
            "now": round(now, 3),
            "stream": stream,
            "streams": list(view.streams()),
            "state": state,
            "last_window_age": age,
            "window": self.history.window,
            "poll": self.history.poll_interval(),
            "history": self.history.series(stream),
            "current": None if window is None else {
                "start": window["start"], "end": window["end"],
                "counters": _counters(window.get("counters", {})),
                "tables": _top(window.get("tables", {})),
            },
            "cumulative": {"counters": _counters(counters), "tables": _top(tables)},
            "receiver": _receiver(view.receiver_counters()),
        }
        return web.json_response(body, headers={"Cache-Control": "no-store"})


def _redirect(location: str) -> web.Response:
    # Relative: the page also works behind a reverse proxy that adds a path prefix.
    return web.Response(status=303, headers={**SECURITY_HEADERS, hdrs.LOCATION: location})


def _rows(rows: Iterable, prefix: str = "") -> list[list]:
    out = []
    for name, count in list(rows)[:TOP_ROWS]:
        out.append([str(name).removeprefix(prefix), _number(count)])
    return out


def _top(tables: dict) -> dict[str, list[list]]:
    """The five tables of the page from the store's layout (either spelling of 4.7.0's keys)."""
    domains = tables.get("domains", {})
    clients = tables.get("clients", {})
    return {
        "domains": _rows(domains.get("hit/query", domains.get("noerror/query", []))),
        "nxdomains": _rows(domains.get("nxdomain/response", [])),
        "clients": _rows(clients.get("hit/ip", clients.get("hit/client", []))),
        "tlds": _rows(tables.get("tlds", {}).get("hit/query", []), "query/"),
        "qtypes": _rows(tables.get("rrtypes", {}).get("hit/query", []), "query/"),
    }
