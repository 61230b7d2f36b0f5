#!/usr/bin/env bash
# Run the whole test suite. The tests start (and stop) every server they need on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m pytest "$@"
