#!/usr/bin/env bash
# Start LocalStack (S3 only) in host mode, in the background, bound to 127.0.0.1:PORT only.
#
#   localstack/start.sh [PORT]          # PORT defaults to 4566
#
# Everything of one run lives in a fresh run directory (pid, log, object storage, tmp):
#   $LOCALSTACK_RUN_DIR if set (created if missing), else mktemp -d under ${TMPDIR:-/tmp}.
# The run directory is printed as the last line ("RUN_DIR=...") and recorded in
# ${TMPDIR:-/tmp}/stream-st-localstack-PORT.rundir so that `stop.sh PORT` finds it.
# Exits 0 once /_localstack/health reports s3 available (timeout: LOCALSTACK_START_TIMEOUT, default 60 s);
# otherwise stops what it started, prints the log tail and exits 1.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$HERE/.venv"
PY="$VENV/bin/python"
PORT="${1:-4566}"
TIMEOUT="${LOCALSTACK_START_TIMEOUT:-60}"
STATE_BASE="${TMPDIR:-/tmp}"
POINTER="$STATE_BASE/stream-st-localstack-$PORT.rundir"

die() { echo "start.sh: $*" >&2; exit 1; }

[[ "$PORT" =~ ^[0-9]+$ ]] && [ "$PORT" -ge 1 ] && [ "$PORT" -le 65535 ] || die "bad port '$PORT'"
[ -x "$PY" ] || die "no LocalStack venv at $VENV; run localstack/install.sh first"

# Refuse a busy port: otherwise the health check could talk to somebody else's server.
if ! "$PY" - "$PORT" <<'PY'
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers do not count, a listener does
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)
finally:
    s.close()
PY
then
    die "port $PORT on 127.0.0.1 is already in use (another LocalStack? try: localstack/stop.sh $PORT)"
fi

if [ -n "${LOCALSTACK_RUN_DIR:-}" ]; then
    RUN_DIR="$LOCALSTACK_RUN_DIR"
    mkdir -p "$RUN_DIR"
else
    RUN_DIR="$(mktemp -d "$STATE_BASE/stream-st-localstack.$PORT.XXXXXX")"
fi
RUN_DIR="$(cd "$RUN_DIR" && pwd)"
mkdir -p "$RUN_DIR/s3" "$RUN_DIR/tmp" "$RUN_DIR/fs"
LOG="$RUN_DIR/localstack.log"
echo "$PORT" > "$RUN_DIR/port"

# setsid: LocalStack becomes the leader of its own process group (PGID == PID), so stop.sh can
# signal the whole group. In a non-interactive shell the background child is not a group leader,
# so setsid does not fork and $! is LocalStack's own PID.
# The S3 provider keeps object bytes under a hard-coded /tmp/localstack-s3-storage shared by every
# LocalStack on the machine (two runs creating the same bucket collide); the launcher points it at
# the run directory instead, falling back to the default with a warning if that attribute moves.
# S3_SKIP_SIGNATURE_VALIDATION defaults to 0 here (LocalStack's own default is 1): SigV4 signatures and
# presigned URLs are checked like AWS does (a tampered or expired presigned URL gets 403).
# TMPDIR makes LocalStack log a harmless "TMPDIR is deprecated" warning; it keeps Python temp files in RUN_DIR.
env -u PYTHONPATH -u VIRTUAL_ENV \
    OVERRIDE_IN_DOCKER=0 \
    GATEWAY_LISTEN="127.0.0.1:$PORT" \
    GATEWAY_SERVER=hypercorn \
    DNS_ADDRESS=0 \
    DISABLE_EVENTS=1 \
    SKIP_SSL_CERT_DOWNLOAD=1 \
    SERVICES=s3 \
    S3_SKIP_SIGNATURE_VALIDATION="${S3_SKIP_SIGNATURE_VALIDATION:-0}" \
    FILESYSTEM_ROOT="$RUN_DIR/fs" \
    TMPDIR="$RUN_DIR/tmp" \
    STREAM_ST_LOCALSTACK_S3_DIR="$RUN_DIR/s3" \
    setsid "$PY" -c '
import os, sys
try:
    import localstack.services.s3.provider as _p
    if not hasattr(_p, "DEFAULT_S3_TMP_DIR"):
        raise AttributeError("DEFAULT_S3_TMP_DIR")
    _p.DEFAULT_S3_TMP_DIR = os.environ["STREAM_ST_LOCALSTACK_S3_DIR"]
except Exception as e:  # keep starting; object bytes then go to the default location
    print(f"start.sh launcher: could not redirect S3 storage ({e!r})", file=sys.stderr, flush=True)
from localstack.runtime.main import main
main()
' </dev/null >"$LOG" 2>&1 &
PID=$!
echo "$PID" > "$RUN_DIR/pid"
echo "$RUN_DIR" > "$POINTER"

HEALTH="http://127.0.0.1:$PORT/_localstack/health"
fail() {
    echo "start.sh: $*" >&2
    echo "----- last lines of $LOG -----" >&2
    tail -n 40 "$LOG" >&2 || true
    echo "------------------------------" >&2
    "$HERE/stop.sh" "$RUN_DIR" >/dev/null 2>&1 || true
    exit 1
}

# One Python process polls the health endpoint until s3 is available, the process dies or time runs out.
set +e
READY_MSG="$("$PY" - "$HEALTH" "$PID" "$TIMEOUT" <<'PY'
import json, os, sys, time, urllib.request
url, pid, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via an http_proxy
t0 = time.monotonic()
while True:
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:  # a dead child not yet reaped still answers kill 0
            if f.read().rpartition(")")[2].split()[0] == "Z":
                sys.exit(2)
    except ProcessLookupError:
        sys.exit(2)
    except OSError:
        pass  # no /proc (macOS)
    try:
        with opener.open(url, timeout=2) as r:
            if json.load(r).get("services", {}).get("s3") in ("available", "running"):
                print(f"{time.monotonic() - t0:.2f}")
                sys.exit(0)
    except Exception:
        pass
    if time.monotonic() - t0 > timeout:
        sys.exit(3)
    time.sleep(0.1)
PY
)"
RC=$?
set -e
case $RC in
    0) ;;
    2) fail "LocalStack (pid $PID) exited during start-up" ;;
    3) fail "s3 not available at $HEALTH after ${TIMEOUT}s" ;;
    *) fail "health check failed (rc $RC)" ;;
esac
echo "start.sh: LocalStack S3 ready at http://127.0.0.1:$PORT (pid $PID, ${READY_MSG}s)"
echo "RUN_DIR=$RUN_DIR"
