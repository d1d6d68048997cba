"""The live web dashboard: a page served by the web API at ``/`` and ``/dashboard`` that shows
what the DNS traffic is doing, updated as the statistics windows close.

Why in the receiver: 4.7.0's users needed a separate terminal tool; this page needs nothing
but a browser. Everything it loads is in ``pipeline/dashboard/`` (HTML, CSS, a hand-made SVG
chart module, no fonts: the system's), so it works on a closed network; its
Content-Security-Policy allows this origin only.

Authentication is the API's: a request with the API key or Basic credentials reaches the page
and its data. A browser signs in with a form instead (``POST /login``: login and password, or
the API key as the password), which sets an HttpOnly, SameSite=Strict session cookie; the key
and password never appear in a URL or in the page. The cookie opens the page and its data
only, not the API (``DELETE /reset`` needs real credentials). A browser without credentials
asking for the page (``Accept: text/html``) is sent to the login form; other clients get the
API's 401. The page's data request without a session (expired, or the receiver restarted)
gets a 401 without a Basic challenge, which would pop up the browser's password dialog; the
page then says it is signed out. ``/logout`` is public: it only clears the cookie
(SameSite=Strict keeps other sites from posting it).

Login guessing: a wrong password is answered after FAILED_LOGIN_DELAY, and the failures wait
one after the other (a shared lock), so parallel guesses get no faster than one per delay; a
right password never waits. A login posted from another origin (an ``Origin`` header naming
another host, or ``Sec-Fetch-Site`` other than same-origin) is refused: no login CSRF. Signing in again revokes the
session the browser had.

The page polls ``GET /dashboard/data`` (one JSON document per stream selection) every half
window, at least every 0.5 s and at most every 5 s. Per-window rates of the last hour come
from :class:`History`, which gathers the closed windows of the statistics store as they
close (the store keeps only ``statistics.keep-windows`` of them, ten minutes by default),
from the first time the dashboard is opened on.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import heapq
import logging
import re
import secrets
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from aiohttp import hdrs, web

from core import counters
from core.ratelimit import RateLimitedLog

if TYPE_CHECKING:  # http_api imports this module
    from core.stats import StatsSnapshot
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
    "window_counts",
]

log = logging.getLogger("dnstap_receiver.api")

STATIC_DIR = Path(__file__).with_name("dashboard")
# Counter group: logins, failed_logins, cross_site_logins, poll_errors (each created when first counted).
COUNTERS = "dashboard"
SESSION_COOKIE = "dnstap_session"
SESSION_SECONDS = 12 * 3600
MAX_SESSIONS = 1000  # the oldest session is dropped past this: bounded memory whoever logs in
FAILED_LOGIN_DELAY = 0.5  # seconds before answering a wrong password: slows guessing
HISTORY_SECONDS = 3600.0
MAX_HISTORY_POINTS = 720  # an hour of 5 s windows; shorter windows keep a shorter span
TOP_STREAMS = 8  # streams drawn one by one in the all-streams rate chart, and kept per history point
TOP_ROWS = 10
PAGE_PATHS = frozenset({"/", "/dashboard"})
DATA_PATH = "/dashboard/data"
STATIC_PREFIX = "/dashboard/static/"
# What a session cookie opens: the page and its data.
SESSION_PATHS = PAGE_PATHS | {DATA_PATH}
PUBLIC_PATHS = frozenset({"/login", "/logout"})
STATIC_TYPES = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}

# Every page: this origin only, no inline script, no framing.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    # Not no-referrer: with it, a browser sends "Origin: null" even on the page's own login
    # POST, which the cross-site check must refuse; same-origin keeps the referrer in this origin.
    "Referrer-Policy": "same-origin",
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


def _count(value: Any) -> float:
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


Counts = tuple[float, float, dict[str, float]]  # queries, responses, responses per rcode


class _Point:
    """One closed window: counts of queries, responses and responses per rcode, in total and
    for its TOP_STREAMS busiest streams."""

    __slots__ = ("end", "start", "streams", "total")

    def __init__(self, start: float, end: float, total: Counts, streams: dict[str, Counts]) -> None:
        self.start, self.end = start, end
        self.total = total
        self.streams = streams


def _counts(values: dict) -> Counts:
    rcodes = values.get("rcodes", {})
    return _count(values.get("query")), _count(values.get("response")), {str(k): _count(n) for k, n in rcodes.items()}


def window_counts(snapshot: StatsSnapshot, last: int, streams: int = TOP_STREAMS) -> list[dict]:
    """What :class:`History` reads, from one snapshot of the statistics store (so the total
    and the streams of a point agree): the ``last`` closed windows, oldest first, as
    ``{"start", "end", "total": counts, "streams": {name: counts}}`` where counts is
    ``{"query", "response", "rcodes": {rcode: responses}}``, for the ``streams`` busiest
    streams of each window only. Counters only, no top-n tables: the cost is a pass over the
    window's streams (heapq picks the busiest), whatever their number (statistics.max-identities).
    A StatsView offers it as ``window_counts(last, streams)``."""

    def counts(stats) -> dict:
        rcodes = {name: n for (qr, name), n in stats.rcodes.items() if qr == "response"}
        return {"query": stats.counts["query"], "response": stats.counts["response"], "rcodes": rcodes}

    out = []
    for w in snapshot.windows(last):
        if not w.closed:
            continue
        by_stream = w.stats.streams
        busiest = heapq.nlargest(
            streams, by_stream, key=lambda name: by_stream[name].counts["query"] + by_stream[name].counts["response"]
        )
        out.append({
            "start": w.start, "end": w.end, "total": counts(w.stats.total),
            "streams": {name: counts(by_stream[name]) for name in busiest},
        })
    return out


def _rcode_rows(window: dict) -> dict:
    rows = window.get("tables", {}).get("rcodes", {}).get("hit/response", [])
    return {str(name).removeprefix("response/"): n for name, n in rows}


class History:
    """Query, response and rcode counts of the closed windows of the last hour (at most
    MAX_HISTORY_POINTS windows), in total and for the TOP_STREAMS busiest streams of each
    window (what the all-streams chart draws; a stream's own chart is 0 for a window where it
    was not among them), so memory is bounded whatever the number of streams.

    Read from the view's ``window_counts(last, streams)`` (counters only, one snapshot: see
    :func:`window_counts`) as windows close; a view without it is read through ``windows()``,
    once per stream, which also builds top-n tables nobody uses here. ``poll()`` is cheap when
    no window closed: one read of the store's ``windows_closed`` counter when the view has it;
    the windows are read again until a read comes SETTLE seconds after the counter changed
    (the store serves reads from a snapshot up to half a second old). It runs on the API's
    event loop: a read per closed window, bounded as above."""

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

    def _read(self, last: int) -> list[dict]:
        """The last closed windows in window_counts' layout."""
        read = getattr(self._view, "window_counts", None)
        if read is not None:
            return read(last, TOP_STREAMS)
        windows = self._view.windows(last, None)
        out = [
            {"start": w["start"], "end": w["end"], "streams": {},
             "total": {**w.get("counters", {}), "rcodes": _rcode_rows(w)}}
            for w in windows
        ]
        index = {float(w["start"]): w for w in out}
        for stream in self._view.streams():
            try:
                for w in self._view.windows(last, stream):
                    if float(w["start"]) in index:
                        index[float(w["start"])]["streams"][stream] = {**w.get("counters", {}), "rcodes": _rcode_rows(w)}
            except KeyError:
                continue  # reset since streams()
        for w in out:
            busy = w["streams"]
            keep = heapq.nlargest(TOP_STREAMS, busy, key=lambda n: _count(busy[n].get("query")) + _count(busy[n].get("response")))
            w["streams"] = {name: busy[name] for name in keep}
        return out

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
        recent = self._read(MAX_HISTORY_POINTS if newest is None else 3)
        if newest is not None and recent and recent[0]["start"] > newest:
            recent = self._read(MAX_HISTORY_POINTS)  # more than 3 closed since the last poll
        fresh = [w for w in recent if newest is None or w["start"] > newest]
        if not fresh:
            return
        for w in fresh:
            streams = {name: _counts(c) for name, c in list(w["streams"].items())[:TOP_STREAMS]}
            point = _Point(float(w["start"]), float(w["end"]), _counts(w["total"]), streams)
            self._points[point.start] = point
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


def _receiver(groups: dict[str, dict], unanswered: float) -> dict:
    """What the page shows of the receiver's own counters (and the unanswered queries of all
    streams, shown with them)."""
    decode = groups.get("decode", {})
    filters = groups.get("filter", {})
    inputs = groups.get("input", {})
    outputs = []
    # Half-received frames lost at a disconnect, and frames a sniffer could not hand over
    # while the pipeline was behind.
    dropped = _count(inputs.get("partial_frames_dropped")) + _count(inputs.get("feed_dropped"))
    for group, values in sorted(groups.items()):
        name = group.removeprefix("output.")
        if not group.startswith("output.") or "." in name:
            continue  # not an output, or a sub-group of one (output.syslog.encode)
        row: dict[str, Any] = {"name": name, "dropped": _count(values.get("dropped"))}
        if "connected" in values:
            row["connected"] = bool(values["connected"])
            row["buffered"] = _count(values.get("buffered"))
            row["delivered"] = _count(values.get("delivered"))
        else:
            row["connected"] = None  # a local output: no connection
            row["buffered"] = None
            row["delivered"] = _count(values.get("lines", values.get("delivered")))
        dropped += row["dropped"]
        outputs.append(row)
    return {
        "decoded": _count(decode.get("decoded")),
        "malformed": _count(decode.get("malformed")),
        "undecodable": _count(decode.get("undecodable")),
        "filtered": sum(_count(v) for k, v in filters.items() if k != "kept"),
        "dropped": dropped,
        "unanswered": unanswered,
        "outputs": outputs,
    }


# --------------------------------------------------------------------------- the application part


class Dashboard:
    """Routes, login and data of the dashboard; ``build_app`` in pipeline/http_api.py adds
    them to the API's application and asks :meth:`allows` / :meth:`refuse` from its
    authentication middleware."""

    def __init__(
        self,
        view: StatsView,
        check_login: Callable[[str, str], bool],
        stream_param: Callable[[web.Request], str | None],
        read_stream: Callable[[Callable[[str | None], Any], str | None], Any],
    ) -> None:
        """``check_login(login, password)``: the form's credentials; ``stream_param`` and
        ``read_stream``: the API's reading of ``stream=`` and of the view for one stream (an
        unknown stream is the API's 400)."""
        self._view = view
        self._check_login = check_login
        self._stream_param = stream_param
        self._read_stream = read_stream
        self._failures = asyncio.Lock()  # wrong passwords wait their delay one after the other
        self.sessions = Sessions()
        self.history = History(view)
        self._files = {p.name: p for p in STATIC_DIR.iterdir() if p.suffix in STATIC_TYPES}
        self._log = RateLimitedLog(log)  # failed logins and store errors can come in floods
        self._poller: asyncio.Task | None = None

    # -- authentication (called by the API's middleware) -----------------------

    @staticmethod
    def public(request: web.Request) -> bool:
        """The login form, logging out (it only clears the cookie) and the static files: no
        secret in them, needed without a session."""
        return request.path in PUBLIC_PATHS or request.path.startswith(STATIC_PREFIX)

    def session(self, request: web.Request) -> bool:
        """A valid session cookie on a path it opens, and no other credential (every
        credential sent must be right: a wrong key is not saved by a cookie)."""
        if request.path not in SESSION_PATHS:
            return False
        if _api_credentials(request):
            return False
        return self.sessions.valid(request.cookies.get(SESSION_COOKIE))

    @staticmethod
    def refuse(request: web.Request) -> web.StreamResponse | None:
        """The answer to an unauthenticated request of the dashboard, or None for the API's
        401: a browser is sent to the login form; the page's data request without API
        credentials (no session, or one that expired or died with a restart) gets a 401
        without a Basic challenge, which would pop up the browser's password dialog."""
        if request.method == "GET" and request.path in PAGE_PATHS and "text/html" in request.headers.get(hdrs.ACCEPT, ""):
            return _redirect("login")
        if request.path == DATA_PATH and not _api_credentials(request):
            return web.json_response({"error": "not signed in"}, status=401, headers={"Cache-Control": "no-store"})
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
        if _cross_site(request):
            counters.counter_group(COUNTERS)["cross_site_logins"] += 1
            self._log(logging.WARNING, "dashboard: login posted from another site refused (%s)", request.remote)
            return web.json_response({"error": "cross-site login refused"}, status=403, headers=SECURITY_HEADERS)
        form = await request.post()
        login, password = form.get("login", ""), form.get("password", "")
        if not (isinstance(login, str) and isinstance(password, str) and self._check_login(login, password)):
            counters.counter_group(COUNTERS)["failed_logins"] += 1
            self._log(logging.WARNING, "dashboard: failed login from %s", request.remote)
            async with self._failures:
                await asyncio.sleep(FAILED_LOGIN_DELAY)
            return self._html("login.html", status=401, error=True)
        self.sessions.drop(request.cookies.get(SESSION_COOKIE))  # the browser's previous session
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
        stream = self._stream_param(request)
        view = self._view
        counters, tables, windows = self._read_stream(
            lambda s: (view.counters(s), view.tables(TOP_ROWS, s), view.windows(1, s)), stream
        )
        everything = counters if stream is None else view.counters(None)
        now = time.time()
        state, age = self.history.state(now)
        if state == "empty" and (_count(counters.get("query")) or _count(counters.get("response"))):
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
            "receiver": _receiver(view.receiver_counters(), _count(everything.get("unanswered"))),
        }
        return web.json_response(body, headers={"Cache-Control": "no-store"})


def _api_credentials(request: web.Request) -> bool:
    return hdrs.AUTHORIZATION in request.headers or "X-API-Key" in request.headers


def _cross_site(request: web.Request) -> bool:
    """A request a page of another origin made the browser send: its Origin (sent with every
    POST by current browsers) names another host, or Sec-Fetch-Site says so. The host is
    compared, not the scheme: a reverse proxy terminating TLS forwards https as http (it must
    keep the Host header)."""
    if request.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
        return True
    origin = request.headers.get(hdrs.ORIGIN)
    if origin is None:
        return False
    try:
        host = urlsplit(origin).netloc
    except ValueError:
        return True
    return not host or host.lower() != request.host.lower()  # "null" (an opaque origin) too


def _redirect(location: str) -> web.Response:
    # Relative: the page also works behind a reverse proxy that adds a path prefix.
    return web.Response(status=303, headers={**SECURITY_HEADERS, hdrs.LOCATION: location})


def _rows(rows: Iterable, prefix: str = "") -> list[list]:
    out = []
    for name, count in list(rows)[:TOP_ROWS]:
        out.append([str(name).removeprefix(prefix), _count(count)])
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
