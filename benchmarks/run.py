"""Whole-process HTTP load benchmark: stream_st against curl, safetensors-streaming, fsspec and download+load.

    .venv/bin/python benchmarks/run.py [--size-gib 1.0] [--repeats 5] [--out benchmarks/out] [--only KEY ...]

The checkpoint (harness/checkpoint.py, cached in OUT/data) served by a private nginx on 127.0.0.1; every
contender checked once untimed, then timed in rotated rounds, each run a fresh process (harness/rounds.py).
Per run: whole-process wall time, the child's peak RSS, and the requests and bytes nginx logged. Writes
OUT/results.md, OUT/results.json (every run) and OUT/results.png (if matplotlib is installed).

Targets (the project's goals): stream_st within 1.10× of (Python+torch start + curl) and at most 0.6×
safetensors-streaming; a partial load pulls exactly the selected tensor bytes + header.
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the harness, whatever the cwd

from harness import REPO, arguments, report, rounds, servers  # noqa: E402
from harness.checkpoint import Checkpoint, ensure_checkpoint  # noqa: E402
from harness.contenders import START, Contender  # noqa: E402
from harness.process import child_env  # noqa: E402

TARGET_VS_FLOOR = 1.10  # stream_st ≤ 1.10 × (start + curl)
TARGET_VS_SST = 0.6  # stream_st ≤ 0.6 × safetensors-streaming
PARTIAL = ["model.layers.0.*", "model.layers.1.*"]

CONTENDERS = [
    Contender(
        "curl",
        "curl -s -o /dev/null (server ceiling, no Python)",
        command=("curl", "-s", "-o", "/dev/null", "{URL}"),
        verifiable=False,
    ),
    START,
    Contender("stream_st", "stream_st.load_file(url)", "import stream_st\nsd = stream_st.load_file(URL)"),
    Contender(
        "stream_st_verify",
        "stream_st.load_file(url, verify=True) (sha256 from a sidecar)",
        "import stream_st\nsd = stream_st.load_file(URL, verify='strict')",
    ),
    Contender(
        "safetensors_streaming",
        "safetensors_streaming.load_file(url) (Rust)",
        "import safetensors_streaming\nsd = safetensors_streaming.load_file(URL)",
    ),
    Contender(
        "fsspec",
        "fsspec.open(url).read() + safetensors.torch.load",
        "import fsspec, safetensors.torch\nwith fsspec.open(URL, 'rb') as f:\n    data = f.read()\n"
        "sd = safetensors.torch.load(data)",
    ),
    Contender(
        "download",
        "urlretrieve to a temp file + safetensors.torch.load_file",
        "import os, tempfile, urllib.request, safetensors.torch\n"
        "with tempfile.TemporaryDirectory() as d:\n"
        "    p = os.path.join(d, 'model.safetensors')\n"
        "    urllib.request.urlretrieve(URL, p)\n"
        "    sd = safetensors.torch.load_file(p)",
    ),
    Contender(
        "partial",
        "stream_st.load_file(url, tensors=[layers 0, 1])",
        f"import stream_st\nPATTERNS = {PARTIAL!r}\nsd = stream_st.load_file(URL, tensors=PATTERNS)",
    ),
]


def main() -> int:
    p = arguments(__doc__)
    p.add_argument("--only", nargs="+", choices=[c.key for c in CONTENDERS], help="run only these contenders")
    args = p.parse_args()
    out = report.out_dir(args.out)
    ckpt = ensure_checkpoint(out, args.size_gib)
    env = child_env()
    found = report.versions(env, REPO, ["safetensors-streaming", "fsspec", "aiohttp"])
    found |= {"nginx": report.tool_version("nginx", "-v"), "curl": report.tool_version("curl", "--version")}
    info = report.machine()
    print(f"checkpoint {ckpt.path.name}: {ckpt.file_bytes / (1 << 30):.3f} GiB, {len(ckpt.spans)} tensors", flush=True)
    chosen = [c for c in CONTENDERS if not args.only or c.key in args.only]
    with servers.nginx(ckpt.path.parent, out / "nginx") as server:
        values = {"URL": server.url(ckpt.path), "LOCAL": str(ckpt.path)}
        print(f"nginx on {values['URL']}", flush=True)
        outcomes = rounds.compare(chosen, lambda c, check: server.run(c.argv(values, check), env, REPO), args.repeats)
    report.finish(info)
    expected = expected_partial(ckpt, found)
    rows = [row(o, ckpt, expected) for o in outcomes]
    curl = report.get_row(rows, "curl")
    for r in rows:
        if "median_s" in r and curl:
            r["x_curl"] = r["median_s"] / curl["median_s"]
    text = report.document("stream_st HTTP load benchmark", body(rows, ckpt, expected, args.repeats), info, found)
    print("\n" + text)
    runs = {o.contender.key: {"check": o.check, "runs": [asdict(r) for r in o.runs]} for o in outcomes}
    report.write(out, "results", text, {"machine": info, "versions": found, "summary": rows, "runs": runs})
    plot(rows, out / "results.png")
    return 0


def expected_partial(ckpt: Checkpoint, found: dict[str, Any]) -> dict[str, int]:
    """What an ideal partial load of PARTIAL pulls: selected bytes + header, in 1 + coalesced parts requests."""
    cfg: dict[str, Any] = found.get("stream_st config") or {}  # stream_st's own defaults, if it imported
    part_size, max_gap = int(cfg.get("part_size", 16 << 20)), int(cfg.get("max_gap", 1 << 20))
    names = ckpt.select(PARTIAL)
    spans = ckpt.coalesced(names, max_gap)
    return {
        "tensors": len(names),
        "selected_bytes": ckpt.selected_bytes(names),
        "bytes": ckpt.selected_bytes(names) + ckpt.header_bytes,
        "spans": len(spans),
        "requests": 1 + sum(-(-(end - start) // part_size) for start, end in spans),
        "part_size": part_size,
    }


def row(outcome: rounds.Outcome, ckpt: Checkpoint, expected: dict[str, int]) -> dict[str, Any]:
    r = rounds.summary(outcome)
    ok = outcome.ok_runs
    r["needed_bytes"] = None if r["key"] == "start" else expected["bytes"] if r["key"] == "partial" else ckpt.file_bytes
    if ok:
        r |= {
            "requests": [x.traffic.requests for x in ok],
            "bytes": [x.traffic.bytes for x in ok],
            "statuses": sorted({s for x in ok for s in x.traffic.statuses}),
            "ranges": list(ok[0].traffic.ranges),
        }
        if r["needed_bytes"]:
            r["gbps"] = r["needed_bytes"] / r["median_s"] / 1e9
    return r


def _ints(values: list[int]) -> str:
    """The value, or "lo–hi (median m)" when runs disagree (they should not for a deterministic client)."""
    lo, hi = min(values), max(values)
    return f"{lo:,}" if lo == hi else f"{lo:,}–{hi:,} (median {int(statistics.median(values)):,})"


def body(rows: list[dict[str, Any]], ckpt: Checkpoint, expected: dict[str, int], repeats: int) -> list[str]:
    header = [
        "contender",
        "median wall s",
        "min–max s",
        "GB/s",
        "× curl",
        "requests",
        "bytes pulled",
        "pulled ÷ needed",
        "peak RSS MiB",
        "check",
    ]
    cells = []
    for r in rows:
        if "median_s" not in r:
            cells.append(report.untimed_cells(r, len(header)))
            continue
        pulled = statistics.median(r["bytes"])
        cells.append(
            [
                r["label"],
                *report.wall_cells(r),
                report.fmt(r.get("gbps")),
                report.fmt(r.get("x_curl")),
                _ints(r["requests"]),
                _ints(r["bytes"]),
                f"{pulled / r['needed_bytes']:.4f}" if r["needed_bytes"] else "—",
                f"{r['rss_mib']:.0f}",
                report.check_cell(r),
            ]
        )
    lines = [
        f"Checkpoint `{ckpt.path.name}`: {ckpt.file_bytes:,} B ({ckpt.file_bytes / (1 << 30):.3f} GiB), "
        f"{len(ckpt.spans)} tensors, header {ckpt.header_bytes:,} B. Served by nginx (sendfile) on 127.0.0.1. Each "
        f"contender is a fresh process; {repeats} rounds, order rotated each round; median of the successful runs. "
        "GB/s = bytes needed (the file; for the partial row, selected tensors + header) ÷ median wall. Requests "
        "and bytes are from nginx's access log.",
        "",
        *report.table(header, cells, "lrrrrrrrrl"),
        "",
        "## Ratios and targets (benchmarks/RESULTS.md has each target)",
        "",
        *targets(rows, expected, ckpt),
        "",
    ]
    detail = [
        f"- {r['key']}: statuses {', '.join(r['statuses'])}; Range headers: "
        + ", ".join(r["ranges"][:12])
        + (f", … ({len(r['ranges'])} in all)" if len(r["ranges"]) > 12 else "")
        for r in rows
        if r["key"] in ("stream_st", "partial", "safetensors_streaming") and r.get("ranges")
    ]
    if detail:
        lines += ["## Requests seen by nginx (first successful round)", "", *detail, ""]
    problems = report.problems(rows) + [
        f"- {r['key']}: nginx answered with status(es) {', '.join(bad)}"
        for r in rows
        if (bad := [s for s in r.get("statuses", []) if s not in ("200", "206")])
    ]
    if problems:
        lines += ["## Failures and warnings", "", *problems, ""]
    return lines


def targets(rows: list[dict[str, Any]], expected: dict[str, int], ckpt: Checkpoint) -> list[str]:
    """The project's targets, each with the numbers it was computed from."""
    lines = []
    curl, start = report.get_row(rows, "curl"), report.get_row(rows, "start")
    ours, sst = report.get_row(rows, "stream_st"), report.get_row(rows, "safetensors_streaming")
    if curl and start:
        floor = start["median_s"] + curl["median_s"]
        lines.append(f"- floor = start + curl = {start['median_s']:.2f} + {curl['median_s']:.2f} = {floor:.2f} s")
        for key in ("stream_st", "safetensors_streaming", "fsspec", "download"):
            other = report.get_row(rows, key)
            if other:
                x = other["median_s"] / floor
                verdict = (
                    f" (target ≤ {TARGET_VS_FLOOR:.2f}: {_met(x <= TARGET_VS_FLOOR)})" if key == "stream_st" else ""
                )
                lines.append(f"- {key} ÷ floor = {other['median_s']:.2f} / {floor:.2f} = **{x:.2f}×**{verdict}")
    if ours and sst:
        x = ours["median_s"] / sst["median_s"]
        lines.append(
            f"- stream_st ÷ safetensors_streaming = {ours['median_s']:.2f} / {sst['median_s']:.2f} = "
            f"**{x:.2f}×** (target ≤ {TARGET_VS_SST}: {_met(x <= TARGET_VS_SST)})"
        )
    elif ours:
        lines.append("- stream_st ÷ safetensors_streaming: not computed (safetensors_streaming had no successful run)")
    verified = report.get_row(rows, "stream_st_verify")
    if ours and verified:
        lines.append(
            f"- cost of verify (sha256 while streaming): {verified['median_s']:.2f} / {ours['median_s']:.2f} = "
            f"**{verified['median_s'] / ours['median_s']:.2f}×** stream_st without it"
        )
    partial = report.get_row(rows, "partial")
    if partial:
        pulled, requests = int(statistics.median(partial["bytes"])), int(statistics.median(partial["requests"]))
        extra = pulled - expected["bytes"]
        lines.append(
            f"- partial ({expected['tensors']} tensors of layers 0–1): needed = selected "
            f"{expected['selected_bytes']:,} + header {ckpt.header_bytes:,} = {expected['bytes']:,} B; "
            f"pulled {pulled:,} B ({extra:+,} B, {'exact' if extra == 0 else 'NOT exact'}); requests {requests} vs "
            f"ideal {expected['requests']} (1 header GET + {expected['requests'] - 1} parts of ≤ "
            f"{expected['part_size'] >> 20} MiB over {expected['spans']} coalesced span(s))"
        )
    return lines


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        print(f"no plot: matplotlib is not installed ({e}); `.venv/bin/pip install matplotlib` to get one")
        return
    done = [r for r in rows if "median_s" in r]
    medians = [r["median_s"] for r in done]
    errors = [[m - r["min_s"] for m, r in zip(medians, done)], [r["max_s"] - m for m, r in zip(medians, done)]]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(done) + 1.5))
    colors = ["tab:green" if r["key"] in ("stream_st", "partial") else "tab:gray" for r in done]
    ax.barh([r["key"] for r in done], medians, xerr=errors, color=colors, capsize=3)
    curl, start = report.get_row(rows, "curl"), report.get_row(rows, "start")
    if curl and start:
        floor = curl["median_s"] + start["median_s"]
        ax.axvline(floor, color="black", linestyle="--", label=f"start + curl = {floor:.2f} s")
        target = floor * TARGET_VS_FLOOR
        ax.axvline(target, color="tab:red", linestyle=":", label=f"target {TARGET_VS_FLOOR:.2f}× = {target:.2f} s")
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


if __name__ == "__main__":
    raise SystemExit(main())
