"""Public suffix ("tld") and registrable domain (eTLD+1) of DNS names.

Reads the Public Suffix List bundled in ``core/data`` (see its README: no
download at run time) and follows the algorithm of
https://publicsuffix.org/list/: among the rules matching a name, an exception
rule (``!``) prevails, otherwise the one with the most labels; the default
rule ``*`` makes an unlisted TLD its own public suffix.

Names are qnames in presentation format: compared case-insensitively, with or
without the trailing dot; results are lowercase without it. A label holding
RFC 1035 escapes (``\\.``, ``\\032``) is compared as written: no rule contains
one, so it can only match a wildcard. Unicode names are looked up through their
punycode form and answered in their own form (the official tests use both).
"""

from __future__ import annotations

import os
import unicodedata

__all__ = ["DEFAULT_PATH", "PublicSuffixList", "default", "split_labels"]

DEFAULT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "public_suffix_list.dat")

_CACHE_SIZE = 65536


class _Node:
    """One label of the rule tree, which is walked from the TLD leftwards."""

    __slots__ = ("children", "rule", "wildcard", "exception")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.rule = False  # this suffix is a rule
        self.wildcard = False  # "*." + this suffix is a rule
        self.exception = False  # "!" + this suffix is a rule


def split_labels(name: str) -> list[str] | None:
    """Labels of a presentation-format name, the root label dropped; None if
    one is empty (".com", "a..b"). Dots escaped as ``\\.`` do not split."""
    if name == "." or not name:
        return []
    if "\\" not in name:
        labels = name.split(".")
        if not labels[-1]:
            labels.pop()
    else:  # rare: split by hand so that "a\.b" stays one label
        labels, start, i, n = [], 0, 0, len(name)
        while i < n:
            c = name[i]
            if c == "\\":
                i += 2  # the escaped character (or first digit of \DDD) never splits
                continue
            if c == ".":
                labels.append(name[start:i])
                start = i + 1
            i += 1
        if start < n:
            labels.append(name[start:])
    return None if "" in labels else labels


def _ascii_label(label: str) -> str:
    """Lookup key of a label: lowercase ASCII, Unicode labels as punycode
    (qnames on the wire are ASCII, so the list's IDN rules are keyed so too)."""
    if label.isascii():
        return label.lower()
    return "xn--" + unicodedata.normalize("NFC", label).lower().encode("punycode").decode("ascii")


class PublicSuffixList:
    """The rules of one list, with a bounded per-name cache of the answers."""

    def __init__(self, rules: list[str]) -> None:
        self._root = _Node()
        self._root.wildcard = True  # the default rule "*"
        self._cache: dict[str, tuple[str, str | None]] = {}
        for rule in rules:
            self._add(rule)

    @classmethod
    def load(cls, path: str = DEFAULT_PATH, private: bool = True) -> PublicSuffixList:
        """Parse a ``public_suffix_list.dat``; ``private=False`` keeps only the
        ICANN section (the PRIVATE one lists names like ``github.io``)."""
        rules = []
        section = None
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if line.startswith("//"):
                    if "===BEGIN ICANN DOMAINS===" in line:
                        section = "icann"
                    elif "===BEGIN PRIVATE DOMAINS===" in line:
                        section = "private"
                    elif "===END " in line:
                        section = None
                    continue
                if not line or section is None or (section == "private" and not private):
                    continue
                rules.append(line.split()[0])  # a rule ends at the first whitespace
        return cls(rules)

    def _add(self, rule: str) -> None:
        exception = rule.startswith("!")
        labels = rule.lstrip("!").split(".")
        wildcard = labels[0] == "*"
        if wildcard:
            labels = labels[1:]
        if not labels or "" in labels or "*" in labels:
            return  # the list only has wildcards as the leftmost label
        node = self._root
        for label in reversed(labels):
            key = _ascii_label(label)
            child = node.children.get(key)
            if child is None:
                child = node.children[key] = _Node()
            node = child
        if exception:
            node.exception = True
        elif wildcard:
            node.wildcard = True
        else:
            node.rule = True

    def _suffix_length(self, keys: list[str]) -> int:
        """Number of labels of the public suffix of a name (keys: its lookup labels)."""
        length = 1
        node = self._root
        depth = 0
        for key in reversed(keys):
            depth += 1
            if node.wildcard:
                length = depth
            child = node.children.get(key)
            if child is None:
                break
            if child.exception:  # prevails over every other match
                return depth - 1
            if child.rule:
                length = depth
            node = child
        return length

    def _lookup_labels(self, name: str) -> tuple[str, str | None]:
        """lookup() of any name: split into labels (escapes, Unicode)."""
        labels = split_labels(name)
        if not labels:
            return ("", None)
        keys = [_ascii_label(label) for label in labels]
        labels = [label.lower() for label in labels]
        n = len(labels)
        k = max(self._suffix_length(keys), 1)
        return (".".join(labels[n - k :]), ".".join(labels[n - k - 1 :]) if k < n else None)

    def _lookup_plain(self, name: str) -> tuple[str, str | None]:
        """lookup() of an ASCII name without escapes (nearly every qname):
        walks the labels from the right with rfind and slices the answers out,
        so only the few labels the rules reach are looked at."""
        s = name.lower()
        if s.endswith("."):
            s = s[:-1]
        if not s or s[0] == "." or s[-1] == "." or ".." in s:
            return ("", None)
        node = self._root
        length = depth = 0
        starts = []  # starts[d - 1]: where the last d labels begin
        end = len(s)
        while True:
            dot = s.rfind(".", 0, end)
            depth += 1
            starts.append(dot + 1)
            if node.wildcard:
                length = depth
            child = node.children.get(s[dot + 1 : end])
            if child is None:
                break
            if child.exception:  # prevails over every other match
                length = depth - 1
                break
            if child.rule:
                length = depth
            if dot < 0:
                break
            node, end = child, dot
        start = starts[max(length, 1) - 1]
        if start == 0:
            return (s, None)
        return (s[start:], s[s.rfind(".", 0, start - 1) + 1 :])

    def lookup(self, name: str) -> tuple[str, str | None]:
        """(public suffix, registrable domain) of ``name``; ("", None) for the
        root and for names with an empty label."""
        hit = self._cache.get(name)
        if hit is not None:
            return hit
        if name.isascii() and "\\" not in name:
            result = self._lookup_plain(name)
        else:
            result = self._lookup_labels(name)
        if len(self._cache) >= _CACHE_SIZE:
            self._cache.clear()  # crude but O(1): the hot names come back at once
        self._cache[name] = result
        return result

    def public_suffix(self, name: str) -> str:
        """The public suffix ("co.uk"); "" for the root or a malformed name."""
        return self.lookup(name)[0]

    def registrable_domain(self, name: str) -> str | None:
        """The public suffix plus one label ("example.co.uk"); None when the name
        is a public suffix itself, the root, or malformed."""
        return self.lookup(name)[1]


_default: PublicSuffixList | None = None


def default() -> PublicSuffixList:
    """The bundled list, parsed once per process (every DoFn instance shares it)."""
    global _default
    if _default is None:
        _default = PublicSuffixList.load()
    return _default
