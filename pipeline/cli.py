"""The ``dnstap_receiver`` command: parse flags and config, run the pipeline,
shut down cleanly on SIGTERM/SIGINT.

Exit status: 0 after a clean shutdown, 2 for configuration and start-up
errors (bad config, port in use, unreadable TLS key), 1 if the pipeline fails.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import threading

from core import counters
from core.errors import ConfigError
from pipeline.arguments import apply_overrides, parse_args
from pipeline.config import Config, load_config, resolve_config_path
from pipeline.logs import import_beam_quietly, setup_logging

log = logging.getLogger("dnstap_receiver")

SHUTDOWN_DEADLINE = 30.0  # seconds after the first signal before a forced exit


def _format_counters() -> str:
    parts = []
    for group, values in counters.snapshot().items():
        shown = ", ".join(
            f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
            for k, v in values.items()
            if v and not isinstance(v, dict)
        )
        if shown:  # groups of transforms that are off stay silent
            parts.append(f"{group}: {shown}")
    return "; ".join(parts) or "nothing yet"


class _CounterLogger(threading.Thread):
    def __init__(self, interval: float) -> None:
        super().__init__(name="counter-log", daemon=True)
        self.interval = interval
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            log.info("counters %s", _format_counters())


def _install_signal_handlers(state: dict) -> None:
    """``state["hub"]`` is shut down on the first signal; it may still be None
    (inputs starting): ``main`` then shuts the hub down once it has it."""
    state["signalled"] = False

    def force_exit() -> None:
        log.error("shutdown did not finish within %.0f s; exiting", SHUTDOWN_DEADLINE)
        os._exit(1)

    def on_signal(signum, _frame) -> None:
        if state["signalled"]:
            log.warning("second %s: exiting now", signal.Signals(signum).name)
            os._exit(1)
        state["signalled"] = True
        log.info("%s received: stopping inputs and draining the pipeline", signal.Signals(signum).name)
        timer = threading.Timer(SHUTDOWN_DEADLINE, force_exit)
        timer.daemon = True
        timer.start()
        if state["hub"] is not None:
            state["hub"].shutdown()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


def _start_api(config: Config, spec):
    """The HTTP API over the live statistics store, or None when disabled."""
    web = config.web_api
    if not web.enable:
        return None
    from pipeline.http_api import ApiServer  # imported late: aiohttp is heavy to import
    from pipeline.stats_view import ReceiverStatsView
    from transforms.statistics import get_store

    st = config.statistics
    api = ApiServer(
        ReceiverStatsView(get_store(spec)),
        address=web.local_address,
        port=web.local_port,
        api_key=web.api_key,
        login=web.login,
        password=web.password,
        default_counters=list(st.default_counters),
        default_top=list(st.default_top),
        max_items=st.max_items,
    )
    api.start()
    return api


def main(argv: list[str] | None = None) -> int:
    args, beam_args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config = apply_overrides(load_config(args.c, require_input=False), args)
    except ConfigError as exc:
        print(f"dnstap_receiver: error: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.trace.file, config.trace.verbose)
    for flag, value in (("--replay-windows", args.replay_windows), ("--replay-workers", args.replay_workers)):
        if value and not args.replay:
            print(f"dnstap_receiver: error: {flag} needs --replay", file=sys.stderr)
            return 2
    if args.replay:
        import_beam_quietly()
        from pipeline.replay import run_replay

        return run_replay(config, args.replay, beam_args, windows_path=args.replay_windows,
                          workers=args.replay_workers)
    source = resolve_config_path(args.c)
    log.info("config: %s", source or "built-in defaults")

    import_beam_quietly()
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipeline.build import build_live_pipeline, hub_spec, stats_spec
    from sources.listener import get_hub

    # Handlers first: from the moment the inputs listen, a signal must drain, not kill.
    stop = {"hub": None}
    _install_signal_handlers(stop)
    try:
        options = PipelineOptions(beam_args)
        spec = hub_spec(config)
        pipeline = build_live_pipeline(config, options, spec)
        log.info("runner: %s", type(pipeline.runner).__name__)
        hub = get_hub(spec)
    except (ConfigError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    try:
        api = _start_api(config, stats_spec(config))
    except ConfigError as exc:
        log.error("%s", exc)
        hub.shutdown()
        return 2
    stop["hub"] = hub
    if stop["signalled"]:  # the signal came while the inputs were starting
        hub.shutdown()
    counters.register("input", hub.stats.snapshot)
    summary = None
    if config.trace.log_interval > 0:
        summary = _CounterLogger(config.trace.log_interval)
        summary.start()
    # Everything allocated so far (Beam, the graph) lives as long as the process:
    # keep it out of the collector's full passes, which otherwise rescan it.
    gc.freeze()
    log.info("receiver started")
    try:
        pipeline.run().wait_until_finish()
    except Exception:
        log.exception("pipeline failed")
        hub.shutdown()
        return 1
    finally:
        if summary is not None:
            summary.stop.set()
        if api is not None:
            api.stop()
    log.info("stopped; counters %s", _format_counters())
    return 0
