"""GeoIP enrichment (core/geoip.py, transforms/geoip.py) on MaxMind's test databases.

The databases in tests/data/geoip are MaxMind's published test files
(github.com/maxmind/MaxMind-DB, test-data; licences alongside). Addresses
used below are ones those files contain.
"""

from __future__ import annotations

import collections
import ipaddress
import os
import pickle
from pathlib import Path

import apache_beam as beam
import pytest
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.util import BeamAssertException, assert_that
from hypothesis import given, settings
from hypothesis import strategies as st

from core import counters
from core.errors import ConfigError
from core.formats import format_text
from core.geoip import GeoIPEnricher
from core.message import FIELDS, DnstapRecord
from pipeline.config import GeoipOptions
from transforms.batches import RecordBatch
from transforms.geoip import EnrichGeoIP

DATA = Path(__file__).parent / "data" / "geoip"
CITY = str(DATA / "GeoIP2-City-Test.mmdb")
LITE_CITY = str(DATA / "GeoLite2-City-Test.mmdb")
COUNTRY = str(DATA / "GeoIP2-Country-Test.mmdb")
ASN = str(DATA / "GeoLite2-ASN-Test.mmdb")

UNKNOWN4 = {"country": "-", "city": "-", "asn": "-", "as-org": "-"}


def _record(ip: object) -> DnstapRecord:
    rec = DnstapRecord(FIELDS)
    rec["query-ip"] = ip
    return rec


def _options(**kw) -> GeoipOptions:
    return GeoipOptions(enable=True, **kw)


@pytest.fixture(scope="module")
def both():
    with GeoIPEnricher.from_options(_options(city_database=CITY, asn_database=ASN)) as enricher:
        yield enricher


def _geo(enricher: GeoIPEnricher, ip: object) -> dict:
    rec = _record(ip)
    enricher.enrich([rec])
    return {k: rec[k] for k in ("country", "city", "asn", "as-org") if k in rec}


# -- known answers ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ip, expected",
    [
        ("81.2.69.142", ("United Kingdom", "London", "-", "-")),
        ("81.2.69.160", ("United Kingdom", "London", "-", "-")),
        ("89.160.20.130", ("Sweden", "Linköping", "AS29518", "Bredband2 AB")),
        ("175.16.199.1", ("China", "Changchun", "-", "-")),
        ("216.160.83.56", ("United States", "Milton", "AS209", "-")),  # AS without organisation
        ("67.43.156.1", ("Bhutan", "-", "AS35908", "-")),  # country without a city
        ("1.128.0.0", ("-", "-", "AS1221", "Telstra Pty Ltd")),  # only in the ASN database
        ("2.3.3.1", ("-", "-", "-", "-")),  # in the city database, but no country
        # IPv6
        ("2001:480:10::1", ("United States", "San Diego", "-", "-")),
        ("2a02:d180::1", ("Germany", "-", "-", "-")),
        ("2001:218::1", ("Japan", "-", "-", "-")),
        ("2600:a00::1", ("-", "-", "AS237", "Merit Network Inc.")),
        ("2a02:8400::1", ("-", "-", "AS15557", "Societe Francaise du Radiotelephone S.A")),
        # an IPv4 client on a dual-stack socket is the IPv4 address
        ("::ffff:81.2.69.142", ("United Kingdom", "London", "-", "-")),
    ],
)
def test_known_answers(both, ip, expected):
    assert tuple(_geo(both, ip).values()) == expected


def test_country_iso():
    with GeoIPEnricher.from_options(_options(city_database=CITY, country_iso=True)) as e:
        assert _geo(e, "81.2.69.142") == {"country": "GB", "city": "London"}
        assert _geo(e, "2001:480:10::1") == {"country": "US", "city": "San Diego"}
        assert _geo(e, "10.1.2.3") == {"country": "-", "city": "-"}


def test_geolite_city_database():
    with GeoIPEnricher.from_options(_options(city_database=LITE_CITY)) as e:
        assert _geo(e, "81.2.69.142") == {"country": "United Kingdom", "city": "London"}


def test_country_database_gives_country_and_no_city():
    for iso, name in ((False, "United Kingdom"), (True, "GB")):
        with GeoIPEnricher.from_options(_options(city_database=COUNTRY, country_iso=iso)) as e:
            assert _geo(e, "81.2.69.142") == {"country": name, "city": "-"}
            assert _geo(e, "2001:218::1")["country"] == ("JP" if iso else "Japan")
            assert _geo(e, "127.0.0.1") == {"country": "-", "city": "-"}


def test_asn_only():
    with GeoIPEnricher.from_options(_options(asn_database=ASN)) as e:
        assert _geo(e, "1.128.0.0") == {"asn": "AS1221", "as-org": "Telstra Pty Ltd"}
        assert _geo(e, "12.81.96.1") == {"asn": "AS7018", "as-org": "-"}  # no organisation
        rec = _record("81.2.69.142")
        e.enrich([rec])
        assert "country" not in rec and "city" not in rec


# -- unknown addresses --------------------------------------------------------------------


@pytest.mark.parametrize(
    "ip",
    [
        "-",
        "",
        "garbage",
        "81.2.69",
        "81.2.69.142.1",
        "081.2.69.142",
        "256.1.1.1",
        " 81.2.69.142",
        "81.2.69.142/32",
        "::g",
        "\x00",
        "10.0.0.1",  # private
        "172.16.5.4",
        "192.168.1.1",
        "100.64.0.1",  # shared (CGNAT)
        "127.0.0.1",  # loopback
        "169.254.1.1",  # link-local
        "0.0.0.0",  # unspecified
        "224.0.1.1",  # multicast
        "240.0.0.1",  # reserved
        "255.255.255.255",
        "192.0.2.1",  # documentation
        "::1",
        "::",
        "fe80::1",
        "fe80::1%eth0",
        "fc00::1",
        "ff0e::1",
        "2001:db8::1",
        "::ffff:10.0.0.1",
        "8.8.8.8",  # public, in neither database
        "2001:4860:4860::8888",
    ],
)
def test_unknown_gives_dash(both, ip):
    assert _geo(both, ip) == UNKNOWN4


@pytest.mark.parametrize("ip", [None, 1, 3232235777, b"81.2.69.142", ("81.2.69.142",), ["x"]])
def test_non_string_query_ip_gives_dash(both, ip):
    assert _geo(both, ip) == UNKNOWN4


def test_record_without_query_ip(both):
    rec = DnstapRecord()
    both.enrich([rec])
    assert rec == UNKNOWN4


def test_counters():
    stats: collections.Counter = collections.Counter()
    with GeoIPEnricher.from_options(_options(city_database=CITY), stats=stats) as e:
        ips = ["81.2.69.142", "81.2.69.142", "10.0.0.1", "8.8.8.8", "junk", "-", "81.2.69.142"]
        e.enrich([_record(ip) for ip in ips])
    assert stats == {"lookups": 7, "cache-hits": 2, "private": 1, "not-found": 1, "invalid": 1}


def test_cache_is_bounded():
    stats: collections.Counter = collections.Counter()
    opts = _options(city_database=CITY, asn_database=ASN)
    with GeoIPEnricher.from_options(opts, stats=stats, cache_size=100) as e:
        net = ipaddress.ip_network("81.2.69.0/24")
        for _ in range(3):
            records = [_record(str(ip)) for ip in net]
            e.enrich(records)
            assert len(e._cache) <= 100
        assert stats["lookups"] == 3 * 256
        assert stats["cache-hits"] == 0  # 256 distinct > 100: each pass refills the cache
        assert _geo(e, "81.2.69.142")["city"] == "London"  # answers unchanged after clears


def test_cached_fields_are_not_shared(both):
    a, b = _record("81.2.69.142"), _record("81.2.69.142")
    both.enrich([a, b])
    a["city"] = "changed"
    c = _record("81.2.69.142")
    both.enrich([c])
    assert b["city"] == c["city"] == "London"


# -- property tests: never raises, always strings -----------------------------------------

ANY_ADDRESS = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
    st.ip_addresses(v=6).map(lambda a: a.exploded),
    st.ip_addresses(v=4).map(lambda a: f"::ffff:{a}"),
    st.sampled_from(["81.2.69.142", "2001:480:10::1", "89.160.20.130", "1.128.0.0"]),
)


def _check_fields(enricher: GeoIPEnricher, ip: str) -> None:
    rec = _record(ip)
    enricher.enrich([rec])
    fields = enricher.lookup(ip)  # uncached: enrich may have answered from the cache
    for key in ("country", "city", "asn", "as-org"):
        assert type(rec[key]) is str and rec[key]
        assert fields[key] == rec[key]


@settings(max_examples=400, deadline=None)
@given(ANY_ADDRESS)
def test_any_address_never_raises(both, ip):
    _check_fields(both, ip)


@settings(max_examples=400, deadline=None)
@given(st.text())
def test_any_string_never_raises(both, ip):
    _check_fields(both, ip)


# -- configuration errors -----------------------------------------------------------------


@pytest.mark.parametrize("key", ["city_database", "asn_database"])
def test_missing_file(tmp_path, key):
    path = str(tmp_path / "missing.mmdb")
    name = key.replace("_", "-")
    with pytest.raises(ConfigError, match=rf"geoip\.{name}: cannot open .*missing\.mmdb"):
        GeoIPEnricher.from_options(_options(**{key: path}))


@pytest.mark.parametrize("content", [b"", b"not a MaxMind database\n" * 100])
def test_not_an_mmdb(tmp_path, content):
    path = tmp_path / "bad.mmdb"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=r"geoip\.city-database: cannot open .*bad\.mmdb"):
        GeoIPEnricher.from_options(_options(city_database=str(path)))


def test_truncated_mmdb(tmp_path):
    path = tmp_path / "truncated.mmdb"
    path.write_bytes(Path(CITY).read_bytes()[:4000])
    with pytest.raises(ConfigError, match=r"geoip\.city-database: cannot open .*truncated\.mmdb"):
        GeoIPEnricher.from_options(_options(city_database=str(path)))


def test_directory(tmp_path):
    with pytest.raises(ConfigError, match=rf"geoip\.asn-database: cannot open {tmp_path}"):
        GeoIPEnricher.from_options(_options(asn_database=str(tmp_path)))


def test_unreadable(tmp_path, monkeypatch):
    path = tmp_path / "secret.mmdb"
    path.write_bytes(Path(CITY).read_bytes())
    path.chmod(0)
    if os.access(path, os.R_OK):  # root reads files whatever their mode: fail the open instead
        import geoip2.database

        def refuse(name, mode):
            raise PermissionError(13, "Permission denied", name)

        monkeypatch.setattr(geoip2.database.maxminddb, "open_database", refuse)
    with pytest.raises(ConfigError, match=r"geoip\.city-database: cannot open .*secret\.mmdb"):
        GeoIPEnricher.from_options(_options(city_database=str(path)))


def test_wrong_database_type():
    with pytest.raises(ConfigError, match=r"city-database: .*ASN-Test\.mmdb is a GeoLite2-ASN d"):
        GeoIPEnricher.from_options(_options(city_database=ASN))
    with pytest.raises(ConfigError, match=r"asn-database: .*City-Test\.mmdb is a GeoIP2-City d"):
        GeoIPEnricher.from_options(_options(city_database=CITY, asn_database=CITY))


def test_no_database():
    with pytest.raises(ConfigError, match=r"geoip\.city-database: required"):
        GeoIPEnricher.from_options(_options())


# -- output format ------------------------------------------------------------------------


def test_text_line_ends_with_country_city(both):
    rec = _record("89.160.20.130")
    both.enrich([rec])
    assert format_text(rec).endswith(" Sweden Linköping".encode())
    rec = _record("10.0.0.1")
    both.enrich([rec])
    assert format_text(rec).endswith(b" - -")


# -- Beam ---------------------------------------------------------------------------------


def test_transform_validates_at_construction(tmp_path):
    with pytest.raises(ConfigError, match="nope.mmdb"):
        EnrichGeoIP(_options(city_database=str(tmp_path / "nope.mmdb")))


def test_transform_pickles_without_readers():
    transform = EnrichGeoIP(_options(city_database=CITY, asn_database=ASN))
    pickle.loads(pickle.dumps(transform))


def test_beam_pipeline():
    batch = RecordBatch(
        _record(ip) for ip in ["81.2.69.142", "2001:480:10::1", "1.128.0.0", "10.0.0.1", "-"]
    )
    expected = [
        ("81.2.69.142", "GB", "London", "-", "-"),
        ("2001:480:10::1", "US", "San Diego", "-", "-"),
        ("1.128.0.0", "-", "-", "AS1221", "Telstra Pty Ltd"),
        ("10.0.0.1", "-", "-", "-", "-"),
        ("-", "-", "-", "-", "-"),
    ]

    def check(batches):
        if len(batches) != 1 or type(batches[0]) is not RecordBatch:
            raise BeamAssertException(f"expected one RecordBatch, got {batches!r}")
        got = [
            tuple(rec[k] for k in ("query-ip", "country", "city", "asn", "as-org"))
            for rec in batches[0]
        ]
        if got != expected:
            raise BeamAssertException(f"{got} != {expected}")

    before = dict(counters.counter_group("geoip"))
    opts = _options(city_database=CITY, asn_database=ASN, country_iso=True)
    with beam.Pipeline(runner=FnApiRunner()) as p:
        out = p | beam.Create([batch]) | EnrichGeoIP(opts)
        assert out.element_type is RecordBatch
        assert_that(out, check)
    after = counters.counter_group("geoip")
    assert after["lookups"] - before.get("lookups", 0) == 5
