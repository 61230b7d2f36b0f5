"""The rows of the GPU benchmark (benchmarks/gpu.py): what each fresh child process does.

    python benchmarks/gpu_children.py KIND JSON_ARGS

prints one ``RESULT {json}`` line: the row's numbers (``seconds`` of the timed call after CUDA is ready, with
a ``torch.cuda.synchronize()``; ``bytes``) and the process's peak RSS (``rss_hwm_mib``: its VmHWM; ``ru_maxrss``
too, which on Linux carries the parent's RSS across fork+exec). The ``raw`` row is harness/raw_get.py.
``GPU_BENCH_DEVICE=cpu`` (``gpu.py --cpu-dry-run``) runs every row on the CPU to test the flow; its numbers
mean nothing.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the harness

from harness.process import emit  # noqa: E402
from harness.verify import differences  # noqa: E402

MiB = 1 << 20
DEVICE = os.environ.get("GPU_BENCH_DEVICE", "cuda")


def _cuda_ready() -> Any:
    import torch

    if DEVICE == "cpu":
        return torch
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA in the child")
    torch.zeros(1, device="cuda")
    torch.cuda.synchronize()
    return torch


def _sync(torch: Any) -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _memory() -> dict[str, float]:
    import resource

    with open("/proc/self/status") as f:
        hwm = next((int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:")), 0.0)
    return {"rss_hwm_mib": hwm, "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _loaded(state: dict[str, Any], expect: dict[str, Any]) -> dict[str, Any]:
    nbytes = sum(t.nbytes for t in state.values())
    if len(state) != expect["tensors"] or nbytes != expect["tensor_bytes"]:
        raise RuntimeError(
            f"loaded {len(state)} tensors / {nbytes} bytes, expected {expect['tensors']} / {expect['tensor_bytes']}"
        )
    if not all(t.device.type == DEVICE for t in state.values()):
        raise RuntimeError(f"a tensor is not on {DEVICE}")
    return {"tensors": len(state), "tensor_bytes": nbytes}


def probe(_: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        import torch
    except Exception as e:
        return out | {"cuda": False, "why": f"torch is not importable: {e!r}"}
    out |= {"torch": torch.__version__, "torch_cuda": torch.version.cuda}
    for name in ("safetensors", "aiohttp", "fsspec", "numpy", "stream_st"):
        try:
            out[name] = getattr(__import__(name), "__version__", "?")
        except Exception as e:
            out[name] = f"missing ({type(e).__name__}: {e})"
    if not torch.cuda.is_available():
        return out | {
            "cuda": False,
            "why": f"torch {torch.__version__} (CUDA build: {torch.version.cuda}) "
            "reports torch.cuda.is_available() == False",
        }
    props = torch.cuda.get_device_properties(0)
    return out | {
        "cuda": True,
        "gpu": torch.cuda.get_device_name(0),
        "gpu_memory_gib": round(props.total_memory / (1 << 30), 1),
        "capability": f"{props.major}.{props.minor}",
    }


def h2d(args: dict[str, Any]) -> dict[str, Any]:
    """Pinned host→device bandwidth: ``copy_`` of one pinned buffer many times, timed with CUDA events."""
    torch = _cuda_ready()
    n, iters = int(args.get("slot", 16 * MiB)), int(args.get("iters", 256))
    if DEVICE == "cpu":  # dry run: pageable memcpy timed on the host clock
        src, dst = torch.randint(0, 256, (n,), dtype=torch.uint8), torch.empty(n, dtype=torch.uint8)
        t0 = time.perf_counter()
        for _ in range(iters):
            dst.copy_(src)
        return {"seconds": time.perf_counter() - t0, "bytes": n * iters}
    src = torch.randint(0, 256, (n,), dtype=torch.uint8).pin_memory()
    dsts = [torch.empty(n, dtype=torch.uint8, device="cuda") for _ in range(4)]
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for i in range(16):
            dsts[i % 4].copy_(src, non_blocking=True)
        stream.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        for i in range(iters):
            dsts[i % 4].copy_(src, non_blocking=True)
        end.record(stream)
    end.synchronize()
    if not torch.equal(dsts[0].cpu(), src):
        raise RuntimeError("pinned copy is not bit-exact")
    return {"seconds": start.elapsed_time(end) / 1000, "bytes": n * iters}


def start(_: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    _cuda_ready()
    import safetensors.torch  # noqa: F401

    import stream_st  # noqa: F401

    return {"seconds": time.perf_counter() - t0}


def safetensors_load(args: dict[str, Any]) -> dict[str, Any]:
    torch = _cuda_ready()
    import safetensors.torch

    t0 = time.perf_counter()
    state = safetensors.torch.load_file(args["path"], device=DEVICE)
    _sync(torch)
    return {"seconds": time.perf_counter() - t0, "bytes": args["bytes"]} | _loaded(state, args)


def stream_st_load(args: dict[str, Any]) -> dict[str, Any]:
    torch = _cuda_ready()
    import stream_st

    verify = f"sha256:{args['sha256']}" if args.get("verify") else None
    t0 = time.perf_counter()
    state = stream_st.load_file(args["url"], DEVICE, verify=verify)
    _sync(torch)
    return {"seconds": time.perf_counter() - t0, "bytes": args["bytes"]} | _loaded(state, args)


def cpu_stream_st(args: dict[str, Any]) -> dict[str, Any]:
    import torch  # noqa: F401  (imported before the timing, as the GPU rows do: stream_st imports it lazily)

    import stream_st

    t0 = time.perf_counter()
    state = stream_st.load_file(args["url"])
    return {"seconds": time.perf_counter() - t0, "bytes": args["bytes"], "tensors": len(state)}


def iterate(args: dict[str, Any]) -> dict[str, Any]:
    """``iter_tensors``: time to the first tensor and to the last."""
    torch = _cuda_ready()
    import stream_st

    count = nbytes = 0
    first, first_name = None, ""
    t0 = time.perf_counter()
    for name, tensor in stream_st.iter_tensors(args["url"], DEVICE):
        if first is None:
            _sync(torch)
            first, first_name = time.perf_counter() - t0, name
        if tensor.device.type != DEVICE:
            raise RuntimeError(f"{name} is not on {DEVICE}")
        count += 1
        nbytes += tensor.nbytes
        del tensor
    _sync(torch)
    seconds = time.perf_counter() - t0
    if count != args["tensors"] or nbytes != args["tensor_bytes"]:
        raise RuntimeError(f"iterated {count} tensors / {nbytes} bytes")
    return {"seconds": seconds, "bytes": args["bytes"], "ttft": first, "first_tensor": first_name}


def sha256(args: dict[str, Any]) -> dict[str, Any]:
    """The hash rate that bounds ``verify=``: hashlib.sha256 over the page-cached file, 4 MiB at a time."""
    import hashlib
    import mmap

    with open(args["path"], "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        view = memoryview(mapped)
        hashlib.sha256(view[: 64 * MiB]).digest()  # fault the mapping's first pages in before timing
        t0 = time.perf_counter()
        h = hashlib.sha256()
        for at in range(0, len(view), 4 * MiB):
            h.update(view[at : at + 4 * MiB])
        seconds = time.perf_counter() - t0
        del view
    if args.get("sha256") and h.hexdigest() != args["sha256"]:
        raise RuntimeError("sha256 differs from the sidecar's")
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in flags.splitlines() if line.startswith("model name")), "?")
    return {"seconds": seconds, "bytes": args["bytes"], "cpu": model, "sha_ni": " sha_ni" in flags}


def check(args: dict[str, Any]) -> dict[str, Any]:
    """Untimed: ``load_file`` and ``iter_tensors`` against ``safetensors.torch.load_file``, bit for bit."""
    device = args.get("device", DEVICE)
    if device == "cuda":
        _cuda_ready()
    import safetensors.torch

    import stream_st

    ref = safetensors.torch.load_file(args["path"], device=device)
    bad = differences(stream_st.load_file(args["url"], device), ref)
    bad += ["iter: " + n for n in differences(dict(stream_st.iter_tensors(args["url"], device)), ref)]
    if bad:
        raise RuntimeError(f"{len(bad)} tensors differ from safetensors: {bad[:5]}")
    return {"tensors": len(ref), "bit_exact": True}


def timeline(args: dict[str, Any]) -> dict[str, Any]:
    """Where a GPU load's time goes: two ``load_file(url, "cuda")`` in one process (the first allocates the
    pinned pool, the second reuses it; the CUDA caching allocator is emptied between them), with the phases
    timed by wrapping stream_st's internals. Diagnostic only: not a row of the table."""
    torch = _cuda_ready()
    import stream_st
    from stream_st import fetch, gpu, remote, sinks

    spans: list[tuple[str, float, float]] = []
    lock = threading.Lock()

    def timed(owner: Any, name: str) -> None:
        original = getattr(owner, name)

        def wrapper(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                with lock:
                    spans.append((name, t, time.perf_counter()))

        setattr(owner, name, wrapper)

    for owner, name in [
        (gpu.PinnedPool, "acquire"),
        (fetch.Engine, "_read_part"),
        (gpu.DeviceStaging, "ship"),
        (gpu.DeviceStaging, "finish"),
        (sinks, "output_tensor"),  # remote.py imports it at each call, so the wrapper is what it gets
    ]:
        timed(owner, name)
    remote.RemoteFile.stage_cpu_loads = DEVICE == "cpu"  # a dry run takes the slot path too
    threads = int(os.environ.get("STREAM_ST_MAX_CONCURRENCY", "16"))
    loads = []
    for label in ("cold pool", "warm pool"):
        spans.clear()
        torch.cuda.empty_cache()
        t0 = time.perf_counter()
        state = stream_st.load_file(args["url"], DEVICE)
        _sync(torch)
        t1 = time.perf_counter()
        _loaded(state, args)
        del state

        def of(name: str) -> list[tuple[str, float, float]]:
            return [s for s in spans if s[0] == name]

        def total(name: str) -> float:
            return round(sum(e - b for _, b, e in of(name)), 4)

        reads, acquires = of("_read_part"), of("acquire")
        window = max(s[2] for s in reads) - min(s[1] for s in reads)
        loads.append(
            {
                "load": label,
                "seconds": round(t1 - t0, 4),
                "gbps": round(args["bytes"] / (t1 - t0) / 1e9, 2),
                "before_first_part_s": round(min(s[1] for s in acquires) - t0, 4),
                "allocate_outputs_s": total("output_tensor"),
                "acquire_s": {
                    "first_wave_max": round(max(e - b for _, b, e in acquires[:threads]), 4),
                    "total": total("acquire"),
                },
                "parts": len(reads),
                "read_window_s": round(window, 4),
                "gbps_in_read_window": round(args["bytes"] / window / 1e9, 2),
                "read_busy_share": round(sum(e - b for _, b, e in reads) / (threads * window), 3),
                "ship_total_s": total("ship"),
                "after_last_read_s": round(t1 - max(s[2] for s in reads), 4),
                "finish_s": total("finish"),
            }
        )
    return {"loads": loads, "stream_st": stream_st.__version__}


CHILDREN: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "probe": probe,
    "h2d": h2d,
    "start": start,
    "safetensors": safetensors_load,
    "stream_st": stream_st_load,
    "cpu_stream_st": cpu_stream_st,
    "iter": iterate,
    "sha256": sha256,
    "check": check,
    "timeline": timeline,
}

if __name__ == "__main__":
    emit(CHILDREN[sys.argv[1]](json.loads(sys.argv[2])) | _memory())
