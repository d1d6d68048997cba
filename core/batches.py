"""The element types of the pipeline: many messages per element.

Per-element overhead dominates at one message per element, so every stage
passes lists: raw frames from the sources, decoded records after decoding.
Distinct list types let the Beam layer attach a cheap coder to them
(transforms/batches.py).
"""

__all__ = ["FrameBatch", "RecordBatch"]


class FrameBatch(list):
    """Raw dnstap protobuf frames (bytes)."""

    __slots__ = ()


class RecordBatch(list):
    """Decoded records (core.message.DnstapRecord)."""

    __slots__ = ()
