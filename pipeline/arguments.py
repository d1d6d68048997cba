"""Command line of ``dnstap_receiver``: 4.7.0's flags, plus ``--replay``.

Arguments this parser does not know (Beam pipeline options such as
``--runner=DirectRunner``) are handed back untouched by :func:`parse_args`.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import replace

from core.errors import ConfigError
from pipeline.config import Config, _check_input_enabled, _normalize_address

__all__ = ["apply_overrides", "build_parser", "parse_args"]


def build_parser() -> argparse.ArgumentParser:
    """4.7.0's ``-l -p -u -v -c`` with its help texts, and ``--replay``.

    Flags left out are ``None`` (``-v``: ``False``), so that only flags given
    on the command line override the config file. ``-p`` is kept as given
    (a string); :func:`apply_overrides` validates it.
    """
    parser = argparse.ArgumentParser(
        prog="dnstap_receiver",
        allow_abbrev=False,  # never mistake a Beam option for a prefix of ours
    )
    parser.add_argument(
        "-l",
        metavar="IP",
        help="IP of the dnsptap server to receive dnstap payloads (default: '0.0.0.0')",
    )
    parser.add_argument(
        "-p",
        metavar="PORT",
        help="Port the dnstap receiver is listening on (default: 6000)",
    )
    parser.add_argument("-u", metavar="PATH", help="read dnstap payloads from unix socket")
    parser.add_argument("-v", action="store_true", help="verbose mode")
    parser.add_argument("-c", metavar="FILE", help="external config file")
    parser.add_argument(
        "--replay",
        metavar="PATH_OR_GLOB",
        action="append",
        help="read dnstap payloads from Frame Streams capture files instead of "
        "sockets (repeatable)",
    )
    parser.add_argument(
        "--replay-windows",
        metavar="PATH",
        help="with --replay: write the statistics of each time window as JSON lines to PATH",
    )
    parser.add_argument(
        "--replay-workers",
        metavar="N",
        type=_positive_int,
        help="with --replay on the local runner: worker processes the files are spread over "
        "(default: one per core, at most one per file)",
    )
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """``(known args, remaining args)``; the remaining ones (Beam pipeline
    options) are returned in their original order, untouched."""
    return build_parser().parse_known_args(argv)


def _port(value: object) -> int:
    text = value.strip() if isinstance(value, str) else value
    try:
        port = int(text) if not isinstance(text, bool) else -1
    except (TypeError, ValueError):
        port = -1
    if isinstance(text, float) or not 1 <= port <= 65535:
        raise ConfigError(f"-p: expected an integer between 1 and 65535, got {value!r}")
    return port


def apply_overrides(config: Config, args: argparse.Namespace) -> Config:
    """Apply the command line flags over ``config`` (a new Config is returned).

    * ``-l IP``: ``input.tcp-socket.local-address`` becomes that one address,
      and the tcp-socket input is enabled.
    * ``-p PORT``: ``input.tcp-socket.local-port`` (1-65535, else a
      ``ConfigError`` naming ``-p``), and the tcp-socket input is enabled.
    * ``-v``: ``trace.verbose`` is set to true (left alone when not given).
    * ``-u PATH``: the unix-socket input is enabled with that path, AND the
      tcp-socket input is disabled unless ``-l`` or ``-p`` is also given.
      4.7.0 runs only the unix socket when ``-u`` is given; giving ``-l`` or
      ``-p`` as well runs both inputs (4.7.0 could not).

    Unless ``--replay`` is given, at least one input must be enabled
    afterwards (``ConfigError`` otherwise), so a config loaded with
    ``require_input=False`` is checked here.
    """
    listen = getattr(args, "l", None)
    port = getattr(args, "p", None)
    unix_path = getattr(args, "u", None)

    trace = config.trace
    if getattr(args, "v", False):
        trace = replace(trace, verbose=True)

    tcp = config.input.tcp_socket
    if listen is not None:
        tcp = replace(tcp, enable=True, local_address=(_normalize_address(listen, "-l"),))
    if port is not None:
        tcp = replace(tcp, enable=True, local_port=_port(port))

    unix = config.input.unix_socket
    if unix_path is not None:
        if not isinstance(unix_path, str) or not unix_path.strip():
            raise ConfigError(f"-u: expected a unix socket path, got {unix_path!r}")
        directory = os.path.dirname(os.path.abspath(unix_path))
        if not os.path.isdir(directory):
            raise ConfigError(f"-u: directory does not exist: {os.path.dirname(unix_path)}")
        unix = replace(unix, enable=True, path=unix_path)
        if listen is None and port is None:
            tcp = replace(tcp, enable=False)

    result = replace(
        config,
        trace=trace,
        input=replace(config.input, tcp_socket=tcp, unix_socket=unix),
    )
    if not getattr(args, "replay", None):
        _check_input_enabled(result)
    return result
