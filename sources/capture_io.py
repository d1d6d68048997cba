"""ReadFromCaptures: a bounded Beam source of Frame Streams capture files.

Patterns (globs or paths) are expanded when the transform is built, so that a
pattern matching nothing is a usage error before anything runs. Each file is
read by a DoFn (core/capture.py) into ``FrameBatch`` elements. A damaged file
(truncated, corrupt, not a dnstap capture, unreadable) is logged with its
name and offset, its frames before the damage are still emitted, and the
other files go on.

What happened is counted twice: in Beam metrics (namespace ``replay``:
counters ``files``, ``frames``, ``damaged_files``; string set ``damage``
holding "path\\toffset\\treason"), which the PipelineResult brings back to
the main process whatever runner ran the workers; and in the process counter
group "replay" (core.counters) for the periodic counters line of an
in-process runner.
"""

from __future__ import annotations

import glob
import logging
import os
import zlib

import apache_beam as beam
from apache_beam.metrics import Metrics

import transforms.batches  # noqa: F401  registers the FrameBatch coder
from core import counters
from core.batches import FrameBatch
from core.capture import (
    DEFAULT_BATCH_SIZE,
    MAX_CAPTURE_FRAME_SIZE,
    CaptureDamage,
    Damaged,
    open_capture,
    read_frames,
)
from core.errors import ConfigError
from core.pcap import PcapReader, is_pcap, read_pcap
from core.progress import ProgressBoard

__all__ = ["DAMAGE_METRIC", "METRICS_NAMESPACE", "NoCaptureMatch", "ReadFromCaptures", "expand_patterns"]

log = logging.getLogger("dnstap_receiver.replay")

METRICS_NAMESPACE = "replay"
DAMAGE_METRIC = "damage."  # + the file's index: "path\toffset\treason"
STATS = counters.counter_group(METRICS_NAMESPACE)


class NoCaptureMatch(ConfigError):
    """A --replay pattern matches no file."""


def expand_patterns(patterns: list[str]) -> list[str]:
    """The files matched by ``patterns`` (globs, ``**`` included), sorted per
    pattern, each once, in pattern order. NoCaptureMatch names the first
    pattern that matches no file."""
    if not patterns:
        raise NoCaptureMatch("no capture file pattern given")
    paths: list[str] = []
    seen: set[str] = set()
    for pattern in patterns:
        found = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))
        if not found:
            raise NoCaptureMatch(f"--replay {pattern}: no file matches")
        for path in found:
            key = os.path.realpath(path)
            if key not in seen:
                seen.add(key)
                paths.append(path)
    return paths


class _ReadCaptureFn(beam.DoFn):
    def __init__(self, batch_size: int, max_frame_size: int, dns_ports: frozenset[int], identity: str,
                 progress: tuple[str, int] | None) -> None:
        self._batch_size = batch_size
        self._max_frame_size = max_frame_size
        self._dns_ports = dns_ports
        self._identity = identity
        self._progress = progress

    def setup(self) -> None:
        self._files = Metrics.counter(METRICS_NAMESPACE, "files")
        self._frames = Metrics.counter(METRICS_NAMESPACE, "frames")
        self._damaged = Metrics.counter(METRICS_NAMESPACE, "damaged_files")
        self._board = ProgressBoard.attach(*self._progress) if self._progress else None

    def teardown(self) -> None:
        if self._board is not None:
            self._board.close()

    def _reader(self, stream, path: str):
        """(reader for the file's format, None), told by its first bytes, or
        (None, CaptureDamage) when they cannot be read (a gzip file cut or
        corrupt in its first block)."""
        try:
            head = stream.peek(4)[:4]
        except (OSError, EOFError, zlib.error) as exc:
            return None, CaptureDamage(path, 0, Damaged.unreadable(0, exc).reason)
        if is_pcap(head):  # DNS packets, turned into CLIENT_QUERY/CLIENT_RESPONSE messages
            return read_pcap(stream, path, dns_ports=self._dns_ports, identity=self._identity,
                             batch_size=self._batch_size), None
        return read_frames(stream, path, self._batch_size, self._max_frame_size), None

    def process(self, element: tuple[int, str]):
        index, path = element
        board = self._board
        frames = 0
        reader = None
        try:
            stream = open_capture(path)
        except OSError as exc:
            damage = CaptureDamage(path, 0, f"cannot open: {exc.strerror or exc}")
        else:
            with stream:
                reader, damage = self._reader(stream, path)
                if reader is not None:
                    for batch in reader:
                        frames += len(batch)
                        # Counted as they go: a failure later in the file keeps these.
                        self._frames.inc(len(batch))
                        STATS["frames"] += len(batch)
                        if board is not None:
                            board.report(index, frames)
                        yield batch
                    damage = reader.damage
        self._files.inc()
        STATS["files"] += 1
        if board is not None:
            board.report(index, frames, done=True)
        if isinstance(reader, PcapReader):
            stats = reader.stats.as_dict()
            log.info("replay: %s: %s", path, ", ".join(f"{k}={v}" for k, v in stats.items() if v))
        if damage is None:
            log.info("replay: %s: %d frames", path, frames)
            return
        self._damaged.inc()
        # One metric per file: the FnApiRunner keeps a single value per
        # metric key across bundles (it has no merge for string sets), so a
        # shared key would lose the damage found by other worker processes.
        Metrics.string_set(METRICS_NAMESPACE, f"{DAMAGE_METRIC}{index}").add(
            f"{damage.path}\t{damage.offset}\t{damage.reason}")
        STATS["damaged_files"] += 1
        log.error("replay: %s: damaged at offset %d: %s (%d frames read before)",
                  damage.path, damage.offset, damage.reason, frames)


class ReadFromCaptures(beam.PTransform):
    """Capture files -> ``FrameBatch`` elements of at most ``batch_size``
    dnstap payloads. ``patterns``: paths or globs; NoCaptureMatch (a
    ConfigError) at construction if one matches no file.

    Frame Streams captures give their payloads; pcap and pcapng files
    (core/pcap.py, recognised by content) give a CLIENT_QUERY or
    CLIENT_RESPONSE message with ``pcap_identity`` per DNS message to or from
    one of ``dns_ports``. ``progress_path``: a core.progress.ProgressBoard
    with a slot per file, in the order of ``paths``, that the readers fill in."""

    def __init__(
        self,
        patterns: list[str],
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_frame_size: int = MAX_CAPTURE_FRAME_SIZE,
        dns_ports: frozenset[int] = frozenset({53}),
        pcap_identity: str = "pcap",
        progress_path: str | None = None,
        label: str | None = None,
    ) -> None:
        super().__init__(label)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        self.paths = expand_patterns(list(patterns))
        self._batch_size = batch_size
        self._max_frame_size = max_frame_size
        self._dns_ports = frozenset(dns_ports)
        self._identity = pcap_identity
        self._progress = (progress_path, len(self.paths)) if progress_path else None

    def expand(self, pbegin):
        return (
            pbegin
            | "Paths" >> beam.Create(list(enumerate(self.paths)))
            # One file per element: the runner may spread files over workers.
            | "Reshuffle" >> beam.Reshuffle()
            | "Read" >> beam.ParDo(
                _ReadCaptureFn(self._batch_size, self._max_frame_size, self._dns_ports, self._identity,
                               self._progress)).with_output_types(FrameBatch)
        )
