#!/usr/bin/env bash
# Start Azurite's Blob service in the background, bound to 127.0.0.1:PORT only.
#
#   azurite/start.sh [PORT]          # PORT defaults to 10000
#
# HTTPS with OAuth (bearer tokens): set AZURITE_CERT and AZURITE_KEY to PEM files (certificate, key);
# Azurite then serves https:// and accepts Entra ID tokens ("--oauth basic": audience, issuer and expiry
# are checked, the token's signature is not). Without them it serves plain http://.
#
# Everything of one run lives in a fresh run directory (pid, port, log, blob data): $AZURITE_RUN_DIR if set
# (created if missing), else mktemp -d under ${TMPDIR:-/tmp}. It is printed as the last line
# ("RUN_DIR=...") and recorded in ${TMPDIR:-/tmp}/stream-st-azurite-PORT.rundir so that `stop.sh PORT`
# finds it. Exits 0 once Azurite answers on the port (timeout: AZURITE_START_TIMEOUT, default 30 s);
# otherwise stops what it started, prints the log tail and exits 1.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
EXE="$HERE/node_modules/.bin/azurite-blob"
PORT="${1:-10000}"
TIMEOUT="${AZURITE_START_TIMEOUT:-30}"
STATE_BASE="${TMPDIR:-/tmp}"
POINTER="$STATE_BASE/stream-st-azurite-$PORT.rundir"

die() { echo "start.sh: $*" >&2; exit 1; }

[[ "$PORT" =~ ^[0-9]+$ ]] && [ "$PORT" -ge 1 ] && [ "$PORT" -le 65535 ] || die "bad port '$PORT'"
[ -x "$EXE" ] || die "Azurite is not installed in $HERE/node_modules; run azurite/install.sh first"
# Refuse a busy port: otherwise the readiness check could talk to somebody else's server.
if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
    die "port $PORT on 127.0.0.1 is already in use (another Azurite? try: azurite/stop.sh $PORT)"
fi

if [ -n "${AZURITE_RUN_DIR:-}" ]; then
    RUN_DIR="$AZURITE_RUN_DIR"
    mkdir -p "$RUN_DIR"
else
    RUN_DIR="$(mktemp -d "$STATE_BASE/stream-st-azurite.$PORT.XXXXXX")"
fi
RUN_DIR="$(cd "$RUN_DIR" && pwd)"
mkdir -p "$RUN_DIR/data"
LOG="$RUN_DIR/azurite.log"
echo "$PORT" > "$RUN_DIR/port"

# --skipApiVersionCheck: azure-storage-blob 12.31 (and adlfs through it) speaks REST version 2026-10-06,
# newer than Azurite 3.37 knows, which it would refuse.
ARGS=(--blobHost 127.0.0.1 --blobPort "$PORT" --location "$RUN_DIR/data" --disableTelemetry --silent --skipApiVersionCheck)
SCHEME=http
if [ -n "${AZURITE_CERT:-}" ] || [ -n "${AZURITE_KEY:-}" ]; then
    [ -f "${AZURITE_CERT:-}" ] && [ -f "${AZURITE_KEY:-}" ] || die "AZURITE_CERT and AZURITE_KEY must both name PEM files"
    ARGS+=(--cert "$AZURITE_CERT" --key "$AZURITE_KEY" --oauth basic)
    SCHEME=https
fi

# setsid: Azurite (node) leads its own process group, so stop.sh can signal all of it.
setsid "$EXE" "${ARGS[@]}" </dev/null >"$LOG" 2>&1 &
PID=$!
echo "$PID" > "$RUN_DIR/pid"
echo "$RUN_DIR" > "$POINTER"

fail() {
    echo "start.sh: $*" >&2
    echo "----- last lines of $LOG -----" >&2
    tail -n 40 "$LOG" >&2 || true
    echo "------------------------------" >&2
    "$HERE/stop.sh" "$RUN_DIR" >/dev/null 2>&1 || true
    exit 1
}

# Ready: Azurite logged that it listens and the port accepts a connection.
deadline=$(( SECONDS + TIMEOUT ))
until grep -q "successfully listens" "$LOG" 2>/dev/null && (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; do
    kill -0 "$PID" 2>/dev/null || fail "Azurite (pid $PID) exited during start-up"
    [ "$SECONDS" -lt "$deadline" ] || fail "Azurite did not listen on 127.0.0.1:$PORT within ${TIMEOUT}s"
    sleep 0.1
done
echo "start.sh: Azurite Blob service ready at $SCHEME://127.0.0.1:$PORT/devstoreaccount1 (pid $PID)"
echo "RUN_DIR=$RUN_DIR"
