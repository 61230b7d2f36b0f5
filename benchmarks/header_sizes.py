"""How big is a safetensors header for real checkpoint layouts? (justifies ``Config.header_prefetch``)

    .venv/bin/python benchmarks/header_sizes.py

A loader's first ranged GET asks for ``header_prefetch`` bytes hoping they hold the whole header
(8-byte little-endian length + JSON); if they do not, a second round trip is needed. This script
builds the header JSON exactly as safetensors writes it — ``__metadata__`` first, then every tensor's
dtype, shape and data_offsets, compact separators, padded with spaces to a multiple of 8 — for
typical layouts, from names and shapes only (no weights are allocated), and says which prefetch
sizes hold each one.

The builder is harness/checkpoint.py's ``header_json`` (the benchmark checkpoints' headers are written with it).
Before the table it checks it byte for byte against ``safetensors.torch.save`` on a small layout of two dtypes,
and against the benchmark checkpoint's real header if ``run.py`` already generated it. Writes
OUT/header_sizes.md and .json.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the harness, whatever the cwd

from harness import arguments, report  # noqa: E402
from harness.checkpoint import LAYERS, Tensor, header_json, layout, nbytes, pick_hidden  # noqa: E402

PREFETCH = [("64 KiB", 64 * 1024), ("100 kB", 100_000), ("256 KiB", 256 * 1024), ("1 MiB", 1 << 20)]


def data_bytes(tensors: list[Tensor]) -> int:
    return sum(nbytes(dtype, shape) for _, dtype, shape in tensors)


def header_bytes(tensors: list[Tensor]) -> int:
    """Bytes before the first tensor byte: the 8-byte length prefix + the padded JSON header."""
    return 8 + len(header_json(tensors))


# --- layouts --------------------------------------------------------------------------------------------


def llama_layer(i: int, hidden: int, inter: int, kv: int, dtype: str) -> Iterator[Tensor]:
    p = f"model.layers.{i}."
    yield p + "self_attn.q_proj.weight", dtype, (hidden, hidden)
    yield p + "self_attn.k_proj.weight", dtype, (kv, hidden)
    yield p + "self_attn.v_proj.weight", dtype, (kv, hidden)
    yield p + "self_attn.o_proj.weight", dtype, (hidden, hidden)
    yield p + "mlp.gate_proj.weight", dtype, (inter, hidden)
    yield p + "mlp.up_proj.weight", dtype, (inter, hidden)
    yield p + "mlp.down_proj.weight", dtype, (hidden, inter)
    yield p + "input_layernorm.weight", dtype, (hidden,)
    yield p + "post_attention_layernorm.weight", dtype, (hidden,)


def ends(hidden: int, vocab: int, dtype: str) -> list[Tensor]:
    return [
        ("model.embed_tokens.weight", dtype, (vocab, hidden)),
        ("model.norm.weight", dtype, (hidden,)),
        ("lm_head.weight", dtype, (vocab, hidden)),
    ]


def llama2_7b() -> list[Tensor]:
    """Llama-2-7B in one file: 32 layers × 9 + embed, norm, lm_head = 291 tensors (F16, as published)."""
    return ends(4096, 32_000, "F16") + [t for i in range(32) for t in llama_layer(i, 4096, 11008, 4096, "F16")]


def llama_70b_shard() -> list[Tensor]:
    """Nine middle layers of Llama-3-70B (GQA: 8 KV heads), 81 tensors, BF16."""
    return [t for i in range(40, 49) for t in llama_layer(i, 8192, 28672, 1024, "BF16")]


def mixtral_8x7b() -> list[Tensor]:
    """Mixtral-8x7B, all 32 layers in one file: 32 × 31 + 3 = 995 tensors, BF16."""
    out = ends(4096, 32_000, "BF16")
    for i in range(32):
        p = f"model.layers.{i}."
        out += [t for t in llama_layer(i, 4096, 0, 1024, "BF16") if "mlp." not in t[0]]
        out.append((p + "block_sparse_moe.gate.weight", "BF16", (8, 4096)))
        for e in range(8):
            q = p + f"block_sparse_moe.experts.{e}."
            out += [
                (q + "w1.weight", "BF16", (14336, 4096)),
                (q + "w2.weight", "BF16", (4096, 14336)),
                (q + "w3.weight", "BF16", (14336, 4096)),
            ]
    return out


def deepseek_layer(i: int, experts: int, fp8: bool) -> list[Tensor]:
    """One DeepSeek-V3 MoE layer (MLA attention, shared expert, ``experts`` routed experts).

    With ``fp8`` every projection is F8_E4M3 plus an F32 ``weight_scale_inv`` per 128×128 block, as
    DeepSeek publishes it; without, BF16 (the common dequantized conversion).
    """
    h, moe = 7168, 2048
    p = f"model.layers.{i}."

    def proj(name: str, rows: int, cols: int) -> list[Tensor]:
        if not fp8:
            return [(name + ".weight", "BF16", (rows, cols))]
        return [
            (name + ".weight", "F8_E4M3", (rows, cols)),
            (name + ".weight_scale_inv", "F32", (-(-rows // 128), -(-cols // 128))),
        ]

    out: list[Tensor] = [
        (p + "input_layernorm.weight", "BF16", (h,)),
        (p + "post_attention_layernorm.weight", "BF16", (h,)),
        (p + "self_attn.q_a_layernorm.weight", "BF16", (1536,)),
        (p + "self_attn.kv_a_layernorm.weight", "BF16", (512,)),
        (p + "mlp.gate.weight", "BF16", (256, h)),
        (p + "mlp.gate.e_score_correction_bias", "F32", (256,)),
    ]
    out += proj(p + "self_attn.q_a_proj", 1536, h) + proj(p + "self_attn.q_b_proj", 24576, 1536)
    out += proj(p + "self_attn.kv_a_proj_with_mqa", 576, h) + proj(p + "self_attn.kv_b_proj", 32768, 512)
    out += proj(p + "self_attn.o_proj", h, 16384)
    for q in [p + "mlp.shared_experts."] + [p + f"mlp.experts.{e}." for e in range(experts)]:
        out += proj(q + "gate_proj", moe, h) + proj(q + "up_proj", moe, h) + proj(q + "down_proj", h, moe)
    return out


def deepseek_bf16_shard() -> list[Tensor]:
    """Three DeepSeek-V3 MoE layers (256 experts each) in one BF16 shard."""
    return [t for i in range(10, 13) for t in deepseek_layer(i, 256, fp8=False)]


def deepseek_fp8_shard() -> list[Tensor]:
    """Two DeepSeek-V3 MoE layers (256 experts each), FP8 weights + F32 block scales."""
    return [t for i in range(10, 12) for t in deepseek_layer(i, 256, fp8=True)]


def deepseek_published_shard() -> list[Tensor]:
    """A shard as DeepSeek-V3 is published (~4.3 GB each, FP8): 97 routed experts of one layer."""
    wanted = tuple(f"mlp.experts.{e}." for e in range(100, 197))
    return [t for t in deepseek_layer(10, 197, fp8=True) if any(w in t[0] for w in wanted)]


def experts_2000_shard() -> list[Tensor]:
    """A hypothetical 2,000-expert MoE layer, each expert its own gate/up/down (BF16), in one shard."""
    return deepseek_layer(10, 2000, fp8=False)


def bench_checkpoint() -> list[Tensor]:
    """The checkpoint run.py generates at --size-gib 1.0 (hidden 1536, 147 tensors, BF16)."""
    return [(name, "BF16", shape) for name, shape in layout(pick_hidden(1.0)).items()]


LAYOUTS = [
    ("benchmark checkpoint (run.py, 1 GiB)", bench_checkpoint),
    ("Llama-2-7B, single file", llama2_7b),
    ("Llama-3-70B shard, 9 layers", llama_70b_shard),
    ("Mixtral-8x7B, all 32 layers in one file", mixtral_8x7b),
    ("DeepSeek-V3-like shard, BF16, 3 MoE layers × 256 experts", deepseek_bf16_shard),
    ("DeepSeek-V3-like shard, FP8 + scales, 2 MoE layers × 256 experts", deepseek_fp8_shard),
    ("DeepSeek-V3 as published: one ~4.3 GB FP8 shard (97 experts)", deepseek_published_shard),
    ("MoE shard, 1 layer × 2,000 experts (BF16)", experts_2000_shard),
]


# --- checks ---------------------------------------------------------------------------------------------


def check_against_safetensors() -> str:
    """The builder vs ``safetensors.torch.save`` on a tiny Llama-like layout (names as in real files)."""
    import torch
    from safetensors.torch import save

    tiny = [t for i in range(3) for t in llama_layer(i, 64, 176, 16, "BF16")] + ends(64, 100, "BF16")
    tiny.append(("model.layers.0.mlp.router_bias", "F32", (8,)))  # a second dtype, to test the ordering
    dtypes = {"BF16": torch.bfloat16, "F32": torch.float32}
    data = save(
        {name: torch.zeros(shape, dtype=dtypes[dtype]) for name, dtype, shape in tiny}, metadata={"format": "pt"}
    )
    real = data[8 : 8 + struct.unpack("<Q", data[:8])[0]]
    if real != header_json(tiny):
        raise SystemExit(
            f"header builder disagrees with safetensors.torch.save: {header_json(tiny)[:200]!r} vs {real[:200]!r}"
        )
    return f"builder matches safetensors.torch.save byte for byte on a {len(tiny)}-tensor layout ({8 + len(real)} B)"


def check_against_benchmark_file(out: Path) -> str | None:
    path = out / "data" / f"llama-like-h{pick_hidden(1.0)}-l{LAYERS}-bf16.safetensors"
    if not path.exists():
        return None
    with open(path, "rb") as f:
        real = 8 + struct.unpack("<Q", f.read(8))[0]
    mine = header_bytes(bench_checkpoint())
    verdict = "matches" if real == mine else f"DISAGREES ({mine} B computed)"
    return f"builder {verdict} the generated benchmark file's real header ({real} B)"


# --- report ---------------------------------------------------------------------------------------------


def main() -> int:
    args = arguments(__doc__, size_gib=None).parse_args()  # --repeats is unused: nothing here is timed
    out = report.out_dir(args.out)
    notes = [check_against_safetensors(), check_against_benchmark_file(out)]
    header = ["layout", "tensors", "shard GB", "header bytes", "KiB", *(f"≤ {label}" for label, _ in PREFETCH)]
    cells = []
    for label, build in LAYOUTS:
        tensors = build()
        size = header_bytes(tensors)
        fits = ["yes" if size <= limit else "**no**" for _, limit in PREFETCH]
        cells.append(
            [label, f"{len(tensors):,}", f"{data_bytes(tensors) / 1e9:.1f}", f"{size:,}", f"{size / 1024:.1f}", *fits]
        )
    lines = [
        *(f"- {note}" for note in notes if note),
        "",
        *report.table(header, cells, "lrrrr" + "l" * len(PREFETCH)),
        "",
        "'header bytes' = 8-byte length prefix + padded JSON: what the first ranged GET must cover to avoid a second",
        "round trip. A column is 'yes' when a prefetch of that size holds the whole header. 'shard GB' = tensor bytes",
        "in that file: published shards are usually 2-10 GB, which caps how many tensors (and so header bytes) one",
        "file holds; the larger MoE rows are stress cases, not published files.",
    ]
    text = report.document("Header sizes of real checkpoint layouts", lines, report.machine(), {})
    print(text)
    report.write(out, "header_sizes", text, {"rows": cells})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
