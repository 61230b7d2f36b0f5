"""Whole-process HTTP load benchmark: stream_st against curl, safetensors-streaming, fsspec and download+load.

    .venv/bin/python benchmarks/run.py [--size-gib 1.0] [--repeats 5] [--out benchmarks/out]

One invocation:
  1. generates (once; cached in OUT/data) a Llama-like bf16 checkpoint of about SIZE GiB, 147 tensors;
  2. serves it with a private nginx on 127.0.0.1 (stopped on exit, errors included);
  3. runs every contender once untimed, checking its result bit for bit against
     ``safetensors.torch.load_file`` (the check is never part of a timed run);
  4. runs REPEATS rounds, each contender once per round as a fresh process, the order rotated every
     round so slow drifts of this shared machine hit every contender alike; per run it records the
     whole-process wall time, the child's peak RSS, and the requests and bytes nginx logged;
  5. writes OUT/results.md (Markdown table + machine + versions), OUT/results.json (every run) and
     OUT/results.png (bar chart, if matplotlib is installed).

Targets (the project's goals): stream_st within 1.10× of (Python+torch start + curl) and at most 0.6×
safetensors-streaming; a partial load pulls exactly the selected tensor bytes + header.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling modules, whatever the cwd

import process  # noqa: E402
import report  # noqa: E402
from checkpoint import HeaderInfo, ensure_checkpoint, read_header  # noqa: E402
from contenders import CONTENDERS, PARTIAL, Contender  # noqa: E402
from nginx_server import Nginx, Traffic, serve  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Run(process.Run):
    traffic: Traffic | None = None  # what nginx logged for this run


@dataclass
class Result:
    contender: Contender
    check: str = ""  # outcome of the untimed verification run
    check_ok: bool = True
    runs: list[Run] = field(default_factory=list)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-gib", type=float, default=1.0, help="checkpoint size to generate (default 1.0)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds; the median is reported (default 5)")
    p.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "out",
        help="output and cache folder (default benchmarks/out)",
    )
    p.add_argument(
        "--only", nargs="+", choices=[c.key for c in CONTENDERS], help="run only these contenders (default: all)"
    )
    return p.parse_args()


def child_env() -> dict[str, str]:
    """The environment of every contender: the repo's stream_st importable, defaults, loopback only."""
    env = {
        k: v
        for k, v in os.environ.items()
        # A proxy would send loopback traffic elsewhere; STREAM_ST_* would change the defaults measured.
        if not k.lower().endswith("_proxy") and not k.startswith("STREAM_ST_")
    }
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def run_once(argv: list[str], env: dict[str, str], server: Nginx) -> Run:
    """One fresh process: wall time around its whole life, its own peak RSS, its HTTP traffic."""
    offset = server.log_offset()
    done = process.run_process(argv, env, REPO)
    return Run(done.wall_s, done.rss_mib, done.rc, done.output, server.traffic_since(offset))


def check(result: Result, url: str, local: Path, env: dict[str, str], server: Nginx) -> None:
    """The untimed run: verifies the result where possible; also warms caches before timing."""
    c = result.contender
    run = run_once(c.argv(url, str(local), verify=c.verifiable), env, server)
    if not run.ok:
        result.check_ok = False
        result.check = f"FAILED (exit {run.rc}): {run.output}"
    elif c.verifiable:
        result.check = run.output.splitlines()[-1] if run.output else "ok"
    else:
        result.check = "not checked (no tensors)"
    print(
        f"  check {c.key:22s} {'ok ' if result.check_ok else 'ERR'} {run.wall_s:6.2f}s  "
        f"{result.check.splitlines()[0][:100]}",
        flush=True,
    )


def measure(results: list[Result], url: str, local: Path, env: dict[str, str], server: Nginx, repeats: int) -> None:
    for r in range(repeats):
        k = r % len(results)
        for result in results[k:] + results[:k]:  # rotate who goes first
            c = result.contender
            run = run_once(c.argv(url, str(local)), env, server)
            result.runs.append(run)
            note = "" if run.ok else f"  FAILED exit {run.rc}: {run.output.splitlines()[-1] if run.output else ''}"
            print(
                f"  round {r + 1}/{repeats} {c.key:22s} {run.wall_s:6.2f}s  {run.rss_mib:7.0f} MiB  "
                f"{run.traffic.requests:3d} req  {run.traffic.bytes / 1e6:9.1f} MB{note}",
                flush=True,
            )


def probe(env: dict[str, str]) -> dict[str, Any]:
    """Versions and stream_st's defaults, read in a child so a broken import cannot stop the run."""
    code = r"""
import json, importlib.metadata as md, platform
out = {"python": platform.python_version()}
for dist in ("torch", "safetensors", "safetensors-streaming", "fsspec", "aiohttp"):
    try: out[dist] = md.version(dist)
    except Exception as e: out[dist] = f"missing ({e})"
try:
    import stream_st
    from stream_st.config import Config
    out["stream_st"] = getattr(stream_st, "__version__", "?")
    cfg = Config()
    out["config"] = {"part_size": cfg.part_size, "max_gap": cfg.max_gap,
                     "header_prefetch": cfg.header_prefetch, "max_concurrency": cfg.max_concurrency}
except Exception as e:
    out["stream_st"] = f"import failed: {e!r}"
print(json.dumps(out))
"""
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True)
    versions: dict[str, Any] = json.loads(done.stdout) if done.returncode == 0 else {"probe": done.stderr}
    for tool, flag in (("nginx", "-v"), ("curl", "--version")):
        done = subprocess.run([tool, flag], capture_output=True, text=True)
        versions[tool] = (done.stdout + done.stderr).strip().splitlines()[0]
    return versions


def main() -> int:
    args = parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    local = ensure_checkpoint(out, args.size_gib)
    header = read_header(local)
    env = child_env()
    versions = probe(env)
    print(
        f"checkpoint {local.name}: {header.file_bytes / (1 << 30):.3f} GiB, {len(header.spans)} tensors, "
        f"header {header.header_bytes} B",
        flush=True,
    )
    print("versions:", json.dumps(versions), flush=True)

    chosen = [c for c in CONTENDERS if not args.only or c.key in args.only]
    results = [Result(c) for c in chosen]
    machine = report.machine_info()
    machine["peak RSS from"] = (
        "GNU time %M of each child"
        if process.GNU_TIME
        else "wait4 ru_maxrss (an upper bound: at least this script's RSS at fork)"
    )
    with serve(root=local.parent, prefix=out / "nginx") as server:
        url = server.url(local)
        print(f"nginx on {url}", flush=True)
        for result in results:
            check(result, url, local, env, server)
        measure(results, url, local, env, server, args.repeats)
    machine["load average after"] = report.loadavg()

    expected = expected_partial(header, versions)
    summary = report.summarize(results, header, expected)
    text = report.markdown(summary, results, header, expected, machine, versions, args, local)
    print("\n" + text)
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps(raw(results, summary, machine, versions), indent=1))
    report.plot(summary, out / "results.png")
    print(f"wrote {out / 'results.md'}, {out / 'results.json'}", flush=True)
    return 0


def expected_partial(header: HeaderInfo, versions: dict[str, Any]) -> dict[str, int]:
    """What an ideal partial load of PARTIAL pulls: selected bytes + header, in 1 + coalesced parts requests."""
    cfg: dict[str, Any] = versions.get("config") or {}  # stream_st's own defaults, if it imported
    part_size = int(cfg.get("part_size", 16 << 20))
    max_gap = int(cfg.get("max_gap", 1 << 20))
    names = header.select(PARTIAL)
    spans = header.coalesced(names, max_gap)
    parts = sum(-(-(end - start) // part_size) for start, end in spans)
    return {
        "tensors": len(names),
        "selected_bytes": header.selected_bytes(names),
        "bytes": header.selected_bytes(names) + header.header_bytes,
        "spans": len(spans),
        "requests": 1 + parts,
        "part_size": part_size,
        "max_gap": max_gap,
    }


def raw(
    results: list[Result], summary: list[dict[str, object]], machine: dict[str, str], versions: dict[str, object]
) -> dict[str, object]:
    return {
        "machine": machine,
        "versions": versions,
        "summary": summary,
        "runs": {r.contender.key: {"check": r.check, "runs": [asdict(run) for run in r.runs]} for r in results},
    }


if __name__ == "__main__":
    raise SystemExit(main())
