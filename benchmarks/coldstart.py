"""Cold-start benchmark: does moving the weights overlap a process's start-up, or add to it?

    .venv/bin/python benchmarks/coldstart.py [--size-gib 1.0] [--repeats 5] [--scenarios a b] [--out benchmarks/out]

The checkpoint of harness/checkpoint.py served by a private nginx on 127.0.0.1; per scenario, every contender
checked once untimed, then timed in rotated rounds, each run a fresh process (harness/rounds.py).

a. A script's first load: ``python -c "import stream_st; stream_st.load_file(url)"`` (the transfer can start
   before torch is imported) against the floor ``python -c "import torch, safetensors"`` + curl, against the
   same load with torch imported first (the transfer after start-up), and against safetensors-streaming.
b. The serverless script: ``stream_st.prefetch(url)``, then ``import torch, transformers``, a Llama skeleton on
   the meta device from the checkpoint's config, then ``stream_st.load_model(model, url, assign=True)``;
   against the same script without the weights, and with the load but no prefetch.

Writes OUT/coldstart.md and OUT/coldstart.json.
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the harness, whatever the cwd

from harness import REPO, arguments, report, rounds, servers  # noqa: E402
from harness.checkpoint import LAYERS, VOCAB, ensure_checkpoint, intermediate_size  # noqa: E402
from harness.contenders import Contender  # noqa: E402
from harness.process import child_env  # noqa: E402

SKELETON = """
import torch, transformers
config = transformers.LlamaConfig(**CONFIG)
with torch.device("meta"):
    model = transformers.LlamaForCausalLM(config)
"""
LOAD_MODEL = "stream_st.load_model(model, URL, assign=True)\nsd = model.state_dict()"

SCENARIOS: dict[str, list[Contender]] = {
    "a": [
        Contender(
            "curl",
            "curl -s -o /dev/null (the server's ceiling)",
            command=("curl", "-s", "-o", "/dev/null", "{URL}"),
            verifiable=False,
        ),
        Contender(
            "start",
            "python -c 'import torch, safetensors' (start-up only)",
            "import torch, safetensors\nsd = {}",
            verifiable=False,
        ),
        Contender(
            "stream_st",
            "import stream_st; load_file(url) (transfer starts before torch)",
            "import stream_st\nsd = stream_st.load_file(URL)",
        ),
        Contender(
            "stream_st_torch_first",
            "import torch, stream_st; load_file(url) (transfer after start-up)",
            "import torch, stream_st\nsd = stream_st.load_file(URL)",
        ),
        Contender(
            "safetensors_streaming",
            "safetensors_streaming.load_file(url) (Rust)",
            "import safetensors_streaming\nsd = safetensors_streaming.load_file(URL)",
        ),
    ],
    "b": [
        Contender(
            "skeleton_only",
            "imports + meta Llama skeleton, no weights",
            "import stream_st" + SKELETON + "sd = {}",
            verifiable=False,
        ),
        Contender(
            "prefetch_then_load",
            "prefetch, imports + skeleton, load_model(assign=True)",
            "import stream_st\nearly = stream_st.prefetch(URL)" + SKELETON + LOAD_MODEL,
        ),
        Contender(
            "load_no_prefetch",
            "imports + skeleton, load_model(assign=True), no prefetch",
            "import stream_st" + SKELETON + LOAD_MODEL,
        ),
    ],
}


def llama_config(hidden: int) -> dict[str, Any]:
    """The transformers config of the benchmark checkpoint (harness/checkpoint.py's layout)."""
    heads = max(1, hidden // 128)
    return {
        "vocab_size": VOCAB,
        "hidden_size": hidden,
        "intermediate_size": intermediate_size(hidden),
        "num_hidden_layers": LAYERS,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "tie_word_embeddings": False,
    }


def main() -> int:
    p = arguments(__doc__)
    p.add_argument("--scenarios", nargs="+", default=sorted(SCENARIOS), choices=sorted(SCENARIOS))
    args = p.parse_args()
    out = report.out_dir(args.out)
    ckpt = ensure_checkpoint(out, args.size_gib)
    env = child_env()
    found = report.versions(env, REPO, ["safetensors-streaming", "transformers"])
    info = report.machine()
    results: dict[str, list[rounds.Outcome]] = {}
    with servers.nginx(ckpt.path.parent, out / "nginx-coldstart") as server:
        values = {"URL": server.url(ckpt.path), "LOCAL": str(ckpt.path), "CONFIG": llama_config(ckpt.hidden)}
        for s in args.scenarios:
            results[s] = rounds.compare(
                SCENARIOS[s], lambda c, check: server.run(c.argv(values, check), env, REPO), args.repeats, tag=f"{s}: "
            )
    report.finish(info)
    rows = {s: [rounds.summary(o) for o in outcomes] for s, outcomes in results.items()}
    text = report.document(
        "stream_st cold start", body(rows, ckpt.path.name, ckpt.file_bytes, args.repeats), info, found
    )
    print("\n" + text)
    runs = {s: {o.contender.key: [asdict(r) for r in o.runs] for o in outcomes} for s, outcomes in results.items()}
    report.write(out, "coldstart", text, {"machine": info, "versions": found, "rows": rows, "runs": runs})
    failed = [r["key"] for rs in rows.values() for r in rs if not r["check_ok"] or "median_s" not in r]
    return 1 if failed else 0


def body(rows: dict[str, list[dict[str, Any]]], name: str, size: int, repeats: int) -> list[str]:
    cells = [
        [s, r["label"], *report.wall_cells(r)] if "median_s" in r else [s, r["label"], "**FAILED**", r["check"][:200]]
        for s, rs in rows.items()
        for r in rs
    ]
    lines = [
        f"Checkpoint {name}, {size / (1 << 30):.2f} GiB from nginx on 127.0.0.1; fresh processes, "
        f"median of {repeats}, contenders rotated per round.",
        "",
        *report.table(["scenario", "contender", "wall s (median)", "min–max"], cells, "llrr"),
        "",
    ]
    med = {s: {r["key"]: r["median_s"] for r in rs if "median_s" in r} for s, rs in rows.items()}
    a, b = med.get("a", {}), med.get("b", {})
    if {"start", "curl", "stream_st", "safetensors_streaming", "stream_st_torch_first"} <= a.keys():
        floor = a["start"] + a["curl"]
        lines.append(f"- a: stream_st ÷ (start-up + curl) = **{a['stream_st'] / floor:.2f}×** (goal ≤ 1.00)")
        vs_rust = a["stream_st"] / a["safetensors_streaming"]
        lines.append(f"- a: stream_st ÷ safetensors-streaming = **{vs_rust:.2f}×** (goal ≤ 0.70)")
        lines.append(f"- a: torch imported first ÷ (start-up + curl) = {a['stream_st_torch_first'] / floor:.2f}×")
    if {"skeleton_only", "prefetch_then_load", "load_no_prefetch"} <= b.keys():
        lines.append(
            f"- b: prefetch ÷ no weights = **{b['prefetch_then_load'] / b['skeleton_only']:.2f}×** (goal ≤ 1.10)"
        )
        lines.append(f"- b: no prefetch ÷ no weights = {b['load_no_prefetch'] / b['skeleton_only']:.2f}×")
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
