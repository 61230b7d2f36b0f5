"""What every report carries: the machine, the date and the versions, Markdown tables, the command that made
it; and where it goes: ``NAME.md`` (the report) and ``NAME.json`` (every run) in the output folder."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from harness import BENCH, REPO
from harness.process import GNU_TIME


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []


def machine() -> dict[str, str]:
    """This machine and now; ``finish`` adds the load average after the run."""
    cpu = next(
        (line.split(":", 1)[1].strip() for line in _lines("/proc/cpuinfo") if line.startswith("model name")),
        platform.processor() or "?",
    )
    mem_kib = next((int(line.split()[1]) for line in _lines("/proc/meminfo") if line.startswith("MemTotal")), 0)
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": f"{len(os.sched_getaffinity(0))} (os.cpu_count {os.cpu_count()})",
        "cpu": cpu,
        "ram": f"{mem_kib / (1 << 20):.1f} GiB",
        "kernel": platform.release(),
        "transparent hugepages": next(iter(_lines("/sys/kernel/mm/transparent_hugepage/enabled")), "?"),
        "load average before": loadavg(),
        "peak RSS from": "GNU time %M of each child" if GNU_TIME else "wait4 ru_maxrss (an upper bound)",
    }


def finish(info: dict[str, str]) -> dict[str, str]:
    info["load average after"] = loadavg()
    return info


PROBE = r"""
import json, sys, importlib.metadata as md, platform
out = {"python": platform.python_version()}
for dist in sys.argv[1:]:
    try: out[dist] = md.version(dist)
    except Exception as e: out[dist] = f"missing ({e})"
try:
    import stream_st
    from stream_st.config import Config
    out["stream_st"] = getattr(stream_st, "__version__", "?") + " imported from " + stream_st.__file__
    cfg = Config()
    out["stream_st config"] = {k: getattr(cfg, k) for k in ("part_size", "max_gap", "header_prefetch",
                               "max_concurrency", "direct_http") if hasattr(cfg, k)}
except Exception as e:
    out["stream_st"] = f"import failed: {e!r}"
print(json.dumps(out))
"""


def versions(
    env: Mapping[str, str], cwd: Path, dists: Sequence[str] = (), interpreter: str = sys.executable
) -> dict[str, Any]:
    """Versions of ``dists`` and stream_st's origin and defaults, read in a child as the contenders see them."""
    argv = [interpreter, "-c", PROBE, "torch", "safetensors", *dists]
    done = subprocess.run(argv, env=dict(env), cwd=cwd, capture_output=True, text=True)
    found: dict[str, Any] = json.loads(done.stdout) if done.returncode == 0 else {"probe": done.stderr[-500:]}
    return found


def tool_version(*argv: str) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"n/a ({e})"
    return ((done.stdout + done.stderr).strip().splitlines() or ["?"])[0]


def git_commit() -> str:
    done = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def command() -> str:
    """The command line that made this report, as the documentation writes it."""
    script = Path(sys.argv[0]).resolve()
    name = script.relative_to(REPO) if script.is_relative_to(REPO) else script
    return shlex.join([".venv/bin/python", str(name), *sys.argv[1:]])


def fmt(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def ratio(a: float | None, b: float | None, digits: int = 2) -> str:
    return "—" if a is None or not b else f"{a / b:.{digits}f}"


def table(header: Sequence[str], rows: Sequence[Sequence[object]], align: str = "") -> list[str]:
    """A Markdown table; ``align`` has one letter per column, ``l`` or ``r`` (default: first left, rest right)."""
    align = align or "l" + "r" * (len(header) - 1)
    return [
        "| " + " | ".join(header) + " |",
        "|" + "".join("---|" if a == "l" else "---:|" for a in align),
        *("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows),
    ]


def document(title: str, body: Sequence[str], info: Mapping[str, Any], found: Mapping[str, Any]) -> str:
    """The report: title, body, then the machine, the versions and the command."""
    lines = [f"# {title}", "", *body, "", "## Machine and versions", ""]
    lines += [f"- {k}: {v}" for k, v in {**info, **found}.items()]
    lines += ["", f"Command: `{command()}`", ""]
    return "\n".join(lines)


def out_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """``explicit``, else $OUT (the device tool's folder), else benchmarks/out."""
    folder = Path(explicit or os.environ.get("OUT") or BENCH / "out").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def write(out: Path, name: str, text: str, data: Mapping[str, Any], quiet: bool = False) -> None:
    (out / f"{name}.md").write_text(text)
    (out / f"{name}.json").write_text(json.dumps(data, indent=1, default=str))
    if not quiet:
        print(f"wrote {out / (name + '.md')} and {name}.json", flush=True)


# Rows of contenders (``rounds.summary``): the pieces every table of them shares.


def get_row(rows: Sequence[Mapping[str, Any]], key: str) -> Mapping[str, Any] | None:
    """The row of ``key`` if it has a median."""
    return next((r for r in rows if r["key"] == key and "median_s" in r), None)


def check_cell(row: Mapping[str, Any]) -> str:
    if not row["check_ok"]:
        return "**FAILED**"
    return "ok" if row["check"].startswith("verified") else "—"


def untimed_cells(row: Mapping[str, Any], columns: int) -> list[str]:
    """The cells of a contender without a successful timed run: why, then blanks, then the check."""
    why = "not timed: check failed" if not row["check_ok"] else f"FAILED ({row['runs']} of {row['runs']} runs)"
    return [row["label"], f"**{why}**", *[""] * (columns - 3), check_cell(row)]


def wall_cells(row: Mapping[str, Any]) -> list[str]:
    """Median (with the number of failed runs) and min–max of a timed contender."""
    failed = f" ({row['runs'] - row['ok_runs']} runs failed)" if row["ok_runs"] < row["runs"] else ""
    return [f"{row['median_s']:.2f}{failed}", f"{row['min_s']:.2f}–{row['max_s']:.2f}"]


def problems(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Failed checks and failed timed runs, with the output of the first."""
    lines = []
    for r in rows:
        if not r["check_ok"]:
            lines.append(f"- {r['key']}: check run failed (so it was not timed):\n\n```\n{r['check']}\n```")
        for failure in r["failures"][:1]:
            lines.append(
                f"- {r['key']}: {len(r['failures'])} of {r['runs']} timed runs failed; first:\n\n```\n{failure}\n```"
            )
    return lines
