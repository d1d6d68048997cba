"""Qname normalisation (config section ``normalize``), engine-free.

Lowercases the qname, removes its trailing dot, and adds the "tld" (public
suffix) and "registrable-domain" (eTLD+1) fields, as configured. Records are
changed in place: the stage runs on batches it owns, so copying them would
only cost time.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from core import psl as _psl
from core.message import UNKNOWN

if TYPE_CHECKING:  # pipeline.config imports core modules; keep core free of it at run time
    from pipeline.config import NormalizeOptions

__all__ = ["QnameNormalizer", "strip_trailing_dot"]

# Only A-Z: a qname is ASCII presentation text, and its escapes (\065, \.) are
# digits and punctuation, which lowercasing leaves alone anyway; non-ASCII text
# (never produced by the decoder) is not touched either.
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def strip_trailing_dot(qname: str) -> str:
    """``qname`` without its final dot; the root "." stays, and an escaped
    final dot (``a\\.``, a label ending in a dot) is part of the label."""
    if len(qname) < 2 or qname[-1] != ".":
        return qname
    if "\\" in qname:
        backslashes = len(qname) - 1 - len(qname[:-1].rstrip("\\"))
        if backslashes % 2:
            return qname
    return qname[:-1]


class QnameNormalizer:
    def __init__(
        self,
        lowercase: bool = False,
        trailing_dot: bool = True,
        add_tld: bool = False,
        add_registrable_domain: bool = False,
        psl: _psl.PublicSuffixList | None = None,
    ) -> None:
        self.lowercase = lowercase
        self.trailing_dot = trailing_dot
        self.add_tld = add_tld
        self.add_registrable_domain = add_registrable_domain
        self.active = lowercase or not trailing_dot or add_tld or add_registrable_domain
        self._psl = None
        if add_tld or add_registrable_domain:
            self._psl = psl if psl is not None else _psl.default()

    @classmethod
    def from_options(cls, options: NormalizeOptions, psl: _psl.PublicSuffixList | None = None) -> QnameNormalizer:
        return cls(
            lowercase=options.qname_lowercase,
            trailing_dot=options.qname_trailing_dot,
            add_tld=options.add_tld,
            add_registrable_domain=options.add_registrable_domain,
            psl=psl,
        )

    def apply(self, records: Iterable[dict]) -> None:
        """Normalise every record in place."""
        if not self.active:
            return
        lowercase, strip = self.lowercase, not self.trailing_dot
        add_tld, add_reg = self.add_tld, self.add_registrable_domain
        lookup = self._psl.lookup if self._psl is not None else None
        for rec in records:
            qname = rec["qname"]
            if qname == UNKNOWN:
                if add_tld:
                    rec["tld"] = UNKNOWN
                if add_reg:
                    rec["registrable-domain"] = UNKNOWN
                continue
            if lowercase:
                qname = qname.lower() if qname.isascii() else qname.translate(_ASCII_LOWER)
            if strip and qname[-1:] == "." and len(qname) > 1:
                # an escaped final dot (a\.) belongs to the label: rare, checked apart
                qname = qname[:-1] if "\\" not in qname else strip_trailing_dot(qname)
            rec["qname"] = qname
            if lookup is not None:
                suffix, registrable = lookup(qname)
                if add_tld:
                    rec["tld"] = suffix or UNKNOWN
                if add_reg:
                    rec["registrable-domain"] = registrable or UNKNOWN
