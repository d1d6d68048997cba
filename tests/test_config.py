"""pipeline.config and pipeline.arguments: defaults, merging, validation, CLI."""

from __future__ import annotations

import dataclasses
import textwrap

import pytest
import yaml

from core.errors import ConfigError
from pipeline import arguments, config
from pipeline.arguments import apply_overrides, build_parser, parse_args
from pipeline.config import (
    WebApiOptions,
    SHIPPED_CONFIG,
    Config,
    FileOutput,
    InputOptions,
    OutputOptions,
    StdoutOutput,
    TcpSocketInput,
    TraceOptions,
    UnixSocketInput,
    config_from_dict,
    config_to_dict,
    load_config,
    parse_size,
)


def write(tmp_path, text: str, name: str = "dnstap.conf") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def error_of(data: dict, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        config_from_dict(data, **kwargs)
    return str(info.value)


def key_tree(value):
    """The nested key structure of a mapping (leaves replaced by None)."""
    if isinstance(value, dict):
        return {k: key_tree(v) for k, v in value.items()}
    return None


# --------------------------------------------------------------------------
# Shipped file and defaults
# --------------------------------------------------------------------------


def test_shipped_file_equals_dataclass_defaults():
    loaded = load_config(SHIPPED_CONFIG)
    assert loaded == Config()


def test_shipped_file_lists_every_key():
    with open(SHIPPED_CONFIG, encoding="utf-8") as handle:
        raw = yaml.safe_load(handle)
    assert key_tree(raw) == key_tree(config_to_dict(Config()))
    # Read without merging: every value in the file is the default value.
    assert config_from_dict(raw) == Config()


def test_shipped_file_documents_every_key_with_a_comment():
    lines = open(SHIPPED_CONFIG, encoding="utf-8").read().splitlines()
    checked = 0
    for number, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", "-")):
            continue
        indent = len(line) - len(line.lstrip())
        if indent >= 6:
            continue  # 4.7.0's free-form sub-mappings (rdkafka-config, rabbitmq queue...)
        previous = lines[number - 1].strip()
        assert previous.startswith("#"), f"line {number + 1} has no comment: {line!r}"
        checked += 1
    assert checked > 100


def test_dataclass_defaults_match_the_brief():
    cfg = Config()
    assert cfg.trace == TraceOptions(verbose=False, file=None, log_interval=60.0)
    assert cfg.input.tcp_socket == TcpSocketInput(
        enable=True,
        local_address=("0.0.0.0",),
        local_port=6000,
        access_control_list=("0.0.0.0/0", "::/0"),
        tls_support=False,
    )
    assert cfg.input.unix_socket == UnixSocketInput(enable=False, path=None, mode=0o660)
    assert (cfg.input.max_frame_size, cfg.input.batch_size, cfg.input.queue_size) == (
        1048576,
        512,
        64,
    )
    assert cfg.output.stdout == StdoutOutput(enable=True, format="text")
    assert cfg.output.file == FileOutput(
        enable=False, format="text", file="/var/log/dnstap.log", file_max_size=10485760, file_count=10
    )
    assert cfg.web_api == WebApiOptions(
        enable=True, api_key="changeme", login="admin", password="changeme",
        local_address="127.0.0.1", local_port=8080,
    )
    assert cfg.statistics.enable and cfg.statistics.window == 10.0 and cfg.statistics.max_items == 10
    assert cfg.output.kafka.rdkafka_config["bootstrap.servers"] is None
    assert cfg.output.kafka.producer == {} and cfg.output.kafka.retry == 5.0
    assert (cfg.output.pgsql.min_size, cfg.output.pgsql.max_size, cfg.output.pgsql.retry) == (5, 10, 1.0)
    assert cfg.output.tcp_socket.delivery().buffer_size == 100_000
    assert (cfg.output.syslog.rfc, cfg.output.syslog.framing, cfg.output.dnstap.retry) == ("5424", "octet-counted", 1.0)
    assert cfg.input.sniffer.dns_port == (53,)


def test_config_is_frozen_and_sections_independent():
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.trace = TraceOptions()  # type: ignore[misc]
    cfg.output.kafka.rdkafka_config["client.id"] = "changed"
    assert "client.id" not in Config().output.kafka.rdkafka_config


def test_config_to_dict_round_trips():
    cfg = config_from_dict(
        {
            "input": {
                "tcp-socket": {"local-address": ["127.0.0.1", "::1"], "local-port": 7000},
                "unix-socket": {"mode": "0600"},
            },
            "output": {"stdout": {"format": "json"}},
        }
    )
    assert config_from_dict(config_to_dict(cfg)) == cfg
    assert config_to_dict(cfg)["input"]["unix-socket"]["mode"] == "0600"


def test_dataclass_field_names_are_yaml_keys_with_underscores():
    data = config_to_dict(Config())
    assert "tcp-socket" in data["input"] and "max-frame-size" in data["input"]
    assert [f.name for f in dataclasses.fields(InputOptions)] == [
        "tcp_socket",
        "unix_socket",
        "max_frame_size",
        "batch_size",
        "queue_size",
        "sniffer",
        "tcp_client",
        "kafka",
    ]
    assert [f.name for f in dataclasses.fields(OutputOptions)] == [
        "stdout",
        "file",
        "metrics",
        "tcp_socket",
        "syslog",
        "dnstap",
        "dnstap_file",
        "kafka",
        "rabbitmq",
        "pgsql",
        "elasticsearch",
    ]


# --------------------------------------------------------------------------
# Loading and merging
# --------------------------------------------------------------------------


def test_partial_user_file_merges_over_defaults(tmp_path):
    path = write(
        tmp_path,
        """
        trace:
          verbose: true
        input:
          tcp-socket:
            local-port: 6001
        output:
          stdout:
            format: json
        """,
    )
    cfg = load_config(path)
    assert cfg.trace == TraceOptions(verbose=True)
    assert cfg.input.tcp_socket == TcpSocketInput(local_port=6001)
    assert cfg.output.stdout == StdoutOutput(format="json")
    assert cfg.output.file == FileOutput()
    assert cfg.web_api == Config().web_api


def test_partial_dict_section_merges_key_by_key():
    cfg = config_from_dict(
        {"output": {"rabbitmq": {"connection": {"host": "mq.example"}}}, "web-api": {"login": "x"}}
    )
    assert cfg.output.rabbitmq["connection"] == {
        "username": None,
        "password": None,
        "host": "mq.example",
        "port": 5672,
    }
    assert cfg.output.rabbitmq["retry-delay"] == 0.5
    assert cfg.web_api.login == "x" and cfg.web_api.password == "changeme"


def test_lists_replace_defaults():
    cfg = config_from_dict(
        {
            "input": {"tcp-socket": {"access-control-list": ["10.0.0.0/8"]}},
            "statistics": {"default-top": ["noerror/query"]},
        }
    )
    assert cfg.input.tcp_socket.access_control_list == ("10.0.0.0/8",)
    assert cfg.statistics.default_top == ("noerror/query",)


def test_empty_file_is_defaults(tmp_path):
    assert load_config(write(tmp_path, "# nothing\n")) == Config()


def test_kafka_rdkafka_config_maps_to_kafka_python():
    cfg = config_from_dict({"output": {"kafka": {"rdkafka-config": {
        "linger.ms": 5, "bootstrap.servers": "a:9092, b:9093", "compression.codec": "GZIP",
        "security.protocol": "sasl_ssl", "acks": -1, "sasl.password": None}}}})
    assert cfg.output.kafka.rdkafka_config["linger.ms"] == 5
    assert cfg.output.kafka.producer == {
        "linger_ms": 5, "bootstrap_servers": ["a:9092", "b:9093"], "compression_type": "gzip",
        "security_protocol": "SASL_SSL", "acks": "all"}


def test_kafka_unknown_librdkafka_key_is_a_config_error():
    assert error_of({"output": {"kafka": {"rdkafka-config": {"linger.msec": 5}}}}) == (
        "output.kafka.rdkafka-config.linger.msec: not supported (no kafka-python equivalent); did you mean 'linger.ms'?")
    assert error_of({"output": {"kafka": {"rdkafka-config": {"compression.type": "brotli"}}}}).startswith(
        "output.kafka.rdkafka-config.compression.type: expected one of none, gzip")


@pytest.mark.parametrize(
    "section, values, message",
    [
        ("tcp-socket", {"enable": True, "remote-port": 9000}, "output.tcp-socket.remote-address: required when output.tcp-socket.enable is true"),
        ("tcp-socket", {"remote-port": 70000}, "output.tcp-socket.remote-port: expected an integer between 1 and 65535, got 70000"),
        ("tcp-socket", {"buffer-size": 0}, "output.tcp-socket.buffer-size: expected an integer >= 1, got 0"),
        ("syslog", {"rfc": 5425}, "output.syslog.rfc: expected 5424 or 3164, got 5425"),
        ("syslog", {"facility": "local9"}, "output.syslog.facility: expected one of kern, user"),
        ("syslog", {"transport": "tls"}, "output.syslog.transport: expected one of udp, tcp, got 'tls'"),
        ("syslog", {"app-name": "has space"}, "output.syslog.app-name: expected 1 to 48 printable ASCII characters"),
        ("syslog", {"hostname": "my host"}, "output.syslog.hostname: expected 1 to 255 printable ASCII characters"),
        ("dnstap", {"enable": True, "remote-address": "127.0.0.1"}, "output.dnstap.remote-port: required when output.dnstap.enable is true"),
        ("dnstap", {"sock-path": "/tmp/x.sock", "tls-support": True}, "output.dnstap.tls-support: TLS is for TCP"),
        ("kafka", {"enable": True, "rdkafka-config": {"bootstrap.servers": "h:9092"}}, "output.kafka.topic: required when output.kafka.enable is true"),
        ("kafka", {"enable": True, "topic": "t"}, "output.kafka.rdkafka-config.bootstrap.servers: required when output.kafka.enable is true"),
        ("kafka", {"key": "qtype"}, "output.kafka.key: expected one of qname, query-ip, response-ip, identity, got 'qtype'"),
        ("dnstap-file", {"enable": True}, "output.dnstap-file.file: required when output.dnstap-file.enable is true"),
        ("dnstap-file", {"enable": True, "file": "/nonexistent-dir/x.fstrm"}, "output.dnstap-file.file: directory does not exist"),
        ("dnstap-file", {"rotate-interval": -1}, "output.dnstap-file.rotate-interval: expected a number >= 0"),
        ("pgsql", {"table": "x; drop"}, "output.pgsql.table: expected a table name"),
        ("pgsql", {"min_size": 5, "max_size": 2}, "output.pgsql.max_size: must be >= min_size (5), got 2"),
    ],
)
def test_network_output_errors(section, values, message):
    assert error_of({"output": {section: values}}).startswith(message)


def test_network_outputs_parse():
    cfg = config_from_dict({"output": {
        "tcp-socket": {"enable": True, "remote-address": "::1", "remote-port": 9000, "format": "json", "buffer-size": 10},
        "syslog": {"enable": True, "remote-address": "127.0.0.1", "remote-port": 514, "rfc": 3164, "facility": "local3"},
        "dnstap": {"enable": True, "sock-path": "/run/dnstap.sock", "dnstap-identity": "edge-1"},
        "pgsql": {"enable": True, "dsn": "host=/tmp dbname=dns", "table": "public.dnstap_log"},
    }})
    out = cfg.output
    assert (out.tcp_socket.remote_address, out.tcp_socket.remote_port, out.tcp_socket.delivery().buffer_size) == ("::1", 9000, 10)
    assert (out.syslog.rfc, out.syslog.facility, out.syslog.transport) == ("3164", "local3", "udp")
    assert (out.dnstap.sock_path, out.dnstap.remote_port, out.dnstap.dnstap_identity) == ("/run/dnstap.sock", None, "edge-1")
    assert out.pgsql.table == "public.dnstap_log"
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_null_where_default_is_a_mapping_is_an_error(tmp_path):
    path = write(tmp_path, "input:\n  tcp-socket:\n")
    with pytest.raises(ConfigError, match=r"^input\.tcp-socket: expected a mapping, got null$"):
        load_config(path)
    assert error_of({"output": None}) == "output: expected a mapping, got null"
    assert error_of({"trace": "verbose"}) == "trace: expected a mapping, got 'verbose'"
    assert (
        error_of({"output": {"kafka": {"rdkafka-config": None}}})
        == "output.kafka.rdkafka-config: expected a mapping, got null"
    )


def test_top_level_must_be_a_mapping(tmp_path):
    path = write(tmp_path, "- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping of sections at top level") as info:
        load_config(path)
    assert path in str(info.value)


def test_missing_config_file():
    with pytest.raises(ConfigError) as info:
        load_config("/nonexistent/dnstap.conf")
    assert str(info.value) == "config file not found: /nonexistent/dnstap.conf"


def test_unreadable_config_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(str(tmp_path))


def test_yaml_syntax_error_has_line_number(tmp_path):
    path = write(tmp_path, "trace:\n  verbose: true\n  file: [unclosed\noutput:\n  x: 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: invalid YAML at line ")
    assert "line 4" in message or "line 5" in message


def test_yaml_bad_indentation_error_has_line_number(tmp_path):
    path = write(tmp_path, "trace:\n  verbose: true\n file: x\n")
    with pytest.raises(ConfigError, match=r"invalid YAML at line 3"):
        load_config(path)


def test_duplicate_key_is_an_error(tmp_path):
    path = write(tmp_path, "trace:\n  verbose: true\n  verbose: false\n")
    with pytest.raises(ConfigError, match=r"line 3.*duplicate key 'verbose'"):
        load_config(path)


def test_default_config_path_used_when_no_path(tmp_path, monkeypatch):
    path = write(tmp_path, "input:\n  tcp-socket:\n    local-port: 7777\n")
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", path)
    assert load_config(None).input.tcp_socket.local_port == 7777
    assert config.resolve_config_path(None) == path
    # An explicit -c wins over the default path.
    other = write(tmp_path, "input:\n  tcp-socket:\n    local-port: 8888\n", name="other.conf")
    assert load_config(other).input.tcp_socket.local_port == 8888


def test_default_config_path_used_when_no_dash_c(tmp_path, monkeypatch):
    path = write(tmp_path, "output:\n  stdout:\n    format: yaml\n")
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", path)
    args, rest = parse_args(["--runner=DirectRunner"])
    cfg = apply_overrides(load_config(args.c), args)
    assert cfg.output.stdout.format == "yaml"
    assert rest == ["--runner=DirectRunner"]


def test_builtin_defaults_when_default_path_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", str(tmp_path / "absent.conf"))
    assert config.resolve_config_path(None) is None
    assert load_config(None) == Config()


# --------------------------------------------------------------------------
# Validation errors
# --------------------------------------------------------------------------


def test_port_not_an_integer():
    assert (
        error_of({"input": {"tcp-socket": {"local-port": "abc"}}})
        == "input.tcp-socket.local-port: expected an integer between 1 and 65535, got 'abc'"
    )


@pytest.mark.parametrize("port", [0, 65536, -1, True, 60.0, "6000", None])
def test_port_out_of_range_or_wrong_type(port):
    message = error_of({"input": {"tcp-socket": {"local-port": port}}})
    assert message.startswith("input.tcp-socket.local-port: expected an integer between 1 and 65535")


def test_unknown_key_with_suggestion():
    assert (
        error_of({"output": {"file": {"formatt": "json"}}})
        == "output.file.formatt: unknown key (did you mean 'format'?)"
    )


def test_unknown_key_without_suggestion_and_at_every_level():
    assert error_of({"nonsense": 1}) == "nonsense: unknown key"
    assert error_of({"inputs": {}}) == "inputs: unknown key (did you mean 'input'?)"
    assert (
        error_of({"output": {"kafka": {"topik": "t"}}})
        == "output.kafka.topik: unknown key (did you mean 'topic'?)"
    )
    assert (
        error_of({"output": {"rabbitmq": {"queue": {"durabel": True}}}})
        == "output.rabbitmq.queue.durabel: unknown key (did you mean 'durable'?)"
    )
    assert error_of({"web-api": {"apikey": "x"}}) == (
        "web-api.apikey: unknown key (did you mean 'api-key'?)"
    )


def test_bad_format():
    assert (
        error_of({"output": {"file": {"format": "xml"}}})
        == "output.file.format: expected one of text, json, yaml, got 'xml'"
    )
    assert error_of({"output": {"stdout": {"format": None}}}).startswith(
        "output.stdout.format: expected one of text, json, yaml, got null"
    )


def test_tls_cert_checked_only_when_tls_enabled(tmp_path):
    not_checked = {"input": {"tcp-socket": {"tls-server-cert": "/x.pem"}}}
    assert config_from_dict(not_checked).input.tcp_socket.tls_server_cert == "/x.pem"

    key = tmp_path / "server.key"
    key.write_text("key")
    assert (
        error_of(
            {
                "input": {
                    "tcp-socket": {
                        "tls-support": True,
                        "tls-server-cert": "/x.pem",
                        "tls-server-key": str(key),
                    }
                }
            }
        )
        == "input.tcp-socket.tls-server-cert: file not found: /x.pem"
    )


def test_tls_key_missing_and_required(tmp_path):
    cert = tmp_path / "server.crt"
    cert.write_text("cert")
    assert (
        error_of(
            {"input": {"tcp-socket": {"tls-support": True, "tls-server-cert": str(cert), "tls-server-key": "/k.pem"}}}
        )
        == "input.tcp-socket.tls-server-key: file not found: /k.pem"
    )
    assert (
        error_of({"input": {"tcp-socket": {"tls-support": True, "tls-server-cert": str(cert)}}})
        == "input.tcp-socket.tls-server-key: required when input.tcp-socket.tls-support is true"
    )


def test_tls_with_existing_files(tmp_path):
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    cert.write_text("cert")
    key.write_text("key")
    cfg = config_from_dict(
        {
            "input": {
                "tcp-socket": {
                    "tls-support": True,
                    "tls-server-cert": str(cert),
                    "tls-server-key": str(key),
                }
            }
        }
    )
    assert cfg.input.tcp_socket.tls_support is True
    assert cfg.input.tcp_socket.tls_server_cert == str(cert)


def test_output_file_directory_checked_when_enabled(tmp_path):
    # Disabled: not checked.
    assert config_from_dict({"output": {"file": {"file": "/nope/dnstap.log"}}}).output.file.file == (
        "/nope/dnstap.log"
    )
    assert (
        error_of({"output": {"file": {"enable": True, "file": "/nope/dnstap.log"}}})
        == "output.file.file: directory does not exist: /nope"
    )
    assert (
        error_of({"output": {"file": {"enable": True, "file": None}}})
        == "output.file.file: required when output.file.enable is true"
    )
    log = tmp_path / "dnstap.log"
    cfg = config_from_dict({"output": {"file": {"enable": True, "file": str(log), "format": "json"}}})
    assert cfg.output.file == FileOutput(enable=True, format="json", file=str(log))


def test_trace_file_directory_checked():
    assert (
        error_of({"trace": {"file": "/nope/receiver.log"}})
        == "trace.file: directory does not exist: /nope"
    )


def test_unix_socket_path_required_when_enabled(tmp_path):
    assert (
        error_of({"input": {"unix-socket": {"enable": True}}})
        == "input.unix-socket.path: required when input.unix-socket.enable is true"
    )
    assert (
        error_of({"input": {"unix-socket": {"enable": True, "path": "/nope/dnstap.sock"}}})
        == "input.unix-socket.path: directory does not exist: /nope"
    )
    sock = str(tmp_path / "dnstap.sock")
    cfg = config_from_dict({"input": {"unix-socket": {"enable": True, "path": sock}}})
    assert cfg.input.unix_socket == UnixSocketInput(enable=True, path=sock)


@pytest.mark.parametrize(
    "acl",
    [["10.0.0.0/33"], ["not-a-network"], [42], ["::/129"]],
)
def test_acl_entries_must_be_cidrs(acl):
    message = error_of({"input": {"tcp-socket": {"access-control-list": acl}}})
    assert message.startswith("input.tcp-socket.access-control-list: expected a network in CIDR notation")


def test_acl_entries_normalized_non_strict():
    cfg = config_from_dict(
        {"input": {"tcp-socket": {"access-control-list": ["10.1.2.3/8", "192.0.2.1", "2001:db8::1/32"]}}}
    )
    assert cfg.input.tcp_socket.access_control_list == ("10.0.0.0/8", "192.0.2.1/32", "2001:db8::/32")


def test_acl_must_not_be_empty():
    assert error_of({"input": {"tcp-socket": {"access-control-list": []}}}).startswith(
        "input.tcp-socket.access-control-list: expected a string or a non-empty list"
    )


@pytest.mark.parametrize("value", ["true", "yes", 1, 0, None])
def test_booleans_must_be_real_booleans(value):
    assert (
        error_of({"output": {"stdout": {"enable": value}}})
        == f"output.stdout.enable: expected true or false, got {config._show(value)}"
    )


def test_yaml_booleans_are_accepted(tmp_path):
    cfg = load_config(write(tmp_path, "trace:\n  verbose: yes\n"))  # YAML 1.1 boolean
    assert cfg.trace.verbose is True


@pytest.mark.parametrize(
    ("key", "value"),
    [("batch-size", True), ("batch-size", 0), ("queue-size", "64"), ("queue-size", 1.5)],
)
def test_ints_must_not_be_bools_or_strings(key, value):
    assert error_of({"input": {key: value}}).startswith(f"input.{key}: expected an integer >= 1, got ")


def test_file_count_must_be_positive_integer():
    assert error_of({"output": {"file": {"file-count": 0}}}) == (
        "output.file.file-count: expected an integer >= 1, got 0"
    )


def test_log_interval():
    assert config_from_dict({"trace": {"log-interval": 0}}).trace.log_interval == 0.0
    assert config_from_dict({"trace": {"log-interval": 2.5}}).trace.log_interval == 2.5
    assert error_of({"trace": {"log-interval": -1}}) == (
        "trace.log-interval: expected a number >= 0, got -1"
    )
    assert error_of({"trace": {"log-interval": True}}).startswith("trace.log-interval: expected a number")


@pytest.mark.parametrize(
    "section",
    ["rabbitmq", "elasticsearch"],
)
def test_unsupported_outputs_refused_when_enabled(section):
    assert error_of({"output": {section: {"enable": True}}}) == (
        f"output.{section}: not supported yet by this receiver"
    )
    # Their keys are accepted when disabled.
    cfg = config_from_dict({"output": {section: {"enable": False}}})
    assert getattr(cfg.output, section.replace("-", "_"))["enable"] is False


def test_enable_of_unsupported_section_must_be_boolean():
    assert error_of({"output": {"kafka": {"enable": "no"}}}) == (
        "output.kafka.enable: expected true or false, got 'no'"
    )


def test_web_api_default_credentials_only_on_loopback():
    assert config_from_dict({"web-api": {"local-address": "::1"}}).web_api.local_address == "::1"
    message = error_of({"web-api": {"local-address": "0.0.0.0"}})
    assert message.startswith("web-api: refusing to listen on 0.0.0.0 with the default credentials")
    exposed = config_from_dict(
        {"web-api": {"local-address": "0.0.0.0", "api-key": "k3y-long-enough", "password": "s3cret-pass"}}
    )
    assert exposed.web_api.local_address == "0.0.0.0"
    # Disabled, the address does not matter.
    assert config_from_dict({"web-api": {"enable": False, "local-address": "0.0.0.0"}}).web_api.enable is False


def test_statistics_values_are_checked():
    assert error_of({"statistics": {"window": 0.5}}).startswith("statistics.window: ")
    assert error_of({"statistics": {"max-items": 0}}).startswith("statistics.max-items: ")
    assert error_of({"statistics": {"default-counters": "query"}}).startswith("statistics.default-counters: ")


def test_filter_regex_must_compile():
    message = error_of({"filter": {"qname-regex": "(unclosed"}})
    assert message.startswith("filter.qname-regex: invalid regular expression '(unclosed'")
    assert error_of({"filter": {"dnstap-identities": 5}}) == (
        "filter.dnstap-identities: expected a regular expression string or null, got 5"
    )


def test_at_least_one_input_enabled():
    message = error_of({"input": {"tcp-socket": {"enable": False}}})
    assert message.startswith("input: no input enabled")
    cfg = config_from_dict({"input": {"tcp-socket": {"enable": False}}}, require_input=False)
    assert cfg.input.tcp_socket.enable is False


def test_both_socket_inputs_can_be_enabled(tmp_path):
    sock = str(tmp_path / "s")
    cfg = config_from_dict({"input": {"unix-socket": {"enable": True, "path": sock}}})
    assert cfg.input.tcp_socket.enable and cfg.input.unix_socket.enable


def test_max_frame_size_bounds():
    assert error_of({"input": {"max-frame-size": 0}}) == (
        "input.max-frame-size: expected a size greater than 0, got 0"
    )
    assert error_of({"input": {"max-frame-size": "8G"}}).startswith("input.max-frame-size: expected at most 4G")
    assert error_of({"input": {"max-frame-size": "lots"}}).startswith(
        "input.max-frame-size: expected a size such as 512K, 10M, 1G or a number of bytes, got 'lots'"
    )


# --------------------------------------------------------------------------
# Sizes, mode, addresses
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10M", 10 * 1024 * 1024),
        ("512K", 512 * 1024),
        ("1G", 1024**3),
        ("10MB", 10485760),
        ("10MiB", 10485760),
        ("10mb", 10485760),
        ("64 KiB", 65536),
        ("100", 100),
        ("100B", 100),
        ("1.5M", 1572864),
        (4096, 4096),
    ],
)
def test_sizes(text, expected):
    assert parse_size(text) == expected
    cfg = config_from_dict({"output": {"file": {"file-max-size": text}}, "input": {"max-frame-size": text}})
    assert cfg.output.file.file_max_size == expected
    assert cfg.input.max_frame_size == expected


@pytest.mark.parametrize("bad", ["10X", "M", "", "-1M", True, 1.5, None, "10 M B"])
def test_bad_sizes(bad):
    with pytest.raises(ConfigError, match=r"^output\.file\.file-max-size: expected a size"):
        config_from_dict({"output": {"file": {"file-max-size": bad}}})


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("0660", 0o660), ("660", 0o660), ("0o600", 0o600), (0o640, 0o640), ("0777", 0o777), ("0", 0)],
)
def test_octal_mode(mode, expected):
    assert config_from_dict({"input": {"unix-socket": {"mode": mode}}}).input.unix_socket.mode == expected


def test_octal_mode_from_yaml(tmp_path):
    # Unquoted 0660 is an octal integer in YAML 1.1.
    assert load_config(write(tmp_path, "input:\n  unix-socket:\n    mode: 0660\n")).input.unix_socket.mode == 0o660
    assert (
        load_config(write(tmp_path, "input:\n  unix-socket:\n    mode: \"0640\"\n")).input.unix_socket.mode
        == 0o640
    )


@pytest.mark.parametrize("mode", ["0888", "rw-rw----", 660, "1777", True, None, -1])
def test_bad_mode(mode):
    message = error_of({"input": {"unix-socket": {"mode": mode}}})
    assert message.startswith("input.unix-socket.mode: expected octal permissions")


def test_local_address_string_or_list(tmp_path):
    one = load_config(write(tmp_path, "input:\n  tcp-socket:\n    local-address: 127.0.0.1\n"))
    assert one.input.tcp_socket.local_address == ("127.0.0.1",)
    many = load_config(
        write(tmp_path, 'input:\n  tcp-socket:\n    local-address: ["0.0.0.0", "::"]\n')
    )
    assert many.input.tcp_socket.local_address == ("0.0.0.0", "::")


def test_local_address_brackets_and_duplicates():
    cfg = config_from_dict({"input": {"tcp-socket": {"local-address": ["[::]", "::", "localhost"]}}})
    assert cfg.input.tcp_socket.local_address == ("::", "localhost")


@pytest.mark.parametrize("value", [[], "", [""], [6000], None, "a b"])
def test_bad_local_address(value):
    message = error_of({"input": {"tcp-socket": {"local-address": value}}})
    assert message.startswith("input.tcp-socket.local-address: expected ")


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def test_parser_flags():
    parser = build_parser()
    assert parser.prog == "dnstap_receiver"
    args = parser.parse_args(
        ["-l", "127.0.0.1", "-p", "7000", "-u", "/tmp/s", "-v", "-c", "/etc/x.conf",
         "--replay", "a.fstrm", "--replay", "caps/*.fstrm"]
    )
    assert (args.l, args.p, args.u, args.v, args.c) == ("127.0.0.1", "7000", "/tmp/s", True, "/etc/x.conf")
    assert args.replay == ["a.fstrm", "caps/*.fstrm"]
    defaults = parser.parse_args([])
    assert (defaults.l, defaults.p, defaults.u, defaults.v, defaults.c, defaults.replay) == (
        None, None, None, False, None, None,
    )


def test_help_texts_are_4_7_0s():
    text = build_parser().format_help()
    for phrase in (
        "IP of the dnsptap server to receive dnstap payloads (default: '0.0.0.0')",
        "Port the dnstap receiver is listening on (default: 6000)",
        "read dnstap payloads from unix socket",
        "verbose mode",
        "external config file",
    ):
        assert phrase in " ".join(text.split())


def test_parse_args_passes_beam_options_through():
    args, rest = parse_args(["-v", "--runner=DirectRunner", "--streaming", "-p", "6001"])
    assert args.v is True and args.p == "6001"
    assert rest == ["--runner=DirectRunner", "--streaming"]
    args, rest = parse_args(["--runner", "DirectRunner", "--streaming", "--direct_num_workers=2"])
    assert rest == ["--runner", "DirectRunner", "--streaming", "--direct_num_workers=2"]


def test_parse_args_does_not_abbreviate():
    args, rest = parse_args(["--rep=x"])
    assert args.replay is None and rest == ["--rep=x"]


def _args(argv):
    return parse_args(argv)[0]


def test_overrides_none_given_is_identity():
    cfg = Config()
    assert apply_overrides(cfg, _args([])) == cfg


def test_override_listen_address_and_port():
    cfg = apply_overrides(
        config_from_dict({"input": {"tcp-socket": {"local-address": ["0.0.0.0", "::"]}}}),
        _args(["-l", "127.0.0.1", "-p", "6001"]),
    )
    assert cfg.input.tcp_socket.local_address == ("127.0.0.1",)
    assert cfg.input.tcp_socket.local_port == 6001
    assert cfg.input.unix_socket.enable is False


def test_override_listen_enables_tcp_input():
    base = config_from_dict({"input": {"tcp-socket": {"enable": False}}}, require_input=False)
    assert apply_overrides(base, _args(["-p", "6001"])).input.tcp_socket.enable is True


@pytest.mark.parametrize("port", ["abc", "0", "65536", "-1", ""])
def test_override_bad_port_names_dash_p(port):
    with pytest.raises(ConfigError, match=r"^-p: expected an integer between 1 and 65535, got "):
        apply_overrides(Config(), _args(["-p", port]))


def test_override_verbose():
    assert apply_overrides(Config(), _args(["-v"])).trace.verbose is True
    verbose = config_from_dict({"trace": {"verbose": True}})
    assert apply_overrides(verbose, _args([])).trace.verbose is True


def test_override_unix_socket_disables_tcp(tmp_path):
    sock = str(tmp_path / "dnstap.sock")
    cfg = apply_overrides(Config(), _args(["-u", sock]))
    assert cfg.input.unix_socket == UnixSocketInput(enable=True, path=sock)
    assert cfg.input.tcp_socket.enable is False


@pytest.mark.parametrize("extra", [["-l", "127.0.0.1"], ["-p", "6001"]])
def test_override_unix_socket_with_l_or_p_keeps_tcp(tmp_path, extra):
    sock = str(tmp_path / "dnstap.sock")
    cfg = apply_overrides(Config(), _args(["-u", sock, *extra]))
    assert cfg.input.unix_socket.enable is True
    assert cfg.input.tcp_socket.enable is True


def test_override_unix_socket_keeps_configured_mode(tmp_path):
    sock = str(tmp_path / "dnstap.sock")
    base = config_from_dict({"input": {"unix-socket": {"mode": "0600"}}})
    assert apply_overrides(base, _args(["-u", sock])).input.unix_socket.mode == 0o600


def test_override_unix_socket_directory_must_exist():
    with pytest.raises(ConfigError, match=r"^-u: directory does not exist: /nope$"):
        apply_overrides(Config(), _args(["-u", "/nope/dnstap.sock"]))


def test_override_u_after_config_without_inputs(tmp_path):
    path = write(tmp_path, "input:\n  tcp-socket:\n    enable: false\n")
    with pytest.raises(ConfigError, match="no input enabled"):
        load_config(path)
    base = load_config(path, require_input=False)
    sock = str(tmp_path / "dnstap.sock")
    assert apply_overrides(base, _args(["-u", sock])).input.unix_socket.enable is True
    with pytest.raises(ConfigError, match="no input enabled"):
        apply_overrides(base, _args([]))
    # --replay reads files instead of sockets: no socket input needed.
    assert apply_overrides(base, _args(["--replay", "x.fstrm"])).input.tcp_socket.enable is False


def test_override_returns_a_new_config():
    base = config_from_dict({})
    cfg = apply_overrides(base, _args(["-v"]))
    assert base.trace.verbose is False and cfg.trace.verbose is True
    assert cfg is not base


def test_override_bad_listen_address():
    with pytest.raises(ConfigError, match=r"^-l: expected an IP address or host name"):
        apply_overrides(Config(), _args(["-l", ""]))
    assert apply_overrides(Config(), _args(["-l", "[::]"])).input.tcp_socket.local_address == ("::",)


def test_arguments_module_exports():
    assert set(arguments.__all__) == {"apply_overrides", "build_parser", "parse_args"}
