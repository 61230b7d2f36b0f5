"""Worked example: a transformers model whose weights stream from a URL, no download step.

Runs offline: it saves a tiny Llama locally, serves the folder on 127.0.0.1 and loads it back through
stream_st. Point ``url`` at ``hf://org/repo``, ``s3://bucket/model/`` or ``https://...`` for a real model.

    .venv/bin/python examples/transformers_from_url.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
import transformers

from stream_st.demo import serve_folder
from stream_st.integrations.transformers import from_pretrained


def main() -> None:
    config = transformers.LlamaConfig(
        vocab_size=1000,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        tie_word_embeddings=True,
    )
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(config).save_pretrained(Path(folder) / "tiny-llama")
        with serve_folder(Path(folder)) as base:
            url = f"{base}/tiny-llama"  # a folder: config.json and model.safetensors (or an index) inside
            started = time.perf_counter()
            model = from_pretrained(url, dtype=torch.bfloat16)  # skeleton on meta, weights streamed
            print(f"loaded {type(model).__name__} from {url} in {time.perf_counter() - started:.2f} s")
            print("tied lm_head:", model.lm_head.weight is model.model.embed_tokens.weight)
            tokens = torch.tensor([[1, 42, 7]])
            with torch.no_grad():
                print("next token:", int(model(tokens).logits[0, -1].argmax()))


if __name__ == "__main__":
    main()
