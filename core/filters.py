"""Message filtering (the ``filter:`` config section), engine-free.

:class:`MessageFilter` is an ordered list of small named steps. Each step
turns a list of records into the records it keeps, so a batch goes through
one list comprehension per step and a record dropped early is never seen by
later steps: the first step that drops a record is its reason. Steps that
are not configured are left out, so the default configuration costs nothing.

Costs stay flat per message whatever the size of the configuration:

* domain lists are two sets (exact names, subtrees) probed with the suffixes
  of the qname, at most one lookup per label, never a scan of the list;
* query addresses are turned into ints with ``socket.inet_pton`` and probed
  against one set of masked network ints per prefix length in use;
* every per-value decision that is not a plain set lookup (address in
  networks, qname in a domain list, regex match) is cached per value in a
  bounded dict, because a DNS server sees the same clients, names and
  identities over and over.
"""

from __future__ import annotations

import collections
import ipaddress
import re
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable

import dns.rcode

from core.batches import RecordBatch
from core.errors import ConfigError
from core.message import MESSAGE_TYPES

if TYPE_CHECKING:  # pipeline.config imports core modules; keep core free of it at run time
    from pipeline.config import FilterOptions

__all__ = ["DomainList", "MessageFilter", "QueryIpMatcher", "Step"]

UNKNOWN = "-"  # core.message's value for a field it could not read
CACHE_SIZE = 65536  # entries per decision cache; cleared when full (cheap, no LRU bookkeeping)

Records = list  # a list (or RecordBatch) of core.message.DnstapRecord


class _DecisionCache(dict):
    """value -> decide(value), computed on first use. Hits are a C-level dict
    lookup inside the steps' comprehensions; only misses call Python code."""

    __slots__ = ("_decide",)

    def __init__(self, decide: Callable[[str], bool]) -> None:
        super().__init__()
        self._decide = decide

    def __missing__(self, key: str) -> bool:
        # A field another stage set to a non-string (None) reads as unknown.
        result = self._decide(key if isinstance(key, str) else UNKNOWN)
        if len(self) >= CACHE_SIZE:
            self.clear()
        self[key] = result
        return result


@dataclass(frozen=True)
class Step:
    """One filter step: ``run`` returns the records it keeps, in order."""

    name: str  # the drop reason counted for this step
    run: Callable[[Records], Records]
    description: str


# --------------------------------------------------------------------------
# Domain lists
# --------------------------------------------------------------------------


def _dot_positions(name: str) -> list[int]:
    """Offsets of the label-separating dots of a presentation-format name:
    a dot preceded by an odd number of backslashes is part of a label."""
    if "\\" not in name:
        return [i for i, c in enumerate(name) if c == "."]
    dots = []
    i = 0
    while i < len(name):
        c = name[i]
        if c == "\\":
            i += 2  # the escaped character (or the first digit of \DDD, never a dot)
            continue
        if c == ".":
            dots.append(i)
        i += 1
    return dots


def _strip_root(name: str) -> str:
    """Lowercased, without the trailing (root) dot: the form names are stored and probed in."""
    name = name.lower()
    if name.endswith(".") and ("\\" not in name or (_dot_positions(name) or [-1])[-1] == len(name) - 1):
        return name[:-1]  # not for "a\\.", whose last dot belongs to the label
    return name


class DomainList:
    """Exact names and ``*.`` subtrees. ``matches`` does at most one set
    lookup per label of the qname (plus one), whatever the list size, and no
    more than the deepest ``*.`` entry has labels (plus one)."""

    __slots__ = ("exact", "subtree", "below_root", "size", "depth")

    def __init__(self, exact: set | frozenset, subtree: set | frozenset, below_root: bool = False) -> None:
        self.exact = exact  # names, lowercased, no trailing dot ("" is the root)
        self.subtree = subtree  # X for every "*.X" line: names strictly below X
        self.below_root = below_root  # a "*." line: every name but the root
        self.size = len(exact) + len(subtree) + below_root
        # labels in the deepest subtree name: no suffix longer than that can match
        self.depth = max((len(_dot_positions(n)) + 1 for n in subtree), default=0)

    @classmethod
    def load(cls, path: str) -> DomainList:
        """Read a list file; a malformed line raises ConfigError naming file and line."""
        exact: set[str] = set()
        subtree: set[str] = set()
        below_root = False
        try:
            with open(path, encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, 1):
                    entry = line.split("#", 1)[0].strip()
                    if not entry:
                        continue
                    wildcard, name = _parse_entry(entry, f"{path}:{lineno}")
                    if wildcard and name == "":
                        below_root = True
                    else:
                        (subtree if wildcard else exact).add(name)
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ConfigError(f"cannot read domain list {path}: {reason}") from None
        return cls(frozenset(exact), frozenset(subtree), below_root)

    def matches(self, qname: str) -> bool:
        name = qname.lower()
        if "\\" in name:  # rare: escaped dots may sit inside labels
            name = _strip_root(name)
            if name in self.exact:
                return True
            for dot in _dot_positions(name):
                if name[dot + 1 :] in self.subtree:
                    return True
            return self.below_root and name != ""
        if name.endswith("."):
            name = name[:-1]
        if name in self.exact:
            return True
        # Every dot separates labels: probe the proper suffixes from the right
        # (1 label, 2 labels...), no deeper than the deepest "*." entry.
        subtree = self.subtree
        dot = len(name)
        for _ in range(self.depth):
            dot = name.rfind(".", 0, dot)
            if dot < 0:
                break
            if name[dot + 1 :] in subtree:
                return True
        return self.below_root and name != "" and qname != UNKNOWN


def _parse_entry(entry: str, where: str) -> tuple[bool, str]:
    """One list line -> (is "*." subtree, name in stored form)."""

    def bad(why: str) -> ConfigError:
        return ConfigError(f"{where}: malformed domain {entry!r}: {why}")

    if any(c.isspace() for c in entry):
        raise bad("one name per line, without spaces")
    if not entry.isascii():
        raise bad("non-ASCII name; write it in its xn-- (punycode) form")
    if entry in (".", "*."):  # the root; every name below the root
        return entry == "*.", ""
    wildcard = entry.startswith("*.")
    name = _strip_root(entry[2:] if wildcard else entry)
    starts = [-1, *_dot_positions(name), len(name)]
    labels = [name[a + 1 : b] for a, b in zip(starts, starts[1:])]
    if "" in labels:
        raise bad("empty label")
    if any("*" in label for label in labels):
        raise bad("'*' is only allowed as a leading '*.'")
    return wildcard, name


# --------------------------------------------------------------------------
# Query addresses
# --------------------------------------------------------------------------

_V4_MAPPED = 0xFFFF  # bits 32-127 of an IPv4-mapped IPv6 address, ::ffff:0:0/96


class QueryIpMatcher:
    """Is an address (text) in one of a list of networks? IPv4 and IPv6; an
    IPv4-mapped IPv6 address (::ffff:a.b.c.d) is checked against the IPv4 ones."""

    def __init__(self, networks: Iterable[str]) -> None:
        v4: dict[int, set[int]] = collections.defaultdict(set)
        v6: dict[int, set[int]] = collections.defaultdict(set)
        for text in networks:
            try:
                net = ipaddress.ip_network(str(text).strip(), strict=False)
            except ValueError:
                raise ConfigError(
                    f"filter.drop-query-ip: expected a network in CIDR notation, got {text!r}"
                ) from None
            shift = net.max_prefixlen - net.prefixlen
            (v4 if net.version == 4 else v6)[shift].add(int(net.network_address) >> shift)
        # (shift, set of network >> shift), one entry per prefix length in use
        self._v4 = tuple((s, frozenset(n)) for s, n in sorted(v4.items()))
        self._v6 = tuple((s, frozenset(n)) for s, n in sorted(v6.items()))

    def __call__(self, address: str) -> bool:
        try:
            if ":" in address:
                value = int.from_bytes(socket.inet_pton(socket.AF_INET6, address), "big")
                if value >> 32 == _V4_MAPPED and _in(self._v4, value & 0xFFFFFFFF):
                    return True
                return _in(self._v6, value)
            return _in(self._v4, int.from_bytes(socket.inet_pton(socket.AF_INET, address), "big"))
        except OSError:  # "-" or anything that is not an address: in no network
            return False


def _in(table: tuple[tuple[int, frozenset], ...], value: int) -> bool:
    for shift, nets in table:  # a loop, not any(genexpr): this runs on every cache miss
        if value >> shift in nets:
            return True
    return False


# --------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------


def _keep_field_in(name: str, field: str, allowed: frozenset, description: str) -> Step:
    return Step(name, lambda records: [r for r in records if r[field] in allowed], description)


def _drop_field_in(name: str, field: str, dropped: frozenset, description: str) -> Step:
    return Step(name, lambda records: [r for r in records if r[field] not in dropped], description)


def _keep_if(name: str, field: str, decide: Callable[[str], bool], description: str) -> Step:
    cache = _DecisionCache(decide)
    return Step(name, lambda records: [r for r in records if cache[r[field]]], description)


def _drop_if(name: str, field: str, decide: Callable[[str], bool], description: str) -> Step:
    cache = _DecisionCache(decide)
    return Step(name, lambda records: [r for r in records if not cache[r[field]]], description)


def _regex(pattern: str, key: str) -> Callable[[str], bool]:
    try:
        match = re.compile(pattern).match  # re.match: anchored at the start only, as 4.7.0
    except re.error as exc:
        raise ConfigError(f"filter.{key}: invalid regular expression {pattern!r}: {exc}") from None
    return lambda value: match(value) is not None


def _check_names(key: str, names: frozenset, known: Iterable[str]) -> None:
    # pipeline.config checks these too; options built in code get the same guard,
    # since a misspelt name would silently keep or drop nothing.
    unknown = names - frozenset(known)
    if unknown:
        raise ConfigError(f"filter.{key}: unknown value(s) {', '.join(sorted(unknown))}")


class _Downsample:
    """Keeps the 1st, N+1th, 2N+1th... record reaching it, counted across batches."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.seen = 0

    def __call__(self, records: Records) -> Records:
        first = -self.seen % self.every  # index in this batch of the next record to keep
        self.seen += len(records)
        return records[first :: self.every]


class MessageFilter:
    """The configured steps, in their fixed order; ``apply`` runs them on a batch."""

    def __init__(self, steps: list[Step]) -> None:
        self.steps = steps
        # drops per reason (step name), plus "kept"; the caller may read and clear it
        self.dropped: collections.Counter = collections.Counter()

    @classmethod
    def from_options(cls, options: FilterOptions) -> MessageFilter:
        """Build (and validate) the steps; file and value errors raise ConfigError."""
        o = options
        steps: list[Step] = []
        if o.keep_message_types:
            types = frozenset(t.upper() for t in o.keep_message_types)
            _check_names("keep-message-types", types, MESSAGE_TYPES.values())
            steps.append(_keep_field_in("message-type", "message", types, f"message in {sorted(types)}"))
        if o.dnstap_identities is not None:
            steps.append(
                _keep_if(
                    "identity",
                    "identity",
                    _regex(o.dnstap_identities, "dnstap-identities"),
                    f"identity matches {o.dnstap_identities!r}",
                )
            )
        if o.drop_rcodes:
            rcodes = frozenset(r.upper() for r in o.drop_rcodes)  # record rcodes are upper case
            _check_names("drop-rcodes", rcodes, (r.name for r in dns.rcode.Rcode))
            steps.append(_drop_field_in("rcode", "rcode", rcodes, f"rcode not in {sorted(rcodes)}"))
        if o.drop_query_ip:
            steps.append(
                _drop_if(
                    "query-ip",
                    "query-ip",
                    QueryIpMatcher(o.drop_query_ip),
                    f"query-ip not in {len(o.drop_query_ip)} network(s)",
                )
            )
        if o.drop_domains_file is not None:
            drop = DomainList.load(o.drop_domains_file)
            steps.append(
                _drop_if(
                    "drop-domains",
                    "qname",
                    drop.matches,
                    f"qname not in {o.drop_domains_file} ({drop.size} names)",
                )
            )
        if o.keep_domains_file is not None:
            keep = DomainList.load(o.keep_domains_file)
            steps.append(
                _keep_if(
                    "keep-domains",
                    "qname",
                    keep.matches,
                    f"qname in {o.keep_domains_file} ({keep.size} names)",
                )
            )
        if o.qname_regex is not None:
            steps.append(
                _keep_if(
                    "qname-regex",
                    "qname",
                    _regex(o.qname_regex, "qname-regex"),
                    f"qname matches {o.qname_regex!r}",
                )
            )
        if o.downsample < 1:
            raise ConfigError(f"filter.downsample: expected an integer >= 1, got {o.downsample!r}")
        if o.downsample > 1:
            steps.append(Step("downsample", _Downsample(o.downsample), f"1 in {o.downsample}"))
        return cls(steps)

    def apply(self, records: Records) -> RecordBatch:
        """The records kept (the same objects, in order); drops counted in ``dropped``."""
        dropped = self.dropped
        if not self.steps:
            dropped["kept"] += len(records)
            return records if type(records) is RecordBatch else RecordBatch(records)
        kept = records
        for step in self.steps:
            if not kept:
                break
            before = len(kept)
            kept = step.run(kept)
            if len(kept) != before:
                dropped[step.name] += before - len(kept)
        dropped["kept"] += len(kept)
        return RecordBatch(kept)

    def describe(self) -> str:
        """One line for the start-up log: what each step lets through, in order,
        e.g. "filter: rcode not in ['NOERROR'] -> 1 in 10"."""
        if not self.steps:
            return "filter: keep every message"
        return "filter: " + " -> ".join(step.description for step in self.steps)
