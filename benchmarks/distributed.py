"""N ranks loading the same checkpoint: each rank loading everything vs split-and-exchange
(``process_group=``), on CPU with gloo. Reports wall time and bytes served by storage (nginx's log).

    .venv/bin/python benchmarks/distributed.py --ranks 2 --repeats 3

Each mode runs as N fresh processes started together (torch.distributed over 127.0.0.1); the wall time is
from start to the last rank's exit. On a 2-core machine the ranks share the cores with nginx, so the
wall-time ratio says little about a real cluster; the byte ratio is exact.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from checkpoint import ensure_checkpoint  # noqa: E402
from nginx_server import free_port, serve  # noqa: E402

RANK = """
import re, sys, time, datetime, torch.distributed as dist, stream_st
url, rank, world, port, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                        timeout=datetime.timedelta(seconds=120))
if mode == "iter":  # tensors consumed (summed) and dropped as they come, as when filling a model
    count = sum(1 for _, tensor in stream_st.iter_tensors(url, process_group=True))
else:
    count = len(stream_st.load_file(url, process_group=True if mode == "split" else None))
dist.barrier()
status = open("/proc/self/status").read()
print(count, int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1)) << 10)
dist.destroy_process_group()
"""

MODES = {
    "each rank loads everything (`load_file`)": "all",
    "split and exchange (`load_file(process_group=)`)": "split",
    "split and exchange, batch by batch (`iter_tensors(process_group=)`)": "iter",
}


def run_mode(url: str, ranks: int, mode: str) -> tuple[float, int]:
    """Wall seconds until the last rank exits, and the largest peak RSS of a rank."""
    port = str(free_port())
    started = time.perf_counter()
    children = [
        subprocess.Popen([sys.executable, "-c", RANK, url, str(r), str(ranks), port, mode], stdout=subprocess.PIPE)
        for r in range(ranks)
    ]
    outputs = [child.communicate(timeout=600)[0] for child in children]
    seconds = time.perf_counter() - started
    if any(child.returncode for child in children):
        raise RuntimeError(f"a rank failed: exit codes {[child.returncode for child in children]}")
    return seconds, max(int(out.split()[-1]) for out in outputs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size-gib", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    args = parser.parse_args()
    local = ensure_checkpoint(args.out, args.size_gib)
    rows: dict[str, dict[str, list[float]]] = {label: {} for label in MODES}
    with serve(root=local.parent, prefix=args.out / "nginx-distributed") as server:
        url = server.url(local)
        for _ in range(args.repeats):
            for label, mode in MODES.items():
                offset = server.log_offset()
                seconds, peak = run_mode(url, args.ranks, mode)
                traffic = server.traffic_since(offset)
                rows[label].setdefault("seconds", []).append(seconds)
                rows[label].setdefault("bytes", []).append(traffic.bytes)
                rows[label].setdefault("peak_rss", []).append(peak)
    size = local.stat().st_size
    lines = [
        f"{args.ranks} ranks (gloo, CPU), {size / (1 << 30):.2f} GiB checkpoint from nginx on 127.0.0.1, "
        f"median of {args.repeats}",
        "",
        "| mode | wall s | bytes from storage | × file size | peak RSS of a rank, MiB |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, row in rows.items():
        pulled = statistics.median(row["bytes"])
        seconds, peak = statistics.median(row["seconds"]), statistics.median(row["peak_rss"]) / (1 << 20)
        lines.append(f"| {label} | {seconds:.2f} | {pulled:,.0f} | {pulled / size:.2f} | {peak:,.0f} |")
    text = "\n".join(lines)
    print(text)
    (args.out / "distributed_results.md").write_text(text + "\n")
    (args.out / "distributed_results.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
