"""Turning runs into the results table, the Markdown report and the bar chart."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
from pathlib import Path
from typing import Any

from process import timing

TARGET_VS_FLOOR = 1.10  # the project's target: stream_st ≤ 1.10 × (start + curl)
TARGET_VS_SST = 0.6  # the project's target: stream_st ≤ 0.6 × safetensors-streaming


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def machine_info() -> dict[str, str]:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in _lines("/proc/cpuinfo") if line.startswith("model name")),
        platform.processor() or "?",
    )
    mem_kib = next((int(line.split()[1]) for line in _lines("/proc/meminfo") if line.startswith("MemTotal")), 0)
    thp = next(iter(_lines("/sys/kernel/mm/transparent_hugepage/enabled")), "?")
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": f"{len(os.sched_getaffinity(0))} (os.cpu_count {os.cpu_count()})",
        "cpu": cpu,
        "ram": f"{mem_kib / (1 << 20):.1f} GiB",
        "kernel": platform.release(),
        "transparent hugepages": thp,
        "load average before": loadavg(),
    }


def _lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []


def _median_int(values: list[int]) -> str:
    """The value, or "lo–hi (median m)" when runs disagree (they should not for a deterministic client)."""
    if not values:
        return "—"
    lo, hi = min(values), max(values)
    return f"{lo:,}" if lo == hi else f"{lo:,}–{hi:,} (median {int(statistics.median(values)):,})"


def summarize(results: list[Any], header: Any, expected: dict[str, int]) -> list[dict[str, Any]]:
    """One dict per contender: medians over successful runs, plus everything the table needs."""
    rows = []
    for result in results:
        c = result.contender
        ok = [r for r in result.runs if r.ok]
        needed = expected["bytes"] if c.partial else header.file_bytes
        row: dict[str, Any] = {
            "key": c.key,
            "label": c.label,
            "runs": len(result.runs),
            "ok_runs": len(ok),
            "check": result.check,
            "check_ok": result.check_ok,
            "needed_bytes": None if c.key == "start" else needed,
            "failures": [r.output for r in result.runs if not r.ok],
        }
        if ok:
            row.update(
                timing(ok),
                requests=[r.traffic.requests for r in ok],
                bytes=[r.traffic.bytes for r in ok],
                statuses=sorted({s for r in ok for s in r.traffic.statuses}),
                ranges=list(ok[0].traffic.ranges),
            )
        rows.append(row)
    curl = get_row(rows, "curl")
    for row in rows:
        if "median_s" in row and row["needed_bytes"]:
            row["gbps"] = row["needed_bytes"] / row["median_s"] / 1e9
        if "median_s" in row and curl and "median_s" in curl:
            row["x_curl"] = row["median_s"] / curl["median_s"]
    return rows


def fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def get_row(rows: list[dict[str, Any]], key: str) -> dict[str, Any] | None:
    return next((r for r in rows if r["key"] == key and "median_s" in r), None)


def table(rows: list[dict[str, Any]]) -> str:
    out = [
        "| contender | median wall s | min–max s | GB/s | × curl | requests | bytes pulled | pulled ÷ needed "
        "| peak RSS MiB | check |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        check = (
            "ok" if r["check_ok"] and r["check"].startswith("verified") else ("—" if r["check_ok"] else "**FAILED**")
        )
        if "median_s" not in r:
            out.append(f"| {r['label']} | **FAILED** ({r['runs']} of {r['runs']} runs) | | | | | | | | {check} |")
            continue
        failed = f" ({r['runs'] - r['ok_runs']} runs failed)" if r["ok_runs"] < r["runs"] else ""
        pulled = statistics.median(r["bytes"])
        ratio = f"{pulled / r['needed_bytes']:.4f}" if r["needed_bytes"] else "—"
        out.append(
            f"| {r['label']} | {r['median_s']:.2f}{failed} | {r['min_s']:.2f}–{r['max_s']:.2f} "
            f"| {fmt(r.get('gbps'))} | {fmt(r.get('x_curl'))} "
            f"| {_median_int(r['requests'])} | {_median_int(r['bytes'])} | {ratio} "
            f"| {r['rss_mib']:.0f} | {check} |"
        )
    return "\n".join(out)


def targets(rows: list[dict[str, Any]], expected: dict[str, int], header: Any) -> list[str]:
    """The project's targets, each with the numbers it was computed from."""
    lines = []
    curl, start, sst = get_row(rows, "curl"), get_row(rows, "start"), get_row(rows, "safetensors_streaming")
    ours = get_row(rows, "stream_st")
    if curl and start:
        floor = start["median_s"] + curl["median_s"]
        lines.append(f"- floor = start + curl = {start['median_s']:.2f} + {curl['median_s']:.2f} = {floor:.2f} s")
        for key in ("stream_st", "safetensors_streaming", "fsspec", "download"):
            row = get_row(rows, key)
            if row:
                verdict = ""
                if key == "stream_st":
                    ok = row["median_s"] / floor <= TARGET_VS_FLOOR
                    verdict = f" (target ≤ {TARGET_VS_FLOOR:.2f}: {'met' if ok else 'NOT met'})"
                lines.append(
                    f"- {key} ÷ floor = {row['median_s']:.2f} / {floor:.2f} = "
                    f"**{row['median_s'] / floor:.2f}×**{verdict}"
                )
    if ours and sst:
        ratio = ours["median_s"] / sst["median_s"]
        ok = ratio <= TARGET_VS_SST
        lines.append(
            f"- stream_st ÷ safetensors_streaming = {ours['median_s']:.2f} / {sst['median_s']:.2f} = "
            f"**{ratio:.2f}×** (target ≤ {TARGET_VS_SST}: {'met' if ok else 'NOT met'})"
        )
    elif ours:
        lines.append("- stream_st ÷ safetensors_streaming: not computed (safetensors_streaming had no successful run)")
    verified = get_row(rows, "stream_st_verify")
    if ours and verified:
        lines.append(
            f"- cost of verify (sha256 while streaming): {verified['median_s']:.2f} / {ours['median_s']:.2f} = "
            f"**{verified['median_s'] / ours['median_s']:.2f}×** stream_st without it"
        )
    partial = get_row(rows, "partial")
    if partial:
        pulled = int(statistics.median(partial["bytes"]))
        requests = int(statistics.median(partial["requests"]))
        extra = pulled - expected["bytes"]
        lines.append(
            f"- partial ({expected['tensors']} tensors of layers 0–1): needed = selected "
            f"{expected['selected_bytes']:,} + header {header.header_bytes:,} = {expected['bytes']:,} B; "
            f"pulled {pulled:,} B ({'+' if extra >= 0 else ''}{extra:,} B, "
            f"{'exact' if extra == 0 else 'NOT exact'}); requests {requests} vs ideal {expected['requests']} "
            f"(1 header GET + {expected['requests'] - 1} parts of ≤ {expected['part_size'] >> 20} MiB over "
            f"{expected['spans']} coalesced span(s))"
        )
    return lines


def markdown(
    rows: list[dict[str, Any]],
    results: list[Any],
    header: Any,
    expected: dict[str, int],
    machine: dict[str, str],
    versions: dict[str, Any],
    args: Any,
    local: Path,
) -> str:
    parts = [
        "# stream_st HTTP load benchmark",
        "",
        f"Checkpoint `{local.name}`: {header.file_bytes:,} B ({header.file_bytes / (1 << 30):.3f} GiB), "
        f"{len(header.spans)} tensors, header {header.header_bytes:,} B. Served by nginx (sendfile) on "
        f"127.0.0.1. Each contender is a fresh process; {args.repeats} rounds, order rotated each round; "
        "median of the successful runs. GB/s = bytes needed (the file; for the partial row, selected tensors "
        "+ header) ÷ median wall. Requests and bytes are from nginx's access log.",
        "",
        table(rows),
        "",
        "## Ratios and targets (benchmarks/RESULTS.md has each target)",
        "",
        *targets(rows, expected, header),
        "",
    ]
    detail = _requests_detail(rows)
    if detail:
        parts += ["## Requests seen by nginx (first successful round)", "", *detail, ""]
    problems = _problems(rows)
    if problems:
        parts += ["## Failures and warnings", "", *problems, ""]
    parts += ["## Machine and versions", ""]
    parts += [f"- {k}: {v}" for k, v in machine.items()]
    parts += [f"- {k}: {v}" for k, v in versions.items()]
    parts += [
        "",
        f"Command: `.venv/bin/python benchmarks/run.py --size-gib {args.size_gib} --repeats {args.repeats}`",
        "",
    ]
    return "\n".join(parts)


def _requests_detail(rows: list[dict[str, Any]]) -> list[str]:
    lines = []
    for r in rows:
        if r["key"] in ("stream_st", "partial", "safetensors_streaming") and r.get("ranges"):
            ranges = r["ranges"]
            shown = ", ".join(ranges[:12]) + (f", … ({len(ranges)} in all)" if len(ranges) > 12 else "")
            lines.append(f"- {r['key']}: statuses {', '.join(r['statuses'])}; Range headers: {shown}")
    return lines


def _problems(rows: list[dict[str, Any]]) -> list[str]:
    lines = []
    for r in rows:
        if not r["check_ok"]:
            lines.append(f"- {r['key']}: check run failed:\n\n```\n{r['check']}\n```")
        for failure in r["failures"][:1]:
            lines.append(
                f"- {r['key']}: {len(r['failures'])} of {r['runs']} timed runs failed; first:\n\n```\n{failure}\n```"
            )
        bad = [s for s in r.get("statuses", []) if s not in ("200", "206")]
        if bad:
            lines.append(f"- {r['key']}: nginx answered with status(es) {', '.join(bad)}")
    return lines


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        print(f"no plot: matplotlib is not installed ({e}); `.venv/bin/pip install matplotlib` to get one")
        return
    done = [r for r in rows if "median_s" in r]
    labels = [r["key"] for r in done]
    medians = [r["median_s"] for r in done]
    errors = [[m - r["min_s"] for m, r in zip(medians, done)], [r["max_s"] - m for m, r in zip(medians, done)]]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(done) + 1.5))
    colors = ["tab:green" if k in ("stream_st", "partial") else "tab:gray" for k in labels]
    ax.barh(labels, medians, xerr=errors, color=colors, capsize=3)
    curl, start = get_row(rows, "curl"), get_row(rows, "start")
    if curl and start:
        floor = curl["median_s"] + start["median_s"]
        ax.axvline(floor, color="black", linestyle="--", label=f"start + curl = {floor:.2f} s")
        ax.axvline(
            floor * TARGET_VS_FLOOR,
            color="tab:red",
            linestyle=":",
            label=f"target {TARGET_VS_FLOOR:.2f}× = {floor * TARGET_VS_FLOOR:.2f} s",
        )
        ax.legend(loc="lower right")
    for y, (m, r) in enumerate(zip(medians, done)):
        ax.text(r["max_s"], y, f"  {m:.2f}", va="center")  # right of the error bar, not on it
    ax.invert_yaxis()
    ax.set_xlabel("whole-process wall time, s (median; bars: min–max)")
    ax.set_title("Loading a safetensors checkpoint over HTTP (nginx, loopback)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")
