#!/usr/bin/env bash
# Stop an Azurite started by start.sh and remove its run directory.
#
#   azurite/stop.sh [PORT | RUN_DIR]     # default: port 10000
#
# Sends SIGTERM to Azurite's process group, waits up to AZURITE_STOP_TIMEOUT (default 10 s), then SIGKILLs
# what is left. Only the process group recorded in RUN_DIR/pid is touched, and only if it is still Azurite.
set -euo pipefail

ARG="${1:-10000}"
STATE_BASE="${TMPDIR:-/tmp}"
TIMEOUT="${AZURITE_STOP_TIMEOUT:-10}"

if [ -d "$ARG" ]; then
    RUN_DIR="$(cd "$ARG" && pwd)"
    PORT="$(cat "$RUN_DIR/port" 2>/dev/null || true)"
else
    PORT="$ARG"
    POINTER="$STATE_BASE/stream-st-azurite-$PORT.rundir"
    if [ ! -f "$POINTER" ]; then
        echo "stop.sh: nothing recorded for port $PORT ($POINTER missing)"
        exit 0
    fi
    RUN_DIR="$(cat "$POINTER")"
fi

# Only ever delete a directory that start.sh made (it holds the marker files).
looks_like_run_dir() { [ -f "$1/port" ] && [ -d "$1/data" ]; }

PID="$(cat "$RUN_DIR/pid" 2>/dev/null || true)"
# Ours only if it leads its own group (start.sh used setsid) and runs azurite: a recycled PID is left alone.
is_ours() {
    local pid="$1"
    [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
    [ "$(ps -o pgid= -p "$pid" | tr -d ' ')" = "$pid" ] || return 1
    ps -o args= -p "$pid" | grep -q "azurite"
}

if is_ours "$PID"; then
    kill -TERM -- "-$PID" 2>/dev/null || true
    deadline=$(( SECONDS + TIMEOUT ))
    while kill -0 -- "-$PID" 2>/dev/null; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "stop.sh: Azurite (pgid $PID) still alive after ${TIMEOUT}s, sending SIGKILL" >&2
            kill -KILL -- "-$PID" 2>/dev/null || true
            sleep 0.2
            break
        fi
        sleep 0.1
    done
    echo "stop.sh: stopped Azurite (pid $PID${PORT:+, port $PORT})"
else
    echo "stop.sh: Azurite not running${PORT:+ on port $PORT}"
fi

if [ -n "$PORT" ]; then
    POINTER="$STATE_BASE/stream-st-azurite-$PORT.rundir"
    if [ -f "$POINTER" ] && [ "$(cat "$POINTER")" = "$RUN_DIR" ]; then rm -f "$POINTER"; fi
fi
if [ -d "$RUN_DIR" ] && looks_like_run_dir "$RUN_DIR"; then
    rm -rf -- "$RUN_DIR"
fi
