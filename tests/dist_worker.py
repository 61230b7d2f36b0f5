"""One rank of a torch.distributed (gloo) test: runs in a spawned process, writes its outcome to a file."""

from __future__ import annotations

import hashlib
import json
import traceback
from datetime import timedelta
from typing import Any


def describe(tensor: Any) -> list[Any]:
    """dtype, shape and the sha256 of the bytes: what a rank reports of each tensor."""
    import torch

    raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
    return [str(tensor.dtype), list(tensor.shape), hashlib.sha256(raw).hexdigest()]


def run_rank(rank: int, world: int, port: int, job: dict[str, Any], out: str) -> None:
    import torch.distributed as dist

    import stream_st as sst

    if job.get("backend") == "nccl":
        import torch

        torch.cuda.set_device(rank)  # one GPU per rank, as NCCL requires
    dist.init_process_group(
        job.get("backend", "gloo"),
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=30),
    )
    result: dict[str, Any]
    stats = sst.Stats()
    try:
        tensors = job["per_rank"][rank] if "per_rank" in job else job.get("tensors")
        options = {**job.get("options", {}), "stats": stats, "device": job.get("device", "cpu")}
        options |= job["per_rank_options"][rank] if "per_rank_options" in job else {}
        reported: list[tuple[int, int]] = []
        options["progress"] = lambda done, total: reported.append((done, total))
        if job.get("tensor_parallel"):
            options["tensor_parallel"] = sst.TensorParallel(rank, world, job["tensor_parallel"])
        if job.get("split", not job.get("tensor_parallel")):
            options["process_group"] = True
        url = job["per_rank_url"][rank] if "per_rank_url" in job else job["url"]
        if job.get("model"):
            loaded = _load_into_model(url, options)
        elif job.get("iter"):
            loaded = dict(sst.iter_tensors(url, tensors=tensors, **options))
        else:
            loaded = sst.load_file(url, tensors=tensors, **options)
        result = {
            "ok": True,
            "tensors": {name: describe(t) for name, t in loaded.items()},
            "bytes": stats.bytes,
            "progress": reported[-1:],
        }
    except Exception as exc:
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
    with open(out, "w") as handle:
        json.dump(result, handle)
    dist.destroy_process_group()


def _load_into_model(url: str, options: dict[str, Any]) -> dict[str, Any]:
    """A module with one zero parameter per tensor of the checkpoint, filled by load_model."""
    import torch

    import stream_st as sst

    header = sst.read_header(url)
    model = torch.nn.Module()
    for info in header:
        module = model
        *path, leaf = info.name.split(".")
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, torch.nn.Module())
            module = getattr(module, part)
        empty = torch.zeros(info.shape, dtype=torch.bfloat16)
        module.register_parameter(leaf, torch.nn.Parameter(empty, requires_grad=False))
    assert sst.load_model(model, url, **options) == ([], [])
    return dict(model.state_dict())
