"""GeoIP enrichment: country/city and autonomous system of the client address.

Adds "country" and "city" (with a city or country database) and "asn" and
"as-org" (with an ASN database) to every record, from its "query-ip", "-"
when unknown, as dnstap-receiver 4.7.0 did for country and city. Engine-free:
the Beam wrapper is transforms/geoip.py.
"""

from __future__ import annotations

import collections
import ipaddress
from typing import TYPE_CHECKING, Iterable

from core.errors import ConfigError
from core.message import UNKNOWN

try:  # geoip2 is an optional extra (pip install .[geoip]); only needed when enabled
    import geoip2.database
    import geoip2.errors
    import maxminddb
except ImportError:  # pragma: no cover - the test environment has it
    geoip2 = None

if TYPE_CHECKING:
    from pipeline.config import GeoipOptions

__all__ = ["CACHE_SIZE", "GeoIPEnricher"]

# DNS clients repeat: a resolver sees a few thousand distinct clients per
# minute, so caching the fields per address string avoids most lookups
# (a city lookup builds a geoip2 model object, ~12 us). Cleared when full
# rather than LRU-evicted: cheaper per hit, and refilling is fast.
CACHE_SIZE = 65536

# A database's metadata type (e.g. "GeoLite2-City", "DBIP-Country-Lite") names the
# geoip2 Reader method that accepts it; Enterprise databases have city names too.
_LOCATION_KINDS = ("City", "Enterprise", "Country")
_ASN_KINDS = ("ASN",)


def _open(
    key: str, path: str, kinds: tuple[str, ...], wanted: str
) -> tuple["geoip2.database.Reader", str]:
    """Open ``path`` and check its type; ConfigError naming ``key`` and ``path`` if not usable."""
    try:
        # MODE_AUTO: the C extension with mmap when installed, else pure-Python mmap.
        reader = geoip2.database.Reader(path, mode=maxminddb.MODE_AUTO)
    except (OSError, ValueError, maxminddb.InvalidDatabaseError) as exc:
        raise ConfigError(f"{key}: cannot open {path}: {exc}") from None
    db_type = reader.metadata().database_type
    for kind in kinds:
        if kind in db_type:
            return reader, kind
    reader.close()
    raise ConfigError(f"{key}: {path} is a {db_type} database, not {wanted} database")


class GeoIPEnricher:
    """Looks up client addresses in MaxMind (mmdb) databases, with a bounded cache.

    ``stats`` counts "lookups" (records enriched), "cache-hits" (of those, served
    from the cache), and per distinct address looked up: "private" (not a public
    unicast address), "invalid" (not an address), "not-found" (absent from a
    database) and "errors" (a database that fails at lookup time).
    """

    def __init__(
        self,
        location: "geoip2.database.Reader | None" = None,
        location_kind: str = "City",
        asn: "geoip2.database.Reader | None" = None,
        country_iso: bool = False,
        stats: collections.Counter | None = None,
        cache_size: int = CACHE_SIZE,
    ) -> None:
        self._location = location
        # reader.city / .enterprise / .country: each refuses the other database types
        self._location_lookup = (
            None if location is None else getattr(location, location_kind.lower())
        )
        self._has_city = location_kind != "Country"
        self._asn = asn
        self._country_iso = country_iso
        self.stats = collections.Counter() if stats is None else stats
        self._cache: dict[str, dict[str, str]] = {}
        self._cache_size = cache_size
        keys = ("country", "city") if location is not None else ()
        if asn is not None:
            keys += ("asn", "as-org")
        self._unknown = dict.fromkeys(keys, UNKNOWN)

    @classmethod
    def from_options(
        cls,
        options: "GeoipOptions",
        stats: collections.Counter | None = None,
        cache_size: int = CACHE_SIZE,
    ) -> GeoIPEnricher:
        """Open the configured databases (whether or not ``options.enable`` is set)."""
        if geoip2 is None:
            raise ConfigError("geoip: needs the geoip2 package (pip install .[geoip])")
        if options.city_database is None and options.asn_database is None:
            raise ConfigError("geoip.city-database: required when geoip.enable is true")
        location = kind = asn = None
        try:
            if options.city_database is not None:
                location, kind = _open(
                    "geoip.city-database", options.city_database, _LOCATION_KINDS, "a city/country"
                )
            if options.asn_database is not None:
                asn, _ = _open("geoip.asn-database", options.asn_database, _ASN_KINDS, "an ASN")
        except ConfigError:
            if location is not None:
                location.close()
            raise
        return cls(location, kind or "City", asn, options.country_iso, stats, cache_size)

    def close(self) -> None:
        for reader in (self._location, self._asn):
            if reader is not None:
                reader.close()
        self._location = self._location_lookup = self._asn = None

    def __enter__(self) -> GeoIPEnricher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def enrich(self, records: Iterable[dict]) -> None:
        """Add the GeoIP fields to each record, in place."""
        cache = self._cache
        count = misses = 0
        for rec in records:
            count += 1
            ip = rec.get("query-ip", UNKNOWN)
            if type(ip) is not str:  # only strings are addresses (and hashable)
                ip = UNKNOWN
            fields = cache.get(ip)
            if fields is None:
                misses += 1
                fields = self.lookup(ip)
                if len(cache) >= self._cache_size:
                    cache.clear()
                cache[ip] = fields
            rec.update(fields)
        self.stats["lookups"] += count
        self.stats["cache-hits"] += count - misses

    def lookup(self, ip: str) -> dict[str, str]:
        """The GeoIP fields of one address (uncached); never raises."""
        stats = self.stats
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            if ip != UNKNOWN:
                stats["invalid"] += 1
            return dict(self._unknown)
        # A dual-stack socket reports IPv4 clients as ::ffff:a.b.c.d; Python 3.11
        # calls all of those reserved, so judge (and look up) the IPv4 address.
        if addr.version == 6 and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        # is_global excludes private, loopback, link-local, unspecified, shared
        # (100.64/10) and documentation ranges, but not multicast or all reserved.
        if not addr.is_global or addr.is_multicast or addr.is_reserved:
            stats["private"] += 1
            return dict(self._unknown)
        fields = dict(self._unknown)
        if self._location_lookup is not None:
            response = self._query(self._location_lookup, addr)
            if response is not None:
                country = response.country.iso_code if self._country_iso else response.country.name
                fields["country"] = country or UNKNOWN
                if self._has_city:
                    fields["city"] = response.city.name or UNKNOWN
        if self._asn is not None:
            response = self._query(self._asn.asn, addr)
            if response is not None and response.autonomous_system_number is not None:
                fields["asn"] = f"AS{response.autonomous_system_number}"
                fields["as-org"] = response.autonomous_system_organization or UNKNOWN
        return fields

    def _query(self, method, addr):
        try:
            return method(addr)
        except geoip2.errors.AddressNotFoundError:
            self.stats["not-found"] += 1
        except (ValueError, maxminddb.InvalidDatabaseError):
            # ValueError: an IPv6 address in an IPv4-only database;
            # InvalidDatabaseError: a corrupt data section, seen only at lookup.
            self.stats["errors"] += 1
        return None
