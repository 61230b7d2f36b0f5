#!/usr/bin/env python3
"""A/B of how an hf:// file is resolved, in alternating fresh processes against the Hub-compatible test server:

    .venv/bin/python benchmarks/hub_resolve_ab.py [--pairs 8] [--file benchmarks/out/data/llama-like-*.safetensors]

- ``direct``: ``storage_options={"endpoint", "token"}`` only: stream_st builds the resolve URL itself;
- ``hffs``: the same plus ``block_size`` (an option only HfFileSystem takes, unused by stream_st), which sends
  the load through HfFileSystem (its import and a repo-info request), as every hf:// load did before.

Each child times ``import torch, stream_st`` and then ``load_file`` separately (the resolution's cost is in
the load), so the 2-core machine's start-up noise, which hides a 0.2 s effect in whole-process timings
(``cloud.py``), stays out of the comparison. Pairs alternate which variant runs first.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

CHILD = """
import json, sys, time
t0 = time.perf_counter()
import torch, stream_st
t1 = time.perf_counter()
state = stream_st.load_file(sys.argv[1], storage_options=json.loads(sys.argv[2]))
t2 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "load": t2 - t1, "tensors": len(state)}))
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--file", type=Path, help="a safetensors file (default: the one benchmarks/run.py generates)")
    a = p.parse_args()
    path = a.file or next((HERE / "out" / "data").glob("llama-like-*.safetensors"), None)
    if path is None:
        raise SystemExit("no checkpoint: run benchmarks/run.py once, or pass --file")
    from hub_server import HubServer

    with tempfile.TemporaryDirectory() as root, HubServer(Path(root), redirect="lfs") as hub:
        hub.commit("org/bench", {"model.safetensors": path})
        url = "hf://org/bench/model.safetensors"
        plain = {"endpoint": hub.endpoint, "token": False}
        variants = {"direct": plain, "hffs": {**plain, "block_size": 0}}
        runs: dict[str, list[dict[str, float]]] = {key: [] for key in variants}
        for i in range(a.pairs):
            for key in list(variants)[:: 1 if i % 2 else -1]:
                out = subprocess.run(
                    [sys.executable, "-c", CHILD, url, json.dumps(variants[key])],
                    capture_output=True,
                    text=True,
                    timeout=300,
                    check=True,
                )
                runs[key].append(json.loads(out.stdout.splitlines()[-1]))
    print(f"{path.name}: {path.stat().st_size:,} bytes, {a.pairs} pairs, loopback Hub server with a CDN redirect")
    load = {key: statistics.median(r["load"] for r in rs) for key, rs in runs.items()}
    for key, rs in runs.items():
        each = ", ".join(f"{r['load']:.2f}" for r in rs)
        print(
            f"{key:7s} import torch+stream_st {statistics.median(r['import'] for r in rs):.3f} s, "
            f"load_file {load[key]:.3f} s (runs: {each})"
        )
    print(f"direct ÷ hffs = {load['direct'] / load['hffs']:.2f}× ({load['direct'] - load['hffs']:+.3f} s per load)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
