"""Where "cuda" points: the GPU current on the caller's thread, not on stream_st's IO thread (CUDA's
current device is per thread; ranks call ``torch.cuda.set_device(local_rank)`` on their own thread)."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest
import torch

import stream_st as sst
from stream_st import api


@pytest.fixture()
def caller_on_gpu_3(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """CUDA faked: GPU 3 is current on this thread, GPU 0 on every other; returns what the async bodies got."""
    caller = threading.get_ident()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3 if threading.get_ident() == caller else 0)
    seen: list[Any] = []

    async def load_file_async(url: str, device: Any, **_: Any) -> dict[str, torch.Tensor]:
        seen.append(device)
        return {}

    async def load_model_async(model: Any, url: str, strict: bool, device: Any, **_: Any) -> tuple[list[str], ...]:
        seen.append(device)
        return [], []

    async def iter_tensors_async(url: str, device: Any, **_: Any) -> AsyncIterator[tuple[str, torch.Tensor]]:
        seen.append(device)
        return
        yield

    monkeypatch.setattr(api, "load_file_async", load_file_async)
    monkeypatch.setattr(api, "load_model_async", load_model_async)
    monkeypatch.setattr(api, "iter_tensors_async", iter_tensors_async)
    return seen


def test_sync_functions_resolve_cuda_on_the_callers_thread(caller_on_gpu_3: list[Any]) -> None:
    sst.load_file("https://example.invalid/model.safetensors", "cuda")
    sst.load_model(torch.nn.Module(), "https://example.invalid/model.safetensors", device="cuda")
    assert list(sst.iter_tensors("https://example.invalid/model.safetensors", "cuda")) == []
    sst.load_file("https://example.invalid/model.safetensors", 1)
    assert caller_on_gpu_3 == [torch.device("cuda", 3)] * 3 + [torch.device("cuda", 1)]
