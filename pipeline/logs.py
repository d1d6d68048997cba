"""The receiver's logging, set up the same way in the main process and in
the worker processes of a replay (pipeline/worker.py)."""

from __future__ import annotations

import logging
import sys

__all__ = ["LOG_FORMAT", "import_beam_quietly", "setup_logging"]

LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"


def setup_logging(file: str | None, verbose: bool) -> None:
    """Our records at INFO (DEBUG if ``verbose``), everything else from
    WARNING, to ``file`` or standard error."""
    handler: logging.Handler = logging.FileHandler(file) if file else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("dnstap_receiver").setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.getLogger("apache_beam").setLevel(logging.WARNING)


def import_beam_quietly() -> None:
    # Importing Beam logs warnings about optional cloud client libraries on the root logger.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        import apache_beam  # noqa: F401
    finally:
        root.setLevel(level)
