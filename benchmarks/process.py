"""Timing one contender run: a fresh process, its whole-process wall time and its own peak RSS."""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any

RUN_TIMEOUT_S = 600  # a hung contender is killed and recorded as failed, not waited for forever
GNU_TIME = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None


@dataclass
class Run:
    wall_s: float
    rss_mib: float
    rc: int
    output: str  # last lines of the child's stdout+stderr

    @property
    def ok(self) -> bool:
        return self.rc == 0


def run_process(argv: list[str], env: dict[str, str], cwd: str | os.PathLike[str]) -> Run:
    """Run ``argv`` to its end: wall time around its whole life, its own peak RSS, its last output lines."""
    with tempfile.TemporaryFile() as out, tempfile.NamedTemporaryFile("r") as rss_file:
        if GNU_TIME:
            # Linux reports a fork+exec'd child's ru_maxrss as at least the parent's RSS at fork time, so
            # our own wait4 would over-report; GNU time is a tiny parent whose wait4 gives the true peak.
            # It adds ~1 ms to every run, the same for every contender.
            argv = [GNU_TIME, "-f", "%M", "-o", rss_file.name, *argv]
        started = time.perf_counter()
        # Its own process group, so a hung run is killed with everything it started (GNU time included).
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
        watchdog = threading.Timer(RUN_TIMEOUT_S, os.killpg, (process.pid, signal.SIGKILL))
        watchdog.start()
        _, status, usage = os.wait4(process.pid, 0)  # same timing as subprocess.run, plus rusage
        wall = time.perf_counter() - started
        watchdog.cancel()
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read().decode(errors="replace")
        # With GNU time its last line is the peak in KiB (a line before it says if the command failed).
        rss_lines = rss_file.read().split() if GNU_TIME else []
        rss_kib = int(rss_lines[-1]) if rss_lines and rss_lines[-1].isdigit() else usage.ru_maxrss
    tail = "\n".join(text.strip().splitlines()[-15:])
    return Run(wall, rss_kib / 1024, process.returncode, tail)


def timing(ok: list[Any]) -> dict[str, Any]:
    """Median, spread and peak RSS of successful runs (objects with ``wall_s`` and ``rss_mib``)."""
    walls = [r.wall_s for r in ok]
    return {
        "median_s": statistics.median(walls),
        "min_s": min(walls),
        "max_s": max(walls),
        "walls": walls,
        "rss_mib": statistics.median(r.rss_mib for r in ok),
    }
