"""Message filtering: core/filters.py (every step, their order, domain lists, CIDRs,
downsampling, counts) and transforms/filter.py on the FnApiRunner."""

from __future__ import annotations

import re
import socket
import tempfile
from pathlib import Path

import apache_beam as beam
import dns.message
import dns.rcode
import pytest
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.util import assert_that, equal_to
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core import dnstap_pb2, filters
from core.batches import RecordBatch
from core.errors import ConfigError
from core.filters import DomainList, MessageFilter, QueryIpMatcher
from core.message import FIELDS, DnstapRecord, decode
from pipeline.config import FilterOptions, config_from_dict
from transforms.filter import STATS, FilterMessages

STEP_ORDER = [
    "message-type", "identity", "rcode", "query-ip",
    "drop-domains", "keep-domains", "qname-regex", "downsample",
]


def rec(**fields) -> DnstapRecord:
    """A record with FIELDS' defaults; keyword names use _ for - (query_ip=...)."""
    r = DnstapRecord(FIELDS)
    r.raw = b""
    for key, value in fields.items():
        r[key.replace("_", "-")] = value
    return r


def domain_file(tmp_path: Path, text: str, name: str = "domains.txt") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def run(options: FilterOptions, records: list) -> tuple[list, MessageFilter]:
    f = MessageFilter.from_options(options)
    return f.apply(records), f


def qnames(records) -> list[str]:
    return [r["qname"] for r in records]


# --------------------------------------------------------------------------
# No filtering
# --------------------------------------------------------------------------


def test_default_options_have_no_steps_and_return_the_batch_itself():
    f = MessageFilter.from_options(FilterOptions())
    assert f.steps == []
    batch = RecordBatch([rec(), rec()])
    assert f.apply(batch) is batch
    assert f.dropped == {"kept": 2}
    assert f.describe() == "filter: keep every message"


def test_a_plain_list_comes_back_as_a_record_batch():
    out = MessageFilter.from_options(FilterOptions()).apply([rec()])
    assert type(out) is RecordBatch and len(out) == 1


def test_shipped_default_config_has_no_steps():
    assert MessageFilter.from_options(config_from_dict({}).filter).steps == []


def test_steps_are_built_in_the_documented_order(tmp_path):
    path = domain_file(tmp_path, "example.com\n")
    options = FilterOptions(
        qname_regex="www", dnstap_identities="u", keep_domains_file=path, drop_domains_file=path,
        drop_query_ip=("10.0.0.0/8",), drop_rcodes=("NXDOMAIN",),
        keep_message_types=("CLIENT_QUERY",), downsample=2,
    )
    f = MessageFilter.from_options(options)
    assert [s.name for s in f.steps] == STEP_ORDER
    text = f.describe()
    assert text.startswith("filter: message in ['CLIENT_QUERY'] -> identity matches 'u'")
    assert text.endswith("qname matches 'www' -> 1 in 2")
    assert "(1 names)" in text


# --------------------------------------------------------------------------
# Message types, identities, rcodes
# --------------------------------------------------------------------------


def test_keep_message_types():
    records = [rec(message=m) for m in ("CLIENT_QUERY", "CLIENT_RESPONSE", "AUTH_QUERY", "-")]
    out, f = run(FilterOptions(keep_message_types=("CLIENT_QUERY", "CLIENT_RESPONSE")), records)
    assert out == records[:2] and out[0] is records[0]
    assert f.dropped == {"message-type": 2, "kept": 2}


def test_unknown_message_type_or_rcode_in_options_is_a_config_error():
    with pytest.raises(ConfigError, match="keep-message-types.*CLIENT_QUERRY"):
        MessageFilter.from_options(FilterOptions(keep_message_types=("CLIENT_QUERRY",)))
    with pytest.raises(ConfigError, match="drop-rcodes.*NXDOMIAN"):
        MessageFilter.from_options(FilterOptions(drop_rcodes=("NXDOMIAN",)))


@pytest.mark.parametrize(
    ("pattern", "identity", "kept"),
    [
        ("unbound", "unbound01", True),
        ("unbound", "my-unbound", False),  # re.match: anchored at the start only
        ("unbound01", "unbound012", True),  # ... and not at the end
        ("dnsdist01|unbound01", "dnsdist01", True),
        ("dnsdist01|unbound01", "unbound01", True),
        ("dnsdist01|unbound01", "dnsdist02", False),
        (".*bound", "my-unbound", True),
        ("unbound", "-", False),  # no identity in the frame
    ],
)
def test_dnstap_identities_uses_re_match(pattern, identity, kept):
    out, f = run(FilterOptions(dnstap_identities=pattern), [rec(identity=identity)])
    assert len(out) == kept
    assert f.dropped["identity"] == (not kept)


def test_invalid_regex_in_options_is_a_config_error():
    with pytest.raises(ConfigError, match=r"filter.qname-regex: invalid regular expression '\('"):
        MessageFilter.from_options(FilterOptions(qname_regex="("))
    with pytest.raises(ConfigError, match="filter.dnstap-identities"):
        MessageFilter.from_options(FilterOptions(dnstap_identities="[a-"))


def test_drop_rcodes_by_name():
    records = [rec(rcode=r) for r in ("NOERROR", "NXDOMAIN", "SERVFAIL", "BADCOOKIE", "-")]
    out, f = run(FilterOptions(drop_rcodes=("NXDOMAIN", "badcookie")), records)
    assert [r["rcode"] for r in out] == ["NOERROR", "SERVFAIL", "-"]
    assert f.dropped == {"rcode": 2, "kept": 3}


def test_every_config_rcode_name_is_the_text_the_decoder_writes():
    # The config accepts dns.rcode.Rcode names; records carry dns.rcode.to_text().
    for code in dns.rcode.Rcode:
        out, _ = run(FilterOptions(drop_rcodes=(code.name,)), [rec(rcode=dns.rcode.to_text(code))])
        assert out == [], code


def test_drop_rcodes_through_config():
    options = config_from_dict({"filter": {"drop-rcodes": ["nxdomain"]}}).filter
    out, _ = run(options, [rec(rcode="NXDOMAIN"), rec(rcode="NOERROR")])
    assert [r["rcode"] for r in out] == ["NOERROR"]


# --------------------------------------------------------------------------
# Query addresses
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "dropped"),
    [
        ("10.1.2.3", True),
        ("10.255.255.255", True),
        ("11.0.0.0", False),
        ("192.0.2.7", True),
        ("192.0.2.8", False),
        ("192.0.2.70", False),
        ("2001:db8::1", True),
        ("2001:db8:ffff::", True),
        ("2001:db9::1", False),
        ("::1", True),
        ("::2", False),
        ("::ffff:10.0.0.1", True),  # IPv4-mapped: checked against the IPv4 networks
        ("::ffff:11.0.0.1", False),
        ("-", False),  # no query address in the message
        ("not an address", False),
    ],
)
def test_drop_query_ip(address, dropped):
    options = FilterOptions(drop_query_ip=("10.0.0.0/8", "192.0.2.7/32", "2001:db8::/32", "::1/128"))
    out, f = run(options, [rec(query_ip=address)])
    assert (out == []) == dropped
    assert f.dropped["query-ip"] == dropped


def test_query_ip_host_bits_and_zero_prefix():
    assert QueryIpMatcher(["10.1.2.3/8"])("10.200.0.1")  # host bits ignored, as the config does
    everything = QueryIpMatcher(["0.0.0.0/0", "::/0"])
    assert everything("1.2.3.4") and everything("2001:db8::1") and not everything("-")
    assert not QueryIpMatcher(["0.0.0.0/0"])("2001:db8::1")


def test_query_ip_bad_network_is_a_config_error():
    with pytest.raises(ConfigError, match="drop-query-ip.*'10.0.0.0/33'"):
        MessageFilter.from_options(FilterOptions(drop_query_ip=("10.0.0.0/33",)))


def test_query_ip_matcher_agrees_with_ipaddress():
    import ipaddress
    import random

    rnd = random.Random(7)
    nets = ["10.0.0.0/8", "172.16.0.0/12", "192.0.2.0/24", "198.51.100.17/32", "2001:db8::/32",
            "fd00::/8", "2001:db8:1:2::/64"]
    matcher = QueryIpMatcher(nets)
    parsed = [ipaddress.ip_network(n) for n in nets]
    for _ in range(5000):
        if rnd.random() < 0.5:
            raw = rnd.choice([b"\x0a", b"\xac\x10", b"\xc0\x00\x02", b""]) + rnd.randbytes(4)
            addr = socket.inet_ntop(socket.AF_INET, raw[:4])
        else:
            raw = rnd.choice([b"\x20\x01\x0d\xb8", b"\xfd", b""]) + rnd.randbytes(16)
            addr = socket.inet_ntop(socket.AF_INET6, raw[:16])
        ip = ipaddress.ip_address(addr)
        assert matcher(addr) == any(ip in n for n in parsed if n.version == ip.version), addr


def test_decision_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(filters, "CACHE_SIZE", 10)
    f = MessageFilter.from_options(FilterOptions(drop_query_ip=("10.0.0.0/8",)))
    records = [rec(query_ip=f"10.0.0.{i}") for i in range(50)] + [rec(query_ip="11.0.0.1")]
    assert f.apply(records) == records[-1:]
    (cache,) = [c.cell_contents for c in f.steps[0].run.__closure__
                if isinstance(c.cell_contents, filters._DecisionCache)]
    assert 0 < len(cache) <= 10


def test_fields_set_to_none_by_another_stage_read_as_unknown(tmp_path):
    path = domain_file(tmp_path, "*.\n")  # every name but the root
    options = FilterOptions(dnstap_identities="-", drop_query_ip=("0.0.0.0/0",),
                            drop_domains_file=path, qname_regex="x")
    r = rec(identity=None, query_ip=None, qname=None)
    out, f = run(options, [r])
    assert f.dropped == {"qname-regex": 1, "kept": 0}  # only the regex needs a match


# --------------------------------------------------------------------------
# Domain lists
# --------------------------------------------------------------------------

LIST = """\
# blocked names
example.com
*.ads.example.net.   # the whole subtree, written with a trailing dot

Tracker.ORG
"""


@pytest.mark.parametrize(
    ("qname", "listed"),
    [
        ("example.com.", True),
        ("example.com", True),  # qname without trailing dot (normalize may remove it)
        ("EXAMPLE.Com.", True),
        ("www.example.com.", False),  # exact entry: only that name
        ("xexample.com.", False),
        ("com.", False),
        ("ads.example.net.", False),  # "*." entry: strictly below
        ("x.ads.example.net.", True),
        ("a.b.X.Ads.Example.Net.", True),
        ("xads.example.net.", False),
        ("tracker.org.", True),
        ("tracker.org", True),
        ("-", False),
        (".", False),
    ],
)
def test_domain_lists_drop_and_keep(tmp_path, qname, listed):
    path = domain_file(tmp_path, LIST)
    out, f = run(FilterOptions(drop_domains_file=path), [rec(qname=qname)])
    assert (out == []) == listed
    assert f.dropped["drop-domains"] == listed
    out, f = run(FilterOptions(keep_domains_file=path), [rec(qname=qname)])
    assert (out != []) == listed
    assert f.dropped["keep-domains"] == (not listed)


def test_domain_list_load_forms(tmp_path):
    d = DomainList.load(domain_file(tmp_path, LIST))
    assert d.exact == {"example.com", "tracker.org"}
    assert d.subtree == {"ads.example.net"}
    assert d.size == 3 and not d.below_root


def test_domain_list_root_entries(tmp_path):
    root = DomainList.load(domain_file(tmp_path, ".\n"))
    assert root.matches(".") and not root.matches("com.")
    below = DomainList.load(domain_file(tmp_path, "*.\n"))
    assert below.below_root and below.matches("com.") and below.matches("a.b.")
    assert not below.matches(".") and not below.matches("-")


def test_domain_list_escaped_dots_are_inside_labels(tmp_path):
    d = DomainList.load(domain_file(tmp_path, "*.b.org\nexact\\.dot.org\n"))
    assert d.matches("x.b.org.")
    assert not d.matches("a\\.b.org.")  # one label "a.b" under org, not below b.org
    assert not d.matches("x.a\\.b.org.")
    assert d.matches("exact\\.dot.org.")
    assert d.matches("trail\\..b.org.")  # label "trail." below b.org
    assert not d.matches("dot.org.")


def test_domain_list_empty_file_keeps_nothing(tmp_path):
    path = domain_file(tmp_path, "# nothing yet\n\n")
    out, f = run(FilterOptions(keep_domains_file=path), [rec(qname="example.com.")])
    assert out == [] and f.dropped == {"keep-domains": 1, "kept": 0}


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("bad name.com", "without spaces"),
        ("0.0.0.0\texample.com", "without spaces"),  # a hosts file line
        ("a..b.com", "empty label"),
        (".example.com", "empty label"),
        ("example.com..", "empty label"),
        ("*..", "empty label"),
        ("*", r"'\*' is only allowed"),
        ("*.*.example.com", r"'\*' is only allowed as a leading '\*.'"),
        ("a.*.example.com", r"'\*' is only allowed"),
        ("exämple.com", "punycode"),
    ],
)
def test_domain_list_malformed_lines_name_file_and_line(tmp_path, line, why):
    path = domain_file(tmp_path, f"# header\nok.example.com\n\n{line}\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(path)}:4: malformed domain .*{why}"):
        MessageFilter.from_options(FilterOptions(drop_domains_file=path))


def test_domain_list_unreadable_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read domain list .*missing.txt"):
        MessageFilter.from_options(FilterOptions(keep_domains_file=str(tmp_path / "missing.txt")))
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="cannot read domain list"):
        DomainList.load(str(binary))


class _CountingSet(frozenset):
    """A frozenset that counts membership tests."""

    lookups = 0

    def __contains__(self, item) -> bool:
        type(self).lookups += 1
        return frozenset.__contains__(self, item)


def test_domain_lookups_are_per_label_not_per_list_entry():
    """A list of 100,000 names costs the same set lookups per qname as a list of 10:
    at most one per label plus one, whatever the list size."""
    names = [f"www.a.b.c.d.host{i}.example" for i in range(10)]
    probes = names + ["x.y.z.nowhere.test.", "deep." * 20 + "test.", "-", "host3.example."]

    def cost(size: int) -> list[int]:
        exact = _CountingSet(f"name{i}.test" for i in range(size))
        subtree = _CountingSet(f"zone{i}.example" for i in range(size))
        d = DomainList(exact, subtree)
        per_probe = []
        for qname in probes:
            _CountingSet.lookups = 0
            d.matches(qname)
            per_probe.append(_CountingSet.lookups)
        return per_probe

    small, large = cost(10), cost(100_000)
    assert small == large
    for qname, lookups in zip(probes, large):
        assert lookups <= qname.rstrip(".").count(".") + 2, (qname, lookups)


def test_domain_list_mixed_depths(tmp_path):
    d = DomainList.load(domain_file(tmp_path, "*.com\n*.a.b.c.d.example\nx.y.z.example\n"))
    assert d.depth == 5
    assert d.matches("q.com.") and d.matches("very.deep.name.com.")
    assert d.matches("z.a.b.c.d.example.") and d.matches("1.2.3.4.5.6.a.b.c.d.example.")
    assert not d.matches("a.b.c.d.example.") and not d.matches("b.c.d.example.")
    assert d.matches("x.y.z.example.") and not d.matches("w.x.y.z.example.")
    assert not d.matches("com.")


def _naive_matches(entries: list[str], qname: str) -> bool:
    """The list semantics written directly: compare label lists."""
    labels = qname.lower().rstrip(".").split(".")
    for entry in entries:
        wildcard = entry.startswith("*.")
        want = entry[2:].lower().rstrip(".").split(".") if wildcard else entry.lower().rstrip(".").split(".")
        if wildcard and len(labels) > len(want) and labels[-len(want):] == want:
            return True
        if not wildcard and labels == want:
            return True
    return False


name_st = st.lists(st.sampled_from(["a", "B", "c", "www", "com"]), min_size=1, max_size=5)


@settings(max_examples=300, deadline=None)
@given(entries=st.lists(st.tuples(st.booleans(), name_st, st.booleans()), max_size=6),
       qnames=st.lists(st.tuples(name_st, st.booleans()), min_size=1, max_size=20))
def test_domain_list_agrees_with_naive_label_matching(entries, qnames):
    lines = [("*." if wild else "") + ".".join(labels) + ("." if dot else "") for wild, labels, dot in entries]
    with tempfile.TemporaryDirectory() as tmp:
        d = DomainList.load(domain_file(Path(tmp), "\n".join(lines)))
    for labels, dot in qnames:
        qname = ".".join(labels) + ("." if dot else "")
        assert d.matches(qname) == _naive_matches(lines, qname), (lines, qname)


# --------------------------------------------------------------------------
# qname regex, downsample, order
# --------------------------------------------------------------------------


def test_qname_regex_uses_re_match():
    records = [rec(qname=q) for q in ("www.example.com.", "a.www.example.com.", "wwwx.org.", "-")]
    out, f = run(FilterOptions(qname_regex="www"), records)
    assert qnames(out) == ["www.example.com.", "wwwx.org."]
    assert f.dropped == {"qname-regex": 2, "kept": 2}
    out, _ = run(FilterOptions(qname_regex=r".*\.com\.$"), records)
    assert qnames(out) == ["www.example.com.", "a.www.example.com."]


@pytest.mark.parametrize("every", [1, 2, 3, 7])
def test_downsample_keeps_1st_then_every_nth_across_batches(every):
    f = MessageFilter.from_options(FilterOptions(downsample=every))
    stream = [rec(id=i) for i in range(100)]
    out = []
    start = 0
    for size in (1, 5, 0, 2, 13, 29, 50):  # uneven batches, an empty one too
        out += f.apply(stream[start : start + size])
        start += size
    assert start == 100
    assert [r["id"] for r in out] == list(range(0, 100, every))
    assert f.dropped["kept"] == len(out)
    assert f.dropped["downsample"] == 100 - len(out)


def test_downsample_counts_only_messages_that_reach_it():
    f = MessageFilter.from_options(FilterOptions(drop_rcodes=("NXDOMAIN",), downsample=2))
    records = [rec(id=i, rcode="NXDOMAIN" if i % 3 == 0 else "NOERROR") for i in range(12)]
    out = f.apply(records)
    reaching = [r["id"] for r in records if r["rcode"] != "NXDOMAIN"]
    assert [r["id"] for r in out] == reaching[::2]
    assert f.dropped == {"rcode": 4, "downsample": 4, "kept": 4}


def test_downsample_below_one_is_a_config_error():
    with pytest.raises(ConfigError, match="downsample"):
        MessageFilter.from_options(FilterOptions(downsample=0))


def test_first_failing_step_is_the_reason(tmp_path):
    drop = domain_file(tmp_path, "dropped.example.\n", "drop.txt")
    keep = domain_file(tmp_path, "*.example.\n", "keep.txt")
    options = FilterOptions(
        keep_message_types=("CLIENT_QUERY",), dnstap_identities="ok", drop_rcodes=("REFUSED",),
        drop_query_ip=("10.0.0.0/8",), drop_domains_file=drop, keep_domains_file=keep,
        qname_regex="www", downsample=1,
    )
    good = dict(message="CLIENT_QUERY", identity="ok1", rcode="NOERROR", query_ip="192.0.2.1",
                qname="www.example.")
    fails = {  # the reason each record is dropped for: it fails that step and every later one
        "message-type": dict(message="AUTH_QUERY", identity="bad", rcode="REFUSED", query_ip="10.0.0.1", qname="x.org."),
        "identity": dict(identity="bad", rcode="REFUSED", query_ip="10.0.0.1", qname="x.org."),
        "rcode": dict(rcode="REFUSED", query_ip="10.0.0.1", qname="x.org."),
        "query-ip": dict(query_ip="10.0.0.1", qname="dropped.example."),
        "drop-domains": dict(qname="dropped.example."),
        "keep-domains": dict(qname="www.other.org."),
        "qname-regex": dict(qname="ftp.example."),
    }
    records = [rec(**good)] + [rec(**{**good, **bad}) for bad in fails.values()] + [rec(**good)]
    out, f = run(options, records)
    assert out == [records[0], records[-1]]
    assert out[0] is records[0]
    assert f.dropped == {**{reason: 1 for reason in fails}, "kept": 2}
    assert sum(f.dropped.values()) == len(records)


def test_records_decoded_from_dnstap_frames(tmp_path):
    """The filter reads the fields as core.message.decode writes them."""

    def frame(qname: str, rcode: int, client: str, mtype: int) -> bytes:
        query = dns.message.make_query(qname, "A")
        wire = query.to_wire()
        if mtype % 2 == 0:
            resp = dns.message.make_response(query)
            resp.set_rcode(rcode)
            wire = resp.to_wire()
        tap = dnstap_pb2.Dnstap(type=dnstap_pb2.Dnstap.MESSAGE, identity=b"unbound01")
        m = tap.message
        m.type = mtype
        m.socket_family = dnstap_pb2.INET6 if ":" in client else dnstap_pb2.INET
        m.query_address = socket.inet_pton(socket.AF_INET6 if ":" in client else socket.AF_INET, client)
        if mtype % 2 == 0:
            m.response_message = wire
        else:
            m.query_message = wire
        return tap.SerializeToString()

    path = domain_file(tmp_path, "*.Blocked.TEST\n")
    frames = [
        frame("www.example.test.", dns.rcode.NOERROR, "192.0.2.1", dnstap_pb2.Message.CLIENT_RESPONSE),
        frame("ads.BLOCKED.test.", dns.rcode.NOERROR, "192.0.2.1", dnstap_pb2.Message.CLIENT_RESPONSE),
        frame("nx.example.test.", dns.rcode.NXDOMAIN, "192.0.2.1", dnstap_pb2.Message.CLIENT_RESPONSE),
        frame("www.example.test.", dns.rcode.NOERROR, "2001:db8::5", dnstap_pb2.Message.CLIENT_RESPONSE),
        frame("www.example.test.", 0, "192.0.2.1", dnstap_pb2.Message.CLIENT_QUERY),
        frame("mail.example.test.", 0, "192.0.2.1", dnstap_pb2.Message.CLIENT_RESPONSE),
    ]
    records = [decode(f) for f in frames]
    options = config_from_dict({"filter": {
        "keep-message-types": ["client_response"], "dnstap-identities": "unbound",
        "drop-rcodes": ["NXDOMAIN"], "drop-query-ip": ["2001:db8::/32"],
        "drop-domains-file": path, "qname-regex": "www",
    }}).filter
    out, f = run(options, records)
    assert out == [records[0]]
    assert f.dropped == {"drop-domains": 1, "rcode": 1, "query-ip": 1, "message-type": 1,
                         "qname-regex": 1, "kept": 1}


# --------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------

LABELS = ["a", "www", "ads", "example", "com", "org", "Com"]
KEEP_LIST = "example.com\n*.org\n*.ads.example.com\n"
DROP_LIST = "*.ads.com\nwww.org\n"


@pytest.fixture(scope="module")
def list_files(tmp_path_factory) -> tuple[str, str]:
    tmp = tmp_path_factory.mktemp("lists")
    return domain_file(tmp, KEEP_LIST, "keep.txt"), domain_file(tmp, DROP_LIST, "drop.txt")


records_st = st.lists(
    st.builds(
        lambda message, identity, rcode, ip, labels, dot: rec(
            message=message, identity=identity, rcode=rcode, query_ip=ip,
            qname=(".".join(labels) + dot) if labels else ".",
        ),
        st.sampled_from(["CLIENT_QUERY", "CLIENT_RESPONSE", "AUTH_RESPONSE", "-"]),
        st.sampled_from(["unbound01", "dnsdist01", "other", "-"]),
        st.sampled_from(["NOERROR", "NXDOMAIN", "SERVFAIL", "-"]),
        st.sampled_from(["10.0.0.1", "192.0.2.1", "2001:db8::1", "::1", "-"]),
        st.lists(st.sampled_from(LABELS), max_size=4),
        st.sampled_from([".", ""]),
    ),
    max_size=60,
)

options_st = st.fixed_dictionaries({
    "keep_message_types": st.sampled_from([(), ("CLIENT_QUERY", "CLIENT_RESPONSE")]),
    "dnstap_identities": st.sampled_from([None, "unbound|dnsdist", ".*0"]),
    "drop_rcodes": st.sampled_from([(), ("NXDOMAIN",), ("SERVFAIL", "NOERROR")]),
    "drop_query_ip": st.sampled_from([(), ("10.0.0.0/8",), ("2001:db8::/32", "192.0.2.0/24")]),
    "drop": st.booleans(),
    "keep": st.booleans(),
    "qname_regex": st.sampled_from([None, "www", r".*\.com\.?$"]),
    "downsample": st.integers(1, 4),
})


def make_options(drawn: dict, files: tuple[str, str]) -> FilterOptions:
    drawn = dict(drawn)
    keep, drop = drawn.pop("keep"), drawn.pop("drop")
    return FilterOptions(**drawn, keep_domains_file=files[0] if keep else None,
                         drop_domains_file=files[1] if drop else None)


def _listed_under(qname: str) -> bool:
    """Is qname equal to or below a name of KEEP_LIST (written independently of DomainList)?"""
    labels = qname.lower().rstrip(".").split(".")
    name = ".".join(labels)
    for entry in KEEP_LIST.split():
        if entry.startswith("*."):
            base = entry[2:]
            if name.endswith("." + base):
                return True
        elif name == entry:
            return True
    return False


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records=records_st, drawn=options_st, batch_cut=st.integers(0, 60))
def test_filter_properties(list_files, records, drawn, batch_cut):
    options = make_options(drawn, list_files)
    f = MessageFilter.from_options(options)
    out = f.apply(records[:batch_cut]) + f.apply(records[batch_cut:])

    # an order-preserving subsequence of the input, the same objects
    it = iter(records)
    assert all(any(kept is r for r in it) for kept in out)
    # every message is either kept or dropped for exactly one reason
    assert f.dropped["kept"] == len(out)
    assert sum(f.dropped.values()) == len(records)
    assert set(f.dropped) <= {*STEP_ORDER, "kept"}
    # a second pass of the same filter only drops by downsampling
    again = MessageFilter.from_options(options)
    again.apply(out)
    assert set(again.dropped) <= {"kept", "downsample"}
    # keep-domains keeps only names equal to or below a listed name
    if options.keep_domains_file:
        assert all(_listed_under(r["qname"]) for r in out)
    if options.downsample == 1 and not options.keep_domains_file:
        assert "downsample" not in f.dropped


# --------------------------------------------------------------------------
# Beam
# --------------------------------------------------------------------------


def test_filter_messages_in_a_pipeline(tmp_path):
    path = domain_file(tmp_path, "*.blocked.test\n")
    options = FilterOptions(drop_rcodes=("NXDOMAIN",), drop_domains_file=path)
    batches = [
        RecordBatch([rec(id=1, rcode="NOERROR", qname="a.test."), rec(id=2, rcode="NXDOMAIN", qname="b.test.")]),
        RecordBatch([rec(id=3, rcode="NXDOMAIN", qname="c.test.")]),  # all dropped: not emitted
        RecordBatch([rec(id=4, rcode="NOERROR", qname="x.blocked.test."), rec(id=5, rcode="NOERROR", qname="d.test.")]),
        RecordBatch(),
    ]
    before = dict(STATS)
    pipeline = beam.Pipeline(runner=FnApiRunner())
    out = pipeline | beam.Create(batches) | FilterMessages(options)
    assert_that(out | beam.Map(lambda b: (type(b).__name__, sorted(r["id"] for r in b))),
                equal_to([("RecordBatch", [1]), ("RecordBatch", [5])]))
    result = pipeline.run()
    result.wait_until_finish()

    delta = {k: STATS[k] - before.get(k, 0) for k in STATS}
    assert {k: v for k, v in delta.items() if v} == {"rcode": 2, "drop-domains": 1, "kept": 2}
    metrics = {
        m.key.metric.name: m.committed
        for m in result.metrics().query()["counters"]
        if m.key.metric.namespace == "dnstap_receiver" and m.key.metric.name.startswith("filter_")
    }
    assert metrics == {"filter_rcode": 2, "filter_drop-domains": 1, "filter_kept": 2}


def test_filter_messages_fails_at_construction_on_a_bad_list(tmp_path):
    path = domain_file(tmp_path, "good.test\nbad..test\n")
    with pytest.raises(ConfigError, match=r"domains.txt:2: malformed domain"):
        FilterMessages(FilterOptions(keep_domains_file=path))
    t = FilterMessages(FilterOptions(downsample=5))
    assert t.description == "filter: 1 in 5"
