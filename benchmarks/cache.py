"""Whole-process benchmark of the local cache (cache_dir=) on the 1 GiB checkpoint served by nginx.

    .venv/bin/python benchmarks/cache.py [--size-gib 1.0] [--repeats 5] [--out benchmarks/out]

Contenders, each a fresh process, the order rotated every round, ``sync`` (outside the timing) before every
run so that no run pays for the previous one's dirty pages:

* ``safetensors_local``: ``safetensors.torch.load_file`` of the same file on local disk (page cache warm);
* ``safetensors_local_touched``: the same, then one byte of every page read: ``load_file`` maps the file
  lazily (its RSS stays small), so this is the cost of having every byte in memory;
* ``stream_st_local``: ``stream_st.load_file`` of the local file (``preadv`` into the tensors);
* ``stream_st_cached``: ``stream_st.load_file(url, cache_dir=...)`` with the cache already filled (the
  network sees the 8-byte version probe only, checked against nginx's log);
* ``stream_st``: ``stream_st.load_file(url)``, no cache;
* ``stream_st_writing``: ``stream_st.load_file(url, cache_dir=...)`` into an empty cache (removed after
  each run), i.e. the first load with the cache being written.

Goals (issue #15): cached ≤ 1.1× safetensors_local; writing ≤ 1.10× stream_st. Every contender is checked
bit for bit against ``safetensors.torch.load_file`` once, untimed. Writes OUT/cache-results.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import process  # noqa: E402
from checkpoint import ensure_checkpoint  # noqa: E402
from nginx_server import serve  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

CODE = {
    "safetensors_local": "import safetensors.torch, sys\nstate = safetensors.torch.load_file(sys.argv[1])\n",
    "safetensors_local_touched": (
        "import safetensors.torch, sys, torch\nstate = safetensors.torch.load_file(sys.argv[1])\n"
        "for t in state.values(): t.view(-1).view(torch.uint8)[::4096].sum()  # fault every page in\n"
    ),
    "stream_st_local": "import stream_st, sys\nstate = stream_st.load_file(sys.argv[1])\n",
    "stream_st_cached": "import stream_st, sys\nstate = stream_st.load_file(sys.argv[2], cache_dir=sys.argv[3])\n",
    "stream_st": "import stream_st, sys\nstate = stream_st.load_file(sys.argv[2])\n",
    "stream_st_writing": "import stream_st, sys\nstate = stream_st.load_file(sys.argv[2], cache_dir=sys.argv[3])\n",
}
CHECK = (
    "import safetensors.torch, torch\nexpected = safetensors.torch.load_file(sys.argv[1])\n"
    "assert state.keys() == expected.keys()\n"
    "same = lambda a, b: torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8))\n"
    "assert all(same(state[k], v) for k, v in expected.items())\n"
    "print('bit-exact')\n"
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-gib", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    p.add_argument("--only", nargs="+", choices=list(CODE), help="run only these contenders")
    args = p.parse_args()
    contenders = args.only or list(CODE)
    path = ensure_checkpoint(args.out, args.size_gib)
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAM_ST_") and not k.lower().endswith("_proxy")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    warm, fresh = args.out / "cache-warm", args.out / "cache-fresh"
    for folder in (warm, fresh):
        shutil.rmtree(folder, ignore_errors=True)
    with serve(path.parent, args.out / "nginx-cache") as nginx:
        url = nginx.url(path)

        def run(key: str, check: bool = False) -> process.Run:
            os.sync()
            code = CODE[key] + (CHECK if check else "")
            argv = [sys.executable, "-c", code, str(path), url, str(warm if key == "stream_st_cached" else fresh)]
            offset = nginx.log_offset()
            result = process.run_process(argv, env, REPO)
            result.traffic = nginx.traffic_since(offset)  # type: ignore[attr-defined]
            if key == "stream_st_writing":
                shutil.rmtree(fresh, ignore_errors=True)
            assert result.ok, result.output
            return result

        process.run_process([sys.executable, "-c", CODE["stream_st_writing"], "", url, str(warm)], env, REPO)
        for key in contenders:
            checked = run(key, check=True)
            print(f"{key}: {checked.output.splitlines()[-1]}; server sent {checked.traffic.bytes} bytes", flush=True)  # type: ignore[attr-defined]
        runs: dict[str, list[process.Run]] = {key: [] for key in contenders}
        keys = contenders
        for round_ in range(args.repeats):
            order = keys[round_ % len(keys) :] + keys[: round_ % len(keys)]
            for key in order:
                runs[key].append(run(key))
            print(f"round {round_ + 1}: " + ", ".join(f"{k} {runs[k][-1].wall_s:.2f}s" for k in keys), flush=True)
    stats = {key: process.timing(r) | {"server_bytes": [x.traffic.bytes for x in r]} for key, r in runs.items()}  # type: ignore[attr-defined]
    median = {key: s["median_s"] for key, s in stats.items()}
    nan = float("nan")
    cached_ratio = median.get("stream_st_cached", nan) / median.get("safetensors_local", nan)
    writing_ratio = median.get("stream_st_writing", nan) / median.get("stream_st", nan)
    machine = f"{platform.node()}, {os.cpu_count()} cores, {platform.platform()}"
    lines = [
        f"# cache benchmark ({time.strftime('%Y-%m-%d')}, {machine})",
        "",
        f"{path.name}: {path.stat().st_size / (1 << 30):.2f} GiB; median of {args.repeats} whole-process runs",
        "",
        "| how | wall s (median) | min–max | server bytes | peak RSS MiB |",
        "|---|---:|---:|---:|---:|",
    ]
    for key, s in stats.items():
        lines.append(
            f"| {key} | {s['median_s']:.2f} | {s['min_s']:.2f}–{s['max_s']:.2f} | "
            f"{max(s['server_bytes']):,} | {s['rss_mib']:.0f} |"
        )
    lines += [
        "",
        f"cached / safetensors_local: {cached_ratio:.2f}× (goal ≤ 1.1×)",
        f"writing / stream_st: {writing_ratio:.2f}× (goal ≤ 1.10×)",
    ]
    (args.out / "cache-results.md").write_text("\n".join(lines) + "\n")
    (args.out / "cache-results.json").write_text(json.dumps(stats, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
