"""vLLM engine start to first generated token, per weight loader, on this machine (vLLM's CPU build).

Contenders, each a fresh process of .venv-vllm's Python, alternating every round, median of ``--repeats``:

* ``stream_st http``: ``load_format="stream_st"`` from nginx on 127.0.0.1;
* ``stream_st s3``: ``load_format="stream_st"`` from LocalStack S3 on 127.0.0.1;
* ``runai_streamer s3``: vLLM's ``load_format="runai_streamer"`` (Run:ai Model Streamer) from the same LocalStack;
* ``download + safetensors``: the checkpoint downloaded from nginx to a temporary folder (``urllib``, one file at a
  time), then ``load_format="safetensors"`` on it; the download is inside the timed span.

The timed span starts after ``import vllm`` (the same for all) and ends when ``LLM.generate`` returns one token.
The engine runs in the calling process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, ``distributed_executor_backend="uni"``)
so that process start-up of vLLM's own children does not drown the loaders' differences. Every contender's first
token is checked against the others'.

Run from the repository root with the main venv (it starts nginx and LocalStack):
    .venv/bin/python benchmarks/vllm.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))

from nginx_server import serve  # noqa: E402

from s3_server import S3Server  # noqa: E402

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


def make_checkpoint(folder: Path, hidden: int, layers: int) -> None:
    """A Llama-shaped float32 checkpoint with random weights, saved by transformers (config, no tokenizer)."""
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=32000,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3 // 256 * 256,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder, max_shard_size="200MB")


def run(spec: dict[str, object], env: dict[str, str], scratch: Path) -> dict[str, object]:
    completed = subprocess.run(
        [str(VLLM_PYTHON), "-c", CHILD, json.dumps(spec)],
        cwd=scratch,  # not benchmarks/: this file's name would shadow the vllm package
        env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", **env},
        capture_output=True,
        text=True,
        timeout=900,
    )
    for line in completed.stdout.splitlines():
        if line.startswith("RESULT "):
            result: dict[str, object] = json.loads(line[len("RESULT ") :])
            return result
    raise RuntimeError(f"{spec['load_format']} failed:\n{completed.stdout[-3000:]}\n{completed.stderr[-5000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--skip-runai", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="stream-st-vllm-bench-") as tmp:
        root = Path(tmp)
        model = root / "model"
        make_checkpoint(model, args.hidden, args.layers)
        weights = sorted(
            p.name for p in model.iterdir() if p.suffix == ".safetensors" or p.name.endswith(".index.json")
        )
        files = sorted(p.name for p in model.iterdir())
        size = sum((model / name).stat().st_size for name in weights if name.endswith(".safetensors"))
        config_only = root / "config"
        config_only.mkdir()
        for name in files:
            if name not in weights:
                (config_only / name).write_bytes((model / name).read_bytes())
        scratch = root / "scratch"
        scratch.mkdir()
        s3 = S3Server().start()
        try:
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
            with serve(root, root / "nginx") as nginx:
                base = f"http://127.0.0.1:{nginx.port}/model"
                s3_url = f"s3://{s3.bucket}/model/"
                contenders: dict[str, dict[str, object]] = {
                    "stream_st http (nginx)": {"load_format": "stream_st", "extra": {"url": base}},
                    "stream_st s3 (LocalStack)": {"load_format": "stream_st", "extra": {"url": s3_url}},
                    "runai_streamer s3 (LocalStack)": {"load_format": "runai_streamer", "model_weights": s3_url},
                    "download (urllib) + safetensors": {"load_format": "safetensors", "download": files, "base": base},
                }
                if args.skip_runai:
                    contenders.pop("runai_streamer s3 (LocalStack)")
                times: dict[str, list[float]] = {name: [] for name in contenders}
                tokens: dict[str, object] = {}
                for round_ in range(args.repeats):
                    for name, spec in contenders.items():
                        spec = {"model": str(config_only), "scratch": str(scratch), **spec}
                        result = run(spec, s3_env if "s3" in name else {}, scratch)
                        times[name].append(float(result["seconds"]))  # type: ignore[arg-type]
                        tokens[name] = result["token"]
                        print(f"round {round_ + 1} {name}: {result['seconds']:.2f} s", flush=True)
        finally:
            s3.stop()
    assert len({json.dumps(t) for t in tokens.values()}) == 1, f"contenders generated different tokens: {tokens}"
    reference = statistics.median(times["stream_st http (nginx)"])
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"\ncheckpoint: {size / 2**20:.0f} MiB float32, {len(weights)} files; {when}")
    print("| contender | median s | min–max s | vs stream_st http |\n|---|---:|---:|---:|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.2f} | {min(values):.2f}–{max(values):.2f} | {median / reference:.2f}× |")


if __name__ == "__main__":
    main()
