#!/usr/bin/env bash
# Stop a LocalStack started by start.sh and remove its run directory.
#
#   localstack/stop.sh [PORT | RUN_DIR]     # default: port 4566
#
# Sends SIGTERM to LocalStack's whole process group, waits up to LOCALSTACK_STOP_TIMEOUT
# (default 15 s), then SIGKILLs what is left. Only the process group recorded in RUN_DIR/pid is touched.
set -euo pipefail

ARG="${1:-4566}"
STATE_BASE="${TMPDIR:-/tmp}"
TIMEOUT="${LOCALSTACK_STOP_TIMEOUT:-15}"

if [ -d "$ARG" ]; then
    RUN_DIR="$(cd "$ARG" && pwd)"
    PORT="$(cat "$RUN_DIR/port" 2>/dev/null || true)"
else
    PORT="$ARG"
    POINTER="$STATE_BASE/stream-st-localstack-$PORT.rundir"
    if [ ! -f "$POINTER" ]; then
        echo "stop.sh: nothing recorded for port $PORT ($POINTER missing)"
        exit 0
    fi
    RUN_DIR="$(cat "$POINTER")"
fi

# Only ever delete a directory that start.sh made (it holds the marker files).
looks_like_run_dir() { [ -f "$1/port" ] && [ -d "$1/s3" ] && [ -d "$1/fs" ]; }

PID="$(cat "$RUN_DIR/pid" 2>/dev/null || true)"
if [[ "$PID" =~ ^[0-9]+$ ]] && kill -0 "$PID" 2>/dev/null; then
    # start.sh made LocalStack a session/group leader, so its PGID is its PID; check before signalling the group.
    PGID="$(ps -o pgid= -p "$PID" | tr -d ' ')"
    if [ "$PGID" = "$PID" ]; then
        kill -TERM -- "-$PGID" 2>/dev/null || true
    else
        kill -TERM "$PID" 2>/dev/null || true
    fi
    deadline=$(( SECONDS + TIMEOUT ))
    while kill -0 -- "-$PID" 2>/dev/null || kill -0 "$PID" 2>/dev/null; do
        # A zombie (exited, not yet reaped by its parent) is done.
        state="$(ps -o stat= -p "$PID" 2>/dev/null | cut -c1 || true)"
        if [ "$state" = "Z" ] && ! pgrep -g "$PID" 2>/dev/null | grep -qv "^$PID\$"; then break; fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "stop.sh: LocalStack (pgid $PID) still alive after ${TIMEOUT}s, sending SIGKILL" >&2
            kill -KILL -- "-$PID" 2>/dev/null || kill -KILL "$PID" 2>/dev/null || true
            sleep 0.5
            break
        fi
        sleep 0.1
    done
    echo "stop.sh: stopped LocalStack (pid $PID${PORT:+, port $PORT})"
else
    echo "stop.sh: LocalStack not running${PORT:+ on port $PORT}"
fi

if [ -n "$PORT" ]; then
    POINTER="$STATE_BASE/stream-st-localstack-$PORT.rundir"
    if [ -f "$POINTER" ] && [ "$(cat "$POINTER")" = "$RUN_DIR" ]; then rm -f "$POINTER"; fi
fi
if [ -d "$RUN_DIR" ] && looks_like_run_dir "$RUN_DIR"; then
    rm -rf -- "$RUN_DIR"
fi
