"""The benchmark checkpoint: a Llama-like bf16 safetensors file of random bytes, generated once and cached.

Layout (16 layers → 147 tensors, like a small Llama): ``model.embed_tokens.weight``, per layer q/k/v/o,
gate/up/down and the two RMSNorm weights, ``model.norm.weight`` and ``lm_head.weight``. The hidden size is
chosen so that the file is about ``size_gib``: 1.0 gives hidden 1536 (1.03 GiB), 4.5 gives hidden 3328 (4.38 GiB).
The header is written the way safetensors writes it (``header_json``); the bytes come from numpy's SFC64, one
process per core (seconds, not minutes). Random bytes, not zeros, so that nothing can take a shortcut on
constant data; as bf16 some are NaN, which is why the check compares bytes.

Run as ``checkpoint.py PATH HIDDEN`` it is the generator child (this module imports only the standard library
at the top, so the parent stays small: it forks every contender).
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
ITEMSIZE = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "F8_E4M3": 1, "U8": 1}
Tensor = tuple[str, str, tuple[int, ...]]  # name, safetensors dtype, shape


def intermediate_size(hidden: int) -> int:
    """Llama's MLP width: about 8/3 × hidden, rounded up to a multiple of 256."""
    return -(-(8 * hidden // 3) // 256) * 256


def layout(hidden: int) -> dict[str, tuple[int, ...]]:
    """Tensor name → shape for the Llama-like model of this hidden size."""
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


def nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    n = ITEMSIZE[dtype]
    for d in shape:
        n *= d
    return n


def pick_hidden(size_gib: float) -> int:
    """The multiple of 128 whose layout is closest to ``size_gib`` GiB (≥ 128)."""
    target = size_gib * (1 << 30)
    return min(
        range(128, 16_384 + 1, 128), key=lambda h: abs(sum(nbytes("BF16", s) for s in layout(h).values()) - target)
    )


def header_json(tensors: list[Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """The JSON header as safetensors writes it: ``__metadata__`` first, the data laid out by dtype alignment
    (largest first) then name, compact separators, padded with spaces to a multiple of 8."""
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, dtype, shape in sorted(tensors, key=lambda t: (-ITEMSIZE[t[1]], t[0])):
        n = nbytes(dtype, shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)


@dataclass(frozen=True)
class Checkpoint:
    """A safetensors file and what its header says (read without torch)."""

    path: Path
    header_bytes: int  # 8-byte length prefix + JSON (with its padding)
    spans: dict[str, tuple[int, int]]  # name → absolute [start, end) in the file
    file_bytes: int

    @property
    def tensor_bytes(self) -> int:
        return self.file_bytes - self.header_bytes

    @property
    def hidden(self) -> int:
        start, end = self.spans["model.norm.weight"]
        return (end - start) // 2  # bf16

    @property
    def first_tensor(self) -> str:
        return min(self.spans, key=lambda n: self.spans[n])

    def sha256(self) -> str:
        """The file's sha256, from the ``stream-st digest`` sidecar next to it."""
        sidecar = self.path.with_name(self.path.name + ".sha256.json")
        return str(json.loads(sidecar.read_text())["sha256"])

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


def read_checkpoint(path: Path) -> Checkpoint:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    base = 8 + n
    spans = {
        name: (base + info["data_offsets"][0], base + info["data_offsets"][1])
        for name, info in header.items()
        if name != "__metadata__"
    }
    return Checkpoint(path, base, spans, path.stat().st_size)


def ensure_checkpoint(folder: Path, size_gib: float, sidecar: bool = True) -> Checkpoint:
    """The checkpoint of about ``size_gib`` in ``folder``/data, generated first if missing (atomically), with
    its ``stream-st digest`` sidecar (the sha256 of the file and of each tensor) unless ``sidecar`` is False."""
    hidden = pick_hidden(size_gib)
    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    path = data / f"llama-like-h{hidden}-l{LAYERS}-bf16.safetensors"
    if not path.exists():
        print(f"generating {path} (hidden {hidden}) ...", flush=True)
        subprocess.run([sys.executable, __file__, str(path), str(hidden)], check=True)
    digest = path.with_name(path.name + ".sha256.json")
    if sidecar and not digest.exists():
        repo = Path(__file__).resolve().parent.parent.parent
        subprocess.run(
            [sys.executable, "-m", "stream_st.cli", "digest", str(path), "--output-dir", str(data)],
            check=True,
            stdout=subprocess.DEVNULL,
            cwd=repo,
        )
    # A server may run as another user: the files and every folder above them must be readable.
    for file in (path, digest):
        if file.exists():
            os.chmod(file, 0o644)
    for parent in (data, folder):
        os.chmod(parent, 0o755)
    return read_checkpoint(path)


def _fill(job: tuple[str, int, int, int]) -> None:
    import numpy as np

    path, offset, length, seed = job
    words = np.random.Generator(np.random.SFC64(seed)).bit_generator.random_raw(-(-length // 8))
    data = memoryview(words.view(np.uint8).data)[:length]
    fd = os.open(path, os.O_WRONLY)
    try:
        done = 0
        while done < length:
            done += os.pwrite(fd, data[done:], offset + done)
    finally:
        os.close(fd)


def write_random(path: Path, hidden: int) -> None:
    """The checkpoint of this hidden size at ``path``: header as safetensors writes it, random bytes."""
    import multiprocessing

    tensors = [(name, "BF16", shape) for name, shape in layout(hidden).items()]
    header = header_json(tensors)
    start = 8 + len(header)
    size = sum(nbytes(dtype, shape) for _, dtype, shape in tensors)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(start + size)
    chunk = 64 << 20
    jobs = [(str(tmp), start + o, min(chunk, size - o), 1_000 + i) for i, o in enumerate(range(0, size, chunk))]
    with multiprocessing.get_context("fork").Pool(min(32, os.cpu_count() or 1)) as pool:
        pool.map(_fill, jobs, chunksize=1)
    os.replace(tmp, path)


if __name__ == "__main__":  # the generator child: checkpoint.py PATH HIDDEN
    write_random(Path(sys.argv[1]), int(sys.argv[2]))
