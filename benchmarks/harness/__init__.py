"""The one harness every benchmark in benchmarks/ runs on.

- ``process``: a fresh process run to its end: whole-process wall time, its own peak RSS, its ``RESULT`` line;
  the environment children get (the stream_st under test first on PYTHONPATH); checkouts of other revisions.
- ``rounds``: contenders checked once untimed, then timed in rounds whose order rotates; medians and spreads.
- ``contenders``: a contender as a ``python -c`` snippet (or a command) and the bit-exact check run after it.
- ``verify``: the check itself, against ``safetensors.torch.load_file`` (imported by the children).
- ``checkpoint``: the Llama-like bf16 checkpoint (generated once, random bytes) and what its header says.
- ``servers``: nginx, aiohttp, LocalStack, s3rver, the GCS emulator, the Hub server and Azurite on 127.0.0.1.
- ``raw_get``: the ceiling client: threads of ranged ``http.client`` GETs, bytes discarded, no torch.
- ``report``: machine, date and versions; Markdown tables; the ``.md`` + ``.json`` written to ``out/``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

HARNESS = Path(__file__).resolve().parent
BENCH = HARNESS.parent
REPO = BENCH.parent
OUT = BENCH / "out"


def arguments(doc: str, *, size_gib: float | None = 1.0, repeats: int = 5) -> argparse.ArgumentParser:
    """The options every benchmark takes: checkpoint size, timed rounds, output folder."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    if size_gib is not None:
        p.add_argument("--size-gib", type=float, default=size_gib, help=f"checkpoint size (default {size_gib})")
    p.add_argument("--repeats", "--repeat", type=int, default=repeats, help=f"timed rounds (default {repeats})")
    p.add_argument("--out", type=Path, default=OUT, help="output and cache folder (default benchmarks/out)")
    return p
