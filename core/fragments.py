"""IP fragments put back together into datagrams, no engine.

DNS over UDP is fragmented when a response is larger than the path MTU
(EDNS buffers up to 4,096 bytes, DNSSEC answers, large TXT sets): without
reassembly a sniffer or a pcap replay loses exactly those responses, and
their queries look unanswered.

:class:`Reassembler` follows Linux (net/ipv4/inet_fragment.c): an exact
duplicate of a fragment is ignored, any other overlap discards the whole
datagram (RFC 5722 for IPv6; Linux does the same for IPv4), every fragment
but the last must carry a multiple of 8 bytes, and a datagram may not pass
65,535 bytes. State is bounded: at most ``max_datagrams`` datagrams and
``max_bytes`` bytes held (the oldest datagram goes first), ``MAX_FRAGMENTS``
fragments per datagram, and a datagram still incomplete ``timeout`` seconds
after its first fragment (packet clock) is discarded.

A discarded datagram, or one the caller rejected (its first fragment showed
it is not DNS), stays known until it times out, so its later fragments are
dropped at once instead of starting a new datagram that would wait for its
timeout.

Counts go to the caller's ``stats`` (core.packets.PacketStats):
``fragments`` (read), ``fragments_reassembled`` (datagrams completed) and
``fragments_dropped`` (fragments that made no datagram).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from core.packets import PacketStats

__all__ = [
    "DEFAULT_FRAGMENT_TIMEOUT",
    "DEFAULT_MAX_DATAGRAMS",
    "DEFAULT_MAX_FRAGMENT_BYTES",
    "MAX_FRAGMENTS",
    "Reassembler",
]

DEFAULT_MAX_DATAGRAMS = 4096
DEFAULT_MAX_FRAGMENT_BYTES = 8 * 1024 * 1024
# Linux waits 30 s, but the fragments of a datagram leave back to back, and
# what never completes here is mostly other traffic's later fragments (they
# carry no ports for the sniffer's kernel filter to look at): a short wait
# keeps them from crowding out DNS datagrams.
DEFAULT_FRAGMENT_TIMEOUT = 5.0
# A 64 KiB datagram in 1,280-byte IPv6 fragments takes 52.
MAX_FRAGMENTS = 64
_MAX_DATAGRAM = 65_535


class _Datagram:
    """Fragments of one datagram: payloads by offset, the bytes they hold,
    the datagram's length once its last fragment is seen (else -1), and
    ``parts`` None once the datagram is dead (discarded or rejected)."""

    __slots__ = ("first", "held", "parts", "total")

    def __init__(self, first: float) -> None:
        self.first = first
        self.parts: dict[int, bytes] | None = {}
        self.held = 0
        self.total = -1


class Reassembler:
    def __init__(
        self,
        stats: PacketStats,
        *,
        max_datagrams: int = DEFAULT_MAX_DATAGRAMS,
        max_bytes: int = DEFAULT_MAX_FRAGMENT_BYTES,
        timeout: float = DEFAULT_FRAGMENT_TIMEOUT,
    ) -> None:
        if max_datagrams < 1 or max_bytes < 1:
            raise ValueError("max_datagrams and max_bytes must be >= 1")
        self.stats = stats
        self.max_datagrams = max_datagrams
        self.max_bytes = max_bytes
        self.timeout = float(timeout)
        self._pending: dict[tuple, _Datagram] = {}  # in order of first fragment: oldest first
        self._bytes = 0
        self._sweep_at = 0.0

    def add(self, key: tuple, offset: int, more: bool, payload: bytes, now: float) -> bytes | None:
        """The fragment of datagram ``key`` at byte ``offset`` (``more``: not
        the last), seen at ``now``; the whole datagram's payload when this
        fragment completes it, else None."""
        self.stats.fragments += 1
        if now >= self._sweep_at:
            self.expire(now)
        d = self._pending.get(key)
        if d is None:
            d = self._new(key, now)
        parts = d.parts
        if parts is None:
            self.stats.fragments_dropped += 1
            return None
        size = len(payload)
        end = offset + size
        if (more and (size % 8 or not size)) or end > _MAX_DATAGRAM:
            return self._kill(d)
        if not more:
            if (d.total >= 0 and d.total != end) or any(o + len(p) > end for o, p in parts.items()):
                return self._kill(d)
            d.total = end
        elif 0 <= d.total < end:
            return self._kill(d)
        same = parts.get(offset)
        if same is not None and len(same) == size:
            self.stats.fragments_dropped += 1  # a duplicate
            return None
        for o, p in parts.items():
            if o < end and offset < o + len(p):
                return self._kill(d)
        if len(parts) >= MAX_FRAGMENTS:
            return self._kill(d)
        parts[offset] = payload
        d.held += size
        self._bytes += size
        # Parts never overlap and all lie below total: held == total means complete.
        if d.held == d.total:
            del self._pending[key]
            self._bytes -= d.held
            self.stats.fragments_reassembled += 1
            return b"".join([parts[o] for o in sorted(parts)])
        while self._bytes > self.max_bytes:
            self._drop_oldest()
        return None

    def reject(self, key: tuple, now: float) -> None:
        """Datagram ``key`` is not wanted (its first fragment showed it is not
        DNS): what it holds is dropped, and so will its later fragments be."""
        self.stats.fragments += 1
        d = self._pending.get(key)
        if d is None:
            d = self._new(key, now)
        self._free(d)

    def expire(self, now: float) -> None:
        """Discard the datagrams whose first fragment is older than ``now - timeout``."""
        limit = now - self.timeout
        pending = self._pending
        while pending:
            key = next(iter(pending))
            if pending[key].first >= limit:
                break
            self._free(pending.pop(key))
        self._sweep_at = now + min(self.timeout, 1.0)

    def close(self) -> None:
        """End of the capture: what is held made no datagram."""
        for d in self._pending.values():
            self._free(d)
        self._pending.clear()

    @property
    def datagrams(self) -> int:
        """Datagrams held now (dead ones included)."""
        return len(self._pending)

    @property
    def held_bytes(self) -> int:
        return self._bytes

    def _new(self, key: tuple, now: float) -> _Datagram:
        while len(self._pending) >= self.max_datagrams:
            self._drop_oldest()
        d = self._pending[key] = _Datagram(now)
        return d

    def _drop_oldest(self) -> None:
        pending = self._pending
        self._free(pending.pop(next(iter(pending))))

    def _kill(self, d: _Datagram) -> None:
        self.stats.fragments_dropped += 1  # this fragment
        self._free(d)

    def _free(self, d: _Datagram) -> None:
        if d.parts:
            self.stats.fragments_dropped += len(d.parts)
            self._bytes -= d.held
        d.parts = None
        d.held = 0
