"""core/normalize.py and transforms/normalize.py: qname case, trailing dot, tld, registrable domain."""

from __future__ import annotations

import itertools

import apache_beam as beam
import pytest
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.util import BeamAssertException, assert_that
from hypothesis import given, settings
from hypothesis import strategies as st

from core import counters
from core.message import FIELDS, DnstapRecord
from core.normalize import QnameNormalizer, strip_trailing_dot
from pipeline.config import NormalizeOptions
from transforms.batches import RecordBatch
from transforms.normalize import NormalizeQnames

ALL_ON = NormalizeOptions(qname_lowercase=True, qname_trailing_dot=False, add_tld=True, add_registrable_domain=True)


def _record(qname: str) -> DnstapRecord:
    rec = DnstapRecord(FIELDS)
    rec["qname"] = qname
    return rec


def _run(options: NormalizeOptions, *qnames: str) -> list[DnstapRecord]:
    records = [_record(q) for q in qnames]
    QnameNormalizer.from_options(options).apply(records)
    return records


def test_default_options_change_nothing():
    normalizer = QnameNormalizer.from_options(NormalizeOptions())
    assert not normalizer.active
    records = [_record("WWW.Example.COM."), _record("-")]
    normalizer.apply(records)
    assert records == [_record("WWW.Example.COM."), _record("-")]
    assert "tld" not in records[0]


@pytest.mark.parametrize(
    ("qname", "expected"),
    [
        ("WwW.ExAmple.COM.", "www.example.com."),
        ("\\065B\\.C.Example.", "\\065b\\.c.example."),  # \065 is a byte escape: kept as written
        ("A\\032B.", "a\\032b."),
        (".", "."),
        ("-", "-"),
    ],
)
def test_lowercase(qname, expected):
    (rec,) = _run(NormalizeOptions(qname_lowercase=True), qname)
    assert rec["qname"] == expected


@pytest.mark.parametrize(
    ("qname", "expected"),
    [
        ("www.example.com.", "www.example.com"),
        ("www.example.com", "www.example.com"),
        (".", "."),  # the root keeps its only character
        ("", ""),
        ("a\\..", "a\\."),  # label "a." : the escaped dot belongs to it
        ("a\\.", "a\\."),
        ("a\\\\.", "a\\\\"),  # label "a\" : escaped backslash, then the real dot
        ("-", "-"),
    ],
)
def test_trailing_dot(qname, expected):
    assert strip_trailing_dot(qname) == expected
    (rec,) = _run(NormalizeOptions(qname_trailing_dot=False), qname)
    assert rec["qname"] == expected


@pytest.mark.parametrize(
    ("qname", "tld", "registrable"),
    [
        ("www.bbc.co.uk.", "co.uk", "bbc.co.uk"),
        ("WWW.Example.COM.", "com", "example.com"),
        ("foo.bar.github.io.", "github.io", "bar.github.io"),
        ("com.", "com", "-"),
        ("co.uk.", "co.uk", "-"),
        ("host.internal.", "internal", "host.internal"),  # unlisted TLD: its own suffix
        (".", "-", "-"),
        ("-", "-", "-"),
    ],
)
def test_tld_and_registrable_domain(qname, tld, registrable):
    (rec,) = _run(NormalizeOptions(add_tld=True, add_registrable_domain=True), qname)
    assert (rec["qname"], rec["tld"], rec["registrable-domain"]) == (qname, tld, registrable)


def test_fields_only_when_asked():
    (only_tld,) = _run(NormalizeOptions(add_tld=True), "www.example.com.")
    assert only_tld["tld"] == "com" and "registrable-domain" not in only_tld
    (only_reg,) = _run(NormalizeOptions(add_registrable_domain=True), "www.example.com.")
    assert only_reg["registrable-domain"] == "example.com" and "tld" not in only_reg


def test_all_options():
    (rec,) = _run(ALL_ON, "WWW.BBC.Co.UK.")
    assert (rec["qname"], rec["tld"], rec["registrable-domain"]) == ("www.bbc.co.uk", "co.uk", "bbc.co.uk")


_OPTIONS = [NormalizeOptions(*flags) for flags in itertools.product([False, True], repeat=4)]
_LABEL = st.one_of(
    st.sampled_from(["com", "CO", "uk", "Example", "github", "IO", "www", "\\.", "\\032", "\\065", "a\\\\", "\\\\"]),
    st.from_regex(r"[A-Za-z0-9-]{1,8}", fullmatch=True),
)
_QNAMES = st.one_of(
    st.just("-"),
    st.just("."),
    st.builds(lambda labels, dot: ".".join(labels) + dot, st.lists(_LABEL, min_size=1, max_size=5), st.sampled_from(["", "."])),
)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(_OPTIONS), st.lists(_QNAMES, min_size=1, max_size=5))
def test_normalisation_is_idempotent(options, qnames):
    once = _run(options, *qnames)
    twice = [DnstapRecord(rec) for rec in once]
    QnameNormalizer.from_options(options).apply(twice)
    assert twice == once


@settings(max_examples=200, deadline=None)
@given(_QNAMES)
def test_registrable_domain_is_a_suffix_of_the_qname(qname):
    (rec,) = _run(ALL_ON, qname)
    reg, tld, name = rec["registrable-domain"], rec["tld"], rec["qname"]
    if reg != "-":
        assert name == reg or name.endswith("." + reg)
        assert reg.endswith("." + tld)


def test_beam_transform():
    batch = RecordBatch([_record("WWW.Example.COM."), _record("-"), _record("a.b.c.mm.")])
    expected = [("www.example.com", "com", "example.com"), ("-", "-", "-"), ("a.b.c.mm", "c.mm", "b.c.mm")]

    def check(batches):
        if len(batches) != 1 or type(batches[0]) is not RecordBatch:
            raise BeamAssertException(f"expected one RecordBatch, got {batches!r}")
        got = [(r["qname"], r["tld"], r["registrable-domain"]) for r in batches[0]]
        if got != expected:
            raise BeamAssertException(f"{got} != {expected}")

    before = counters.counter_group("normalize")["records"]
    with beam.Pipeline(runner=FnApiRunner()) as p:
        out = p | beam.Create([batch]) | NormalizeQnames(ALL_ON)
        assert out.element_type is RecordBatch
        assert_that(out, check)
    assert counters.counter_group("normalize")["records"] == before + 3
