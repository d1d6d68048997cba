"""Entry point of the worker processes of a replay spread over several
processes (pipeline/replay.py): Beam's SDK harness, logging as the receiver
does.

Run by the FnApiRunner as ``python -m pipeline.worker`` instead of Beam's
``apache_beam.runners.worker.sdk_worker_main``, which would print its own
start-up chatter at INFO in another format. The receiver's log settings come
from the environment the runner passes on (``LOGGING_ENV``, set by the main
process).
"""

from __future__ import annotations

import json
import logging
import os
import sys

from pipeline.logs import import_beam_quietly, setup_logging

LOGGING_ENV = "DNSTAP_RECEIVER_WORKER_LOGGING"


def logging_env(file: str | None, verbose: bool) -> dict[str, str]:
    """The environment entry that gives the workers the main process's log settings."""
    return {LOGGING_ENV: json.dumps({"file": file, "verbose": verbose})}


def main() -> None:
    settings = json.loads(os.environ.get(LOGGING_ENV) or "{}")
    setup_logging(settings.get("file"), bool(settings.get("verbose")))
    import_beam_quietly()
    from apache_beam.runners.worker import sdk_worker_main

    # It warns that a directory only Dataflow's containers provide is missing.
    logging.getLogger(sdk_worker_main.__name__).setLevel(logging.ERROR)

    sdk_worker_main.main(sys.argv)


if __name__ == "__main__":
    main()
