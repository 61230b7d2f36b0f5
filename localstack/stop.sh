#!/usr/bin/env bash
# Stop a LocalStack started by start.sh and remove its run directory.
#
#   localstack/stop.sh [PORT | RUN_DIR]     # default: port 4566
#
# Sends SIGTERM to LocalStack's whole process group, waits up to LOCALSTACK_STOP_TIMEOUT
# (default 10 s), then SIGKILLs what is left. Only the process group recorded in RUN_DIR/pid is touched.
set -euo pipefail

ARG="${1:-4566}"
STATE_BASE="${TMPDIR:-/tmp}"
TIMEOUT="${LOCALSTACK_STOP_TIMEOUT:-10}"

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

# Alive while any process of the group is. A leader that is a zombie with a single thread left has
# exited and only waits for its (adopting) parent to reap it; a "zombie" leader that still has other
# threads is a Python whose main thread returned while shutdown threads still run: not done yet.
group_alive() {
    local pid="$1" state threads others
    kill -0 -- "-$pid" 2>/dev/null || kill -0 "$pid" 2>/dev/null || return 1
    state="$(ps -o stat= -p "$pid" 2>/dev/null | cut -c1 || true)"
    [ "$state" = "Z" ] || return 0
    threads="$(ls "/proc/$pid/task" 2>/dev/null | wc -l)"
    others="$(pgrep -g "$pid" 2>/dev/null | grep -cv "^$pid\$" || true)"
    [ "${threads:-1}" -le 1 ] && [ "${others:-0}" = 0 ] && return 1
    return 0
}

PID="$(cat "$RUN_DIR/pid" 2>/dev/null || true)"
# Ours only if it is still LocalStack's launcher and leads its own group (start.sh used setsid):
# a recycled PID of some other program is left alone.
is_ours() {
    local pid="$1"
    [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
    [ "$(ps -o pgid= -p "$pid" | tr -d ' ')" = "$pid" ] || return 1
    ps -o args= -p "$pid" | grep -q "localstack.runtime.main"
}

if is_ours "$PID"; then
    kill -TERM -- "-$PID" 2>/dev/null || true
    deadline=$(( SECONDS + TIMEOUT ))
    while group_alive "$PID"; do
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
