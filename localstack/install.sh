#!/usr/bin/env bash
# Create localstack/.venv with LocalStack's host-mode runtime (S3 only is used).
# Idempotent: does nothing when the venv already imports localstack at the pinned version.
# LocalStack needs Python >= 3.12 (on 3.11 it fails with a misleading "No component plugins found").
# Override the interpreter with LOCALSTACK_PYTHON=/path/to/python3.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$HERE/.venv"
LOCALSTACK_VERSION="2026.3.0"
# Pins that made it start (found by trial on these machines; see localstack/README.md).
PINS=('cbor2<6' 'pyopenssl<26' 'cryptography>=45.0.1,<47' 'service_identity')

ok_python() {  # prints the path and succeeds if "$1" runs and is Python >= 3.12
    local py="$1"
    [ -n "$py" ] || return 1
    "$py" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1 || return 1
    echo "$py"
}

find_python() {
    if [ -n "${LOCALSTACK_PYTHON:-}" ]; then
        ok_python "$LOCALSTACK_PYTHON" && return 0
        echo "install.sh: LOCALSTACK_PYTHON=$LOCALSTACK_PYTHON is not a working Python >= 3.12" >&2
        return 1
    fi
    local c
    for c in python3.13 python3.12; do
        if command -v "$c" >/dev/null 2>&1; then ok_python "$(command -v "$c")" && return 0; fi
    done
    for c in /root/.pyenv/versions/3.13*/bin/python3 /root/.pyenv/versions/3.12*/bin/python3 \
             "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.13*/bin/python3 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3; do
        [ -x "$c" ] && ok_python "$c" && return 0
    done
    # Last resort: plain python3 if it happens to be new enough.
    command -v python3 >/dev/null 2>&1 && ok_python "$(command -v python3)" && return 0
    echo "install.sh: no Python >= 3.12 found (set LOCALSTACK_PYTHON, or install python3.12/3.13)" >&2
    return 1
}

installed() {
    [ -x "$VENV/bin/python" ] && "$VENV/bin/python" - "$LOCALSTACK_VERSION" >/dev/null 2>&1 <<'PY'
import sys
from importlib.metadata import version
import localstack.runtime.main  # noqa: F401  (importable)
sys.exit(0 if version("localstack-core") == sys.argv[1] else 1)
PY
}

if installed; then
    echo "install.sh: localstack-core $LOCALSTACK_VERSION already installed in $VENV"
    exit 0
fi

PY="$(find_python)"
echo "install.sh: using $PY ($("$PY" -c 'import sys; print(sys.version.split()[0])'))"
rm -rf "$VENV"
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    "localstack-core[runtime]==$LOCALSTACK_VERSION" "${PINS[@]}"
if ! installed; then
    echo "install.sh: localstack installed but not importable from $VENV" >&2
    exit 1
fi
echo "install.sh: installed localstack-core $LOCALSTACK_VERSION in $VENV"
