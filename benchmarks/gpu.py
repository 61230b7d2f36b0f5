#!/usr/bin/env python3
"""GPU benchmark of the device path, against the physical limits, in one command (docs/ARCHITECTURE.md §5).

    python benchmarks/gpu.py                    # on a CUDA machine (about 3 minutes on 16 cores)
    python benchmarks/gpu.py --server-check     # no GPU needed: the loopback server + raw client only

What one run does:

1. generates a Llama-like bf16 checkpoint (``--size-gib`` 4.5 → hidden 3328, 4.38 GiB, 147 tensors, the
   layout of ``checkpoint.py``) in /dev/shm, filling it with random bytes from numpy's SFC64 in one
   process per core (seconds, not minutes); the header is written the way safetensors writes it;
2. starts the loopback server of docs/ARCHITECTURE.md §5: ``--servers`` (8) aiohttp processes sharing one port with
   SO_REUSEPORT, each serving the file with ``web.FileResponse`` (sendfile, Range → 206);
3. checks once, untimed, that ``stream_st.load_file(url, "cuda")`` and ``stream_st.iter_tensors`` return
   every tensor bit for bit as ``safetensors.torch.load_file(path, device="cuda")`` does;
4. runs ``--repeats`` rounds (order rotated each round), every row a fresh child process:

   - ``raw``: the server's ceiling, ``--threads`` (16) threads of ``http.client`` ``readinto`` into reused
     16 MiB buffers, bytes discarded, no torch imported;
   - ``h2d``: pinned host→device bandwidth, ``copy_`` of a 16 MiB pinned tensor many times, CUDA events;
   - ``start``: import torch + stream_st + safetensors and initialise CUDA (the RSS every row starts from);
   - ``safetensors``: ``safetensors.torch.load_file(path, device="cuda")`` from /dev/shm (page cache);
   - ``stream_st``: ``stream_st.load_file(url, "cuda")`` with STREAM_ST_MAX_CONCURRENCY=16;
   - ``stream_st_pool512``: the same with a 512 MiB pinned pool (32 slots) instead of 256 MiB;
   - ``stream_st_part8``: the same with 8 MiB parts, so 8 MiB slots (a cold process pins half as much);
   - ``iter``: ``stream_st.iter_tensors(url, "cuda")``: time to first tensor and to the last;
   - ``stream_st_cpu``: ``stream_st.load_file(url)`` to host memory: with ``raw`` and ``stream_st``, it tells
     which stage bounds a GPU load (the data plane, or the slot pipeline and copies);
   - ``verify``: ``stream_st.load_file(url, "cuda", verify="sha256:<whole file>")`` (the bytes go to the
     GPU as usual and are hashed in order, read back through a small host buffer: the cost of verifying);
   - ``sha256``: hashlib.sha256 over the page-cached file, no torch: the hash rate that bounds ``verify``;

   and, once, untimed in the table, a ``timeline`` child: two loads in one process with their phases timed
   (call → first part, output allocation, slot waits, read window, tail), to say where a load's time goes;

5. prints a Markdown table (GB/s, time to first tensor, peak RSS, whole-process wall), the ratio
   stream_st ÷ min(raw ceiling, pinned H2D) (target ≥ 0.90) and the overlap achieved: the share of the
   shorter stage (download at the raw ceiling, or copy at pinned H2D speed) that stream_st hid behind the
   longer one, from those rates (conservative: the load's time also holds its allocation), and writes
   ``gpu_results.md`` and ``gpu_results.json`` to $OUT when set (the device tool brings those back), else
   ``benchmarks/out/``.

Timings of a load are taken inside the child after CUDA is initialised, around the call and a
``torch.cuda.synchronize()``; GB/s = file bytes ÷ that time. Peak RSS is the child's ``VmHWM`` (its
own address space's high-water mark); ``ru_maxrss`` is kept in the JSON too, but on Linux it carries the
parent's RSS across fork+exec. Without CUDA the script prints ``no CUDA`` and exits 2.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from checkpoint import LAYERS, layout, pick_hidden  # noqa: E402  (no torch at import)

MiB = 1 << 20
GiB = 1 << 30
RESULT = "RESULT "

# ---------------------------------------------------------------------------------------------------
# children: each runs as ``gpu.py _child KIND JSON`` and prints one ``RESULT {json}`` line
# ---------------------------------------------------------------------------------------------------


def _memory() -> dict[str, float]:
    import resource

    hwm = 0.0
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    hwm = int(line.split()[1]) / 1024
    except OSError:
        pass
    return {"rss_hwm_mib": hwm, "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


# "cuda", or "cpu" for --cpu-dry-run (the whole flow without a GPU, to test this script; numbers meaningless)
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


def child_probe(_: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        import torch
    except Exception as e:  # noqa: BLE001
        return out | {"cuda": False, "why": f"torch is not importable: {e!r}"}
    out |= {"torch": torch.__version__, "torch_cuda": torch.version.cuda}
    for name in ("safetensors", "aiohttp", "fsspec", "numpy", "stream_st"):
        try:
            out[name] = getattr(__import__(name), "__version__", "?")
        except Exception as e:  # noqa: BLE001
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
        "gpu_memory_gib": round(props.total_memory / GiB, 1),
        "capability": f"{props.major}.{props.minor}",
    }


def _fill(job: tuple[str, int, int, int]) -> None:
    import numpy as np

    path, offset, length, seed = job
    words = np.random.Generator(np.random.SFC64(seed)).bit_generator.random_raw(-(-length // 8))
    data = memoryview(words.view(np.uint8))[:length]
    fd = os.open(path, os.O_WRONLY)
    try:
        done = 0
        while done < length:
            done += os.pwrite(fd, data[done:], offset + done)
    finally:
        os.close(fd)


def child_gen(args: dict[str, Any]) -> dict[str, Any]:
    """A safetensors file of random bf16 bytes, written in parallel (header as safetensors writes it)."""
    import hashlib
    import multiprocessing

    path, hidden = Path(args["path"]), int(args["hidden"])
    t0 = time.perf_counter()
    shapes = layout(hidden)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in sorted(shapes):  # safetensors orders by dtype alignment, then name: all bf16 here
        n = 2
        for d in shapes[name]:
            n *= d
        header[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    data_start = 8 + len(raw)
    total = data_start + offset
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        f.truncate(total)
    chunk = 64 * MiB
    jobs = [
        (str(tmp), data_start + o, min(chunk, offset - o), 1_000 + i) for i, o in enumerate(range(0, offset, chunk))
    ]
    with multiprocessing.get_context("fork").Pool(min(32, os.cpu_count() or 1)) as pool:
        pool.map(_fill, jobs, chunksize=1)
    os.replace(tmp, path)
    written = time.perf_counter() - t0
    digest = None
    if args.get("digest"):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(64 * MiB):
                h.update(block)
        digest = h.hexdigest()
    return {
        "bytes": total,
        "tensor_bytes": offset,
        "tensors": len(shapes),
        "header_bytes": data_start,
        "first_tensor": sorted(shapes)[0],
        "write_s": written,
        "sha256": digest,
        "sha256_s": time.perf_counter() - t0 - written,
    }


def child_raw(args: dict[str, Any]) -> dict[str, Any]:
    """The server's ceiling: threads of http.client readinto into reused buffers, bytes discarded."""
    import http.client
    import threading
    from urllib.parse import urlsplit

    url, size, threads, part = args["url"], int(args["size"]), int(args["threads"]), int(args["part"])
    u = urlsplit(url)
    ranges = iter([(o, min(part, size - o)) for o in range(0, size, part)])
    lock = threading.Lock()
    errors: list[str] = []
    got = [0] * threads

    def work(i: int) -> None:
        conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port, timeout=60)
        view = memoryview(bytearray(part))
        try:
            while True:
                with lock:
                    r = next(ranges, None)
                if r is None or errors:
                    return
                o, n = r
                conn.request("GET", u.path, headers={"Range": f"bytes={o}-{o + n - 1}"})
                resp = conn.getresponse()
                if resp.status != 206:
                    raise RuntimeError(f"HTTP {resp.status} for bytes={o}-{o + n - 1}")
                have = 0
                while have < n:
                    k = resp.readinto(view[have:n])
                    if not k:
                        raise RuntimeError(f"short body: {have} of {n} bytes at {o}")
                    have += k
                got[i] += have
        except BaseException as e:  # noqa: BLE001
            errors.append(repr(e))
        finally:
            conn.close()

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    t0 = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    seconds = time.perf_counter() - t0
    if errors:
        raise RuntimeError("; ".join(errors[:3]))
    if sum(got) != size:
        raise RuntimeError(f"got {sum(got)} bytes, expected {size}")
    return {"seconds": seconds, "bytes": size}


def child_h2d(args: dict[str, Any]) -> dict[str, Any]:
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


def child_start(_: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    _cuda_ready()
    import safetensors.torch  # noqa: F401

    import stream_st  # noqa: F401

    return {"seconds": time.perf_counter() - t0}


def _loaded(torch: Any, state: dict[str, Any], expect: dict[str, Any]) -> dict[str, Any]:
    nbytes = sum(t.nbytes for t in state.values())
    if len(state) != expect["tensors"] or nbytes != expect["tensor_bytes"]:
        raise RuntimeError(
            f"loaded {len(state)} tensors / {nbytes} bytes, expected {expect['tensors']} / {expect['tensor_bytes']}"
        )
    if not all(t.device.type == DEVICE for t in state.values()):
        raise RuntimeError(f"a tensor is not on {DEVICE}")
    return {"tensors": len(state), "tensor_bytes": nbytes}


def child_safetensors(args: dict[str, Any]) -> dict[str, Any]:
    torch = _cuda_ready()
    import safetensors.torch

    t0 = time.perf_counter()
    state = safetensors.torch.load_file(args["path"], device=DEVICE)
    _sync(torch)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "bytes": args["bytes"]} | _loaded(torch, state, args)


def child_stream_st(args: dict[str, Any]) -> dict[str, Any]:
    torch = _cuda_ready()
    import stream_st

    verify = f"sha256:{args['sha256']}" if args.get("verify") else None
    t0 = time.perf_counter()
    state = stream_st.load_file(args["url"], DEVICE, verify=verify)
    _sync(torch)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "bytes": args["bytes"]} | _loaded(torch, state, args)


def child_sha256(args: dict[str, Any]) -> dict[str, Any]:
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
        raise RuntimeError("sha256 differs from the generator's")
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in flags.splitlines() if line.startswith("model name")), "?")
    return {"seconds": seconds, "bytes": args["bytes"], "cpu": model, "sha_ni": " sha_ni" in flags}


def child_timeline(args: dict[str, Any]) -> dict[str, Any]:
    """Where a GPU load's time goes: two ``load_file(url, "cuda")`` in one process (the first allocates the
    pinned pool, the second reuses it; the CUDA caching allocator is emptied between them), with the
    phases timed by wrapping stream_st's internals. Diagnostic only: not a row of the table."""
    torch = _cuda_ready()
    import threading

    import stream_st
    from stream_st import fetch, gpu, remote

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
        (remote, "output_tensor"),
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
        _loaded(torch, state, args)
        del state

        def of(name: str) -> list[tuple[str, float, float]]:
            return [s for s in spans if s[0] == name]

        reads, acquires = of("_read_part"), of("acquire")
        first = min(s[1] for s in acquires)
        window = max(s[2] for s in reads) - min(s[1] for s in reads)
        loads.append(
            {
                "load": label,
                "seconds": round(t1 - t0, 4),
                "gbps": round(args["bytes"] / (t1 - t0) / 1e9, 2),
                "before_first_part_s": round(first - t0, 4),
                "allocate_outputs_s": round(sum(e - b for _, b, e in of("output_tensor")), 4),
                "acquire_s": {
                    "first_wave_max": round(max(e - b for _, b, e in acquires[:threads]), 4),
                    "total": round(sum(e - b for _, b, e in acquires), 4),
                },
                "parts": len(reads),
                "read_window_s": round(window, 4),
                "gbps_in_read_window": round(args["bytes"] / window / 1e9, 2),
                "read_busy_share": round(sum(e - b for _, b, e in reads) / (threads * window), 3),
                "ship_total_s": round(sum(e - b for _, b, e in of("ship")), 4),
                "after_last_read_s": round(t1 - max(s[2] for s in reads), 4),
                "finish_s": round(sum(e - b for _, b, e in of("finish")), 4),
            }
        )
    return {"loads": loads, "stream_st": stream_st.__version__}


def child_iter(args: dict[str, Any]) -> dict[str, Any]:
    torch = _cuda_ready()
    import stream_st

    count = nbytes = 0
    first = None
    first_name = ""
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


def child_check(args: dict[str, Any]) -> dict[str, Any]:
    """Untimed: stream_st (load_file and iter_tensors) against safetensors, bit for bit, on ``device``."""
    import torch

    device = args.get("device", DEVICE)
    if device == "cuda":
        _cuda_ready()
    import safetensors.torch

    import stream_st

    ref = safetensors.torch.load_file(args["path"], device=device)

    def same(name: str, t: Any) -> bool:
        r = ref.get(name)
        return (
            r is not None
            and t.dtype == r.dtype
            and t.shape == r.shape
            and t.device.type == r.device.type
            and torch.equal(t.reshape(-1).view(torch.uint8), r.reshape(-1).view(torch.uint8))
        )

    got = stream_st.load_file(args["url"], device)
    bad = [n for n, t in got.items() if not same(n, t)] + sorted(set(ref) - set(got))
    del got
    seen = set()
    for name, t in stream_st.iter_tensors(args["url"], device):
        seen.add(name)
        if not same(name, t):
            bad.append("iter:" + name)
    bad += ["iter:" + n for n in sorted(set(ref) - seen)]
    if bad:
        raise RuntimeError(f"{len(bad)} tensors differ from safetensors: {bad[:5]}")
    return {"tensors": len(ref), "bit_exact": True}


def child_cpu_stream_st(args: dict[str, Any]) -> dict[str, Any]:
    import stream_st

    t0 = time.perf_counter()
    state = stream_st.load_file(args["url"])
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "bytes": args["bytes"], "tensors": len(state)}


CHILDREN: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "probe": child_probe,
    "gen": child_gen,
    "raw": child_raw,
    "h2d": child_h2d,
    "start": child_start,
    "safetensors": child_safetensors,
    "stream_st": child_stream_st,
    "iter": child_iter,
    "check": child_check,
    "cpu_stream_st": child_cpu_stream_st,
    "sha256": child_sha256,
    "timeline": child_timeline,
}


def serve(root: str, port: int) -> None:
    """One server process: aiohttp FileResponse (sendfile, Range) on a port shared via SO_REUSEPORT."""
    import asyncio
    import ctypes

    from aiohttp import web

    with contextlib.suppress(OSError):  # die with the benchmark even if it is killed hard (PR_SET_PDEATHSIG)
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)
    folder = Path(root)

    async def handle(request: web.Request) -> web.StreamResponse:
        path = folder / request.match_info["name"]
        if not path.is_file():
            raise web.HTTPNotFound()
        return web.FileResponse(path, chunk_size=1 * MiB)

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/{name}", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, reuse_port=True, backlog=1024).start()
        print("ready", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


# ---------------------------------------------------------------------------------------------------
# the parent: no torch import, so it stays small
# ---------------------------------------------------------------------------------------------------


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = os.environ.copy()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    for key in [k for k in env if k.startswith("STREAM_ST_")]:
        del env[key]  # every row states its own settings
    env.update(extra or {})
    return env


def run_child(
    kind: str, args: dict[str, Any], env: dict[str, str] | None = None, timeout: float = 120
) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, __file__, "_child", kind, json.dumps(args)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=child_env(env),
            cwd=REPO,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s", "wall": time.perf_counter() - t0}
    wall = time.perf_counter() - t0
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT) :]) | {"wall": wall}
    tail = (proc.stderr.strip() or proc.stdout.strip())[-1500:]
    return {"error": f"exit {proc.returncode}: {tail}", "wall": wall}


class Servers:
    """``count`` aiohttp processes serving ``root`` on one loopback port (SO_REUSEPORT)."""

    def __init__(self, root: Path, count: int) -> None:
        self.procs: list[subprocess.Popen[str]] = []
        for attempt in range(3):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                self.port = s.getsockname()[1]
            self.procs = [
                subprocess.Popen(
                    [sys.executable, __file__, "_serve", str(root), str(self.port)],
                    stdout=subprocess.PIPE,
                    text=True,
                    env=child_env(),
                    cwd=REPO,
                )
                for _ in range(count)
            ]
            if self._ready(time.monotonic() + 30):
                return
            self.stop()
            print(f"server start failed (attempt {attempt + 1}), retrying on another port", flush=True)
        raise RuntimeError("could not start the loopback server")

    def _ready(self, deadline: float) -> bool:
        for p in self.procs:
            assert p.stdout is not None
            ready, _, _ = select.select([p.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not ready or p.stdout.readline().strip() != "ready":
                return False
        return True

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs = []


def data_dir(explicit: str | None, size_gib: float) -> Path:
    """/dev/shm when it has room (tmpfs: the file is always in memory), else $TMPDIR or /tmp (page cache)."""
    if explicit:
        return Path(explicit)
    need = size_gib * GiB * 1.05 + 256 * MiB
    for base in (Path("/dev/shm"), Path(os.environ.get("TMPDIR") or "/tmp")):
        if base.is_dir() and os.access(base, os.W_OK) and shutil.disk_usage(base).free >= need:
            return base / "stream_st_gpu_bench"
        if base.is_dir():
            print(f"{base}: {shutil.disk_usage(base).free / GiB:.1f} GiB free, need {need / GiB:.1f}", flush=True)
    raise SystemExit(f"no folder with {need / GiB:.1f} GiB free for the checkpoint (--data-dir)")


def make_checkpoint(folder: Path, size_gib: float, digest: bool) -> tuple[Path, dict[str, Any]]:
    hidden = pick_hidden(size_gib)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"llama-like-h{hidden}-l{LAYERS}-bf16.safetensors"
    meta_path = path.with_name(path.name + ".json")
    if path.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("sha256") or not digest:
            print(f"reusing {path} ({meta['bytes'] / GiB:.2f} GiB)", flush=True)
            return path, meta
    print(f"generating {path} (hidden {hidden}) ...", flush=True)
    meta = run_child("gen", {"path": str(path), "hidden": hidden, "digest": digest}, timeout=300)
    if "error" in meta:
        raise SystemExit(f"generating the checkpoint failed: {meta['error']}")
    meta["hidden"] = hidden
    meta_path.write_text(json.dumps(meta))
    print(
        f"  {meta['bytes'] / GiB:.2f} GiB, {meta['tensors']} tensors, written in {meta['write_s']:.1f} s"
        + (f", sha256 in {meta['sha256_s']:.1f} s" if digest else ""),
        flush=True,
    )
    return path, meta


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def fmt(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if "error" not in r]
    rates = [r["bytes"] / r["seconds"] / 1e9 for r in ok if r.get("seconds") and r.get("bytes")]
    return {
        "n": len(ok),
        "failed": len(runs) - len(ok),
        "gbps": median(rates),
        "gbps_min": min(rates, default=None),
        "gbps_max": max(rates, default=None),
        "seconds": median([r["seconds"] for r in ok if "seconds" in r]),
        "ttft": median([r["ttft"] for r in ok if r.get("ttft") is not None]),
        "rss": median([r["rss_hwm_mib"] for r in ok if "rss_hwm_mib" in r]),
        "wall": median([r["wall"] for r in ok]),
        "errors": [r["error"][:300] for r in runs if "error" in r][:2],
    }


def table(rows: list[tuple[str, str]], stats: dict[str, dict[str, Any]], base_rss: float | None) -> list[str]:
    lines = [
        "| row | what the fresh child process does | GB/s (median) | min–max | load s | first tensor s "
        "| peak RSS MiB | RSS over start | process wall s | runs |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, what in rows:
        s = stats.get(key)
        if s is None:
            continue
        spread = f"{fmt(s['gbps_min'])}–{fmt(s['gbps_max'])}" if s["gbps"] is not None else "—"
        # raw imports no torch: its RSS is not "start + something"
        over = (
            s["rss"] - base_rss
            if s["rss"] is not None and base_rss is not None and key not in ("start", "raw")
            else None
        )
        runs = f"{s['n']}" + (f" ({s['failed']} failed)" if s["failed"] else "")
        lines.append(
            f"| {key} | {what} | {fmt(s['gbps'])} | {spread} | {fmt(s['seconds'], 3)} | {fmt(s['ttft'], 3)} "
            f"| {fmt(s['rss'], 0)} | {fmt(over, 0)} | {fmt(s['wall'])} | {runs} |"
        )
    return lines


def overlap(net_gbps: float | None, h2d_gbps: float | None, load_gbps: float | None) -> str:
    """How much of the shorter stage the load hid behind the longer one, from rates measured in this run:
    per byte, downloading takes 1/net, copying 1/h2d; done one after the other they take the sum, fully
    overlapped the larger. 1.00 = fully hidden (above 1: faster than the raw ceiling, which is timed in a
    fresh process); 0 or less = serialised, or slowed by costs outside both stages."""
    if not (net_gbps and h2d_gbps and load_gbps):
        return "—"
    net, h2d, load = 1 / net_gbps, 1 / h2d_gbps, 1 / load_gbps  # seconds per GB
    hidden = (net + h2d - load) / min(net, h2d)
    return f"{hidden:.2f} (download {net:.3f} s/GB + copy {h2d:.3f} s/GB serially; stream_st {load:.3f} s/GB)"


def ratio(a: float | None, b: float | None) -> str:
    return "—" if a is None or not b else f"{a / b:.2f}"


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def nvidia_smi() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        return out.stdout.strip().replace("\n", "; ") or "n/a"
    except (OSError, subprocess.TimeoutExpired):
        return "n/a"


def out_dir(explicit: str | None) -> Path:
    folder = Path(explicit or os.environ.get("OUT") or REPO / "benchmarks" / "out")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def write_results(folder: Path, name: str, lines: list[str], data: dict[str, Any]) -> None:
    (folder / f"{name}.md").write_text("\n".join(lines) + "\n")
    (folder / f"{name}.json").write_text(json.dumps(data, indent=1, default=str))
    print(f"\nwrote {folder / (name + '.md')} and {name}.json", flush=True)


Plan = list[tuple[str, str, dict[str, Any], dict[str, str]]]


def run_rounds(
    plan: Plan,
    repeats: int,
    deadline: float,
    timeout: float,
    on_round: Callable[[dict[str, list[dict[str, Any]]], int], object] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Every row once per round, in an order rotated by one each round; stops early at ``deadline``."""
    runs: dict[str, list[dict[str, Any]]] = {key: [] for key, *_ in plan}
    last_round = 0.0
    for rnd in range(repeats):
        if rnd and time.monotonic() + last_round * 1.2 > deadline:
            print(f"stopping after {rnd} rounds: another would pass --deadline-s", flush=True)
            break
        t0 = time.monotonic()
        shift = rnd % len(plan)
        for key, kind, args, env in plan[shift:] + plan[:shift]:
            r = run_child(kind, args, env, timeout=timeout)
            runs[key].append(r)
            if "error" in r:
                print(f"  round {rnd + 1} {key:18s} FAILED: {r['error'][-300:]}", flush=True)
            else:
                rate = f"{r['bytes'] / r['seconds'] / 1e9:6.2f} GB/s" if r.get("bytes") else " " * 11
                ttft = f"  first tensor {r['ttft']:.3f} s" if r.get("ttft") is not None else ""
                print(
                    f"  round {rnd + 1} {key:18s} {rate}  {r.get('seconds', 0):7.3f} s  RSS "
                    f"{r.get('rss_hwm_mib', 0):6.0f} MiB  wall {r['wall']:.2f} s{ttft}",
                    flush=True,
                )
        last_round = time.monotonic() - t0
        if on_round is not None:
            on_round(runs, rnd + 1)  # results so far reach $OUT even if a timeout kills the rest
    return runs


def gpu_report(
    a: argparse.Namespace,
    probe: dict[str, Any],
    meta: dict[str, Any],
    path: Path,
    check: dict[str, Any],
    runs: dict[str, list[dict[str, Any]]],
    rounds: int,
    timeline: dict[str, Any],
) -> tuple[list[str], list[str], dict[str, Any]]:
    stats = {key: summarize(r) for key, r in runs.items()}
    rows = [
        ("raw", f"server ceiling: {a.threads} threads http.client readinto, 16 MiB ranges, bytes discarded"),
        ("h2d", "pinned host→device copy_ of 16 MiB, 256 times (CUDA events)"),
        ("start", "import torch + stream_st + safetensors, CUDA init (RSS baseline)"),
        ("safetensors", f'safetensors.torch.load_file(path in {path.parent.parent}, device="cuda")'),
        ("stream_st", f'stream_st.load_file(url, "cuda"), MAX_CONCURRENCY={a.threads}'),
        ("iter", f'stream_st.iter_tensors(url, "cuda"), MAX_CONCURRENCY={a.threads}'),
        ("stream_st_cpu", f"stream_st.load_file(url) to host memory, MAX_CONCURRENCY={a.threads} (no GPU stage)"),
        ("stream_st_pool512", "as stream_st, PINNED_POOL_BYTES=512 MiB"),
        ("stream_st_part8", "as stream_st, PART_SIZE=8 MiB (8 MiB slots: half the memory to pin in a cold process)"),
        ("verify", 'as stream_st, verify="sha256:…" (whole file)'),
        ("sha256", "hashlib.sha256 of the page-cached file (mmap, 4 MiB updates): the rate that bounds verify"),
    ]
    g = {k: s["gbps"] for k, s in stats.items()}
    limit = min((v for v in (g.get("raw"), g.get("h2d")) if v), default=None)
    base_rss = stats.get("start", {}).get("rss")
    lines = [
        f"# stream_st on the GPU: {probe['gpu']}",
        "",
        f"- date (UTC): {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M}; CPUs: {probe['cpus']}; "
        f"nvidia-smi: {nvidia_smi()}",
        f"- python {probe['python']}, torch {probe['torch']} (CUDA {probe['torch_cuda']}), safetensors "
        f"{probe['safetensors']}, aiohttp {probe['aiohttp']}, fsspec {probe['fsspec']}, stream_st {probe['stream_st']} "
        f"(commit {git_commit()})",
        f"- checkpoint: {meta['bytes'] / GiB:.2f} GiB ({meta['bytes']:,} bytes), {meta['tensors']} bf16 tensors, "
        f"hidden {meta['hidden']}, random bytes, in {path.parent} (page-cached)",
        f"- server: {a.servers} aiohttp processes, one port (SO_REUSEPORT), FileResponse/sendfile, 127.0.0.1",
        "- bit-exact check of load_file and iter_tensors against safetensors: "
        + ("passed" if check.get("bit_exact") else f"FAILED ({check.get('error', '?')[:300]})"),
        f"- each row: a fresh process per run; {rounds} of {a.repeats} rounds done, order rotated; GB/s = file "
        "bytes ÷ the in-process time of the call (+ cuda synchronize); peak RSS = VmHWM",
        "",
        *table(rows, stats, base_rss),
        "",
        f"- limit = min(raw ceiling, pinned H2D) = {fmt(limit)} GB/s",
        f"- **stream_st ÷ limit = {ratio(g.get('stream_st'), limit)}** (target ≥ 0.90); "
        f"pool 512 MiB ÷ limit = {ratio(g.get('stream_st_pool512'), limit)}; "
        f"8 MiB parts ÷ limit = {ratio(g.get('stream_st_part8'), limit)}",
        f"- stream_st ÷ safetensors(page cache) = {ratio(g.get('stream_st'), g.get('safetensors'))}; "
        f"verify ÷ stream_st = {ratio(g.get('verify'), g.get('stream_st'))}; verify ÷ sha256 rate = "
        f"{ratio(g.get('verify'), g.get('sha256'))} (1.00: verifying costs only what hashing needs; CPU "
        f"{_first(runs.get('sha256'), 'cpu')}, sha_ni {_first(runs.get('sha256'), 'sha_ni')})",
        f"- time to first tensor (iter_tensors, first = `{meta.get('first_tensor')}`): "
        f"{fmt(stats.get('iter', {}).get('ttft'), 3)} s",
        f"- overlap of download and host→device copy: {overlap(g.get('raw'), g.get('h2d'), g.get('stream_st'))}; "
        f"from the second load in one process (pool pinned; timeline below): "
        f"{overlap(g.get('raw'), g.get('h2d'), _warm_gbps(timeline))}",
        f"- which stage bounds it: stream_st to host ÷ raw = {ratio(g.get('stream_st_cpu'), g.get('raw'))} "
        "(the data plane and fresh host memory), stream_st to cuda ÷ to host = "
        f"{ratio(g.get('stream_st'), g.get('stream_st_cpu'))} (the slot pipeline and copies)",
    ]
    lines += timeline_lines(timeline)
    errors = [f"- {k} failures: {s['errors']}" for k, s in stats.items() if s["errors"]]
    return lines + errors, errors, stats


def _warm_gbps(timeline: dict[str, Any]) -> float | None:
    loads = timeline.get("loads") or []
    return loads[-1]["gbps"] if len(loads) > 1 else None


def _first(runs: list[dict[str, Any]] | None, key: str) -> Any:
    return next((r[key] for r in runs or [] if key in r), "?")


def timeline_lines(timeline: dict[str, Any]) -> list[str]:
    """The diagnostic child's phases of one load, as a small table."""
    if "loads" not in timeline:
        return [f"- timeline of one load: {timeline.get('error', 'not run')[-400:]}"] if timeline else []
    keys = [
        ("seconds", "load s"),
        ("gbps", "GB/s"),
        ("before_first_part_s", "call → first part s (header, allocation)"),
        ("allocate_outputs_s", "allocating outputs s"),
        ("acquire_s", "slot acquire s (first wave max / total)"),
        ("read_window_s", "first read → last read s"),
        ("gbps_in_read_window", "GB/s in that window"),
        ("read_busy_share", "share of threads × window spent reading"),
        ("ship_total_s", "queuing copies s (total)"),
        ("after_last_read_s", "last read → return s"),
    ]
    loads = timeline["loads"]
    lines = ["", "Where one load's time goes (one process, two loads; diagnostic child, phases timed in-process):", ""]
    lines += ["| phase | " + " | ".join(load["load"] for load in loads) + " |", "|---|" + "---|" * len(loads)]
    for key, label in keys:
        cells = []
        for load in loads:
            v = load.get(key)
            cells.append(f"{v['first_wave_max']} / {v['total']}" if isinstance(v, dict) else str(v))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def gpu_main(a: argparse.Namespace) -> int:
    started = time.monotonic()
    deadline = started + a.deadline_s
    if a.cpu_dry_run:
        os.environ["GPU_BENCH_DEVICE"] = "cpu"  # the children inherit it
    probe = run_child("probe", {}, timeout=180)
    if a.cpu_dry_run and "error" not in probe:
        probe |= {"cuda": True, "gpu": "CPU DRY RUN (numbers meaningless)", "gpu_memory_gib": 0, "capability": "-"}
    if "error" in probe or not probe.get("cuda"):
        print(
            f"no CUDA: {probe.get('why') or probe.get('error')}; nothing to benchmark "
            "(python benchmarks/gpu.py --server-check runs the server part without a GPU)",
            flush=True,
        )
        return 2
    print(
        f"GPU: {probe['gpu']} ({probe['gpu_memory_gib']} GiB, sm {probe['capability']}), torch {probe['torch']}, "
        f"{probe['cpus']} CPUs",
        flush=True,
    )
    folder = out_dir(a.out)
    path, meta = make_checkpoint(data_dir(a.data_dir, a.size_gib), a.size_gib, digest=not a.quick)
    servers = Servers(path.parent, a.servers)
    try:
        url = servers.url(path.name)
        common = {
            "url": url,
            "path": str(path),
            "bytes": meta["bytes"],
            "tensors": meta["tensors"],
            "tensor_bytes": meta["tensor_bytes"],
            "sha256": meta.get("sha256"),
        }
        sst_env = {"STREAM_ST_MAX_CONCURRENCY": str(a.threads)}
        print(f"server: {a.servers} aiohttp processes on {url}", flush=True)
        check = run_child("check", common, sst_env, timeout=a.child_timeout)
        print(
            f"check: {'bit-exact' if check.get('bit_exact') else 'FAILED: ' + check.get('error', '?')[-800:]}",
            flush=True,
        )
        timeline = run_child("timeline", common, sst_env, timeout=a.child_timeout)
        print("\n".join(timeline_lines(timeline)), flush=True)
        plan: Plan = [
            ("raw", "raw", {"url": url, "size": meta["bytes"], "threads": a.threads, "part": 16 * MiB}, {}),
            ("h2d", "h2d", {"slot": 16 * MiB, "iters": 256}, {}),
            ("start", "start", {}, {}),
            ("safetensors", "safetensors", common, {}),
            ("stream_st", "stream_st", common, sst_env),
            ("iter", "iter", common, sst_env),
            ("stream_st_cpu", "cpu_stream_st", common, sst_env),
        ]
        if not a.quick:
            plan += [
                ("stream_st_pool512", "stream_st", common, sst_env | {"STREAM_ST_PINNED_POOL_BYTES": str(512 * MiB)}),
                ("stream_st_part8", "stream_st", common, sst_env | {"STREAM_ST_PART_SIZE": str(8 * MiB)}),
                ("verify", "stream_st", common | {"verify": True}, sst_env),
                ("sha256", "sha256", common, {}),
            ]

        def save(runs: dict[str, list[dict[str, Any]]], rounds: int) -> tuple[list[str], list[str]]:
            lines, errors, stats = gpu_report(a, probe, meta, path, check, runs, rounds, timeline)
            data = {
                "probe": probe,
                "checkpoint": meta,
                "check": check,
                "timeline": timeline,
                "runs": runs,
                "stats": stats,
                "args": vars(a),
                "rounds": rounds,
                "elapsed_s": time.monotonic() - started,
            }
            (folder / "gpu_results.md").write_text("\n".join(lines) + "\n")
            (folder / "gpu_results.json").write_text(json.dumps(data, indent=1, default=str))
            return lines, errors

        runs = run_rounds(plan, a.repeats, deadline, a.child_timeout, on_round=save)
    finally:
        servers.stop()
        if not a.keep:
            shutil.rmtree(path.parent, ignore_errors=True)
    rounds = min((len(r) for r in runs.values()), default=0)
    lines, errors = save(runs, rounds)
    print("\n" + "\n".join(lines), flush=True)
    print(f"\nwrote {folder / 'gpu_results.md'} and gpu_results.json", flush=True)
    return 0 if check.get("bit_exact") and not errors else 1


def server_check_main(a: argparse.Namespace) -> int:
    """The GPU-free part: generate a small file, start the servers, measure the raw ceiling, load to CPU."""
    folder = data_dir(a.data_dir, a.size_mib / 1024) / "server-check"
    path, meta = make_checkpoint(folder, a.size_mib / 1024, digest=False)
    servers = Servers(path.parent, a.servers)
    try:
        url = servers.url(path.name)
        print(f"server: {a.servers} aiohttp processes on {url}; file {meta['bytes'] / MiB:.0f} MiB", flush=True)
        common = {"url": url, "path": str(path), "bytes": meta["bytes"], "device": "cpu"}
        check = run_child("check", common, {"STREAM_ST_MAX_CONCURRENCY": str(a.threads)}, timeout=a.child_timeout)
        print(
            f"check (stream_st to CPU vs safetensors): {'bit-exact' if check.get('bit_exact') else check}", flush=True
        )
        plan = [
            ("raw", "raw", {"url": url, "size": meta["bytes"], "threads": a.threads, "part": 16 * MiB}, {}),
            ("stream_st_cpu", "cpu_stream_st", common, {"STREAM_ST_MAX_CONCURRENCY": str(a.threads)}),
        ]
        runs = run_rounds(plan, a.repeats, time.monotonic() + a.deadline_s, a.child_timeout)
    finally:
        servers.stop()
        if not a.keep:
            shutil.rmtree(folder, ignore_errors=True)
            with contextlib.suppress(OSError):
                folder.parent.rmdir()
    stats = {k: summarize(r) for k, r in runs.items()}
    lines = [
        f"# loopback server check (no GPU): {os.cpu_count()} CPUs, {a.servers} server processes, {a.threads} threads",
        "",
        *table(
            [("raw", "http.client readinto, bytes discarded"), ("stream_st_cpu", "stream_st.load_file(url) to CPU")],
            stats,
            None,
        ),
    ]
    print("\n" + "\n".join(lines), flush=True)
    write_results(out_dir(a.out), "server_check", lines, {"runs": runs, "stats": stats, "check": check})
    return 0 if check.get("bit_exact") and all(s["n"] and not s["failed"] for s in stats.values()) else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_child"]:
        out = CHILDREN[argv[1]](json.loads(argv[2]))
        print(RESULT + json.dumps(out | _memory()), flush=True)
        return 0
    if argv[:1] == ["_serve"]:
        serve(argv[1], int(argv[2]))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-gib", type=float, default=4.5, help="checkpoint size (4.5 → 4.38 GiB)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--servers", type=int, default=8, help="aiohttp server processes sharing the port")
    p.add_argument("--threads", type=int, default=16, help="raw client threads = STREAM_ST_MAX_CONCURRENCY")
    p.add_argument("--quick", action="store_true", help="skip the pool-512 and verify rows (and the sha256)")
    p.add_argument("--deadline-s", type=float, default=270, help="start no round that would end after this")
    p.add_argument("--child-timeout", type=float, default=120, help="seconds for one child process")
    p.add_argument("--data-dir", help="where the checkpoint goes (default /dev/shm/stream_st_gpu_bench)")
    p.add_argument("--keep", action="store_true", help="keep the generated checkpoint")
    p.add_argument("--out", help="results folder (default $OUT, else benchmarks/out)")
    p.add_argument("--server-check", action="store_true", help="no GPU: server + raw client + CPU load only")
    p.add_argument("--size-mib", type=float, default=512, help="file size for --server-check")
    p.add_argument("--cpu-dry-run", action="store_true", help="the GPU flow on the CPU, to test this script")
    a = p.parse_args(argv)

    def _terminate(signum: int, _frame: Any) -> None:
        raise SystemExit(f"stopped by signal {signum}")  # so that the servers are stopped and the file removed

    signal.signal(signal.SIGTERM, _terminate)
    return server_check_main(a) if a.server_check else gpu_main(a)


if __name__ == "__main__":
    sys.exit(main())
