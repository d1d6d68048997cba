"""``--replay``: run the receiver's transforms and outputs over capture files.

Capture files -> decode -> the live transforms (build.add_transforms) -> the
live outputs (build.add_outputs); the pipeline is bounded, so the process
exits once the files are read and the outputs flushed.

Statistics use Beam's own event-time windowing on the message timestamps
(transforms.statistics.WindowStatistics) instead of the live store; the
per-window results are written as JSON lines to ``--replay-windows PATH``,
one line per window holding messages, oldest first:
{"start", "end", "counters" (all streams), "streams" {identity: counters},
"tables" (top 10, all streams)}. Without ``--replay-windows`` no windows are
computed (the GroupByKey they need is skipped) and only the summary is logged.

On the local runner the files are spread over worker processes (one per
core, at most one per file; ``--replay-workers``), each running the whole
chain for the files it is given: Beam's FnApiRunner with its workers in
subprocesses (pipeline/worker.py). The file and stdout outputs are safe to
share between processes (sinks/rotating.py); output.dnstap-file (one Frame
Streams stream per file) and output.metrics (per-process totals) are not, so
either keeps the replay in one process. Latency matching is per process: a
query and its response in files read by different workers are not paired.

The summary (files, messages, damaged files with offsets, seconds,
messages/s) is logged at the end, from the PipelineResult's metrics (so it
holds whatever process read the files), falling back on the process counters
when the runner reports no metrics. Exit status: 0 all files clean, 1 some
damaged (the others fully processed) or the pipeline failed, 2 usage errors
(a pattern matching no file, a bad config).
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

import apache_beam as beam
import orjson
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions
from apache_beam.transforms.window import GlobalWindows

from core import counters
from core.errors import ConfigError
from core.progress import ProgressBoard
from core.stats import WindowView
from pipeline.build import (
    LOCAL_RUNNERS,
    add_outputs,
    add_transforms,
    make_runner,
    needs_raw,
    stats_spec,
)
from pipeline.config import Config
from pipeline.worker import logging_env
from sinks.stdout import STDOUT_LOCK_ENV
from sources.capture_io import DAMAGE_METRIC, METRICS_NAMESPACE, ReadFromCaptures, expand_patterns
from transforms.decode import DecodeDnstap
from transforms.statistics import WindowStatistics

__all__ = ["ReplaySummary", "build_replay_pipeline", "replay_workers", "run_replay", "window_line"]

log = logging.getLogger("dnstap_receiver")

TOP_N = 10


def window_line(view: WindowView, top: int = TOP_N) -> bytes:
    """One window as a JSON line (see the module docstring)."""
    return orjson.dumps(
        {
            "start": view.start,
            "end": view.end,
            "counters": view.counters(),
            "streams": {name: view.counters(name) for name in view.streams()},
            "tables": view.tables(top),
        },
        option=orjson.OPT_NON_STR_KEYS,
    )


class _WriteWindows(beam.DoFn):
    def __init__(self, path: str) -> None:
        self._path = path

    def process(self, lines):
        # One element (all windows): one writer, lines in time order.
        tmp = f"{self._path}.tmp"
        with open(tmp, "wb") as fh:
            fh.writelines(line + b"\n" for _, line in sorted(lines))
        os.replace(tmp, self._path)
        yield len(lines)


class Progress(threading.Thread):
    """A status line on a terminal, redrawn twice a second: files done,
    messages, messages/s, read from the readers' ProgressBoard (whichever
    process they run in on this host)."""

    def __init__(self, board: ProgressBoard, out=None) -> None:
        super().__init__(name="replay-progress", daemon=True)
        self._board = board
        self._out = out or sys.stderr
        self._done = threading.Event()
        self._began = time.monotonic()
        self.start()

    def line(self) -> str:
        files, frames = self._board.totals()
        seconds = time.monotonic() - self._began
        rate = frames / seconds if seconds > 0 else 0.0
        return (f"replay: {files}/{self._board.slots} files, {frames:,} messages, "
                f"{rate:,.0f} messages/s, {seconds:.0f} s")

    def run(self) -> None:
        while not self._done.wait(0.5):
            self._out.write("\r" + self.line() + "\033[K")
            self._out.flush()

    def stop(self) -> None:
        self._done.set()
        self.join()
        self._out.write("\r\033[K")  # the summary lines follow
        self._out.flush()


# Outputs whose writers cannot be shared by several processes.
_ONE_PROCESS_OUTPUTS = (
    ("dnstap_file", "output.dnstap-file writes one Frame Streams stream per file"),
    ("metrics", "output.metrics counts per process"),
)


def replay_workers(config: Config, options: PipelineOptions, requested: int | None, files: int) -> int:
    """Worker processes for a replay of ``files`` files: ``requested`` or one
    per core, at most one per file; 1 off the local runner (that runner
    spreads the work itself), when the Beam options set the workers
    themselves, or when an enabled output cannot be shared."""
    if options.view_as(StandardOptions).runner not in LOCAL_RUNNERS or \
            "direct_num_workers" in options.get_all_options(drop_default=True):
        return 1
    workers = min(requested or os.cpu_count() or 1, files)
    if workers > 1:
        for section, why in _ONE_PROCESS_OUTPUTS:
            if getattr(config.output, section).enable:
                log.warning("replay: %s: replaying in one process", why)
                return 1
    return max(1, workers)


class _NoWorkerRelay(logging.Filter):
    """The runner logs every record of its workers again, in its own format;
    our workers log for themselves (pipeline/worker.py)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Worker: ")


class _NoModeWarning(logging.Filter):
    """Workers in subprocesses without direct_running_mode=multi_processing
    (which would start Beam's own worker entry point): the FnApiRunner warns
    that this mode is "in_memory"; it is not, our environment decides."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "direct_running_mode" not in str(record.msg)


_QUIETED: list[logging.Filter] = []


def _worker_runner(scratch: str):
    """The FnApiRunner with its workers in subprocesses running
    pipeline/worker.py; ``scratch``: a directory for the stdout lock file
    (sinks/stdout.py) that lives as long as the run."""
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner
    from apache_beam.transforms.environments import SubprocessSDKEnvironment

    lock = os.path.join(scratch, "stdout.lock")
    open(lock, "wb").close()
    os.environ.update(logging_env(*_log_settings()), **{STDOUT_LOCK_ENV: lock})
    if not _QUIETED:
        _QUIETED[:] = [_NoWorkerRelay(), _NoModeWarning()]
        logging.getLogger("apache_beam.runners.portability.local_job_service").addFilter(_QUIETED[0])
        logging.getLogger("apache_beam.runners.portability.fn_api_runner.fn_runner").addFilter(_QUIETED[1])
    command = f"{shlex.quote(sys.executable)} -m pipeline.worker"
    return FnApiRunner(default_environment=SubprocessSDKEnvironment.from_command_string(command))


def _log_settings() -> tuple[str | None, bool]:
    """The main process's log file (None: standard error) and verbosity."""
    file = next((h.baseFilename for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)), None)
    return file, log.getEffectiveLevel() <= logging.DEBUG


def build_replay_pipeline(
    config: Config, options: PipelineOptions, patterns: list[str], scratch: str, windows_path: str | None = None,
    workers: int = 1, progress_path: str | None = None,
) -> tuple[beam.Pipeline, list[str]]:
    """The replay pipeline and the files it reads, run by ``workers`` local
    worker processes (1: in this process); ``scratch``: a directory for the
    run's own files. NoCaptureMatch (a ConfigError) if a pattern matches no
    file, ConfigError for transforms' bad files."""
    # pcap files: the sniffer's settings say which ports are DNS and the identity.
    sniffer = config.input.sniffer
    source = ReadFromCaptures(patterns, batch_size=config.input.batch_size,
                              dns_ports=frozenset(sniffer.dns_port),
                              pcap_identity=sniffer.dnstap_identity,
                              progress_path=progress_path)
    if workers > 1:
        options.view_as(DirectOptions).direct_num_workers = workers
        runner = _worker_runner(scratch)
    else:
        runner = make_runner(options)
    p = beam.Pipeline(runner=runner, options=options)
    records = (
        p
        | "ReadFromCaptures" >> source
        # Forwarding dnstap needs each message's original bytes.
        | "DecodeDnstap" >> DecodeDnstap(keep_raw=needs_raw(config))
    )
    records = add_transforms(records, config)
    if windows_path:
        (
            records
            | "WindowStatistics" >> WindowStatistics(config.statistics.window, stats_spec(config).config())
            | "WindowLine" >> beam.Map(lambda view: (view.start, window_line(view)))
            | "GlobalWindow" >> beam.WindowInto(GlobalWindows())
            | "AllWindows" >> beam.combiners.ToList()
            | "WriteWindows" >> beam.ParDo(_WriteWindows(windows_path))
        )
    add_outputs(records, config)
    return p, source.paths


@dataclass
class ReplaySummary:
    files: int = 0
    frames: int = 0
    decoded: int = 0
    damaged: int = 0  # files
    damage: list[tuple[str, int, str]] = field(default_factory=list)
    seconds: float = 0.0

    def lines(self, expected_files: int) -> list[str]:
        rate = self.frames / self.seconds if self.seconds > 0 else 0.0
        head = (
            f"replay summary: {self.files}/{expected_files} files, {self.frames} messages "
            f"({self.decoded} decoded) in {self.seconds:.2f} s ({rate:.0f} messages/s), "
            f"{max(self.damaged, len(self.damage))} damaged"
        )
        out = [head]
        for path, offset, reason in sorted(self.damage):
            out.append(f"replay summary: damaged: {path} at offset {offset}: {reason}")
        return out


def _committed(result) -> object:
    return result.committed if result.committed is not None else result.attempted


def summarize(result, seconds: float, before: dict) -> ReplaySummary:
    """From the PipelineResult's metrics; from the process counters (deltas
    over ``before``) if the runner returned none."""
    summary = ReplaySummary(seconds=seconds)
    try:
        metrics = result.metrics().query(MetricsFilter())
    except Exception:  # noqa: BLE001  a runner without metrics support
        metrics = {}
    found = False
    for res in metrics.get("counters", []):
        ns, name = res.key.metric.namespace, res.key.metric.name
        value = _committed(res) or 0
        if name == "damaged_files":
            name = "damaged"
        if ns == METRICS_NAMESPACE and name in ("files", "frames", "damaged"):
            setattr(summary, name, getattr(summary, name) + value)
            found = True
        elif ns == "dnstap_receiver" and name == "decoded":
            summary.decoded += value
    damage = set()
    for res in metrics.get("string_sets", []):
        if res.key.metric.namespace == METRICS_NAMESPACE and res.key.metric.name.startswith(DAMAGE_METRIC):
            damage.update(_committed(res) or ())
    for item in damage:
        path, offset, reason = item.split("\t", 2)
        summary.damage.append((path, int(offset), reason))
    if not found:
        group = counters.snapshot().get(METRICS_NAMESPACE, {})
        summary.files = group.get("files", 0) - before.get("files", 0)
        summary.frames = group.get("frames", 0) - before.get("frames", 0)
        decode = counters.snapshot().get("decode", {})
        summary.decoded = decode.get("decoded", 0) - before.get("decoded", 0)
        # No details without metrics: the reader logged each damaged file.
        summary.damaged = group.get("damaged_files", 0) - before.get("damaged_files", 0)
    return summary


def run_replay(config: Config, patterns: list[str], beam_args: list[str], windows_path: str | None = None,
               workers: int | None = None) -> int:
    """``workers``: worker processes on the local runner (None: one per core)."""
    options = PipelineOptions(beam_args)
    with tempfile.TemporaryDirectory(prefix="dnstap-replay-") as scratch:
        board_path = os.path.join(scratch, "progress") if sys.stderr.isatty() else None
        try:
            count = replay_workers(config, options, workers, len(expand_patterns(patterns)))
            pipeline, paths = build_replay_pipeline(config, options, patterns, scratch, windows_path, count,
                                                    board_path)
        except (ConfigError, ValueError) as exc:
            log.error("%s", exc)
            return 2
        where = f"{count} worker processes" if count > 1 else type(pipeline.runner).__name__
        log.info("replay: %d file(s) on %s: %s", len(paths), where, ", ".join(paths))
        group = counters.snapshot()
        before = {**group.get(METRICS_NAMESPACE, {}), "decoded": group.get("decode", {}).get("decoded", 0)}
        started = time.monotonic()
        board = ProgressBoard(board_path, len(paths), create=True) if board_path else None
        progress = Progress(board) if board else None
        try:
            result = pipeline.run()
            result.wait_until_finish()
        except Exception:
            log.exception("replay pipeline failed")
            return 1
        finally:
            os.environ.pop(STDOUT_LOCK_ENV, None)
            if progress is not None:
                progress.stop()
                board.close()
    summary = summarize(result, time.monotonic() - started, before)
    for line in summary.lines(len(paths)):
        log.info("%s", line)
    if windows_path:
        log.info("replay: windows written to %s", windows_path)
    return 1 if summary.damaged or summary.damage else 0
