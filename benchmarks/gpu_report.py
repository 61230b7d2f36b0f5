"""The GPU benchmark's report (benchmarks/gpu.py): each row's medians, the table, and what bounds a load.

The analysis lines: stream_st ÷ min(raw ceiling, pinned H2D) (target ≥ 0.90); the overlap of download and
host→device copy (``overlap``); which stage bounds a load (to host ÷ raw, to the GPU ÷ to host); and the
timeline child's phases of one load (``timeline_lines``).
"""

from __future__ import annotations

import statistics
import subprocess
from collections.abc import Mapping, Sequence
from typing import Any

from harness import report
from harness.checkpoint import Checkpoint

fmt, ratio = report.fmt, report.ratio


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians of one row's runs (each a child's RESULT plus ``wall``, or ``error``)."""
    ok = [r for r in runs if "error" not in r]
    rates = [r["bytes"] / r["seconds"] / 1e9 for r in ok if r.get("seconds") and r.get("bytes")]
    return {
        "n": len(ok),
        "failed": len(runs) - len(ok),
        "gbps": _median(rates),
        "gbps_min": min(rates, default=None),
        "gbps_max": max(rates, default=None),
        "seconds": _median([r["seconds"] for r in ok if "seconds" in r]),
        "ttft": _median([r["ttft"] for r in ok if r.get("ttft") is not None]),
        "rss": _median([r["rss_hwm_mib"] for r in ok if r.get("rss_hwm_mib") is not None]),
        "wall": _median([r["wall"] for r in ok]),
        "errors": [r["error"][:300] for r in runs if "error" in r][:2],
    }


def describe(r: Mapping[str, Any]) -> str:
    """One progress line's worth of a child's result."""
    if "error" in r:
        return f"FAILED: {r['error'][-300:]}"
    rate = f"{r['bytes'] / r['seconds'] / 1e9:6.2f} GB/s" if r.get("bytes") else " " * 11
    ttft = f"  first tensor {r['ttft']:.3f} s" if r.get("ttft") is not None else ""
    return (
        f"{rate}  {r.get('seconds', 0):7.3f} s  RSS {r.get('rss_hwm_mib') or 0:6.0f} MiB  wall {r['wall']:.2f} s{ttft}"
    )


def table(rows: Sequence[tuple[str, str]], stats: Mapping[str, Mapping[str, Any]], base_rss: float | None) -> list[str]:
    header = [
        "row",
        "what the fresh child process does",
        "GB/s (median)",
        "min–max",
        "load s",
        "first tensor s",
        "peak RSS MiB",
        "RSS over start",
        "process wall s",
        "runs",
    ]
    cells = []
    for key, what in rows:
        s = stats.get(key)
        if s is None:
            continue
        spread = f"{fmt(s['gbps_min'])}–{fmt(s['gbps_max'])}" if s["gbps"] is not None else "—"
        # raw imports no torch: its RSS is not "start + something"
        over = s["rss"] - base_rss if None not in (s["rss"], base_rss) and key not in ("start", "raw") else None
        runs = f"{s['n']}" + (f" ({s['failed']} failed)" if s["failed"] else "")
        cells.append(
            [
                key,
                what,
                fmt(s["gbps"]),
                spread,
                fmt(s["seconds"], 3),
                fmt(s["ttft"], 3),
                fmt(s["rss"], 0),
                fmt(over, 0),
                fmt(s["wall"]),
                runs,
            ]
        )
    return report.table(header, cells, "l" * len(header))


def overlap(net_gbps: float | None, h2d_gbps: float | None, load_gbps: float | None) -> str:
    """How much of the shorter stage the load hid behind the longer one, from rates measured in this run:
    per byte, downloading takes 1/net, copying 1/h2d; done one after the other they take the sum, fully
    overlapped the larger. 1.00 = fully hidden (above 1: faster than the raw ceiling, which is timed in a
    fresh process); 0 or less = serialised, or slowed by costs outside both stages."""
    if not (net_gbps and h2d_gbps and load_gbps):
        return "—"
    net, h2d, load = 1 / net_gbps, 1 / h2d_gbps, 1 / load_gbps  # seconds per GB
    hidden = (net + h2d - load) / min(net, h2d)
    return f"{hidden:.2f} (download {net:.3f} s/GB + copy {h2d:.3f} s/GB serially; stream_st {load:.3f} s/GB)"


TIMELINE_KEYS = [
    ("seconds", "load s"),
    ("gbps", "GB/s"),
    ("before_first_part_s", "call → first part s (header, allocation)"),
    ("allocate_outputs_s", "allocating outputs s"),
    ("acquire_s", "slot acquire s (first wave max / total)"),
    ("read_window_s", "first read → last read s"),
    ("gbps_in_read_window", "GB/s in that window"),
    ("read_busy_share", "share of threads × window spent reading"),
    ("ship_total_s", "queuing copies s (total)"),
    ("after_last_read_s", "last read → return s"),
]


def timeline_lines(timeline: Mapping[str, Any]) -> list[str]:
    """The diagnostic child's phases of one load, as a small table."""
    if "loads" not in timeline:
        return [f"- timeline of one load: {timeline.get('error', 'not run')[-400:]}"] if timeline else []
    loads = timeline["loads"]
    cells = [
        [
            label,
            *(
                f"{v['first_wave_max']} / {v['total']}" if isinstance(v, dict) else str(v)
                for v in (load.get(key) for load in loads)
            ),
        ]
        for key, label in TIMELINE_KEYS
    ]
    head = "Where one load's time goes (one process, two loads; diagnostic child, phases timed in-process):"
    return ["", head, "", *report.table(["phase", *(load["load"] for load in loads)], cells, "l" * (len(loads) + 1))]


def _warm_gbps(timeline: Mapping[str, Any]) -> float | None:
    loads = timeline.get("loads") or []
    return loads[-1]["gbps"] if len(loads) > 1 else None


def _first(runs: list[dict[str, Any]] | None, key: str) -> Any:
    return next((r[key] for r in runs or [] if key in r), "?")


def nvidia_smi() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        return out.stdout.strip().replace("\n", "; ") or "n/a"
    except (OSError, subprocess.TimeoutExpired):
        return "n/a"


def rows(threads: int, where: str) -> list[tuple[str, str]]:
    """Every row of the table: key and what its child does."""
    return [
        ("raw", f"server ceiling: {threads} threads http.client readinto, 16 MiB ranges, bytes discarded"),
        ("h2d", "pinned host→device copy_ of 16 MiB, 256 times (CUDA events)"),
        ("start", "import torch + stream_st + safetensors, CUDA init (RSS baseline)"),
        ("safetensors", f'safetensors.torch.load_file(path in {where}, device="cuda")'),
        ("stream_st", f'stream_st.load_file(url, "cuda"), MAX_CONCURRENCY={threads}'),
        ("iter", f'stream_st.iter_tensors(url, "cuda"), MAX_CONCURRENCY={threads}'),
        ("stream_st_cpu", f"stream_st.load_file(url) to host memory, MAX_CONCURRENCY={threads} (no GPU stage)"),
        ("stream_st_pool512", "as stream_st, PINNED_POOL_BYTES=512 MiB"),
        ("stream_st_part8", "as stream_st, PART_SIZE=8 MiB (8 MiB slots: half the memory to pin in a cold process)"),
        ("verify", 'as stream_st, verify="sha256:…" (whole file)'),
        ("sha256", "hashlib.sha256 of the page-cached file (mmap, 4 MiB updates): the rate that bounds verify"),
    ]


def gpu_report(
    a: Any,
    probe: Mapping[str, Any],
    ckpt: Checkpoint,
    check: Mapping[str, Any],
    runs: dict[str, list[dict[str, Any]]],
    rounds: int,
    timeline: Mapping[str, Any],
) -> tuple[list[str], list[str], dict[str, Any]]:
    """The report's lines, the failures among them, and every row's medians."""
    stats = {key: summarize(r) for key, r in runs.items()}
    g = {k: s["gbps"] for k, s in stats.items()}
    limit = min((v for v in (g.get("raw"), g.get("h2d")) if v), default=None)
    info = report.machine()
    lines = [
        f"# stream_st on the GPU: {probe['gpu']}",
        "",
        f"- date (UTC): {info['date']}; CPUs: {probe['cpus']} ({info['cpu']}); nvidia-smi: {nvidia_smi()}",
        f"- python {probe['python']}, torch {probe['torch']} (CUDA {probe['torch_cuda']}), safetensors "
        f"{probe['safetensors']}, aiohttp {probe['aiohttp']}, fsspec {probe['fsspec']}, stream_st {probe['stream_st']} "
        f"(commit {report.git_commit()})",
        f"- checkpoint: {ckpt.file_bytes / (1 << 30):.2f} GiB ({ckpt.file_bytes:,} bytes), {len(ckpt.spans)} bf16 "
        f"tensors, hidden {ckpt.hidden}, random bytes, in {ckpt.path.parent} (page-cached)",
        f"- server: {a.servers} aiohttp processes, one port (SO_REUSEPORT), FileResponse/sendfile, 127.0.0.1",
        "- bit-exact check of load_file and iter_tensors against safetensors: "
        + ("passed" if check.get("bit_exact") else f"FAILED ({check.get('error', '?')[:300]})"),
        f"- each row: a fresh process per run; {rounds} of {a.repeats} rounds done, order rotated; GB/s = file "
        "bytes ÷ the in-process time of the call (+ cuda synchronize); peak RSS = VmHWM",
        "",
        *table(rows(a.threads, str(ckpt.path.parent.parent)), stats, stats.get("start", {}).get("rss")),
        "",
        f"- limit = min(raw ceiling, pinned H2D) = {fmt(limit)} GB/s",
        f"- **stream_st ÷ limit = {ratio(g.get('stream_st'), limit)}** (target ≥ 0.90); "
        f"pool 512 MiB ÷ limit = {ratio(g.get('stream_st_pool512'), limit)}; "
        f"8 MiB parts ÷ limit = {ratio(g.get('stream_st_part8'), limit)}",
        f"- stream_st ÷ safetensors(page cache) = {ratio(g.get('stream_st'), g.get('safetensors'))}; "
        f"verify ÷ stream_st = {ratio(g.get('verify'), g.get('stream_st'))}; verify ÷ sha256 rate = "
        f"{ratio(g.get('verify'), g.get('sha256'))} (1.00: verifying costs only what hashing needs; CPU "
        f"{_first(runs.get('sha256'), 'cpu')}, sha_ni {_first(runs.get('sha256'), 'sha_ni')})",
        f"- time to first tensor (iter_tensors, first = `{ckpt.first_tensor}`): "
        f"{fmt(stats.get('iter', {}).get('ttft'), 3)} s",
        f"- overlap of download and host→device copy: {overlap(g.get('raw'), g.get('h2d'), g.get('stream_st'))}; "
        f"from the second load in one process (pool pinned; timeline below): "
        f"{overlap(g.get('raw'), g.get('h2d'), _warm_gbps(timeline))}",
        f"- which stage bounds it: stream_st to host ÷ raw = {ratio(g.get('stream_st_cpu'), g.get('raw'))} "
        "(the data plane and fresh host memory), stream_st to cuda ÷ to host = "
        f"{ratio(g.get('stream_st'), g.get('stream_st_cpu'))} (the slot pipeline and copies)",
        *timeline_lines(timeline),
    ]
    errors = [f"- {k} failures: {s['errors']}" for k, s in stats.items() if s["errors"]]
    return lines + errors, errors, stats
