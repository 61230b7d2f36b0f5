"""N ranks loading the same checkpoint: each rank loading everything vs split-and-exchange (``process_group=``),
on CPU with gloo. Reports wall time, the bytes storage served (nginx's log) and the largest peak RSS of a rank.

    .venv/bin/python benchmarks/distributed.py --ranks 2 --repeats 3

Each mode runs as N fresh processes started together (torch.distributed over 127.0.0.1; harness/process.py
``run_together``), the modes rotated each round; the wall time is from the start to the last rank's exit. On
a 2-core machine the ranks share the cores with nginx, so the wall-time ratio says little about a real
cluster; the byte ratio is exact. Writes OUT/distributed_results.md and .json.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the harness, whatever the cwd

from harness import REPO, arguments, report, rounds, servers  # noqa: E402
from harness.checkpoint import ensure_checkpoint  # noqa: E402
from harness.process import child_env, python, run_together  # noqa: E402

RANK = """
import datetime, json, re, sys, torch.distributed as dist, stream_st
url, rank, world, port, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                        timeout=datetime.timedelta(seconds=120))
if mode == "iter":  # tensors consumed and dropped as they come, as when filling a model
    count = sum(1 for _, tensor in stream_st.iter_tensors(url, process_group=True))
else:
    count = len(stream_st.load_file(url, process_group=True if mode == "split" else None))
dist.barrier()
hwm = int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) << 10
print("RESULT " + json.dumps({"tensors": count, "peak_rss": hwm}), flush=True)
dist.destroy_process_group()
"""

MODES = {
    "all": "each rank loads everything (`load_file`)",
    "split": "split and exchange (`load_file(process_group=)`)",
    "iter": "split and exchange, batch by batch (`iter_tensors(process_group=)`)",
}


def main() -> int:
    p = arguments(__doc__, repeats=3)
    p.add_argument("--ranks", type=int, default=2)
    args = p.parse_args()
    out = report.out_dir(args.out)
    ckpt = ensure_checkpoint(out, args.size_gib)
    env = child_env()
    found = report.versions(env, REPO)
    info = report.machine()
    with servers.nginx(ckpt.path.parent, out / "nginx-distributed") as server:
        url = server.url(ckpt.path)

        def run_mode(mode: str) -> dict[str, Any]:
            port = str(servers.free_port())
            offset = server.log_offset()
            argvs = [python(RANK, url, str(r), str(args.ranks), port, mode) for r in range(args.ranks)]
            wall, ranks = run_together(argvs, env, REPO)
            failed = [f"rank {i}: exit {r.rc}: {r.output}" for i, r in enumerate(ranks) if not r.ok or not r.result]
            if failed:
                raise SystemExit(f"{mode}: a rank failed:\n" + "\n".join(failed))
            peak = max(r.result["peak_rss"] for r in ranks if r.result)
            return {"seconds": wall, "bytes": server.traffic_since(offset).bytes, "peak_rss": peak}

        def show(r: dict[str, Any]) -> str:
            return f"{r['seconds']:6.2f}s {r['bytes']:,} B from storage, peak RSS {r['peak_rss'] >> 20:,} MiB"

        runs = rounds.run_rounds(list(MODES), args.repeats, run_mode, show=show)
    report.finish(info)
    cells = []
    for mode, rs in runs.items():
        pulled = statistics.median(r["bytes"] for r in rs)
        seconds, peak = statistics.median(r["seconds"] for r in rs), statistics.median(r["peak_rss"] for r in rs)
        cells.append(
            [
                MODES[mode],
                f"{seconds:.2f}",
                f"{pulled:,.0f}",
                f"{pulled / ckpt.file_bytes:.2f}",
                f"{peak / (1 << 20):,.0f}",
            ]
        )
    lines = [
        f"{args.ranks} ranks (gloo, CPU), {ckpt.file_bytes / (1 << 30):.2f} GiB checkpoint from nginx on 127.0.0.1, "
        f"median of {args.repeats}, modes rotated per round",
        "",
        *report.table(["mode", "wall s", "bytes from storage", "× file size", "peak RSS of a rank, MiB"], cells),
    ]
    text = report.document("Many ranks loading one checkpoint", lines, info, found)
    print("\n" + text)
    report.write(out, "distributed_results", text, {"machine": info, "versions": found, "runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
