"""Cold-start benchmark: does moving the weights overlap a process's start-up, or add to it?

    .venv/bin/python benchmarks/coldstart.py [--size-gib 1.0] [--repeats 5] [--out benchmarks/out]

Fresh processes, the contenders of each scenario rotated every round, the checkpoint of benchmarks/run.py
served by a private nginx on 127.0.0.1. Every loading contender is first run once untimed and its result
checked bit for bit against ``safetensors.torch.load_file`` (the check is never part of a timed run).

a. A script's first load: ``python -c "import stream_st; stream_st.load_file(url)"`` (the transfer starts
   before torch is imported) against the floor ``python -c "import torch, safetensors"`` + curl, against
   the same load with torch imported first (the transfer after start-up: the old sequence), and against
   safetensors-streaming.
b. The serverless script: ``stream_st.prefetch(url)``, then ``import torch, transformers``, a Llama
   skeleton on the meta device from the checkpoint's config, then ``stream_st.load_model(model, url,
   assign=True)``; against the same script without the weights, and with the load but no prefetch.

Writes OUT/coldstart.md and OUT/coldstart.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling modules, whatever the cwd

import process  # noqa: E402
import report  # noqa: E402
from checkpoint import LAYERS, VOCAB, ensure_checkpoint, intermediate_size, read_header  # noqa: E402
from nginx_server import serve  # noqa: E402
from run import REPO, child_env  # noqa: E402

CHECK = """
import torch, safetensors.torch
ref = safetensors.torch.load_file(LOCAL)
assert sorted(sd) == sorted(ref), "names differ"
assert all(sd[k].dtype == ref[k].dtype and torch.equal(sd[k], ref[k]) for k in ref), "tensors differ"
print(f"verified {len(sd)} tensors")
"""

SKELETON = """
import torch, transformers
config = transformers.LlamaConfig(**CONFIG)
with torch.device("meta"):
    model = transformers.LlamaForCausalLM(config)
"""

# scenario -> contender -> Python source (URL, LOCAL and CONFIG are defined before it); None: curl
SCENARIOS: dict[str, dict[str, str | None]] = {
    "a": {
        "curl": None,
        "start": "import torch, safetensors\nsd = None",
        "stream_st": "import stream_st\nsd = stream_st.load_file(URL)",
        "stream_st_torch_first": "import torch, stream_st\nsd = stream_st.load_file(URL)",
        "safetensors_streaming": "import safetensors_streaming\nsd = safetensors_streaming.load_file(URL)",
    },
    "b": {
        "skeleton_only": "import stream_st" + SKELETON + "sd = None",
        "prefetch_then_load": (
            "import stream_st\nearly = stream_st.prefetch(URL)"
            + SKELETON
            + "stream_st.load_model(model, URL, assign=True)\nsd = model.state_dict()"
        ),
        "load_no_prefetch": (
            "import stream_st" + SKELETON + "stream_st.load_model(model, URL, assign=True)\nsd = model.state_dict()"
        ),
    },
}

LABELS = {
    "curl": "curl -s -o /dev/null (the server's ceiling)",
    "start": "python -c 'import torch, safetensors' (start-up only)",
    "stream_st": "import stream_st; load_file(url) (transfer starts before torch)",
    "stream_st_torch_first": "import torch, stream_st; load_file(url) (transfer after start-up)",
    "safetensors_streaming": "safetensors_streaming.load_file(url) (Rust)",
    "skeleton_only": "imports + meta Llama skeleton, no weights",
    "prefetch_then_load": "prefetch, imports + skeleton, load_model(assign=True)",
    "load_no_prefetch": "imports + skeleton, load_model(assign=True), no prefetch",
}


def llama_config(hidden: int) -> dict[str, object]:
    """The transformers config of the benchmark checkpoint (benchmarks/checkpoint.py's layout)."""
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


def argv(code: str | None, url: str, local: Path, config: dict[str, object], check: bool = False) -> list[str]:
    if code is None:
        return ["curl", "-s", "-o", "/dev/null", url]
    preamble = f"URL, LOCAL, CONFIG = {url!r}, {str(local)!r}, {config!r}\n"
    tail = CHECK if check else "print('ok')"
    return [sys.executable, "-c", preamble + code + "\n" + ("" if "sd = None" in code else tail)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-gib", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--scenarios", nargs="+", default=sorted(SCENARIOS), choices=sorted(SCENARIOS))
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    args = p.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    local = ensure_checkpoint(out, args.size_gib)
    header = read_header(local)
    start, end = header.spans["model.norm.weight"]
    hidden = (end - start) // 2  # bf16
    config = llama_config(hidden)
    env = child_env()
    machine = report.machine_info()
    runs: dict[str, dict[str, list[process.Run]]] = {s: {k: [] for k in SCENARIOS[s]} for s in args.scenarios}
    with serve(root=local.parent, prefix=out / "nginx-coldstart") as server:
        url = server.url(local)
        for scenario in args.scenarios:
            for key, code in SCENARIOS[scenario].items():  # untimed: checks the result, warms the page cache
                done = process.run_process(argv(code, url, local, config, check=True), env, REPO)
                status = done.output.splitlines()[-1] if done.output else ""
                print(f"  check {scenario}.{key:24s} rc={done.rc} {done.wall_s:6.2f}s {status[:90]}", flush=True)
                if not done.ok:
                    raise SystemExit(f"{scenario}.{key} failed its check:\n{done.output}")
            keys = list(SCENARIOS[scenario])
            for round_ in range(args.repeats):
                shift = round_ % len(keys)
                for key in keys[shift:] + keys[:shift]:  # rotate who goes first
                    done = process.run_process(argv(SCENARIOS[scenario][key], url, local, config), env, REPO)
                    runs[scenario][key].append(done)
                    print(f"  {scenario} round {round_ + 1} {key:24s} {done.wall_s:6.2f}s rc={done.rc}", flush=True)
    machine["load average after"] = report.loadavg()
    text = markdown(runs, machine, local, header.file_bytes, args.repeats)
    print("\n" + text)
    (out / "coldstart.md").write_text(text)
    walls = {s: {k: [r.wall_s for r in v] for k, v in c.items()} for s, c in runs.items()}
    (out / "coldstart.json").write_text(json.dumps({"machine": machine, "walls": walls}, indent=1))
    return 0


def markdown(
    runs: dict[str, dict[str, list[process.Run]]], machine: dict[str, str], local: Path, size: int, repeats: int
) -> str:
    med = {s: {k: statistics.median(r.wall_s for r in v if r.ok) for k, v in c.items()} for s, c in runs.items()}
    lines = [
        f"Checkpoint {local.name}, {size / (1 << 30):.2f} GiB from nginx on 127.0.0.1; fresh processes, "
        f"median of {repeats}, contenders rotated per round.",
        "",
        "| scenario | contender | wall s (median) | min–max |",
        "|---|---|---:|---:|",
    ]
    for scenario, contenders in runs.items():
        for key, done in contenders.items():
            walls = [r.wall_s for r in done if r.ok]
            lines.append(
                f"| {scenario} | {LABELS[key]} | {med[scenario][key]:.2f} | {min(walls):.2f}–{max(walls):.2f} |"
            )
    lines.append("")
    if "a" in med:
        a = med["a"]
        floor = a["start"] + a["curl"]
        lines.append(f"- a: stream_st ÷ (start-up + curl) = **{a['stream_st'] / floor:.2f}×** (goal ≤ 1.00)")
        vs_rust = a["stream_st"] / a["safetensors_streaming"]
        lines.append(f"- a: stream_st ÷ safetensors-streaming = **{vs_rust:.2f}×** (goal ≤ 0.70)")
        lines.append(f"- a: torch imported first ÷ (start-up + curl) = {a['stream_st_torch_first'] / floor:.2f}×")
    if "b" in med:
        b = med["b"]
        lines.append(
            f"- b: prefetch ÷ no weights = **{b['prefetch_then_load'] / b['skeleton_only']:.2f}×** (goal ≤ 1.10)"
        )
        lines.append(f"- b: no prefetch ÷ no weights = {b['load_no_prefetch'] / b['skeleton_only']:.2f}×")
    lines += ["", "Machine: " + "; ".join(f"{k}: {v}" for k, v in machine.items())]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
