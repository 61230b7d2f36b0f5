"""Who runs when, and what the runs add up to.

Every contender is first run once untimed, with its result checked (which also warms the caches); a contender
whose check fails is reported and not timed. Then ``repeats`` rounds, each running every contender once, the
order rotated by one each round so that slow drifts of a shared machine hit all contenders alike. Reported:
the median of the successful runs and their min–max.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from harness.contenders import Contender
from harness.process import Run

T = TypeVar("T")
R = TypeVar("R")


def rotated(items: Sequence[T], round_index: int) -> list[T]:
    k = round_index % len(items) if items else 0
    return [*items[k:], *items[:k]]


def describe(run: Run) -> str:
    """One progress line's worth of a run."""
    text = f"{run.wall_s:6.2f}s {run.rss_mib:7.0f} MiB"
    if run.traffic is not None:
        text += f" {run.traffic.requests:3d} req {run.traffic.bytes / 1e6:9.1f} MB"
    return text if run.ok else f"{text}  FAILED exit {run.rc}: {run.last_line[:200]}"


def run_rounds(
    keys: Sequence[str],
    repeats: int,
    run_one: Callable[[str], R],
    *,
    show: Callable[[Any], str] = describe,
    deadline: float | None = None,
    on_round: Callable[[dict[str, list[R]], int], object] | None = None,
    tag: str = "",
) -> dict[str, list[R]]:
    """Every key once per round, the order rotated each round; no round starts that would end after
    ``deadline`` (``time.monotonic()``); ``on_round`` sees the runs so far after each round."""
    runs: dict[str, list[R]] = {key: [] for key in keys}
    last_round = 0.0
    for r in range(repeats):
        if r and deadline is not None and time.monotonic() + last_round * 1.2 > deadline:
            print(f"{tag}stopping after {r} rounds: another would pass the deadline", flush=True)
            break
        t0 = time.monotonic()
        for key in rotated(keys, r):
            runs[key].append(run_one(key))
            print(f"  {tag}round {r + 1}/{repeats} {key:24s} {show(runs[key][-1])}", flush=True)
        last_round = time.monotonic() - t0
        if on_round is not None:
            on_round(runs, r + 1)
    return runs


@dataclass
class Outcome:
    """A contender's check and timed runs."""

    contender: Contender
    check_ok: bool = True
    check: str = ""  # the check's last line, or why it failed
    check_wall_s: float | None = None
    runs: list[Run] = field(default_factory=list)

    @property
    def ok_runs(self) -> list[Run]:
        return [r for r in self.runs if r.ok]


def checked(contender: Contender, run: Run) -> Outcome:
    """The untimed run's verdict: it must succeed, and one that returns tensors must print ``verified ...``."""
    outcome = Outcome(contender, check_wall_s=run.wall_s)
    if not run.ok:
        outcome.check_ok, outcome.check = False, f"FAILED (exit {run.rc}): {run.output}"
    elif not contender.verifiable:
        outcome.check = "not checked (no tensors)"
    elif run.last_line.startswith("verified"):
        outcome.check = run.last_line
    else:
        outcome.check_ok, outcome.check = False, f"FAILED (no 'verified' line): {run.output}"
    return outcome


def compare(
    contenders: Sequence[Contender], run: Callable[[Contender, bool], Run], repeats: int, tag: str = ""
) -> list[Outcome]:
    """Check each contender once (``run(c, True)``), then time those that passed (``run(c, False)``) in rounds."""
    outcomes = []
    for c in contenders:
        outcome = checked(c, run(c, True))
        outcomes.append(outcome)
        first = outcome.check.splitlines()[0][:110] if outcome.check else ""
        print(f"  {tag}check {c.key:24s} {'ok ' if outcome.check_ok else 'ERR'} {outcome.check_wall_s:6.2f}s  {first}")
    timed = {o.contender.key: o for o in outcomes if o.check_ok}
    runs = run_rounds(list(timed), repeats, lambda key: run(timed[key].contender, False), tag=tag)
    for key, done in runs.items():
        timed[key].runs = done
    return outcomes


@dataclass(frozen=True)
class Stats:
    """Median and min–max of some values (at least one)."""

    median: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, values: Iterable[float]) -> Stats:
        v = list(values)
        return cls(statistics.median(v), min(v), max(v), len(v))

    @property
    def spread(self) -> str:
        return f"{self.min:.2f}–{self.max:.2f}"


def timing(runs: Iterable[Run]) -> dict[str, Any]:
    """Median, spread and median peak RSS of the successful runs (empty without one)."""
    ok = [r for r in runs if r.ok]
    if not ok:
        return {}
    walls = [r.wall_s for r in ok]
    return {
        "median_s": statistics.median(walls),
        "min_s": min(walls),
        "max_s": max(walls),
        "walls": walls,
        "rss_mib": statistics.median(r.rss_mib for r in ok),
    }


def summary(outcome: Outcome) -> dict[str, Any]:
    """A contender's row: its check, its runs, and the timing of the successful ones (see ``timing``)."""
    c = outcome.contender
    return {
        "key": c.key,
        "label": c.label,
        "runs": len(outcome.runs),
        "ok_runs": len(outcome.ok_runs),
        "check": outcome.check,
        "check_ok": outcome.check_ok,
        "check_wall_s": outcome.check_wall_s,
        "failures": [r.output for r in outcome.runs if not r.ok],
        **timing(outcome.runs),
    }
