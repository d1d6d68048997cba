"""Hand-written pieces of the dnstap protobuf wire format, for the places that
build or patch messages without the protobuf library (core/packets.py writes
whole messages, sinks/dnstap.py rewrites the identity): a per-message parse
and serialise would cost more than the rest of their work."""

from __future__ import annotations

__all__ = ["IDENTITY_TAG", "identity_field", "varint"]

IDENTITY_TAG = 0x0A  # Dnstap.identity: field 1, wire type 2 (length-delimited)


def varint(n: int) -> bytes:
    """A non-negative integer as a protobuf varint."""
    if n < 0x80:  # the common case: one byte
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def identity_field(identity: str | bytes) -> bytes:
    """Field 1 of a Dnstap message holding ``identity`` (tag, length, value)."""
    value = identity.encode() if isinstance(identity, str) else bytes(identity)
    return bytes((IDENTITY_TAG,)) + varint(len(value)) + value
