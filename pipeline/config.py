"""Receiver configuration: typed, frozen defaults, YAML loading and validation.

The YAML keys and layout are dnstap-receiver 4.7.0's (see ``dnstap.conf``
next to this module, the commented default file shipped as package data).
Field names are the YAML keys with ``-`` replaced by ``_``.

The dataclass defaults below are the single source of the default values;
``dnstap.conf`` documents them and a test checks both agree. Sections that
this release does not implement (the rabbitmq and elasticsearch outputs)
are kept as plain dicts with 4.7.0's keys.

Entry points:

* :func:`load_config` reads a YAML file (or the default path) and merges it
  over the defaults;
* :func:`config_from_dict` does the same for an already parsed mapping;
* :func:`config_to_dict` is the inverse (YAML keys, plain values).

Every problem raises :class:`core.errors.ConfigError` with one message naming
the full dotted key, e.g. ``output.file.format: expected one of text, json,
yaml, got 'xml'``.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import dns.rcode
import yaml

from core.errors import ConfigError
from core.formats import FORMATS
from core.message import MESSAGE_TYPES
from sinks.delivery import DeliveryOptions

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "SHIPPED_CONFIG",
    "Config",
    "FileOutput",
    "MetricsOutput",
    "FilterOptions",
    "StatisticsOptions",
    "WebApiOptions",
    "GeoipOptions",
    "LatencyOptions",
    "NormalizeOptions",
    "PrivacyOptions",
    "InputOptions",
    "KafkaInput",
    "OutputOptions",
    "StdoutOutput",
    "TcpClientInput",
    "TcpSocketInput",
    "TraceOptions",
    "SnifferInput",
    "UnixSocketInput",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "parse_size",
    "resolve_config_path",
]

DEFAULT_CONFIG_PATH = "/etc/dnstap_receiver/dnstap.conf"
"""Read by :func:`load_config` when no path is given and the file exists."""

SHIPPED_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dnstap.conf")
"""The commented default configuration shipped with the package."""

OUTPUT_FORMATS: tuple[str, ...] = tuple(FORMATS)  # text, json, yaml

# --------------------------------------------------------------------------
# Defaults of the sections kept as plain dicts (4.7.0 keys, as they are).
# --------------------------------------------------------------------------

_KAFKA = {
    "rdkafka-config": {
        "bootstrap.servers": None,
        "security.protocol": None,
        "sasl.mechanism": None,
        "sasl.username": None,
        "sasl.password": None,
    },
}
_RABBITMQ = {
    "enable": False,
    "format": "json",
    "connection": {"username": None, "password": None, "host": "127.0.0.1", "port": 5672},
    "queue": {
        "queue": None,
        "passive": False,
        "durable": True,
        "exclusive": False,
        "auto_delete": False,
    },
    "exchange": "",
    "routing-key": None,
    "retry-count": 2,
    "retry-delay": 0.5,
}
_ELASTICSEARCH = {"enable": False, "url": None}

# Mappings whose keys are free-form (passed to a third-party library as is).
_FREE_FORM = frozenset({"output.kafka.rdkafka-config", "input.kafka.rdkafka-config"})


def _dict_default(value: dict) -> Any:
    return field(default_factory=lambda: copy.deepcopy(value))


# --------------------------------------------------------------------------
# Typed sections
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class TraceOptions:
    """``trace``: logging of the receiver itself."""

    verbose: bool = False
    file: str | None = None
    log_interval: float = 60.0  # seconds between counter summaries; 0 disables


@dataclass(frozen=True)
class TcpSocketInput:
    """``input.tcp-socket``: Frame Streams over TCP (optionally TLS)."""

    enable: bool = True
    local_address: tuple[str, ...] = ("0.0.0.0",)
    local_port: int = 6000
    access_control_list: tuple[str, ...] = ("0.0.0.0/0", "::/0")
    tls_support: bool = False
    tls_server_cert: str | None = None
    tls_server_key: str | None = None


@dataclass(frozen=True)
class UnixSocketInput:
    """``input.unix-socket``: Frame Streams over a unix socket."""

    enable: bool = False
    path: str | None = None
    mode: int = 0o660


@dataclass(frozen=True)
class SnifferInput:
    """``input.sniffer``: DNS traffic captured on a network interface (Linux,
    CAP_NET_RAW; sources/sniffer.py). ``eth-name`` null captures on every
    interface; without ``eth-ip`` every message is a client one. The
    ``resolver-*`` / ``forwarder-*`` types need ``eth-ip`` (our resolver's
    own queries to other servers)."""

    enable: bool = False
    eth_name: str | None = None
    eth_ip: tuple[str, ...] = ()
    dnstap_identity: str = "sniffer"
    dns_port: tuple[int, ...] = (53,)
    record_client_query: bool = True
    record_client_response: bool = True
    resolver_query_support: bool = True
    resolver_response_support: bool = True
    forwarder_query_support: bool = True
    forwarder_response_support: bool = True


# 4.7.0's README spells the client keys record-client-*, its shipped
# dnstap.conf and its code client-*-support: both are read.
SNIFFER_KEY_ALIASES = {
    "client-query-support": "record-client-query",
    "client-response-support": "record-client-response",
}


KAFKA_OFFSET_RESETS = ("earliest", "latest")


@dataclass(frozen=True)
class KafkaInput:
    """``input.kafka`` (new): the records edge receivers wrote to a topic with
    output.kafka (format json), read as consumer group ``group-id``
    (sources/kafka_io.py). ``rdkafka-config`` takes output.kafka's
    connection and security settings; ``consumer`` is what they map to in
    kafka-python (see ``kafka_consumer_settings``)."""

    enable: bool = False
    rdkafka_config: dict = _dict_default(_KAFKA["rdkafka-config"])
    topic: str | None = None
    group_id: str = "dnstap-receiver"
    auto_offset_reset: str = "latest"
    format: str = "json"
    consumer: dict = field(default_factory=dict, compare=False, metadata={"derived": True})


@dataclass(frozen=True)
class TcpClientInput:
    """``input.tcp-client``: connect to a dnstap sender that listens and read
    its Frame Streams (TLS optional); reconnect every ``retry`` seconds."""

    enable: bool = False
    retry: float = 1.0
    remote_address: str | None = None
    remote_port: int | None = None
    tls_support: bool = False
    tls_ca_file: str | None = None
    tls_insecure: bool = False


@dataclass(frozen=True)
class InputOptions:
    """``input``."""

    tcp_socket: TcpSocketInput = field(default_factory=TcpSocketInput)
    unix_socket: UnixSocketInput = field(default_factory=UnixSocketInput)
    max_frame_size: int = 1048576
    batch_size: int = 512
    queue_size: int = 64
    sniffer: SnifferInput = field(default_factory=SnifferInput)
    tcp_client: TcpClientInput = field(default_factory=TcpClientInput)
    kafka: KafkaInput = field(default_factory=KafkaInput)


@dataclass(frozen=True)
class StdoutOutput:
    """``output.stdout``."""

    enable: bool = True
    format: str = "text"


@dataclass(frozen=True)
class FileOutput:
    """``output.file``: size-rotated log file."""

    enable: bool = False
    format: str = "text"
    file: str | None = "/var/log/dnstap.log"
    file_max_size: int = 10485760
    file_count: int = 10


@dataclass(frozen=True)
class MetricsOutput:
    """``output.metrics``: one summary line every ``interval`` seconds."""

    enable: bool = False
    interval: float = 300.0
    cumulative: bool = True
    file: str | None = None
    file_max_size: int = 10485760
    file_count: int = 10


def _yaml(key: str, default: Any) -> Any:
    """A field whose YAML key is not its name with "_" -> "-" (4.7.0's
    output.pgsql spells some keys with underscores)."""
    return field(default=default, metadata={"key": key})


@dataclass(frozen=True)
class _Delivery:
    """Keys every network output has (see sinks/delivery.py)."""

    retry: float = 5.0
    buffer_size: int = 100_000
    flush_timeout: float = 10.0

    def delivery(self) -> DeliveryOptions:
        return DeliveryOptions(retry=self.retry, buffer_size=self.buffer_size, flush_timeout=self.flush_timeout)


@dataclass(frozen=True)
class TcpSocketOutput(_Delivery):
    """``output.tcp-socket``: formatted lines to a remote TCP server."""

    enable: bool = False
    format: str = "text"
    delimiter: str = "\n"
    remote_address: str | None = None
    remote_port: int | None = None


SYSLOG_FACILITIES = (
    "kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news", "uucp", "cron", "authpriv",
    "ftp", "ntp", "security", "console", "solaris-cron",
    "local0", "local1", "local2", "local3", "local4", "local5", "local6", "local7",
)
SYSLOG_SEVERITIES = ("emerg", "alert", "crit", "err", "warning", "notice", "info", "debug")


@dataclass(frozen=True)
class SyslogOutput(_Delivery):
    """``output.syslog``: one syslog message per record (RFC 5424 or 3164)."""

    enable: bool = False
    transport: str = "udp"
    format: str = "text"
    remote_address: str | None = None
    remote_port: int | None = None
    rfc: str = "5424"
    facility: str = "daemon"
    severity: str = "info"
    app_name: str = "dnstap-receiver"
    hostname: str | None = None
    framing: str = "octet-counted"


@dataclass(frozen=True)
class DnstapOutput(_Delivery):
    """``output.dnstap``: the original dnstap messages, Frame Streams to
    another receiver over TCP (optionally TLS) or a unix socket."""

    enable: bool = False
    retry: float = 1.0
    remote_address: str | None = None
    remote_port: int | None = None
    sock_path: str | None = None
    dnstap_identity: str | None = None
    tls_support: bool = False
    tls_ca_file: str | None = None
    tls_insecure: bool = False


@dataclass(frozen=True)
class DnstapFileOutput:
    """``output.dnstap-file``: the original dnstap messages in Frame Streams
    files, rotated by size and/or time (not in 4.7.0)."""

    enable: bool = False
    file: str | None = None
    file_max_size: int = 104857600
    file_count: int = 10
    rotate_interval: float = 0.0


KAFKA_MESSAGE_KEYS = ("qname", "query-ip", "response-ip", "identity")


@dataclass(frozen=True)
class KafkaOutput(_Delivery):
    """``output.kafka``: one Kafka message per record. ``rdkafka-config``
    holds 4.7.0's librdkafka settings; ``producer`` is what they map to in
    kafka-python (see ``kafka_producer_settings``)."""

    enable: bool = False
    format: str = "json"
    rdkafka_config: dict = _dict_default(_KAFKA["rdkafka-config"])
    topic: str | None = None
    key: str | None = None
    producer: dict = field(default_factory=dict, compare=False, metadata={"derived": True})


@dataclass(frozen=True)
class PgsqlOutput(_Delivery):
    """``output.pgsql``: rows in a PostgreSQL table (psycopg2)."""

    enable: bool = False
    retry: float = 1.0
    dsn: str = "postgres://postgres@localhost:5432/postgres"
    passfile: str | None = "~/.pgpass"
    min_size: int = _yaml("min_size", 5)
    max_size: int = _yaml("max_size", 10)
    busy_wait: float = _yaml("busy_wait", 1.0)
    timeout: float = 60.0
    userfuncfile: str | None = None
    table: str = "dnstap"


@dataclass(frozen=True)
class OutputOptions:
    """``output``."""

    stdout: StdoutOutput = field(default_factory=StdoutOutput)
    file: FileOutput = field(default_factory=FileOutput)
    metrics: MetricsOutput = field(default_factory=MetricsOutput)
    tcp_socket: TcpSocketOutput = field(default_factory=TcpSocketOutput)
    syslog: SyslogOutput = field(default_factory=SyslogOutput)
    dnstap: DnstapOutput = field(default_factory=DnstapOutput)
    dnstap_file: DnstapFileOutput = field(default_factory=DnstapFileOutput)
    kafka: KafkaOutput = field(default_factory=KafkaOutput)
    rabbitmq: dict = _dict_default(_RABBITMQ)
    pgsql: PgsqlOutput = field(default_factory=PgsqlOutput)
    elasticsearch: dict = _dict_default(_ELASTICSEARCH)


_DEFAULT_COUNTERS = ("clients", "domains", "query", "response", "qps", "response/noerror", "response/nxdomain")


@dataclass(frozen=True)
class WebApiOptions:
    """``web-api``: the HTTP API (counters, tables, windows, Prometheus metrics)."""

    enable: bool = True
    api_key: str = "changeme"
    login: str = "admin"
    password: str = "changeme"
    local_address: str = "127.0.0.1"
    local_port: int = 8080


@dataclass(frozen=True)
class StatisticsOptions:
    """``statistics``: what is counted, and the defaults of the API views."""

    enable: bool = True
    qname_lowercase: bool = True
    max_items: int = 10
    default_counters: tuple[str, ...] = _DEFAULT_COUNTERS
    default_top: tuple[str, ...] = ("noerror/query", "nxdomain/response")
    window: float = 10.0
    keep_windows: int = 60
    top_capacity: int = 1000
    max_identities: int = 100


@dataclass(frozen=True)
class FilterOptions:
    """``filter``: which messages to keep. 4.7.0's two regexes, plus lists."""

    qname_regex: str | None = None
    dnstap_identities: str | None = None
    keep_domains_file: str | None = None
    drop_domains_file: str | None = None
    drop_query_ip: tuple[str, ...] = ()
    drop_rcodes: tuple[str, ...] = ()
    keep_message_types: tuple[str, ...] = ()
    downsample: int = 1


@dataclass(frozen=True)
class GeoipOptions:
    """``geoip``: country/city (and AS) of the client address."""

    enable: bool = False
    city_database: str | None = None
    country_iso: bool = False
    asn_database: str | None = None


@dataclass(frozen=True)
class NormalizeOptions:
    """``normalize``: qname case and trailing dot, TLD and registrable domain."""

    qname_lowercase: bool = False
    qname_trailing_dot: bool = True
    add_tld: bool = False
    add_registrable_domain: bool = False


@dataclass(frozen=True)
class PrivacyOptions:
    """``privacy``: anonymised or hashed client addresses, minimised qnames."""

    anonymize_ip: bool = False
    ipv4_prefix: int = 24
    ipv6_prefix: int = 56
    hash_ip: bool = False
    hash_secret: str | None = None
    minimize_qname: bool = False


@dataclass(frozen=True)
class LatencyOptions:
    """``latency``: match responses to queries where the dnstap times do not give it."""

    enable: bool = True
    timeout: float = 10.0
    max_entries: int = 100000
    unanswered: bool = False


@dataclass(frozen=True)
class Config:
    """The whole configuration. ``Config()`` is the built-in default."""

    trace: TraceOptions = field(default_factory=TraceOptions)
    web_api: WebApiOptions = field(default_factory=WebApiOptions)
    geoip: GeoipOptions = field(default_factory=GeoipOptions)
    statistics: StatisticsOptions = field(default_factory=StatisticsOptions)
    input: InputOptions = field(default_factory=InputOptions)
    filter: FilterOptions = field(default_factory=FilterOptions)
    normalize: NormalizeOptions = field(default_factory=NormalizeOptions)
    latency: LatencyOptions = field(default_factory=LatencyOptions)
    privacy: PrivacyOptions = field(default_factory=PrivacyOptions)
    output: OutputOptions = field(default_factory=OutputOptions)


# Dict-valued outputs that exist in 4.7.0 but are not implemented here.
_UNSUPPORTED_OUTPUTS = ("rabbitmq", "elasticsearch")

# --------------------------------------------------------------------------
# Value helpers
# --------------------------------------------------------------------------

_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(?:([kmgt])(?:i?b)?|b)?", re.IGNORECASE)
_SIZE_UNITS = {None: 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def _show(value: Any) -> str:
    """A value as the user wrote it in YAML, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    return repr(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_size(value: Any, key: str = "size") -> int:
    """``"10M"``, ``"512K"``, ``"1G"``, ``"10MB"``, ``"10MiB"`` or an int of
    bytes -> bytes. Units are binary (1K = 1024), as in 4.7.0; must be > 0."""
    if _is_int(value):
        size = value
    elif isinstance(value, str) and (m := _SIZE_RE.fullmatch(value.strip())):
        unit = m.group(2).lower() if m.group(2) else None
        size = int(float(m.group(1)) * _SIZE_UNITS[unit])
    else:
        raise ConfigError(
            f"{key}: expected a size such as 512K, 10M, 1G or a number of bytes, got {_show(value)}"
        )
    if size <= 0:
        raise ConfigError(f"{key}: expected a size greater than 0, got {_show(value)}")
    return size


def _parse_mode(value: Any, key: str) -> int:
    if _is_int(value):
        mode = value
    elif isinstance(value, str):
        text = value.strip().lower()
        text = text[2:] if text.startswith("0o") else text
        try:
            mode = int(text, 8)
        except ValueError:
            mode = -1
    else:
        mode = -1
    if not 0 <= mode <= 0o777:
        raise ConfigError(
            f'{key}: expected octal permissions between "0000" and "0777" such as "0660", '
            f"got {_show(value)}"
        )
    return mode


def _normalize_address(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value.strip() or any(c.isspace() for c in value.strip()):
        raise ConfigError(f"{key}: expected an IP address or host name, got {_show(value)}")
    address = value.strip()
    # 4.7.0's comments suggest "[::]" for IPv6; sockets want the bare form.
    if address.startswith("[") and address.endswith("]"):
        address = address[1:-1]
    return address


def _dirname_exists(path: str) -> bool:
    return os.path.isdir(os.path.dirname(os.path.abspath(path)))


class _Section:
    """Reads and validates the keys of one merged mapping, naming ``prefix.key``."""

    def __init__(self, data: Mapping, prefix: str) -> None:
        self.data = data
        self.prefix = prefix

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}"

    def bool(self, name: str) -> bool:
        value = self.data[name]
        if not isinstance(value, bool):
            raise ConfigError(f"{self.key(name)}: expected true or false, got {_show(value)}")
        return value

    def int(self, name: str, low: int, high: int | None = None) -> int:
        value = self.data[name]
        if not _is_int(value) or value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f">= {low}"
            raise ConfigError(f"{self.key(name)}: expected an integer {bound}, got {_show(value)}")
        return value

    def number(self, name: str, low: float) -> float:
        value = self.data[name]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < low:
            raise ConfigError(f"{self.key(name)}: expected a number >= {low:g}, got {_show(value)}")
        return float(value)

    def opt_str(self, name: str) -> str | None:
        value = self.data[name]
        if value is not None and (not isinstance(value, str) or not value):
            raise ConfigError(f"{self.key(name)}: expected a string or null, got {_show(value)}")
        return value

    def choice(self, name: str, choices: tuple[str, ...]) -> str:
        value = self.data[name]
        if value not in choices or not isinstance(value, str):
            raise ConfigError(
                f"{self.key(name)}: expected one of {', '.join(choices)}, got {_show(value)}"
            )
        return value

    def size(self, name: str) -> int:
        return parse_size(self.data[name], self.key(name))

    def str_list(self, name: str) -> list:
        """A string or a list of strings -> non-empty list."""
        value = self.data[name]
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not items:
            raise ConfigError(
                f"{self.key(name)}: expected a string or a non-empty list of strings, got {_show(value)}"
            )
        return items

    def mapping(self, name: str) -> Mapping:
        value = self.data[name]
        if not isinstance(value, Mapping):
            raise ConfigError(f"{self.key(name)}: expected a mapping, got {_show(value)}")
        return value

    def regex(self, name: str) -> str | None:
        value = self.data[name]
        if value is None:
            return None
        if not isinstance(value, str):
            raise ConfigError(
                f"{self.key(name)}: expected a regular expression string or null, got {_show(value)}"
            )
        try:
            re.compile(value)
        except re.error as exc:
            raise ConfigError(
                f"{self.key(name)}: invalid regular expression {value!r}: {exc}"
            ) from None
        return value


# --------------------------------------------------------------------------
# Merging
# --------------------------------------------------------------------------


def _unknown_key(key: Any, known: Mapping, dotted: str) -> ConfigError:
    message = f"{dotted}: unknown key"
    if isinstance(key, str):
        close = difflib.get_close_matches(key, [k for k in known if isinstance(k, str)], n=1)
        if close:
            message += f" (did you mean {close[0]!r}?)"
    return ConfigError(message)


def _merge(defaults: Mapping, user: Mapping, prefix: str) -> dict:
    """Deep-merge ``user`` over ``defaults``; refuse unknown keys and
    non-mappings where the default is a mapping."""
    merged = copy.deepcopy(dict(defaults))
    free_form = prefix in _FREE_FORM
    for key, value in user.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in defaults:
            if not free_form:
                raise _unknown_key(key, defaults, dotted)
            merged[key] = copy.deepcopy(value)
        elif isinstance(defaults[key], Mapping):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{dotted}: expected a mapping, got {_show(value)}")
            merged[key] = _merge(defaults[key], value, dotted)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


# --------------------------------------------------------------------------
# Building the typed config
# --------------------------------------------------------------------------


def _trace(data: Mapping) -> TraceOptions:
    s = _Section(data, "trace")
    file = s.opt_str("file")
    if file is not None and not _dirname_exists(file):
        raise ConfigError(f"trace.file: directory does not exist: {os.path.dirname(file) or '.'}")
    return TraceOptions(
        verbose=s.bool("verbose"),
        file=file,
        log_interval=s.number("log-interval", 0),
    )


def _tcp_socket(data: Mapping) -> TcpSocketInput:
    s = _Section(data, "input.tcp-socket")
    enable = s.bool("enable")
    addresses: list[str] = []
    for item in s.str_list("local-address"):
        address = _normalize_address(item, s.key("local-address"))
        if address not in addresses:
            addresses.append(address)
    port = s.int("local-port", 1, 65535)
    networks = _networks(s, "access-control-list", s.str_list("access-control-list"))
    tls = s.bool("tls-support")
    cert = s.opt_str("tls-server-cert")
    key = s.opt_str("tls-server-key")
    if tls:
        for name, path in (("tls-server-cert", cert), ("tls-server-key", key)):
            if path is None:
                raise ConfigError(
                    f"{s.key(name)}: required when input.tcp-socket.tls-support is true"
                )
            if not os.path.isfile(path):
                raise ConfigError(f"{s.key(name)}: file not found: {path}")
    return TcpSocketInput(
        enable=enable,
        local_address=tuple(addresses),
        local_port=port,
        access_control_list=networks,
        tls_support=tls,
        tls_server_cert=cert,
        tls_server_key=key,
    )


def _unix_socket(data: Mapping) -> UnixSocketInput:
    s = _Section(data, "input.unix-socket")
    enable = s.bool("enable")
    path = s.opt_str("path")
    mode = _parse_mode(data["mode"], s.key("mode"))
    if enable:
        if path is None:
            raise ConfigError(f"{s.key('path')}: required when input.unix-socket.enable is true")
        if not _dirname_exists(path):
            raise ConfigError(
                f"{s.key('path')}: directory does not exist: {os.path.dirname(path) or '.'}"
            )
    return UnixSocketInput(enable=enable, path=path, mode=mode)


def _tcp_client(data: Mapping) -> TcpClientInput:
    s = _Section(data, "input.tcp-client")
    enable = s.bool("enable")
    remote = _remote(s, enable)
    if remote["remote_address"] is not None:
        remote["remote_address"] = _normalize_address(remote["remote_address"], s.key("remote-address"))
    ca_file = s.opt_str("tls-ca-file")
    if enable and ca_file is not None and not os.path.isfile(ca_file):
        raise ConfigError(f"{s.key('tls-ca-file')}: no such file: {ca_file}")
    return TcpClientInput(
        enable=enable,
        retry=s.number("retry", 0.01),
        tls_support=s.bool("tls-support"),
        tls_ca_file=ca_file,
        tls_insecure=s.bool("tls-insecure"),
        **remote,
    )


def _unsupported(data: Mapping, prefix: str) -> dict:
    if _Section(data, prefix).bool("enable"):
        raise ConfigError(f"{prefix}: not supported yet by this receiver")
    return dict(data)


def _sniffer(data: Mapping) -> SnifferInput:
    s = _Section(data, "input.sniffer")
    enable = s.bool("enable")
    name = s.opt_str("eth-name")
    if enable and name is not None and ("/" in name or name in (".", "..") or not os.path.isdir(f"/sys/class/net/{name}")):
        raise ConfigError(f"{s.key('eth-name')}: no such network interface: {name} (see ip link)")
    value = data["eth-ip"]
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise ConfigError(f"{s.key('eth-ip')}: expected a list of IP addresses, got {_show(value)}")
    addresses: list[str] = []
    for item in items:
        try:
            address = str(ipaddress.ip_address(item.strip() if isinstance(item, str) else item))
        except ValueError:
            raise ConfigError(f"{s.key('eth-ip')}: expected an IP address, got {_show(item)}") from None
        if address not in addresses:
            addresses.append(address)
    value = data["dns-port"]
    items = [value] if _is_int(value) else value
    if not isinstance(items, list) or not items or not all(_is_int(p) and 1 <= p <= 65535 for p in items):
        raise ConfigError(f"{s.key('dns-port')}: expected a port or a list of ports (1-65535), got {_show(value)}")
    if len(set(items)) > 100:
        raise ConfigError(f"{s.key('dns-port')}: at most 100 ports (the capture filter's limit), got {len(set(items))}")
    identity = s.opt_str("dnstap-identity")
    if identity is None:
        raise ConfigError(f"{s.key('dnstap-identity')}: expected a string, got null")
    return SnifferInput(
        enable=enable,
        eth_name=name,
        eth_ip=tuple(addresses),
        dnstap_identity=identity,
        dns_port=tuple(dict.fromkeys(items)),
        record_client_query=s.bool("record-client-query"),
        record_client_response=s.bool("record-client-response"),
        resolver_query_support=s.bool("resolver-query-support"),
        resolver_response_support=s.bool("resolver-response-support"),
        forwarder_query_support=s.bool("forwarder-query-support"),
        forwarder_response_support=s.bool("forwarder-response-support"),
    )


def _sniffer_aliases(data: Mapping) -> Mapping:
    """``data`` with the other spellings of the sniffer's keys (SNIFFER_KEY_ALIASES) renamed."""
    inp = data.get("input")
    section = inp.get("sniffer") if isinstance(inp, Mapping) else None
    if not isinstance(section, Mapping) or not any(alias in section for alias in SNIFFER_KEY_ALIASES):
        return data
    renamed = dict(section)
    for alias, key in SNIFFER_KEY_ALIASES.items():
        if alias not in renamed:
            continue
        value = renamed.pop(alias)
        if key in renamed and renamed[key] != value:
            raise ConfigError(
                f"input.sniffer.{alias}: another spelling of input.sniffer.{key}, which is set to "
                f"{_show(renamed[key])}; keep one of them"
            )
        renamed[key] = value
    return {**data, "input": {**inp, "sniffer": renamed}}


def _input(data: Mapping) -> InputOptions:
    s = _Section(data, "input")
    max_frame_size = s.size("max-frame-size")
    if max_frame_size > 0xFFFFFFFF:
        raise ConfigError(
            f"input.max-frame-size: expected at most 4G (Frame Streams lengths are 32-bit), "
            f"got {_show(data['max-frame-size'])}"
        )
    return InputOptions(
        tcp_socket=_tcp_socket(data["tcp-socket"]),
        unix_socket=_unix_socket(data["unix-socket"]),
        max_frame_size=max_frame_size,
        batch_size=s.int("batch-size", 1),
        queue_size=s.int("queue-size", 1),
        sniffer=_sniffer(data["sniffer"]),
        tcp_client=_tcp_client(data["tcp-client"]),
        kafka=_kafka_input(data["kafka"]),
    )


def _output(data: Mapping) -> OutputOptions:
    s = _Section(data["stdout"], "output.stdout")
    stdout = StdoutOutput(enable=s.bool("enable"), format=s.choice("format", OUTPUT_FORMATS))
    s = _Section(data["file"], "output.file")
    enable = s.bool("enable")
    fmt = s.choice("format", OUTPUT_FORMATS)
    path = s.opt_str("file")
    max_size = s.size("file-max-size")
    count = s.int("file-count", 1)
    if enable:
        if path is None:
            raise ConfigError("output.file.file: required when output.file.enable is true")
        if not _dirname_exists(path):
            raise ConfigError(
                f"output.file.file: directory does not exist: {os.path.dirname(path) or '.'}"
            )
    file = FileOutput(enable=enable, format=fmt, file=path, file_max_size=max_size, file_count=count)
    s = _Section(data["metrics"], "output.metrics")
    interval = s.number("interval", 0)
    if interval < 1:
        raise ConfigError(f"output.metrics.interval: expected a number of seconds >= 1, got {_show(interval)}")
    metrics_file = s.opt_str("file")
    if s.bool("enable") and metrics_file is not None and not _dirname_exists(metrics_file):
        raise ConfigError(
            f"output.metrics.file: directory does not exist: {os.path.dirname(metrics_file) or '.'}"
        )
    metrics = MetricsOutput(
        enable=s.bool("enable"),
        interval=interval,
        cumulative=s.bool("cumulative"),
        file=metrics_file,
        file_max_size=s.size("file-max-size"),
        file_count=s.int("file-count", 1),
    )
    others = {
        name.replace("-", "_"): _unsupported(data[name], f"output.{name}")
        for name in _UNSUPPORTED_OUTPUTS
    }
    return OutputOptions(
        stdout=stdout,
        file=file,
        metrics=metrics,
        tcp_socket=_out_tcp_socket(data["tcp-socket"]),
        syslog=_out_syslog(data["syslog"]),
        dnstap=_out_dnstap(data["dnstap"]),
        dnstap_file=_out_dnstap_file(data["dnstap-file"]),
        kafka=_out_kafka(data["kafka"]),
        pgsql=_out_pgsql(data["pgsql"]),
        **others,
    )


def _delivery(s: _Section) -> dict:
    return {
        "retry": s.number("retry", 0.01),
        "buffer_size": s.int("buffer-size", 1),
        "flush_timeout": s.number("flush-timeout", 0),
    }


def _remote(s: _Section, enable: bool, required: bool = True) -> dict:
    """remote-address and remote-port, required when enabled."""
    address = s.opt_str("remote-address")
    port = s.data["remote-port"]
    if port is not None:
        port = s.int("remote-port", 1, 65535)
    if enable and required and (address is None or port is None):
        missing = "remote-address" if address is None else "remote-port"
        raise ConfigError(f"{s.key(missing)}: required when {s.prefix}.enable is true")
    return {"remote_address": address, "remote_port": port}


def _out_tcp_socket(data: Mapping) -> TcpSocketOutput:
    s = _Section(data, "output.tcp-socket")
    enable = s.bool("enable")
    delimiter = data["delimiter"]
    if not isinstance(delimiter, str):
        raise ConfigError(f"{s.key('delimiter')}: expected a string, got {_show(delimiter)}")
    return TcpSocketOutput(
        enable=enable,
        format=s.choice("format", OUTPUT_FORMATS),
        delimiter=delimiter,
        **_remote(s, enable),
        **_delivery(s),
    )


def _out_syslog(data: Mapping) -> SyslogOutput:
    s = _Section(data, "output.syslog")
    enable = s.bool("enable")
    rfc = str(data["rfc"]) if _is_int(data["rfc"]) else data["rfc"]
    if rfc not in ("5424", "3164"):
        raise ConfigError(f"{s.key('rfc')}: expected 5424 or 3164, got {_show(data['rfc'])}")
    app_name = s.opt_str("app-name")
    if app_name is None or len(app_name) > 48 or not all(33 <= ord(c) <= 126 for c in app_name):
        raise ConfigError(f"{s.key('app-name')}: expected 1 to 48 printable ASCII characters, got {_show(app_name)}")
    hostname = s.opt_str("hostname")
    if hostname is not None and (len(hostname) > 255 or not all(33 <= ord(c) <= 126 for c in hostname)):
        raise ConfigError(f"{s.key('hostname')}: expected 1 to 255 printable ASCII characters, got {_show(hostname)}")
    return SyslogOutput(
        enable=enable,
        transport=s.choice("transport", ("udp", "tcp")),
        format=s.choice("format", ("text", "json")),
        rfc=rfc,
        facility=s.choice("facility", SYSLOG_FACILITIES),
        severity=s.choice("severity", SYSLOG_SEVERITIES),
        app_name=app_name,
        hostname=hostname,
        framing=s.choice("framing", ("octet-counted", "non-transparent")),
        **_remote(s, enable),
        **_delivery(s),
    )


def _out_dnstap(data: Mapping) -> DnstapOutput:
    s = _Section(data, "output.dnstap")
    enable = s.bool("enable")
    sock_path = s.opt_str("sock-path")
    tls = s.bool("tls-support")
    if sock_path is not None and tls:
        raise ConfigError(f"{s.key('tls-support')}: TLS is for TCP, not with output.dnstap.sock-path")
    ca_file = s.opt_str("tls-ca-file")
    if enable and ca_file is not None and not os.path.isfile(ca_file):
        raise ConfigError(f"{s.key('tls-ca-file')}: no such file: {ca_file}")
    return DnstapOutput(
        enable=enable,
        sock_path=sock_path,
        dnstap_identity=s.opt_str("dnstap-identity"),
        tls_support=tls,
        tls_ca_file=ca_file,
        tls_insecure=s.bool("tls-insecure"),
        **_remote(s, enable, required=sock_path is None),
        **_delivery(s),
    )


def _out_dnstap_file(data: Mapping) -> DnstapFileOutput:
    s = _Section(data, "output.dnstap-file")
    enable = s.bool("enable")
    path = s.opt_str("file")
    if enable:
        if path is None:
            raise ConfigError("output.dnstap-file.file: required when output.dnstap-file.enable is true")
        if not _dirname_exists(path):
            raise ConfigError(f"output.dnstap-file.file: directory does not exist: {os.path.dirname(path) or '.'}")
    return DnstapFileOutput(
        enable=enable,
        file=path,
        file_max_size=s.size("file-max-size"),
        file_count=s.int("file-count", 1),
        rotate_interval=s.number("rotate-interval", 0),
    )


# librdkafka settings (4.7.0's rdkafka-config) -> kafka-python KafkaProducer
# arguments. null values are left out (4.7.0's file lists some as null).
_RDKAFKA_SETTINGS = {
    "bootstrap.servers": "bootstrap_servers",
    "client.id": "client_id",
    "security.protocol": "security_protocol",
    "sasl.mechanism": "sasl_mechanism",
    "sasl.mechanisms": "sasl_mechanism",
    "sasl.username": "sasl_plain_username",
    "sasl.password": "sasl_plain_password",
    "ssl.ca.location": "ssl_cafile",
    "ssl.certificate.location": "ssl_certfile",
    "ssl.key.location": "ssl_keyfile",
    "ssl.key.password": "ssl_password",
    "acks": "acks",
    "request.required.acks": "acks",
    "compression.type": "compression_type",
    "compression.codec": "compression_type",
    "linger.ms": "linger_ms",
    "queue.buffering.max.ms": "linger_ms",
    "batch.size": "batch_size",
    "message.max.bytes": "max_request_size",
    "retries": "retries",
    "message.send.max.retries": "retries",
    "retry.backoff.ms": "retry_backoff_ms",
    "request.timeout.ms": "request_timeout_ms",
    "metadata.max.age.ms": "metadata_max_age_ms",
    "connections.max.idle.ms": "connections_max_idle_ms",
    "max.in.flight.requests.per.connection": "max_in_flight_requests_per_connection",
    "enable.idempotence": "enable_idempotence",
}
_KAFKA_COMPRESSION = ("none", "gzip", "snappy", "lz4", "zstd")


def kafka_producer_settings(rdkafka: Mapping, prefix: str = "output.kafka.rdkafka-config") -> dict:
    """kafka-python KafkaProducer arguments for 4.7.0's librdkafka settings;
    ConfigError naming the key for one that has no equivalent."""
    out: dict[str, Any] = {}
    for key, value in rdkafka.items():
        if value is None:
            continue
        target = _RDKAFKA_SETTINGS.get(key)
        if target is None:
            hint = difflib.get_close_matches(str(key), _RDKAFKA_SETTINGS, 1)
            raise ConfigError(
                f"{prefix}.{key}: not supported (no kafka-python equivalent)"
                + (f"; did you mean {hint[0]!r}?" if hint else "")
            )
        if target == "bootstrap_servers":
            value = [v.strip() for v in str(value).split(",") if v.strip()] if isinstance(value, str) else value
        elif target == "security_protocol" or target == "sasl_mechanism":
            value = str(value).upper()
        elif target == "compression_type":
            value = str(value).lower()
            if value not in _KAFKA_COMPRESSION:
                raise ConfigError(f"{prefix}.{key}: expected one of {', '.join(_KAFKA_COMPRESSION)}, got {_show(value)}")
            value = None if value == "none" else value
        elif target == "acks":
            value = "all" if str(value) in ("all", "-1") else value
        out[target] = value
    return out


def _out_kafka(data: Mapping) -> KafkaOutput:
    s = _Section(data, "output.kafka")
    enable = s.bool("enable")
    rdkafka = s.mapping("rdkafka-config")
    producer = kafka_producer_settings(rdkafka)
    topic = s.opt_str("topic")
    if enable:
        if topic is None:
            raise ConfigError(f"{s.key('topic')}: required when output.kafka.enable is true")
        if not producer.get("bootstrap_servers"):
            raise ConfigError(f"{s.key('rdkafka-config')}.bootstrap.servers: required when output.kafka.enable is true")
    key = data["key"]
    if key is not None:
        key = s.choice("key", KAFKA_MESSAGE_KEYS)
    return KafkaOutput(
        enable=enable,
        format=s.choice("format", OUTPUT_FORMATS),
        rdkafka_config=dict(rdkafka),
        topic=topic,
        key=key,
        producer=producer,
        **_delivery(s),
    )


# input.kafka.rdkafka-config: the connection and security settings it
# shares with output.kafka's producer (mapped by kafka_producer_settings),
# and the consumer's own fetch settings.
_RDKAFKA_CONNECTION = frozenset({
    "bootstrap.servers", "client.id", "security.protocol", "sasl.mechanism", "sasl.mechanisms",
    "sasl.username", "sasl.password", "ssl.ca.location", "ssl.certificate.location", "ssl.key.location",
    "ssl.key.password", "request.timeout.ms", "retry.backoff.ms", "metadata.max.age.ms",
    "connections.max.idle.ms",
})
_RDKAFKA_CONSUMER = {
    "fetch.wait.max.ms": "fetch_max_wait_ms",
    "fetch.min.bytes": "fetch_min_bytes",
    "fetch.max.bytes": "fetch_max_bytes",
    "max.partition.fetch.bytes": "max_partition_fetch_bytes",
}
_RDKAFKA_CONSUMER_INTEGERS = frozenset({
    "request_timeout_ms", "retry_backoff_ms", "metadata_max_age_ms", "connections_max_idle_ms",
    *_RDKAFKA_CONSUMER.values(),
})
# librdkafka consumer settings that are keys of input.kafka here.
_RDKAFKA_INPUT_KEYS = {"group.id": "group-id", "auto.offset.reset": "auto-offset-reset"}


def kafka_consumer_settings(rdkafka: Mapping, prefix: str = "input.kafka.rdkafka-config") -> dict:
    """kafka-python KafkaConsumer arguments for librdkafka settings (the
    connection and security keys of output.kafka's rdkafka-config, and the
    fetch settings); ConfigError naming the key for any other."""
    shared: dict[str, Any] = {}
    out: dict[str, Any] = {}
    for key, value in rdkafka.items():
        if value is None:
            continue
        if key in _RDKAFKA_CONNECTION:
            shared[key] = value
        elif key in _RDKAFKA_CONSUMER:
            out[_RDKAFKA_CONSUMER[key]] = value
        elif key in _RDKAFKA_INPUT_KEYS:
            raise ConfigError(f"{prefix}.{key}: set input.kafka.{_RDKAFKA_INPUT_KEYS[key]} instead")
        elif key == "enable.auto.commit":
            raise ConfigError(f"{prefix}.{key}: not supported: the source commits the offsets it has processed")
        elif key in _RDKAFKA_SETTINGS:
            raise ConfigError(f"{prefix}.{key}: a producer setting (output.kafka only), not used to read")
        else:
            known = sorted(_RDKAFKA_CONNECTION | _RDKAFKA_CONSUMER.keys())
            hint = difflib.get_close_matches(str(key), known, 1)
            raise ConfigError(
                f"{prefix}.{key}: not supported (no kafka-python equivalent)"
                + (f"; did you mean {hint[0]!r}?" if hint else "")
            )
    out.update(kafka_producer_settings(shared, prefix))
    names = {target: key for key, target in {**_RDKAFKA_SETTINGS, **_RDKAFKA_CONSUMER}.items() if key in rdkafka}
    for target in _RDKAFKA_CONSUMER_INTEGERS & out.keys():
        value = out[target]
        if isinstance(value, str) and value.isdigit():
            value = out[target] = int(value)
        if not _is_int(value) or value < 1:
            raise ConfigError(f"{prefix}.{names[target]}: expected a positive integer, got {_show(value)}")
    return out


def _kafka_input(data: Mapping) -> KafkaInput:
    s = _Section(data, "input.kafka")
    enable = s.bool("enable")
    rdkafka = s.mapping("rdkafka-config")
    consumer = kafka_consumer_settings(rdkafka)
    topic = s.opt_str("topic")
    group_id = s.opt_str("group-id")
    if group_id is None:
        raise ConfigError(f"{s.key('group-id')}: expected a consumer group name")
    if data["format"] != "json":
        raise ConfigError(
            f"{s.key('format')}: expected json (text and yaml values cannot be read back into records), "
            f"got {_show(data['format'])}"
        )
    if enable:
        if topic is None:
            raise ConfigError(f"{s.key('topic')}: required when input.kafka.enable is true")
        if not consumer.get("bootstrap_servers"):
            raise ConfigError(f"{s.key('rdkafka-config')}.bootstrap.servers: required when input.kafka.enable is true")
    return KafkaInput(
        enable=enable,
        rdkafka_config=dict(rdkafka),
        topic=topic,
        group_id=group_id,
        auto_offset_reset=s.choice("auto-offset-reset", KAFKA_OFFSET_RESETS),
        format="json",
        consumer=consumer,
    )


def _out_pgsql(data: Mapping) -> PgsqlOutput:
    s = _Section(data, "output.pgsql")
    enable = s.bool("enable")
    dsn = s.opt_str("dsn")
    if dsn is None:
        raise ConfigError(f"{s.key('dsn')}: expected a connection string")
    userfuncfile = s.opt_str("userfuncfile")
    if enable and userfuncfile is not None and not os.path.isfile(userfuncfile):
        raise ConfigError(f"{s.key('userfuncfile')}: no such file: {userfuncfile}")
    table = s.opt_str("table")
    if table is None or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?", table):
        raise ConfigError(f"{s.key('table')}: expected a table name ([schema.]name, letters, digits, _), got {_show(table)}")
    min_size = s.int("min_size", 1)
    max_size = s.int("max_size", 1)
    if max_size < min_size:
        raise ConfigError(f"{s.key('max_size')}: must be >= min_size ({min_size}), got {max_size}")
    return PgsqlOutput(
        enable=enable,
        dsn=dsn,
        passfile=s.opt_str("passfile"),
        min_size=min_size,
        max_size=max_size,
        busy_wait=s.number("busy_wait", 0),
        timeout=s.number("timeout", 0),
        userfuncfile=userfuncfile,
        table=table,
        **_delivery(s),
    )


def _existing_file(s: _Section, name: str) -> str | None:
    path = s.opt_str(name)
    if path is not None and not os.path.isfile(path):
        raise ConfigError(f"{s.key(name)}: file not found: {path}")
    return path


def _names(s: _Section, name: str, known: dict[str, str]) -> tuple[str, ...]:
    """A list of names from ``known`` (matched case-insensitively) -> canonical names."""
    value = s.data[name]
    if not isinstance(value, list):
        raise ConfigError(f"{s.key(name)}: expected a list, got {_show(value)}")
    out = []
    for item in value:
        canonical = known.get(item.upper()) if isinstance(item, str) else None
        if canonical is None:
            raise ConfigError(
                f"{s.key(name)}: unknown value {_show(item)}; expected some of {', '.join(known.values())}"
            )
        if canonical not in out:
            out.append(canonical)
    return tuple(out)


def _networks(s: _Section, name: str, items: list) -> tuple[str, ...]:
    """CIDR strings -> normalised networks, duplicates dropped, order kept."""
    out: list[str] = []
    for item in items:
        try:
            if not isinstance(item, str):
                raise ValueError
            network = str(ipaddress.ip_network(item.strip(), strict=False))
        except ValueError:
            raise ConfigError(
                f"{s.key(name)}: expected a network in CIDR notation such as 10.0.0.0/8, got {_show(item)}"
            ) from None
        if network not in out:
            out.append(network)
    return tuple(out)


def _cidrs(s: _Section, name: str) -> tuple[str, ...]:
    value = s.data[name]
    if not isinstance(value, list):
        raise ConfigError(f"{s.key(name)}: expected a list of networks, got {_show(value)}")
    return _networks(s, name, value)


def _web_api(data: Mapping) -> WebApiOptions:
    s = _Section(data, "web-api")
    options = WebApiOptions(
        enable=s.bool("enable"),
        api_key=s.opt_str("api-key") or "",
        login=s.opt_str("login") or "",
        password=s.opt_str("password") or "",
        local_address=_normalize_address(data["local-address"], s.key("local-address")),
        local_port=s.int("local-port", 1, 65535),
    )
    if options.enable:
        if not options.api_key and not (options.login and options.password):
            raise ConfigError("web-api.api-key: set an api-key or a login and password")
        from pipeline.http_api import check_exposure  # imported late: aiohttp is heavy to import

        check_exposure(options.local_address, options.api_key, options.password)
    return options


def _names_list(s: _Section, name: str) -> tuple[str, ...]:
    value = s.data[name]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{s.key(name)}: expected a list of names, got {_show(value)}")
    return tuple(value)


def _statistics(data: Mapping) -> StatisticsOptions:
    s = _Section(data, "statistics")
    window = s.number("window", 0)
    if window < 1:
        raise ConfigError(f"statistics.window: expected a number of seconds >= 1, got {_show(data['window'])}")
    return StatisticsOptions(
        enable=s.bool("enable"),
        qname_lowercase=s.bool("qname-lowercase"),
        max_items=s.int("max-items", 1, 1000),
        default_counters=_names_list(s, "default-counters"),
        default_top=_names_list(s, "default-top"),
        window=window,
        keep_windows=s.int("keep-windows", 1, 100000),
        top_capacity=s.int("top-capacity", 10, 1000000),
        max_identities=s.int("max-identities", 1, 100000),
    )


def _filter(data: Mapping) -> FilterOptions:
    s = _Section(data, "filter")
    rcodes = {r.name: r.name for r in dns.rcode.Rcode}
    return FilterOptions(
        qname_regex=s.regex("qname-regex"),
        dnstap_identities=s.regex("dnstap-identities"),
        keep_domains_file=_existing_file(s, "keep-domains-file"),
        drop_domains_file=_existing_file(s, "drop-domains-file"),
        drop_query_ip=_cidrs(s, "drop-query-ip"),
        drop_rcodes=_names(s, "drop-rcodes", rcodes),
        keep_message_types=_names(s, "keep-message-types", {n: n for n in MESSAGE_TYPES.values()}),
        downsample=s.int("downsample", 1),
    )


def _geoip(data: Mapping) -> GeoipOptions:
    s = _Section(data, "geoip")
    enable = s.bool("enable")
    city = s.opt_str("city-database")
    asn = s.opt_str("asn-database")
    if enable:
        if city is None and asn is None:
            raise ConfigError("geoip.city-database: required when geoip.enable is true")
        for name, path in (("city-database", city), ("asn-database", asn)):
            if path is not None and not os.path.isfile(path):
                raise ConfigError(f"geoip.{name}: file not found: {path}")
    return GeoipOptions(enable=enable, city_database=city, country_iso=s.bool("country-iso"), asn_database=asn)


def _normalize(data: Mapping) -> NormalizeOptions:
    s = _Section(data, "normalize")
    return NormalizeOptions(
        qname_lowercase=s.bool("qname-lowercase"),
        qname_trailing_dot=s.bool("qname-trailing-dot"),
        add_tld=s.bool("add-tld"),
        add_registrable_domain=s.bool("add-registrable-domain"),
    )


def _privacy(data: Mapping) -> PrivacyOptions:
    s = _Section(data, "privacy")
    anonymize, hashed = s.bool("anonymize-ip"), s.bool("hash-ip")
    secret = s.opt_str("hash-secret")
    if anonymize and hashed:
        raise ConfigError("privacy.hash-ip: cannot be combined with privacy.anonymize-ip; choose one")
    if hashed and not secret:
        raise ConfigError("privacy.hash-secret: required when privacy.hash-ip is true")
    return PrivacyOptions(
        anonymize_ip=anonymize,
        ipv4_prefix=s.int("ipv4-prefix", 0, 32),
        ipv6_prefix=s.int("ipv6-prefix", 0, 128),
        hash_ip=hashed,
        hash_secret=secret,
        minimize_qname=s.bool("minimize-qname"),
    )


def _latency(data: Mapping) -> LatencyOptions:
    s = _Section(data, "latency")
    timeout = s.number("timeout", 0)
    if timeout <= 0:
        raise ConfigError(f"latency.timeout: expected a number > 0, got {_show(data['timeout'])}")
    return LatencyOptions(
        enable=s.bool("enable"),
        timeout=timeout,
        max_entries=s.int("max-entries", 1),
        unanswered=s.bool("unanswered"),
    )


def _check_input_enabled(config: Config) -> None:
    inp = config.input
    if not (inp.tcp_socket.enable or inp.unix_socket.enable or inp.tcp_client.enable or inp.kafka.enable
            or inp.sniffer.enable):
        raise ConfigError(
            "input: no input enabled; enable input.tcp-socket, input.unix-socket, input.tcp-client, input.kafka "
            "or input.sniffer"
        )


def config_from_dict(data: Mapping | None, *, require_input: bool = True) -> Config:
    """Merge ``data`` (YAML keys, possibly partial) over the defaults, validate
    and return the typed :class:`Config`.

    ``require_input=False`` skips the "at least one input enabled" check, for
    callers that enable an input afterwards (``-u``) or read captures instead.
    """
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"config: expected a mapping of sections at top level, got {_show(data)}")
    merged = _merge(config_to_dict(Config()), _sniffer_aliases(data), "")

    config = Config(
        trace=_trace(merged["trace"]),
        web_api=_web_api(merged["web-api"]),
        geoip=_geoip(merged["geoip"]),
        statistics=_statistics(merged["statistics"]),
        input=_input(merged["input"]),
        filter=_filter(merged["filter"]),
        normalize=_normalize(merged["normalize"]),
        latency=_latency(merged["latency"]),
        privacy=_privacy(merged["privacy"]),
        output=_output(merged["output"]),
    )
    if require_input:
        _check_input_enabled(config)
    return config


def config_to_dict(config: Config) -> dict:
    """The config as a YAML-keyed mapping of plain values; round-trips
    through :func:`config_from_dict`."""

    def convert(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {
                f.metadata.get("key", f.name.replace("_", "-")): convert(getattr(value, f.name))
                for f in dataclasses.fields(value)
                if not f.metadata.get("derived")
            }
        if isinstance(value, tuple):
            return [convert(v) for v in value]
        return copy.deepcopy(value)

    out = convert(config)
    out["input"]["unix-socket"]["mode"] = f"{config.input.unix_socket.mode:04o}"
    return out


# --------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys in a mapping."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set[str] = set()
    for key_node, _ in node.value:
        if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
            if key_node.value in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key_node.value!r}", key_node.start_mark
                )
            seen.add(key_node.value)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _read_yaml(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"cannot read config file {path}: {reason}") from None
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None


def resolve_config_path(path: str | None) -> str | None:
    """The file :func:`load_config` reads: ``path`` if given, else
    :data:`DEFAULT_CONFIG_PATH` if it exists, else ``None`` (built-in defaults)."""
    if path is not None:
        return path
    return DEFAULT_CONFIG_PATH if os.path.exists(DEFAULT_CONFIG_PATH) else None


def load_config(path: str | None, *, require_input: bool = True) -> Config:
    """Load ``path`` merged over the defaults.

    ``None`` means :data:`DEFAULT_CONFIG_PATH` if it exists, else the built-in
    defaults (as 4.7.0 does). An empty file is the defaults. See
    :func:`config_from_dict` for ``require_input``.
    """
    resolved = resolve_config_path(path)
    data = _read_yaml(resolved) if resolved is not None else {}
    if data is not None and not isinstance(data, Mapping):
        raise ConfigError(
            f"{resolved}: expected a mapping of sections at top level, got {_show(data)}"
        )
    return config_from_dict(data, require_input=require_input)
