#!/usr/bin/env python3
"""A/B of how an hf:// file is resolved, in alternating fresh processes against the Hub-compatible test server:

    .venv/bin/python benchmarks/hub_resolve_ab.py [--pairs 8] [--size-gib 1.0 | --file PATH.safetensors]

- ``direct``: ``storage_options={"endpoint", "token"}`` only: stream_st builds the resolve URL itself;
- ``hffs``: the same plus ``block_size`` (an option only HfFileSystem takes, unused by stream_st), which sends
  the load through HfFileSystem (its import and a repo-info request), as every hf:// load did before.

Each child times ``import torch, stream_st`` and then ``load_file`` separately (the resolution's cost is in
the load), so the 2-core machine's start-up noise, which hides a 0.2 s effect in whole-process timings
(``cloud.py``), stays out of the comparison. Each variant is checked bit for bit once, untimed; the pairs
alternate which variant runs first. Writes OUT/hub_resolve_ab.md and .json.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the harness, whatever the cwd

from harness import REPO, arguments, report, rounds, servers  # noqa: E402
from harness.checkpoint import ensure_checkpoint  # noqa: E402
from harness.contenders import Contender  # noqa: E402
from harness.process import child_env, run_process  # noqa: E402

LOAD = """import json, time
t0 = time.perf_counter()
import torch, stream_st
t1 = time.perf_counter()
sd = stream_st.load_file(URL, storage_options=SO)
t2 = time.perf_counter()
print("RESULT " + json.dumps({"import": t1 - t0, "load": t2 - t1}))
"""
VARIANTS = {"direct": {}, "hffs": {"block_size": 0}}


def main() -> int:
    p = arguments(__doc__, repeats=8)
    p.add_argument("--pairs", dest="repeats", type=int, help="alternating pairs (default 8); the same as --repeats")
    p.add_argument("--file", type=Path, help="a safetensors file (default: the checkpoint of --size-gib)")
    a = p.parse_args()
    out = report.out_dir(a.out)
    path = a.file or ensure_checkpoint(out, a.size_gib).path
    env = child_env()
    found, info = report.versions(env, REPO, ["huggingface_hub"]), report.machine()
    with tempfile.TemporaryDirectory() as root, servers.hub(Path(root)) as hub:
        hub.commit("org/bench", {"model.safetensors": path})
        plain = {"endpoint": hub.endpoint, "token": False}
        contenders = [Contender(key, key, LOAD) for key in VARIANTS]
        url = "hf://org/bench/model.safetensors"
        values = {c.key: {"URL": url, "LOCAL": str(path), "SO": plain | VARIANTS[c.key]} for c in contenders}
        outcomes = rounds.compare(
            contenders, lambda c, check: run_process(c.argv(values[c.key], check), env, REPO), a.repeats
        )
    report.finish(info)
    if not all(o.check_ok and len(o.ok_runs) == a.repeats for o in outcomes):
        raise SystemExit("a variant failed: " + "; ".join(o.check for o in outcomes))
    results = {o.contender.key: [r.result or {} for r in o.runs] for o in outcomes}
    load = {key: rounds.Stats.of([r["load"] for r in rs]) for key, rs in results.items()}
    cells = [
        [
            key,
            f"{rounds.Stats.of([r['import'] for r in rs]).median:.3f}",
            f"{load[key].median:.3f}",
            load[key].spread,
            ", ".join(f"{r['load']:.2f}" for r in rs),
        ]
        for key, rs in results.items()
    ]
    direct, hffs = load["direct"].median, load["hffs"].median
    lines = [
        f"{path.name}: {path.stat().st_size:,} bytes, {a.repeats} pairs, loopback Hub server with a CDN redirect",
        "",
        *report.table(["variant", "import torch + stream_st s", "load_file s (median)", "min–max", "runs"], cells),
        "",
        f"direct ÷ hffs = {direct / hffs:.2f}× ({direct - hffs:+.3f} s per load)",
    ]
    text = report.document("hf:// resolution: stream_st's resolve URL against HfFileSystem", lines, info, found)
    print("\n" + text)
    report.write(out, "hub_resolve_ab", text, {"machine": info, "versions": found, "runs": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
