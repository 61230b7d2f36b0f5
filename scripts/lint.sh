#!/usr/bin/env bash
# Static checks: ruff (lint + format) and mypy --strict on the package.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check stream_st tests benchmarks examples
.venv/bin/ruff format --check stream_st tests
.venv/bin/mypy
