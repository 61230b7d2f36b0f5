"""Whole-process benchmark of the local cache (cache_dir=) on the checkpoint served by nginx.

    .venv/bin/python benchmarks/cache.py [--size-gib 1.0] [--repeats 5] [--out benchmarks/out] [--only KEY ...]

Contenders, each checked once untimed and then timed in rotated rounds as fresh processes (harness/rounds.py),
with ``sync`` (outside the timing) before every run so that no run pays for the previous one's dirty pages:

* ``safetensors_local``: ``safetensors.torch.load_file`` of the same file on local disk (page cache warm);
* ``safetensors_local_touched``: the same, then one byte of every page read: ``load_file`` maps the file
  lazily (its RSS stays small), so this is the cost of having every byte in memory;
* ``stream_st_local``: ``stream_st.load_file`` of the local file (``preadv`` into the tensors);
* ``stream_st_cached``: ``stream_st.load_file(url, cache_dir=...)`` with the cache already filled (the
  network sees the 8-byte version probe only, checked against nginx's log; the tensors map the cache file);
* ``stream_st_cached_touched``: the same, then one byte of every page read (a cached load maps the cache file
  copy-on-write as safetensors maps its file, so this is the cost of having every byte in memory);
* ``stream_st_local_mmap``: ``stream_st.load_file(path, backend="mmap")``, mapped as safetensors does;
* ``stream_st``: ``stream_st.load_file(url)``, no cache;
* ``stream_st_writing``: ``stream_st.load_file(url, cache_dir=...)`` into an empty cache (removed after
  each run), i.e. the first load with the cache being written.

Goals: cached ≤ 1.1× safetensors_local; writing ≤ 1.10× stream_st. Writes OUT/cache-results.md and .json.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the harness, whatever the cwd

from harness import REPO, arguments, report, rounds, servers  # noqa: E402
from harness.checkpoint import ensure_checkpoint  # noqa: E402
from harness.contenders import Contender  # noqa: E402
from harness.process import Run, child_env, python, run_process  # noqa: E402

CONTENDERS = [
    Contender(
        "safetensors_local",
        "`safetensors.torch.load_file(path)` (maps the file lazily)",
        "import safetensors.torch\nsd = safetensors.torch.load_file(LOCAL)",
    ),
    Contender(
        "safetensors_local_touched",
        "the same, then one byte of every page read",
        "import safetensors.torch, torch\nsd = safetensors.torch.load_file(LOCAL)\n"
        "for t in sd.values(): t.view(-1).view(torch.uint8)[::4096].sum()  # fault every page in",
    ),
    Contender(
        "stream_st_local",
        "`stream_st.load_file(path)` (local file)",
        "import stream_st\nsd = stream_st.load_file(LOCAL)",
    ),
    Contender(
        "stream_st_cached",
        "`stream_st.load_file(url, cache_dir=...)`, cache full",
        "import stream_st\nsd = stream_st.load_file(URL, cache_dir=WARM)",
    ),
    Contender(
        "stream_st_cached_touched",
        "the same, then one byte of every page read",
        "import stream_st, torch\nsd = stream_st.load_file(URL, cache_dir=WARM)\n"
        "for t in sd.values(): t.view(-1).view(torch.uint8)[::4096].sum()  # fault every page in",
    ),
    Contender(
        "stream_st_local_mmap",
        "`stream_st.load_file(path, backend=\"mmap\")` (local file, mapped)",
        "import stream_st\nsd = stream_st.load_file(LOCAL, backend='mmap')",
    ),
    Contender("stream_st", "`stream_st.load_file(url)`, no cache", "import stream_st\nsd = stream_st.load_file(URL)"),
    Contender(
        "stream_st_writing",
        "`stream_st.load_file(url, cache_dir=...)`, cache empty (written)",
        "import stream_st\nsd = stream_st.load_file(URL, cache_dir=FRESH)",
    ),
]


def main() -> int:
    p = arguments(__doc__)
    p.add_argument("--only", nargs="+", choices=[c.key for c in CONTENDERS], help="run only these contenders")
    args = p.parse_args()
    out = report.out_dir(args.out)
    ckpt = ensure_checkpoint(out, args.size_gib)
    env = child_env()
    found = report.versions(env, REPO)
    info = report.machine()
    warm, fresh = out / "cache-warm", out / "cache-fresh"
    for folder in (warm, fresh):
        shutil.rmtree(folder, ignore_errors=True)
    with servers.nginx(ckpt.path.parent, out / "nginx-cache") as server:
        values = {"URL": server.url(ckpt.path), "LOCAL": str(ckpt.path), "WARM": str(warm), "FRESH": str(fresh)}
        fill = run_process(
            python(f"import stream_st\nstream_st.load_file({values['URL']!r}, cache_dir={str(warm)!r})"), env, REPO
        )
        if not fill.ok:
            raise SystemExit(f"filling the cache failed:\n{fill.output}")

        def run(c: Contender, check: bool) -> Run:
            os.sync()
            done = server.run(c.argv(values, check), env, REPO)
            shutil.rmtree(fresh, ignore_errors=True)
            return done

        outcomes = rounds.compare([c for c in CONTENDERS if not args.only or c.key in args.only], run, args.repeats)
    report.finish(info)
    rows = [rounds.summary(o) | {"server_bytes": [r.traffic.bytes for r in o.runs]} for o in outcomes]
    cells = [
        [r["label"], *report.wall_cells(r), f"{max(r['server_bytes']):,}", f"{r['rss_mib']:.0f}"]
        if "median_s" in r
        else report.untimed_cells(r, 5)
        for r in rows
    ]
    median = {r["key"]: r["median_s"] for r in rows if "median_s" in r}
    cached, writing = median.get("stream_st_cached"), median.get("stream_st_writing")
    lines = [
        f"{ckpt.path.name}: {ckpt.file_bytes / (1 << 30):.2f} GiB from nginx on 127.0.0.1; median of {args.repeats} "
        "whole-process runs, contenders rotated per round, each checked bit for bit once first",
        "",
        *report.table(["how", f"wall s (median of {args.repeats})", "min–max", "server bytes", "peak RSS MiB"], cells),
        "",
        f"- cached / safetensors_local: {report.ratio(cached, median.get('safetensors_local'))}× (goal ≤ 1.1×)",
        f"- cached, every page touched / safetensors_local, every page touched: "
        f"{report.ratio(median.get('stream_st_cached_touched'), median.get('safetensors_local_touched'))}×",
        f"- writing / stream_st: {report.ratio(writing, median.get('stream_st'))}× (goal ≤ 1.10×)",
        *report.problems(rows),
    ]
    text = report.document("stream_st local cache benchmark", lines, info, found)
    print("\n" + text)
    runs = {o.contender.key: [asdict(r) for r in o.runs] for o in outcomes}
    report.write(out, "cache-results", text, {"machine": info, "versions": found, "rows": rows, "runs": runs})
    return 0 if all("median_s" in r for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
