"""Fresh processes: each run to its end, timed around its whole life, with its own peak RSS and its result.

A child reports numbers of its own (an in-process timing, a token) by printing one ``RESULT {json}`` line
(``emit``). Which stream_st the children import is the one first on their PYTHONPATH (``child_env``); a
``Code`` is a revision of the repository checked out for that (``checkout``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import REPO

RESULT = "RESULT "
TIMEOUT_S = 600.0  # a hung child is killed and recorded as failed, not waited for forever
GNU_TIME = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None
# Configuration a child must not inherit: proxies would send loopback traffic elsewhere, STREAM_ST_* would
# change the defaults measured, and credentials or endpoints of a real cloud would change what a client does.
DROPPED = ("STREAM_ST_", "AWS_", "HF_", "HUGGING_FACE_", "GOOGLE_", "GCSFS_", "RUNAI_", "AZURE_")


@dataclass
class Run:
    wall_s: float
    rss_mib: float
    rc: int
    output: str  # the last lines of stdout + stderr
    result: dict[str, Any] | None = None  # the child's RESULT line
    traffic: Any = None  # what the server logged during the run (servers.Traffic), where one counts

    @property
    def ok(self) -> bool:
        return self.rc == 0

    @property
    def last_line(self) -> str:
        lines = self.output.strip().splitlines()
        return lines[-1] if lines else ""


def emit(result: Mapping[str, Any]) -> None:
    """In a child: report ``result`` to the parent."""
    print(RESULT + json.dumps(result), flush=True)


def run_process(
    argv: Sequence[str], env: Mapping[str, str], cwd: str | os.PathLike[str], timeout_s: float = TIMEOUT_S
) -> Run:
    """Run ``argv`` to its end: wall time around its whole life, its own peak RSS, its output and result."""
    return run_together([argv], env, cwd, timeout_s)[1][0]


def run_together(
    argvs: Sequence[Sequence[str]], env: Mapping[str, str], cwd: str | os.PathLike[str], timeout_s: float = TIMEOUT_S
) -> tuple[float, list[Run]]:
    """Start every ``argv`` at once; the wall time until the last one exits, and each one's ``Run``."""
    runs: list[Run] = [Run(0.0, 0.0, -1, "not run")] * len(argvs)

    def wait(i: int) -> None:
        with tempfile.TemporaryFile() as out, tempfile.NamedTemporaryFile("r") as rss:
            try:
                runs[i] = _run(list(argvs[i]), env, cwd, timeout_s, out, rss)
            except OSError as e:  # the program is missing, or cannot run
                runs[i] = Run(0.0, 0.0, 127, f"{argvs[i][0]}: {e}")

    started = time.perf_counter()
    waiters = [threading.Thread(target=wait, args=(i,)) for i in range(len(argvs))]
    for waiter in waiters:
        waiter.start()
    for waiter in waiters:
        waiter.join()
    return time.perf_counter() - started, runs


def _run(
    argv: list[str], env: Mapping[str, str], cwd: str | os.PathLike[str], timeout_s: float, out: Any, rss: Any
) -> Run:
    if GNU_TIME:
        # Linux reports a fork+exec'd child's ru_maxrss as at least the parent's RSS at fork time, so our own
        # wait4 would over-report; GNU time is a tiny parent whose wait4 gives the true peak (~1 ms per run,
        # the same for every contender).
        argv = [GNU_TIME, "-f", "%M", "-o", rss.name, *argv]
    started = time.perf_counter()
    # Its own process group, so that a hung run is killed with everything it started (GNU time included).
    process = subprocess.Popen(
        argv, stdout=out, stderr=subprocess.STDOUT, env=dict(env), cwd=cwd, start_new_session=True
    )
    timed_out = threading.Event()

    def kill() -> None:
        timed_out.set()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)

    watchdog = threading.Timer(timeout_s, kill)
    watchdog.start()
    _, status, usage = os.wait4(process.pid, 0)  # as subprocess waits, plus the rusage
    wall = time.perf_counter() - started
    watchdog.cancel()
    process.returncode = os.waitstatus_to_exitcode(status)
    out.seek(0)
    lines = out.read().decode(errors="replace").strip().splitlines()
    # With GNU time its last line is the peak in KiB (a line before it says if the command failed).
    rss_lines = rss.read().split() if GNU_TIME else []
    rss_kib = int(rss_lines[-1]) if rss_lines and rss_lines[-1].isdigit() else usage.ru_maxrss
    result = next((json.loads(line[len(RESULT) :]) for line in reversed(lines) if line.startswith(RESULT)), None)
    lines = [line for line in lines if not line.startswith(RESULT)]
    if timed_out.is_set():
        lines.append(f"killed: still running after {timeout_s:.0f} s")
    return Run(wall, rss_kib / 1024, process.returncode, "\n".join(lines[-15:]), result)


def child_env(code: Path = REPO, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of every child: ``code``'s stream_st first on PYTHONPATH, its defaults, loopback only."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.lower().endswith("_proxy") and not k.startswith(DROPPED) and k != "STORAGE_EMULATOR_HOST"
    }
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(code), env.get("PYTHONPATH")]))
    env.update(extra or {})
    return env


def python(code: str, *args: str) -> list[str]:
    return [sys.executable, "-c", code, *args]


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()


@dataclass(frozen=True)
class Code:
    """Where a revision of stream_st lives: its root goes first on the children's PYTHONPATH and is their cwd
    (``python -c`` puts the cwd first on sys.path)."""

    root: Path
    commit: str
    description: str


@contextlib.contextmanager
def checkout(ref: str, folder: Path) -> Iterator[Code]:
    """``ref`` checked out with ``git worktree`` under ``folder`` (removed on exit), so that edits made to the
    working tree while a benchmark runs cannot change the code it measures; ``worktree``: the live tree."""
    head = git("rev-parse", "HEAD")
    if ref == "worktree":
        dirty = git("status", "--porcelain", "--", "stream_st")
        yield Code(REPO, head, f"the working tree at {head[:12]}" + (" with uncommitted changes" if dirty else ""))
        return
    sha = git("rev-parse", "--verify", f"{ref}^{{commit}}")
    subject = git("log", "-1", "--format=%s", sha)
    folder.mkdir(parents=True, exist_ok=True)
    dest = Path(tempfile.mkdtemp(prefix=f"{sha[:12]}-", dir=folder))
    git("worktree", "add", "--detach", "--quiet", str(dest), sha)
    try:
        yield Code(dest, sha, f"{sha[:12]} ({ref}: {subject[:80]})")
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(dest)], cwd=REPO, capture_output=True)
        shutil.rmtree(dest, ignore_errors=True)
