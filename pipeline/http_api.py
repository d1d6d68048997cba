"""The web API of 4.7.0 (counters, tables, streams, reset, Prometheus metrics) plus the
windowed views, served by aiohttp on an event loop of its own in a daemon thread.

The server only reads a :class:`StatsView`; the statistics store implements it. Handlers
call the view on the server's loop thread, so the view must be safe to read from a thread
other than the one that updates it.

Differences from 4.7.0, on purpose:

- a bad parameter (``n=abc``, ``n=-1``, an unknown stream or counter name) is a 400 with
  ``{"error": "..."}``; 4.7.0 answered 500 for ``n=abc`` and silently fell back to the global
  counters for an unknown stream;
- 401, 404 and 405 carry a JSON ``{"error": ...}`` body and a 401 asks for Basic auth;
- every endpoint needs credentials, ``/metrics`` and ``/openapi.yaml`` included, except the
  dashboard's login form, ``/logout`` and static files (pipeline/dashboard.py; its session
  cookie opens the dashboard only, not the API);
- ``more=`` adds to the configured defaults for this request only (4.7.0 appended it to the
  configuration list, so extra names piled up from one request to the next);
- ``/tables`` has 4.7.0's keys as its code served them (``rcodes``, ``clients.hit/ip``); its
  README said ``top-rcodes`` and ``hit/client``, and the store may use either spelling;
- counts that are whole numbers are JSON integers, as in 4.7.0, even if the store keeps floats.
"""

from __future__ import annotations

import asyncio
import binascii
import hmac
import ipaddress
import logging
import re
import threading
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, Protocol, Self

from aiohttp import BasicAuth, hdrs, web
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

from core.errors import ConfigError
from pipeline.dashboard import Dashboard
from pipeline.prometheus import new_registry

__all__ = [
    "DEFAULT_COUNTERS",
    "DEFAULT_TOP",
    "MAX_ITEMS",
    "OPENAPI_PATH",
    "ApiServer",
    "StatsView",
    "build_app",
    "check_exposure",
    "is_loopback",
]

log = logging.getLogger("dnstap_receiver.api")

OPENAPI_PATH = Path(__file__).with_name("openapi.yaml")
DEFAULT_CREDENTIAL = "changeme"  # 4.7.0's shipped api-key and password
MAX_ITEMS = 1000  # largest n= and last=: bounds the work and the size of one answer
START_TIMEOUT = 10.0  # seconds to bind, and to shut down
REALM = 'Basic realm="dnstap-receiver"'

# 4.7.0's statistics.default-counters and default-top (pipeline/dnstap.conf).
DEFAULT_COUNTERS = ("clients", "domains", "query", "response", "qps", "response/noerror", "response/nxdomain")
DEFAULT_TOP = ("noerror/query", "nxdomain/response")

# Counter names of 4.7.0: a few global ones, and "<query|response>/<what>" where <what> is
# a family, protocol, rcode, rrtype, tld, "bytes" or a latency bucket; plus "malformed" and
# "unanswered", new here. A well-formed name the store has not counted yet is 0, as in 4.7.0;
# a name the store has is always known; anything else is an unknown name.
_GLOBAL_COUNTERS = frozenset({"query", "response", "qps", "rps", "pps", "clients", "domains", "malformed", "unanswered"})
_COUNTER_NAME = re.compile(r"(query|response)/[a-z0-9][a-z0-9_-]*")
# Domain tables: "<hit|length|rcode|rrtype>/<query|response>".
_DOMAIN_TABLE = re.compile(r"[a-z0-9][a-z0-9_-]*/(query|response)")


class StatsView(Protocol):
    """What the API reads from the statistics store. A view may also offer
    ``window_counts(last, streams)`` (pipeline/dashboard.py ``window_counts``): the
    dashboard's history then reads counters only, from one snapshot."""

    def streams(self) -> list[str]:
        """Identities seen so far."""
        ...

    def counters(self, stream: str | None = None) -> dict[str, float]:
        """4.7.0 counter names -> values; None = all streams; KeyError for an unknown stream."""
        ...

    def tables(self, n: int, stream: str | None = None) -> dict:
        """Top-n tables in 4.7.0's layout; KeyError for an unknown stream."""
        ...

    def windows(self, last: int, stream: str | None = None) -> list[dict]:
        """The last closed windows, newest last: {"start", "end", "counters", "tables"}."""
        ...

    def reset(self) -> None: ...

    def receiver_counters(self) -> dict[str, dict]:
        """The receiver's own counter groups, as core.counters.snapshot()."""
        ...


# --------------------------------------------------------------------------- exposure


def is_loopback(address: str) -> bool:
    """True for 127.0.0.0/8, ::1 (also IPv4-mapped, also in brackets) and "localhost"."""
    host = address.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False  # another host name, or "" (every interface): not known to be local
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def check_exposure(address: str, api_key: str, password: str) -> None:
    """Refuse the shipped credentials anywhere but on loopback: anyone reaching the port could
    read the statistics (client addresses, names asked) and reset them."""
    if (api_key == DEFAULT_CREDENTIAL or password == DEFAULT_CREDENTIAL) and not is_loopback(address):
        raise ConfigError(
            f"web-api: refusing to listen on {address} with the default credentials; "
            "set web-api.api-key and web-api.password"
        )


def _same(given: str, expected: str) -> bool:
    # compare_digest takes as long whatever prefix of a guess is right; bytes because it
    # refuses non-ASCII str.
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected.encode("utf-8"))


# --------------------------------------------------------------------------- parameters


class _BadRequest(Exception):
    """A query parameter the API cannot use; the message goes back to the client."""


def _int_param(request: web.Request, name: str, default: int) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    if not re.fullmatch(r"[0-9]+", raw.strip()) or not 1 <= int(raw) <= MAX_ITEMS:
        raise _BadRequest(f"{name}: expected an integer from 1 to {MAX_ITEMS}, got {raw[:40]!r}")
    return int(raw)


def _stream_param(request: web.Request) -> str | None:
    # 4.7.0 clients send "stream=" for all streams.
    return request.query.get("stream") or None


def _list_param(request: web.Request, name: str) -> list[str]:
    raw = request.query.get(name, "")
    return [item.strip() for item in raw.split(",") if item.strip()]


def _names(defaults: Iterable[str], extra: Iterable[str]) -> list[str]:
    return list(dict.fromkeys([*defaults, *extra]))  # in order, once each


def _valid_counter(name: str) -> bool:
    return name in _GLOBAL_COUNTERS or _COUNTER_NAME.fullmatch(name) is not None


def _number(value: Any) -> Any:
    # 4.7.0 counted in ints; a store keeping floats should not turn 3 into 3.0 on the wire.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _table(rows: Iterable, n: int | None = None) -> list[list]:
    out = [[name, _number(count)] for name, count in rows]
    return out if n is None else out[:n]


def _tables_out(raw: dict, n: int | None, domains: list[str] | None) -> dict:
    """The store's tables in the layout 4.7.0's /tables served; ``domains`` selects the domain
    tables (None: every one the store has)."""
    clients = {("hit/ip" if k == "hit/client" else k): _table(v, n) for k, v in raw.get("clients", {}).items()}
    rcodes = raw.get("rcodes", raw.get("top-rcodes", {}))
    all_domains = raw.get("domains", {})
    names = list(all_domains) if domains is None else domains
    return {
        "tlds": {k: _table(v, n) for k, v in raw.get("tlds", {}).items()},
        "domains": {name: _table(all_domains.get(name, ()), n) for name in names},
        "clients": clients,
        "rcodes": {k: _table(v, n) for k, v in rcodes.items()},
        "rrtypes": {k: _table(v, n) for k, v in raw.get("rrtypes", {}).items()},
    }


# --------------------------------------------------------------------------- application


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure is a JSON {"error": ...}; an unexpected one is logged, never shown."""
    try:
        return await handler(request)
    except _BadRequest as exc:
        return _error(400, str(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        keep = {k: v for k, v in exc.headers.items() if k.lower() not in ("content-type", "content-length")}
        return _error(exc.status, exc.reason.lower(), keep)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("web-api: %s %s failed", request.method, request.path)
        return _error(500, "internal error")


class _Credentials:
    """The one place secrets are compared. An empty configured secret matches nothing; every
    comparison is made whatever the others gave (constant time over the guess)."""

    def __init__(self, api_key: str, login: str, password: str) -> None:
        self._api_key, self._login, self._password = api_key, login, password

    def key(self, given: str) -> bool:
        return _same(given, self._api_key) and bool(self._api_key)

    def login(self, given_login: str, given_password: str) -> bool:
        login_ok = _same(given_login, self._login)
        password_ok = _same(given_password, self._password)
        return login_ok and password_ok and bool(self._password)

    def form(self, given_login: str, given_password: str) -> bool:
        """The dashboard's login form: the login and password, or the API key as the password."""
        login_ok = self.login(given_login, given_password)
        key_ok = self.key(given_password)
        return login_ok or key_ok


def _auth_middleware(credentials: _Credentials, dashboard: Dashboard) -> Callable:
    def authenticated(request: web.Request) -> bool:
        key = request.headers.get("X-API-Key")
        basic = request.headers.get(hdrs.AUTHORIZATION)
        if key is None and basic is None:
            return False
        ok = True
        # As in 4.7.0, every credential sent must be right.
        if key is not None:
            ok = credentials.key(key)
        if basic is not None:
            try:
                auth = BasicAuth.decode(basic)
            except (ValueError, binascii.Error):
                return False
            ok = credentials.login(auth.login, auth.password) and ok
        return ok

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if dashboard.public(request) or authenticated(request) or dashboard.session(request):
            return await handler(request)
        refused = dashboard.refuse(request)
        if refused is not None:
            return refused
        return _error(401, "authentication required", {hdrs.WWW_AUTHENTICATE: REALM})

    return auth


class _Handlers:
    def __init__(self, view: StatsView, default_counters: list[str], default_top: list[str], max_items: int):
        self.view = view
        self.default_counters = default_counters
        self.default_top = default_top
        self.max_items = max_items
        self.registry = new_registry(view)  # one per server: never the process-global registry

    async def counters(self, request: web.Request) -> web.Response:
        stream = _stream_param(request)
        more = _list_param(request, "more")
        values = self._read(self.view.counters, stream)
        for name in more:
            if name not in values and not _valid_counter(name):
                raise _BadRequest(
                    f"more: unknown counter {name!r}; expected one of {sorted(_GLOBAL_COUNTERS)} "
                    "or query/... and response/... (family, protocol, rcode, rrtype, tld, bytes, latency)"
                )
        names = _names(self.default_counters, more)
        return web.json_response({"stream": stream, "counters": {k: _number(values.get(k, 0)) for k in names}})

    async def tables(self, request: web.Request) -> web.Response:
        n = _int_param(request, "n", self.max_items)
        stream = _stream_param(request)
        more = _list_param(request, "more")
        for name in more:
            if not _DOMAIN_TABLE.fullmatch(name):
                raise _BadRequest(
                    f"more: unknown domain table {name!r}; expected <hit|length|rcode|rrtype>/<query|response>"
                )
        raw = self._read(lambda s: self.view.tables(n, s), stream)
        tables = _tables_out(raw, n, _names(self.default_top, more))
        return web.json_response({"stream": stream, "tables": tables})

    async def streams(self, request: web.Request) -> web.Response:
        return web.json_response({"streams": list(self.view.streams())})

    async def reset(self, request: web.Request) -> web.Response:
        self.view.reset()
        log.info("web-api: statistics reset by %s", request.remote)
        return web.Response(status=204)

    async def windows(self, request: web.Request) -> web.Response:
        last = _int_param(request, "last", 1)
        stream = _stream_param(request)
        raw = self._read(lambda s: self.view.windows(last, s), stream)
        windows = [
            {
                "start": w["start"],
                "end": w["end"],
                "counters": {k: _number(v) for k, v in w.get("counters", {}).items()},
                "tables": _tables_out(w.get("tables", {}), None, None),
            }
            for w in raw[-last:]
        ]
        return web.json_response({"stream": stream, "windows": windows})

    async def metrics(self, request: web.Request) -> web.Response:
        # 0.0.4, the format every Prometheus 2.x reads: our names need none of 1.0.0's escaping.
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={hdrs.CONTENT_TYPE: CONTENT_TYPE_PLAIN_0_0_4})

    async def openapi(self, request: web.Request) -> web.Response:
        return web.Response(body=OPENAPI_PATH.read_bytes(), content_type="application/yaml")

    @staticmethod
    def _read(read: Callable[[str | None], Any], stream: str | None) -> Any:
        try:
            return read(stream)
        except KeyError:
            if stream is None:
                raise  # not a bad request: a bug in the store, the middleware makes it a 500
            raise _BadRequest(f"stream: unknown stream {stream!r}") from None


def build_app(
    view: StatsView,
    *,
    api_key: str,
    login: str,
    password: str,
    default_counters: Iterable[str] = DEFAULT_COUNTERS,
    default_top: Iterable[str] = DEFAULT_TOP,
    max_items: int = 10,
) -> web.Application:
    """The aiohttp application, without a server (also what the tests list the routes of)."""
    h = _Handlers(view, list(default_counters), list(default_top), max_items)
    credentials = _Credentials(api_key, login, password)
    dashboard = Dashboard(view, credentials.form, _stream_param, _Handlers._read)
    app = web.Application(middlewares=[_errors, _auth_middleware(credentials, dashboard)])
    app.router.add_get("/counters", h.counters, allow_head=False)
    app.router.add_get("/tables", h.tables, allow_head=False)
    app.router.add_get("/streams", h.streams, allow_head=False)
    app.router.add_delete("/reset", h.reset)
    app.router.add_get("/windows", h.windows, allow_head=False)
    app.router.add_get("/metrics", h.metrics, allow_head=False)
    app.router.add_get("/openapi.yaml", h.openapi, allow_head=False)
    dashboard.add_routes(app)  # /, /dashboard, /dashboard/data, /login, /logout, static files
    return app


class ApiServer:
    """The web API on ``address:port`` (port 0: any free port, see :attr:`port`)."""

    def __init__(
        self,
        view: StatsView,
        *,
        address: str,
        port: int,
        api_key: str,
        login: str,
        password: str,
        default_counters: Iterable[str] = DEFAULT_COUNTERS,
        default_top: Iterable[str] = DEFAULT_TOP,
        max_items: int = 10,
    ) -> None:
        default_counters, default_top = list(default_counters), list(default_top)
        if not isinstance(port, int) or not 0 <= port <= 65535:
            raise ConfigError(f"web-api.local-port: expected a port number, got {port!r}")
        if not isinstance(max_items, int) or not 1 <= max_items <= MAX_ITEMS:
            raise ConfigError(f"statistics.max-items: expected an integer from 1 to {MAX_ITEMS}, got {max_items!r}")
        for name in default_counters:
            if not _valid_counter(name):
                raise ConfigError(f"statistics.default-counters: unknown counter {name!r}")
        for name in default_top:
            if not _DOMAIN_TABLE.fullmatch(name):
                raise ConfigError(f"statistics.default-top: unknown domain table {name!r}")
        self.address = address
        self._requested_port = port
        self._credentials = (api_key, login, password)
        self._app = build_app(
            view,
            api_key=api_key,
            login=login,
            password=password,
            default_counters=default_counters,
            default_top=default_top,
            max_items=max_items,
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self.port: int | None = None  # the bound port once started

    @property
    def app(self) -> web.Application:
        return self._app

    def start(self) -> None:
        """Bind and serve; ConfigError for default credentials off loopback or a port that
        cannot be bound."""
        api_key, _, password = self._credentials
        check_exposure(self.address, api_key, password)
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="web-api", daemon=True)
        thread.start()
        self._loop, self._thread = loop, thread
        try:
            asyncio.run_coroutine_threadsafe(self._serve(), loop).result(START_TIMEOUT)
        except OSError as exc:
            self._stop_loop()
            raise ConfigError(
                f"web-api: cannot listen on {self.address}:{self._requested_port}: {exc.strerror or exc}"
            ) from None
        except BaseException:
            self._stop_loop()
            raise
        log.info("web-api: listening on %s:%s", self.address, self.port)

    async def _serve(self) -> None:
        # shutdown_timeout: stop() waits this long for requests in flight.
        runner = web.AppRunner(self._app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.address.strip("[]"), self._requested_port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = runner.addresses[0][1]

    def stop(self) -> None:
        """Close the listener and the open connections; idempotent."""
        loop, runner = self._loop, self._runner
        if loop is None:
            return
        if runner is not None:
            try:
                asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(START_TIMEOUT)
            except Exception:
                log.exception("web-api: error while stopping")
            self._runner = None
        self._stop_loop()

    def _stop_loop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(START_TIMEOUT)
        if not thread.is_alive():
            loop.close()
        self._loop = self._thread = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
