"""The benchmark checkpoint: a Llama-like bf16 safetensors file, generated once and cached.

Layout (16 layers → 147 tensors, like a small Llama): ``model.embed_tokens.weight``, per layer
q/k/v/o, gate/up/down and the two RMSNorm weights, ``model.norm.weight`` and ``lm_head.weight``.
The hidden size is chosen so the file is about ``--size-gib``; 1.0 gives hidden 1536, i.e. 1.03 GiB,
the checkpoint docs/ARCHITECTURE.md §5's measurements use.

Also reads the header back (no torch needed) so the runner can say how many bytes a partial
load *should* pull.
"""

from __future__ import annotations

import fnmatch
import json
import os
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

LAYERS = 16  # 1 embed + 16 × 9 + norm + lm_head = 147 tensors
VOCAB = 32_000
BF16_BYTES = 2


def intermediate_size(hidden: int) -> int:
    """Llama's MLP width: about 8/3 × hidden, rounded up to a multiple of 256."""
    return -(-(8 * hidden // 3) // 256) * 256


def layout(hidden: int) -> dict[str, tuple[int, ...]]:
    """Tensor name → shape for the Llama-like model of this hidden size (file order does not matter)."""
    inter = intermediate_size(hidden)
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, hidden)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{proj}.weight"] = (hidden, hidden)
        shapes[p + "mlp.gate_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.up_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (VOCAB, hidden)
    return shapes


def layout_bytes(hidden: int) -> int:
    total = 0
    for shape in layout(hidden).values():
        n = 1
        for d in shape:
            n *= d
        total += n * BF16_BYTES
    return total


def pick_hidden(size_gib: float) -> int:
    """The multiple of 128 whose layout is closest to ``size_gib`` GiB (≥ 128)."""
    target = size_gib * (1 << 30)
    candidates = range(128, 16_384 + 1, 128)
    return min(candidates, key=lambda h: abs(layout_bytes(h) - target))


def ensure_checkpoint(out_dir: Path, size_gib: float) -> Path:
    """Path of the cached checkpoint, generating it first if missing (written atomically)."""
    hidden = pick_hidden(size_gib)
    data_dir = out_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / f"llama-like-h{hidden}-l{LAYERS}-bf16.safetensors"
    if not path.exists():
        print(f"generating {path.name} (hidden {hidden}, ~{layout_bytes(hidden) / (1 << 30):.2f} GiB) ...", flush=True)
        # In a child process: the parent stays small (it forks every contender) and gets no torch import.
        subprocess.run([sys.executable, __file__, str(path), str(hidden)], check=True)
    sidecar = path.with_name(path.name + ".sha256.json")
    if not sidecar.exists():  # for the verify=True contender: the sha256 of the file and of each tensor
        subprocess.run(
            [sys.executable, "-m", "stream_st.cli", "digest", str(path), "--output-dir", str(data_dir)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    # nginx workers may run as another user: the file and every folder above it must be readable.
    os.chmod(sidecar, 0o644)
    os.chmod(path, 0o644)
    for folder in (data_dir, out_dir):
        os.chmod(folder, 0o755)
    return path


def _write(path: Path, hidden: int) -> None:
    import torch
    from safetensors.torch import save_file

    # Random values (not zeros) so nothing downstream can take a shortcut on constant data.
    gen = torch.Generator().manual_seed(0)
    tensors = {
        name: torch.randn(shape, generator=gen, dtype=torch.float32).to(torch.bfloat16)
        for name, shape in layout(hidden).items()
    }
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    del tensors
    os.replace(tmp, path)


@dataclass(frozen=True)
class HeaderInfo:
    header_bytes: int  # 8-byte length prefix + JSON (with its padding)
    spans: dict[str, tuple[int, int]]  # name → absolute [start, end) in the file
    file_bytes: int

    def select(self, patterns: list[str]) -> list[str]:
        return [n for n in self.spans if any(fnmatch.fnmatchcase(n, p) for p in patterns)]

    def selected_bytes(self, names: list[str]) -> int:
        return sum(end - start for start, end in (self.spans[n] for n in names))

    def coalesced(self, names: list[str], max_gap: int) -> list[tuple[int, int]]:
        """Selected spans merged when the gap between them is ≤ ``max_gap`` (what a good planner fetches)."""
        merged: list[list[int]] = []
        for start, end in sorted(self.spans[n] for n in names):
            if merged and start - merged[-1][1] <= max_gap:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        return [(s, e) for s, e in merged]


def read_header(path: Path) -> HeaderInfo:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    base = 8 + n
    spans = {
        name: (base + info["data_offsets"][0], base + info["data_offsets"][1])
        for name, info in header.items()
        if name != "__metadata__"
    }
    return HeaderInfo(header_bytes=base, spans=spans, file_bytes=path.stat().st_size)


if __name__ == "__main__":  # the generator child: checkpoint.py PATH HIDDEN
    _write(Path(sys.argv[1]), int(sys.argv[2]))
