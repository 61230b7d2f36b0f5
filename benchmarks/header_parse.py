"""Header parse + validate time and peak memory: stream_st against the safetensors crate, same bytes, same run.

    .venv/bin/python benchmarks/header_parse.py                  # 10k, 100k, 1M tensors, a 99 MB header
    .venv/bin/python benchmarks/header_parse.py --tensors 10000 --repeat 5

Each file is written once to a temporary folder; every measurement then runs in a fresh process (so that
peak memory is that of the one operation), alternating contenders so that both see the same machine load:

- ``crate``: ``safetensors.safe_open(path, "pt")`` and ``keys()``: the Rust crate reads, parses and
  validates the header (it maps the file; tensors are not touched).
- ``stream_st``: ``stream_st.header.parse_header`` on the header bytes, already in memory (what
  ``read_header`` does after its one read).
- ``read_header``: ``stream_st.read_header(path)``, the whole public call on a local path.

Time is the median wall time of the operation (in brackets: the ratio of the best times, less
sensitive to a busy machine); memory is the peak resident set of the process during the operation minus its
resident set just before (the peak is reset through ``/proc/self/clear_refs``), as a multiple of the header's
size. The files: N tensors named like experts of a mixture (2-element BF16 tensors,
so the header is nearly the whole file), the same 1M-tensor header whose last entry (in file order) has a
wrong span (rejected at the end), and a 99 MB header made of ``__metadata__`` strings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def dense(n: int, *, break_last: bool = False) -> bytes:
    """A file of ``n`` tiny BF16 tensors, written as safetensors writes it (compact JSON, padded to 8)."""
    parts = []
    for i in range(n):
        end = 4 * i + (5 if break_last and i == n - 1 else 4)
        parts.append(
            f'"layers.{i // 1000}.experts.{i % 1000}.w":{{"dtype":"BF16","shape":[1,2],"data_offsets":[{4 * i},{end}]}}'
        )
    raw = ("{" + ",".join(parts) + "}").encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + bytes(4 * n)


def metadata_heavy(total: int) -> bytes:
    """A file of one tensor whose header is about ``total`` bytes of metadata strings (1,000 of them)."""
    value = "x" * (total // 1000 - 20)
    header = {"__metadata__": {f"k{i}": value for i in range(1000)}}
    header["w"] = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + bytes(4)


# --- one measurement, in a fresh process -----------------------------------------------------------------


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def worker(contender: str, path: str) -> None:
    """Run one operation and print {"seconds", "peak_bytes", "ok"} as JSON."""
    sys.path.insert(0, str(ROOT))
    import safetensors
    import torch  # noqa: F401  (imported here, not in the timed call: safe_open(..., "pt") and read_header import it)

    import stream_st
    from stream_st.errors import HeaderError
    from stream_st.header import LENGTH_PREFIX, parse_header

    read_header = stream_st.read_header  # (a lazy name: its module is imported here, not in the timed call)
    raw = Path(path).read_bytes() if contender == "stream_st" else b""
    size = int.from_bytes(raw[:LENGTH_PREFIX], "little") if raw else 0
    errors: tuple[type[BaseException], ...] = (HeaderError, safetensors.SafetensorError)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
    before = _rss_kib("VmRSS")
    ok = True
    start = time.perf_counter()
    try:
        if contender == "crate":
            with safetensors.safe_open(path, "pt") as f:
                f.keys()
        elif contender == "stream_st":
            parse_header(memoryview(raw)[LENGTH_PREFIX : LENGTH_PREFIX + size], url=path, file_size=len(raw))
        else:
            read_header(path)
    except errors:
        ok = False
    seconds = time.perf_counter() - start
    peak = _rss_kib("VmHWM")
    print(json.dumps({"seconds": seconds, "peak_bytes": (peak - before) * 1024, "ok": ok}))


def measure(contender: str, path: Path) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--worker", contender, str(path)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


# --- the table ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tensors", default="10000,100000,1000000", help="comma-separated tensor counts")
    parser.add_argument("--metadata-mb", type=int, default=99, help="size of the metadata-heavy header (0: none)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return

    import safetensors
    import torch

    print(
        f"# {time.strftime('%Y-%m-%d')}, {platform.node()}: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}, safetensors {safetensors.__version__}, "
        f"torch {torch.__version__}; median of {args.repeat}, each in a fresh process; "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    counts = [int(c) for c in args.tensors.split(",") if c]
    cases: list[tuple[str, Callable[[], bytes]]] = [(f"{n:,} tensors", partial(dense, n)) for n in counts]
    if counts:
        cases.append((f"{counts[-1]:,} tensors, last one bad", partial(dense, counts[-1], break_last=True)))
    if args.metadata_mb:
        cases.append((f"{args.metadata_mb} MB of metadata", partial(metadata_heavy, args.metadata_mb * 1_000_000)))

    print(
        "| header | MB | crate s | stream_st s | ratio (best) | read_header s | ratio (best) | peak × header: "
        "crate / stream_st / read_header |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    with tempfile.TemporaryDirectory() as folder:
        for label, make in cases:
            path = Path(folder) / "h.safetensors"
            data = make()
            path.write_bytes(data)
            header_size = int.from_bytes(data[:8], "little")
            del data
            runs: dict[str, list[dict[str, float]]] = {"crate": [], "stream_st": [], "read_header": []}
            for _ in range(args.repeat):
                for contender in runs:  # interleaved: the same load on the machine for all three
                    runs[contender].append(measure(contender, path))
            oks = {c: {r["ok"] for r in rs} for c, rs in runs.items()}
            if len({frozenset(v) for v in oks.values()}) != 1:
                raise SystemExit(f"{label}: the contenders disagree on accepting the header: {oks}")
            secs = {c: statistics.median(r["seconds"] for r in rs) for c, rs in runs.items()}
            best = {c: min(r["seconds"] for r in rs) for c, rs in runs.items()}
            peaks = {c: max(r["peak_bytes"] for r in rs) / header_size for c, rs in runs.items()}
            print(
                f"| {label}{'' if runs['crate'][0]['ok'] else ' (rejected)'} | {header_size / 1e6:.1f} "
                f"| {secs['crate']:.3f} | {secs['stream_st']:.3f} | {secs['stream_st'] / secs['crate']:.2f}× "
                f"({best['stream_st'] / best['crate']:.2f}×) | {secs['read_header']:.3f} "
                f"| {secs['read_header'] / secs['crate']:.2f}× ({best['read_header'] / best['crate']:.2f}×) "
                f"| {peaks['crate']:.2f} / {peaks['stream_st']:.2f} / {peaks['read_header']:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
