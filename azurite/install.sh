#!/usr/bin/env bash
# Install Azurite (the Azure Storage emulator, npm package "azurite") into azurite/node_modules.
# Idempotent: does nothing when the pinned version is already there. Needs node and npm (Node.js >= 18).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
AZURITE_VERSION="3.37.0"
PACKAGE="$HERE/node_modules/azurite/package.json"

installed() {
    [ -x "$HERE/node_modules/.bin/azurite-blob" ] && [ -f "$PACKAGE" ] &&
        grep -q "\"version\": \"$AZURITE_VERSION\"" "$PACKAGE"
}

if installed; then
    echo "install.sh: azurite $AZURITE_VERSION already installed in $HERE/node_modules"
    exit 0
fi
command -v npm >/dev/null 2>&1 || { echo "install.sh: npm is not installed (apt-get install nodejs npm)" >&2; exit 1; }
command -v node >/dev/null 2>&1 || { echo "install.sh: node is not installed (apt-get install nodejs)" >&2; exit 1; }
# --prefix keeps it in this folder (git-ignored), never global; no audit or funding calls.
npm install --silent --no-audit --no-fund --no-save --prefix "$HERE" "azurite@$AZURITE_VERSION" >&2
if ! installed; then
    echo "install.sh: npm finished but azurite $AZURITE_VERSION is not in $HERE/node_modules" >&2
    exit 1
fi
echo "install.sh: installed azurite $AZURITE_VERSION in $HERE/node_modules"
