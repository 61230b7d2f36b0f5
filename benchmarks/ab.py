"""A/B of stream_st at two git revisions: the same load, in alternating fresh processes, over HTTP and S3.

    .venv/bin/python benchmarks/ab.py --base HEAD~3 [--new worktree] [--size-gib 1.0] [--repeats 5]
        [--stores http s3] [--out benchmarks/out]

Each revision is checked out with ``git worktree`` (``--new worktree``, the default, is the live working tree,
uncommitted changes included) and put first on the PYTHONPATH of its children, which also run in it; each side
is probed once to show that its children import stream_st from its own checkout. Per store, one server at a
time on 127.0.0.1 (harness/servers.py): nginx for ``http``, LocalStack for ``s3``. Both sides load the same
checkpoint (harness/checkpoint.py) with ``stream_st.load_file(url, storage_options=...)``, are checked once
untimed bit for bit against ``safetensors.torch.load_file``, then alternate for ``--repeats`` rounds (at least 5
for a figure worth recording). Reported per store: the median whole-process wall time of each side, min–max,
peak RSS, the in-process time of the ``load_file`` call (after ``import torch, stream_st``), and the ratios
new ÷ base. Writes OUT/ab.md and .json.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the harness, whatever the cwd

from harness import arguments, report, rounds, servers  # noqa: E402
from harness.checkpoint import Checkpoint, ensure_checkpoint  # noqa: E402
from harness.contenders import Contender  # noqa: E402
from harness.process import Code, checkout, child_env, run_process  # noqa: E402

LOAD = """import json, time
import torch, stream_st
t0 = time.perf_counter()
sd = stream_st.load_file(URL, storage_options=SO)
print("RESULT " + json.dumps({"load_s": time.perf_counter() - t0}), flush=True)"""
BUCKET = "stream-st-ab"


@contextlib.contextmanager
def store(name: str, ckpt: Checkpoint, out: Path) -> Iterator[dict[str, Any]]:
    """The store's server with the checkpoint on it; yields the contenders' values (URL, SO, LOCAL)."""
    if name == "http":
        with servers.nginx(ckpt.path.parent, out / "nginx-ab") as server:
            yield {"URL": server.url(ckpt.path), "SO": None, "LOCAL": str(ckpt.path)}
    else:
        with servers.localstack(BUCKET) as s3:
            key = f"checkpoints/{ckpt.path.name}"
            s3.make_bucket(BUCKET)
            s3.upload(BUCKET, key, ckpt.path)
            yield {"URL": f"s3://{BUCKET}/{key}", "SO": s3.storage_options, "LOCAL": str(ckpt.path)}


def probe(code: Code) -> dict[str, Any]:
    """Versions as this side's children see them; stops unless they import stream_st from its checkout."""
    found = report.versions(child_env(code.root), code.root, ["fsspec", "s3fs", "botocore"])
    origin = str(found.get("stream_st", ""))
    if f"imported from {code.root}/" not in origin:
        raise SystemExit(f"children meant to run {code.description} import stream_st {origin!r}")
    return found


def main() -> int:
    p = arguments(__doc__)
    p.add_argument("--base", required=True, help="the old revision (e.g. HEAD~3, a commit, a branch)")
    p.add_argument("--new", default="worktree", help="the new revision (default: the working tree as it is)")
    p.add_argument("--stores", nargs="+", choices=["http", "s3"], default=["http", "s3"])
    args = p.parse_args()
    if args.repeats < 5:
        print(f"note: {args.repeats} rounds; use at least 5 for a figure worth recording", flush=True)
    out = report.out_dir(args.out)
    ckpt = ensure_checkpoint(out, args.size_gib)
    info = report.machine()
    sections: list[dict[str, Any]] = []
    with checkout(args.base, out / "checkouts") as base, checkout(args.new, out / "checkouts") as new:
        codes = {"base": base, "new": new}
        found = {
            side: f"{code.description}; " + "; ".join(f"{k} {v}" for k, v in probe(code).items())
            for side, code in codes.items()
        }
        contenders = [Contender(side, f"{side}: {code.description}", LOAD) for side, code in codes.items()]

        for name in args.stores:
            print(f"\n== {name} ==", flush=True)
            with store(name, ckpt, out) as values:

                def run(c: Contender, check: bool) -> Any:
                    code = codes[c.key]
                    return run_process(c.argv(values, check), child_env(code.root), code.root)

                outcomes = rounds.compare(contenders, run, args.repeats, tag=f"[{name}] ")
            sections.append({"store": name, "url": values["URL"], "outcomes": outcomes})
    report.finish(info)
    text = report.document(f"A/B: stream_st {args.new} against {args.base}", body(sections, ckpt, args), info, found)
    print("\n" + text)
    data = {
        "machine": info,
        "versions": found,
        "stores": {
            s["store"]: {
                o.contender.key: {"check": o.check, "runs": [asdict(r) for r in o.runs]} for o in s["outcomes"]
            }
            for s in sections
        },
    }
    report.write(out, "ab", text, data)
    return 0 if all(o.check_ok and o.ok_runs for s in sections for o in s["outcomes"]) else 1


def body(sections: list[dict[str, Any]], ckpt: Checkpoint, args: Any) -> list[str]:
    lines = [
        f"Checkpoint `{ckpt.path.name}`: {ckpt.file_bytes:,} B ({ckpt.file_bytes / (1 << 30):.3f} GiB), "
        f"{len(ckpt.spans)} tensors. Each side is a `git worktree` checkout first on its children's PYTHONPATH; "
        f"every run a fresh process, the sides alternating, {args.repeats} rounds; median of the successful runs. "
        "wall = the whole process (start-up, imports, load, exit); load_file = the call alone, timed inside the child "
        "after `import torch, stream_st`.",
        "",
    ]
    summary = []
    for s in sections:
        rows = {o.contender.key: rounds.summary(o) for o in s["outcomes"]}
        loads = {o.contender.key: [r.result["load_s"] for r in o.ok_runs if r.result] for o in s["outcomes"]}
        cells = []
        for key, r in rows.items():
            if "median_s" not in r:
                cells.append(report.untimed_cells(r, 6))
                continue
            load = rounds.Stats.of(loads[key]) if loads[key] else None
            load_cell = f"{load.median:.3f} ({load.spread})" if load else "—"
            cells.append([r["label"], *report.wall_cells(r), load_cell, f"{r['rss_mib']:.0f}", report.check_cell(r)])
        lines += [f"## {s['store']}: {s['url']}", ""]
        header = ["side", "median wall s", "min–max s", "load_file s (min–max)", "peak RSS MiB", "check"]
        lines += report.table(header, cells, "lrrrrl")
        lines += ["", *report.problems(list(rows.values()))]
        old, new = rows["base"].get("median_s"), rows["new"].get("median_s")
        old_load = rounds.Stats.of(loads["base"]).median if loads["base"] else None
        new_load = rounds.Stats.of(loads["new"]).median if loads["new"] else None
        summary.append(
            [
                s["store"],
                report.fmt(old),
                report.fmt(new),
                f"**{report.ratio(new, old)}×**",
                report.fmt(old_load, 3),
                report.fmt(new_load, 3),
                f"{report.ratio(new_load, old_load)}×",
            ]
        )
    return [
        *lines[:2],
        *report.table(
            [
                "store",
                "base wall s",
                "new wall s",
                "new ÷ base",
                "base load_file s",
                "new load_file s",
                "new ÷ base (load_file)",
            ],
            summary,
        ),
        "",
        *lines[2:],
    ]


if __name__ == "__main__":
    raise SystemExit(main())
