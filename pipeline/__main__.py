"""``python -m pipeline``: the dnstap receiver."""

from pipeline.cli import main

raise SystemExit(main())
