"""Header parse + validate time and peak memory: stream_st against the safetensors crate, same bytes, same run.

    .venv/bin/python benchmarks/header_parse.py                  # 10k, 100k, 1M tensors, a 99 MB header
    .venv/bin/python benchmarks/header_parse.py --tensors 10000 --repeat 5

Each file is written once to a temporary folder; every measurement then runs in a fresh process (so that
peak memory is that of the one operation), the contenders' order rotated each round (harness/rounds.py) so
that all see the same machine load:

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
wrong span (rejected at the end), and a 99 MB header made of ``__metadata__`` strings. Writes
OUT/header_parse.md and .json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the harness, whatever the cwd

from harness import REPO, arguments, report, rounds  # noqa: E402
from harness.process import child_env, emit, run_process  # noqa: E402


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
    """Run one operation and emit {"seconds", "peak_bytes", "ok"}."""
    import safetensors
    import torch  # noqa: F401  (before the timing: safe_open(..., "pt") and stream_st import it lazily)

    from stream_st import read_header  # its module loaded before the timing, as a user's second call finds it
    from stream_st.errors import HeaderError
    from stream_st.header import LENGTH_PREFIX, parse_header

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
    emit({"seconds": seconds, "peak_bytes": (peak - before) * 1024, "ok": ok})


def measure(contender: str, path: Path) -> dict[str, float]:
    run = run_process([sys.executable, __file__, "--worker", contender, str(path)], child_env(), REPO)
    if run.result is None:
        raise SystemExit(f"{contender} on {path.name} failed:\n{run.output}")
    return run.result


# --- the table ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = arguments(__doc__, size_gib=None, repeats=3)
    parser.add_argument("--tensors", default="10000,100000,1000000", help="comma-separated tensor counts")
    parser.add_argument("--metadata-mb", type=int, default=99, help="size of the metadata-heavy header (0: none)")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    out = report.out_dir(args.out)
    found = report.versions(child_env(), REPO)
    info = report.machine()
    counts = [int(c) for c in args.tensors.split(",") if c]
    cases: list[tuple[str, Callable[[], bytes]]] = [(f"{n:,} tensors", partial(dense, n)) for n in counts]
    if counts:
        cases.append((f"{counts[-1]:,} tensors, last one bad", partial(dense, counts[-1], break_last=True)))
    if args.metadata_mb:
        cases.append((f"{args.metadata_mb} MB of metadata", partial(metadata_heavy, args.metadata_mb * 1_000_000)))
    header = [
        "header",
        "MB",
        "crate s",
        "stream_st s",
        "ratio (best)",
        "read_header s",
        "ratio (best)",
        "peak × header: crate / stream_st / read_header",
    ]
    print("\n".join(report.table(header, [], "lrrrrrrl")), flush=True)
    cells, data = [], {}
    with tempfile.TemporaryDirectory() as folder:
        for label, make in cases:
            path = Path(folder) / "h.safetensors"
            raw = make()
            path.write_bytes(raw)
            header_size = int.from_bytes(raw[:8], "little")
            del raw
            runs = rounds.run_rounds(
                ["crate", "stream_st", "read_header"], args.repeats, partial(measure, path=path), show=json.dumps
            )
            oks = {c: {r["ok"] for r in rs} for c, rs in runs.items()}
            if len({frozenset(v) for v in oks.values()}) != 1:
                raise SystemExit(f"{label}: the contenders disagree on accepting the header: {oks}")
            secs = {c: statistics.median(r["seconds"] for r in rs) for c, rs in runs.items()}
            best = {c: min(r["seconds"] for r in rs) for c, rs in runs.items()}
            peaks = {c: max(r["peak_bytes"] for r in rs) / header_size for c, rs in runs.items()}
            cells.append(
                [
                    f"{label}{'' if runs['crate'][0]['ok'] else ' (rejected)'}",
                    f"{header_size / 1e6:.1f}",
                    f"{secs['crate']:.3f}",
                    f"{secs['stream_st']:.3f}",
                    f"{secs['stream_st'] / secs['crate']:.2f}× ({best['stream_st'] / best['crate']:.2f}×)",
                    f"{secs['read_header']:.3f}",
                    f"{secs['read_header'] / secs['crate']:.2f}× ({best['read_header'] / best['crate']:.2f}×)",
                    f"{peaks['crate']:.2f} / {peaks['stream_st']:.2f} / {peaks['read_header']:.2f}",
                ]
            )
            print(report.table(header, cells[-1:])[-1], flush=True)
            data[label] = runs
    report.finish(info)
    intro = f"Median of {args.repeats} rounds, each operation in a fresh process, contenders rotated per round."
    text = report.document(
        "Header parse: stream_st against the safetensors crate",
        [intro, "", *report.table(header, cells, "lrrrrrrl")],
        info,
        found,
    )
    print("\n" + text)
    report.write(out, "header_parse", text, {"machine": info, "versions": found, "runs": data})


if __name__ == "__main__":
    main()
