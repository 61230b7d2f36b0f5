#!/usr/bin/env python3
"""GPU benchmark of the device path, against the physical limits, in one command (docs/ARCHITECTURE.md §5).

    python benchmarks/gpu.py                    # on a CUDA machine (about 3 minutes on 16 cores)
    python benchmarks/gpu.py --server-check     # no GPU needed: the loopback server + raw client only
    python benchmarks/gpu.py --cpu-dry-run      # the whole flow on the CPU, to test this script

What one run does:

1. generates the checkpoint of harness/checkpoint.py (``--size-gib`` 4.5 → hidden 3328, 4.38 GiB, 147 bf16
   tensors) in /dev/shm (else $TMPDIR or /tmp), with its sha256 sidecar unless ``--quick``;
2. serves it with ``--servers`` (8) aiohttp processes sharing one port (harness/servers.py ``aiohttp_group``);
3. checks once, untimed, that ``stream_st.load_file(url, "cuda")`` and ``stream_st.iter_tensors`` return every
   tensor bit for bit as ``safetensors.torch.load_file(path, device="cuda")`` does; runs the ``timeline``
   child once (the phases of two loads in one process);
4. runs ``--repeats`` rounds, order rotated, every row a fresh child (gpu_children.py; rows listed in
   gpu_report.py): raw (harness/raw_get.py, ``--threads`` threads), h2d, start, safetensors, stream_st, iter,
   stream_st_cpu and, without ``--quick``, stream_st_pool512, stream_st_part8, verify, sha256; no round starts
   that would end after ``--deadline-s``;
5. writes ``gpu_results.md`` and ``gpu_results.json`` (gpu_report.py) to $OUT when set (the device tool brings
   those back), else ``benchmarks/out/``, after every round, so that a timeout still leaves numbers.

Without CUDA it prints ``no CUDA`` and exits 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the harness, whatever the cwd

import gpu_report  # noqa: E402
from harness import HARNESS, REPO, report, rounds, servers  # noqa: E402
from harness.checkpoint import Checkpoint, ensure_checkpoint  # noqa: E402
from harness.process import child_env, run_process  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30

# key → (child kind, its arguments, extra environment)
Plan = dict[str, tuple[str, dict[str, Any], dict[str, str]]]


def run_child(
    kind: str, args: dict[str, Any], env: dict[str, str] | None = None, timeout: float = 120
) -> dict[str, Any]:
    """One fresh child: its RESULT plus ``wall``, or ``error``."""
    if kind == "raw":
        argv = [
            sys.executable,
            str(HARNESS / "raw_get.py"),
            args["url"],
            str(args["size"]),
            str(args["threads"]),
            str(args["part"]),
        ]
    else:
        argv = [sys.executable, str(HERE / "gpu_children.py"), kind, json.dumps(args)]
    run = run_process(argv, child_env(REPO, env), REPO, timeout)
    if run.ok and run.result is not None:
        return run.result | {"wall": run.wall_s}
    return {"error": f"exit {run.rc}: {run.output[-1500:]}", "wall": run.wall_s}


def data_dir(explicit: str | None, size_gib: float) -> Path:
    """/dev/shm when it has room (tmpfs: the file is always in memory), else $TMPDIR or /tmp (page cache)."""
    if explicit:
        return Path(explicit)
    need = size_gib * GiB * 1.05 + 256 * MiB
    for base in (Path("/dev/shm"), Path(os.environ.get("TMPDIR") or "/tmp")):
        if base.is_dir() and os.access(base, os.W_OK) and shutil.disk_usage(base).free >= need:
            return base / "stream_st_gpu_bench"
        if base.is_dir():
            print(f"{base}: {shutil.disk_usage(base).free / GiB:.1f} GiB free, need {need / GiB:.1f}", flush=True)
    raise SystemExit(f"no folder with {need / GiB:.1f} GiB free for the checkpoint (--data-dir)")


def common_args(url: str, ckpt: Checkpoint, device: str | None = None) -> dict[str, Any]:
    sidecar = ckpt.path.with_name(ckpt.path.name + ".sha256.json")
    return {
        "url": url,
        "path": str(ckpt.path),
        "bytes": ckpt.file_bytes,
        "tensors": len(ckpt.spans),
        "tensor_bytes": ckpt.tensor_bytes,
        "sha256": ckpt.sha256() if sidecar.exists() else None,
    } | ({"device": device} if device else {})


def gpu_main(a: argparse.Namespace) -> int:
    started = time.monotonic()
    if a.cpu_dry_run:
        os.environ["GPU_BENCH_DEVICE"] = "cpu"  # the children inherit it
    probe = run_child("probe", {}, timeout=180)
    if a.cpu_dry_run and "error" not in probe:
        probe |= {"cuda": True, "gpu": "CPU DRY RUN (numbers meaningless)", "gpu_memory_gib": 0, "capability": "-"}
    if "error" in probe or not probe.get("cuda"):
        print(
            f"no CUDA: {probe.get('why') or probe.get('error')}; nothing to benchmark "
            "(python benchmarks/gpu.py --server-check runs the server part without a GPU)",
            flush=True,
        )
        return 2
    print(
        f"GPU: {probe['gpu']} ({probe['gpu_memory_gib']} GiB, sm {probe['capability']}), torch {probe['torch']}, "
        f"{probe['cpus']} CPUs",
        flush=True,
    )
    out = report.out_dir(a.out)
    folder = data_dir(a.data_dir, a.size_gib)
    ckpt = ensure_checkpoint(folder, a.size_gib, sidecar=not a.quick)
    sst = {"STREAM_ST_MAX_CONCURRENCY": str(a.threads)}
    try:
        with servers.aiohttp_group(ckpt.path.parent, a.servers, child_env()) as group:
            url = group.url(ckpt.path)
            common = common_args(url, ckpt)
            print(f"server: {a.servers} aiohttp processes on {url}", flush=True)
            check = run_child("check", common, sst, timeout=a.child_timeout)
            verdict = "bit-exact" if check.get("bit_exact") else "FAILED: " + check.get("error", "?")[-800:]
            print(f"check: {verdict}", flush=True)
            timeline = run_child("timeline", common, sst, timeout=a.child_timeout)
            print("\n".join(gpu_report.timeline_lines(timeline)), flush=True)
            plan: Plan = {
                "raw": ("raw", {"url": url, "size": ckpt.file_bytes, "threads": a.threads, "part": 16 * MiB}, {}),
                "h2d": ("h2d", {"slot": 16 * MiB, "iters": 256}, {}),
                "start": ("start", {}, {}),
                "safetensors": ("safetensors", common, {}),
                "stream_st": ("stream_st", common, sst),
                "iter": ("iter", common, sst),
                "stream_st_cpu": ("cpu_stream_st", common, sst),
            }
            if not a.quick:
                plan |= {
                    "stream_st_pool512": ("stream_st", common, sst | {"STREAM_ST_PINNED_POOL_BYTES": str(512 * MiB)}),
                    "stream_st_part8": ("stream_st", common, sst | {"STREAM_ST_PART_SIZE": str(8 * MiB)}),
                    "verify": ("stream_st", common | {"verify": True}, sst),
                    "sha256": ("sha256", common, {}),
                }

            def save(runs: dict[str, list[dict[str, Any]]], done: int) -> list[str]:
                lines, errors, stats = gpu_report.gpu_report(a, probe, ckpt, check, runs, done, timeline)
                data = {
                    "probe": probe,
                    "checkpoint": {
                        "path": str(ckpt.path),
                        "bytes": ckpt.file_bytes,
                        "tensors": len(ckpt.spans),
                        "hidden": ckpt.hidden,
                    },
                    "check": check,
                    "timeline": timeline,
                    "runs": runs,
                    "stats": stats,
                    "args": vars(a),
                    "rounds": done,
                    "elapsed_s": time.monotonic() - started,
                }
                report.write(out, "gpu_results", "\n".join(lines) + "\n", data, quiet=True)
                return errors

            runs = rounds.run_rounds(
                list(plan),
                a.repeats,
                lambda key: run_child(*plan[key], timeout=a.child_timeout),
                show=gpu_report.describe,
                deadline=started + a.deadline_s,
                on_round=save,
            )
    finally:
        if not a.keep:
            shutil.rmtree(folder, ignore_errors=True)
    done = min((len(r) for r in runs.values()), default=0)
    errors = save(runs, done)
    print("\n" + (out / "gpu_results.md").read_text(), flush=True)
    print(f"wrote {out / 'gpu_results.md'} and gpu_results.json", flush=True)
    return 0 if check.get("bit_exact") and not errors else 1


def server_check_main(a: argparse.Namespace) -> int:
    """The GPU-free part: a small file, the servers, the raw ceiling and stream_st to CPU."""
    folder = data_dir(a.data_dir, a.size_mib / 1024) / "server-check"
    ckpt = ensure_checkpoint(folder, a.size_mib / 1024, sidecar=False)
    sst = {"STREAM_ST_MAX_CONCURRENCY": str(a.threads)}
    try:
        with servers.aiohttp_group(ckpt.path.parent, a.servers, child_env()) as group:
            url = group.url(ckpt.path)
            print(f"server: {a.servers} aiohttp processes on {url}; file {ckpt.file_bytes / MiB:.0f} MiB", flush=True)
            common = common_args(url, ckpt, device="cpu")
            check = run_child("check", common, sst, timeout=a.child_timeout)
            print(f"check (stream_st to CPU vs safetensors): {'bit-exact' if check.get('bit_exact') else check}")
            plan: Plan = {
                "raw": ("raw", {"url": url, "size": ckpt.file_bytes, "threads": a.threads, "part": 16 * MiB}, {}),
                "stream_st_cpu": ("cpu_stream_st", common, sst),
            }
            runs = rounds.run_rounds(
                list(plan),
                a.repeats,
                lambda key: run_child(*plan[key], timeout=a.child_timeout),
                show=gpu_report.describe,
                deadline=time.monotonic() + a.deadline_s,
            )
    finally:
        if not a.keep:
            shutil.rmtree(folder, ignore_errors=True)
            with contextlib.suppress(OSError):
                folder.parent.rmdir()
    stats = {k: gpu_report.summarize(r) for k, r in runs.items()}
    what = [("raw", "http.client readinto, bytes discarded"), ("stream_st_cpu", "stream_st.load_file(url) to CPU")]
    lines = [
        f"# loopback server check (no GPU): {os.cpu_count()} CPUs, {a.servers} server processes, {a.threads} threads",
        "",
        *gpu_report.table(what, stats, None),
    ]
    print("\n" + "\n".join(lines), flush=True)
    report.write(
        report.out_dir(a.out), "server_check", "\n".join(lines) + "\n", {"runs": runs, "stats": stats, "check": check}
    )
    return 0 if check.get("bit_exact") and all(s["n"] and not s["failed"] for s in stats.values()) else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-gib", type=float, default=4.5, help="checkpoint size (4.5 → 4.38 GiB)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--servers", type=int, default=8, help="aiohttp server processes sharing the port")
    p.add_argument("--threads", type=int, default=16, help="raw client threads = STREAM_ST_MAX_CONCURRENCY")
    p.add_argument("--quick", action="store_true", help="skip the pool-512, part-8, verify and sha256 rows")
    p.add_argument("--deadline-s", type=float, default=270, help="start no round that would end after this")
    p.add_argument("--child-timeout", type=float, default=120, help="seconds for one child process")
    p.add_argument("--data-dir", help="where the checkpoint goes (default /dev/shm/stream_st_gpu_bench)")
    p.add_argument("--keep", action="store_true", help="keep the generated checkpoint")
    p.add_argument("--out", help="results folder (default $OUT, else benchmarks/out)")
    p.add_argument("--server-check", action="store_true", help="no GPU: server + raw client + CPU load only")
    p.add_argument("--size-mib", type=float, default=512, help="file size for --server-check")
    p.add_argument("--cpu-dry-run", action="store_true", help="the GPU flow on the CPU, to test this script")
    a = p.parse_args(argv)

    def _terminate(signum: int, _frame: Any) -> None:
        raise SystemExit(f"stopped by signal {signum}")  # so that the servers are stopped and the file removed

    signal.signal(signal.SIGTERM, _terminate)
    return server_check_main(a) if a.server_check else gpu_main(a)


if __name__ == "__main__":
    sys.exit(main())
