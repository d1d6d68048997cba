#!/usr/bin/env bash
# Set up .venv from requirements.txt and run the receiver with the default
# configuration (TCP 0.0.0.0:6000 -> stdout, text), or with your arguments:
#   ./run_local.sh -c my.conf -v
set -euo pipefail
cd "$(dirname "$0")"
. scripts/ensure_venv.sh
ensure_venv
exec .venv/bin/python -m pipeline --runner=DirectRunner "$@"
