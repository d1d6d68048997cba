"""Output formats: text (4.7.0's one-line layout), JSON lines and YAML documents.

Each formatter turns one record into bytes without a trailing delimiter; the
writers join a batch with their delimiter.
"""

from __future__ import annotations

import re
from typing import Callable

import orjson

from core.errors import ConfigError

__all__ = ["FORMATS", "format_json", "format_text", "format_yaml", "get_formatter"]

Formatter = Callable[[dict], bytes]


def format_text(rec: dict) -> bytes:
    """``timestamp identity message rcode query-ip query-port family protocol
    <len>b qname rrtype latency``, plus country/city when GeoIP added them."""
    line = (
        f"{rec['datetime']} {rec['identity']} {rec['message']} {rec['rcode']} "
        f"{rec['query-ip']} {rec['query-port']} {rec['family']} {rec['protocol']} "
        f"{rec['length']}b {rec['qname']} {rec['rrtype']} {rec['latency']}"
    )
    if "country" in rec:
        line = f"{line} {rec['country']} {rec['city']}"
    return line.encode("utf-8", "backslashreplace")


def format_json(rec: dict) -> bytes:
    return orjson.dumps(rec)


# Characters JSON leaves raw but YAML does not read back: DEL, C1 controls
# (U+0085 is a YAML line break), U+2028/U+2029 and U+FFFE/U+FFFF (UTF-8 bytes).
_YAML_UNSAFE = re.compile(rb"\x7f|\xc2[\x80-\x9f]|\xe2\x80[\xa8\xa9]|\xef\xbf[\xbe\xbf]")


def _yaml_escape(match: re.Match) -> bytes:
    return b"\\u%04x" % ord(match.group().decode())


def _yaml_float(text: bytes) -> bytes:
    """YAML 1.1 floats need a '.' and a signed exponent: orjson's 1e+16 reads as a string."""
    mantissa, _, exponent = text.partition(b"e")
    if b"." not in mantissa:
        mantissa += b".0"
    if exponent[:1] not in (b"+", b"-"):
        exponent = b"+" + exponent
    return mantissa + b"e" + exponent


def format_yaml(rec: dict) -> bytes:
    """One YAML document per record. Values are written as JSON scalars, which
    YAML reads back unchanged once the few float spellings and characters that
    YAML 1.1 reads differently are adjusted; ~20x faster than yaml.dump."""
    dumps = orjson.dumps
    parts = [b"---"]
    for key, value in rec.items():
        text = dumps(value)
        if type(value) is float and b"e" in text:
            text = _yaml_float(text)
        parts.append(key.encode() + b": " + text)
    doc = b"\n".join(parts)
    if not doc.isascii() or b"\x7f" in doc:
        doc = _YAML_UNSAFE.sub(_yaml_escape, doc)
    return doc


FORMATS: dict[str, Formatter] = {"text": format_text, "json": format_json, "yaml": format_yaml}


def get_formatter(name: str) -> Formatter:
    try:
        return FORMATS[name]
    except KeyError:
        raise ConfigError(f"unknown format {name!r}; expected one of {', '.join(FORMATS)}") from None
