"""The embedded default: a small checkpoint served on 127.0.0.1, streamed, checked against safetensors."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import torch


def write_demo_checkpoint(path: Path, *, layers: int = 4, hidden: int = 512, vocab: int = 8000) -> Path:
    """A Llama-shaped bf16 checkpoint (~40 MB with the defaults), deterministic."""
    import safetensors.torch

    generator = torch.Generator().manual_seed(0)

    def weight(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(torch.bfloat16)

    state = {"model.embed_tokens.weight": weight(vocab, hidden)}
    for layer in range(layers):
        prefix = f"model.layers.{layer}"
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            state[f"{prefix}.self_attn.{name}.weight"] = weight(hidden, hidden)
        state[f"{prefix}.mlp.gate_proj.weight"] = weight(hidden * 3, hidden)
        state[f"{prefix}.mlp.up_proj.weight"] = weight(hidden * 3, hidden)
        state[f"{prefix}.mlp.down_proj.weight"] = weight(hidden, hidden * 3)
        state[f"{prefix}.input_layernorm.weight"] = weight(hidden)
        state[f"{prefix}.post_attention_layernorm.weight"] = weight(hidden)
    state["model.norm.weight"] = weight(hidden)
    state["lm_head.weight"] = weight(vocab, hidden)
    safetensors.torch.save_file(state, str(path), metadata={"format": "pt", "source": "stream-st demo"})
    return path


@contextlib.contextmanager
def serve_folder(folder: Path) -> Iterator[str]:
    """Serve ``folder`` over HTTP with Range support on 127.0.0.1 (aiohttp); yields the base URL."""
    from aiohttp import web

    loop = asyncio.new_event_loop()
    ready = threading.Event()
    state: dict[str, object] = {}

    def run() -> None:
        asyncio.set_event_loop(loop)
        app = web.Application()
        app.router.add_static("/", folder)
        runner = web.AppRunner(app, access_log=None)
        loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        loop.run_until_complete(site.start())
        state["runner"] = runner
        state["port"] = runner.addresses[0][1]
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, name="stream_st-demo-server", daemon=True)
    thread.start()
    if not ready.wait(10):
        raise RuntimeError("the demo HTTP server did not start")
    try:
        yield f"http://127.0.0.1:{state['port']}"
    finally:
        runner = state["runner"]
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)  # type: ignore[attr-defined]
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@contextlib.contextmanager
def demo_url() -> Iterator[tuple[str, Path]]:
    """A served demo checkpoint: yields its URL and local path."""
    with tempfile.TemporaryDirectory(prefix="stream-st-demo-") as folder:
        path = write_demo_checkpoint(Path(folder) / "model.safetensors")
        with serve_folder(Path(folder)) as base:
            yield f"{base}/{path.name}", path
