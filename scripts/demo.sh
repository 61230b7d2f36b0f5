#!/usr/bin/env bash
# Set up (once) and run the embedded demo: a small checkpoint served on 127.0.0.1, streamed and checked.
set -euo pipefail
cd "$(dirname "$0")/.."
STREAM_ST_SETUP_SERVERS=0 bash scripts/setup.sh
exec .venv/bin/stream-st demo "$@"
