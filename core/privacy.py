"""Privacy (config section ``privacy``), engine-free: client addresses
anonymised or hashed, qnames minimised. Applied last, just before the outputs.

Addresses ("query-ip" and "response-ip"; "-" stays "-"):

- anonymise: the address becomes the network address of its prefix, written
  as an address without "/len" (IPv4 /24: "192.0.2.77" -> "192.0.2.0"; IPv6
  /56: "2001:db8:0:1ab::1" -> "2001:db8:0:100::"), so that the field keeps the
  shape of an address for the outputs and tools reading them;
- hash: HMAC-SHA256 keyed with ``hash-secret`` over the packed address (4 or
  16 bytes), of which the first 16 bytes are written as 32 lowercase hex
  characters: the same client gets the same value for as long as the secret
  is kept, and nobody without the secret can walk the (small) IPv4 space to
  undo it.

An IPv4-mapped IPv6 address (::ffff:a.b.c.d, how dual-stack sockets report
IPv4 clients) is an IPv4 client: anonymised with the IPv4 prefix
("::ffff:192.0.2.77" -> "::ffff:192.0.2.0") and hashed as the 4-byte address.

A value that is not an IP address is replaced by "-" and counted: passing it
through could leak what the settings promise to hide.

The qname (``minimize-qname``) becomes its registrable domain (eTLD+1),
keeping its case and trailing dot; a name that has none (a TLD, the root, "-")
is left as it is.
"""

from __future__ import annotations

import hmac
import socket
from collections.abc import Iterable
from typing import TYPE_CHECKING

from core import psl as _psl
from core.message import UNKNOWN
from core.normalize import strip_trailing_dot

if TYPE_CHECKING:  # pipeline.config imports core modules; keep core free of it at run time
    from pipeline.config import PrivacyOptions

__all__ = ["HASH_HEX_CHARS", "Privacy"]

HASH_HEX_CHARS = 32  # 16 of the 32 HMAC-SHA256 bytes: collisions stay negligible
_CACHE_SIZE = 65536  # a server sees the same clients over and over
_ADDRESS_FIELDS = ("query-ip", "response-ip")
_V4_MAPPED = bytes(10) + b"\xff\xff"  # ::ffff:0:0/96


class Privacy:
    def __init__(
        self,
        anonymize_ip: bool = False,
        ipv4_prefix: int = 24,
        ipv6_prefix: int = 56,
        hash_ip: bool = False,
        hash_secret: str | bytes | None = None,
        minimize_qname: bool = False,
        psl: _psl.PublicSuffixList | None = None,
    ) -> None:
        if anonymize_ip and hash_ip:
            raise ValueError("anonymize_ip and hash_ip cannot be combined")
        if hash_ip and not hash_secret:
            raise ValueError("hash_ip needs a hash_secret")
        if not 0 <= ipv4_prefix <= 32 or not 0 <= ipv6_prefix <= 128:
            raise ValueError("prefix out of range")
        self.anonymize_ip = anonymize_ip
        self.hash_ip = hash_ip
        self.minimize_qname = minimize_qname
        self.active = anonymize_ip or hash_ip or minimize_qname
        self._v4_mask = ((1 << ipv4_prefix) - 1) << (32 - ipv4_prefix)
        self._v6_mask = ((1 << ipv6_prefix) - 1) << (128 - ipv6_prefix)
        self._mapped_mask = (((1 << 96) - 1) << 32) | self._v4_mask  # ::ffff:a.b.c.d keeps ipv4-prefix bits
        self._key = hash_secret.encode("utf-8") if isinstance(hash_secret, str) else hash_secret
        self._cache: dict[str, str] = {}
        self._psl = (psl if psl is not None else _psl.default()) if minimize_qname else None

    @classmethod
    def from_options(cls, options: PrivacyOptions, psl: _psl.PublicSuffixList | None = None) -> Privacy:
        return cls(
            anonymize_ip=options.anonymize_ip,
            ipv4_prefix=options.ipv4_prefix,
            ipv6_prefix=options.ipv6_prefix,
            hash_ip=options.hash_ip,
            hash_secret=options.hash_secret,
            minimize_qname=options.minimize_qname,
            psl=psl,
        )

    def _transform(self, packed: bytes, family: int) -> str:
        mapped = packed[:12] == _V4_MAPPED
        if self.hash_ip:
            if mapped:  # the IPv4 client of a dual-stack socket: same client, same hash
                packed = packed[12:]
            return hmac.digest(self._key, packed, "sha256")[: HASH_HEX_CHARS // 2].hex()
        size = len(packed)
        mask = self._v4_mask if size == 4 else self._mapped_mask if mapped else self._v6_mask
        network = (int.from_bytes(packed, "big") & mask).to_bytes(size, "big")
        return socket.inet_ntop(family, network)

    def address(self, text: str) -> str | None:
        """The anonymised or hashed form of one address, the address itself
        when neither is configured; None if ``text`` is not an IP address."""
        out = self._cache.get(text)
        if out is not None:
            return out
        family = socket.AF_INET6 if ":" in text else socket.AF_INET
        try:
            packed = socket.inet_pton(family, text)
        except (OSError, ValueError):  # ValueError: embedded NUL
            return None
        out = self._transform(packed, family) if self.anonymize_ip or self.hash_ip else text
        if len(self._cache) >= _CACHE_SIZE:
            self._cache.clear()  # crude but O(1); the active clients come back at once
        self._cache[text] = out
        return out

    def apply(self, records: Iterable[dict]) -> int:
        """Apply the settings to every record in place; returns how many
        non-address values were replaced by "-"."""
        if not self.active:
            return 0
        invalid = 0
        addresses = self.anonymize_ip or self.hash_ip
        cache = self._cache
        lookup = self._psl.lookup if self._psl is not None else None
        for rec in records:
            if addresses:
                for key in _ADDRESS_FIELDS:
                    value = rec[key]
                    out = cache.get(value)
                    if out is None:
                        if value == UNKNOWN:
                            continue
                        out = self.address(value)
                        if out is None:
                            out = UNKNOWN
                            invalid += 1
                    rec[key] = out
                ecs = rec.get("edns-client-subnet")
                if ecs:  # "address/source-prefix": the client's subnet, as revealing as its address
                    address, _, bits = ecs.partition("/")
                    out = self.address(address)
                    rec["edns-client-subnet"] = f"{out}/{bits}" if out is not None else UNKNOWN
            if lookup is not None:
                qname = rec["qname"]
                if qname != UNKNOWN:
                    registrable = lookup(qname)[1]
                    if registrable is not None:
                        rec["qname"] = _minimized(qname, registrable)
        return invalid


def _minimized(qname: str, registrable: str) -> str:
    name = strip_trailing_dot(qname)
    dot = "." if len(name) < len(qname) else ""
    if name.isascii():  # registrable is the lowercased tail of name: slice it out to keep the case
        return name[len(name) - len(registrable) :] + dot
    return registrable + dot
