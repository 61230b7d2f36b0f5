"""The device path: parts pass through a bounded pool of (pinned) slots and are copied to the output
tensors. Without a GPU the same slot pipeline runs on CPU memory (RemoteFile.stage_cpu_loads); the tests
marked ``cuda`` run it for real on a GPU and skip elsewhere."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import safetensors.torch
import torch

import stream_st as sst
from checkpoints import assert_same, assert_tensor_same, layered_state, tiny_state, write
from servers import RangeServer
from stream_st import gpu
from stream_st.process_cache import ProcessCache
from stream_st.remote import RemoteFile


@pytest.fixture()
def staged(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(RemoteFile, "stage_cpu_loads", True)
    monkeypatch.setattr(gpu, "_pools", ProcessCache())  # a fresh pool per test, to count its slots
    yield


def only_pool() -> gpu.PinnedPool:
    (pool,) = gpu._pools.values()
    return pool


@pytest.mark.parametrize("name", ["dtypes.safetensors", "layered.safetensors", "tiny.safetensors"])
def test_staged_loads_are_bit_exact(staged: None, http: RangeServer, root: Path, name: str) -> None:
    # 3 slots for 6 threads: threads wait for slots, slots are reused many times.
    loaded = sst.load_file(
        http.url(name), "cpu", part_size=16384, pinned_pool_bytes=3 * 16384, max_concurrency=6, header_prefetch=1024
    )
    assert_same(loaded, safetensors.torch.load_file(str(root / name)))
    pool = only_pool()
    assert 1 <= pool.allocated <= 3 and pool.idle == pool.allocated


def test_staged_slices_and_retries(staged: None, http: RangeServer, root: Path) -> None:
    http.quirks.faults, http.quirks.fault_from = 2, 4096
    expected = safetensors.torch.load_file(str(root / "layered.safetensors"))
    with sst.safe_open(http.url("layered.safetensors"), part_size=32768, header_prefetch=4096, backoff_base=0.01) as f:
        assert_tensor_same(f.get_slice("lm_head.weight")[10:900], expected["lm_head.weight"][10:900])
        assert_same(f.get_tensors(list(expected)), expected)
    assert only_pool().idle == only_pool().allocated


def test_failed_staged_load_returns_every_slot(staged: None, http: RangeServer) -> None:
    http.quirks.faults, http.quirks.fault_from = 1000, 4096
    with pytest.raises(sst.IncompleteReadError):
        sst.load_file(
            http.url("layered.safetensors"),
            "cpu",
            part_size=8192,
            pinned_pool_bytes=2 * 8192,
            header_prefetch=4096,
            retries=1,
            backoff_base=0.001,
        )
    pool = only_pool()
    assert pool.allocated >= 1 and pool.idle == pool.allocated


def test_staged_iter_tensors_with_a_cast(staged: None, http: RangeServer, root: Path) -> None:
    """Batches through the slots, cast after landing, in file order: as iter_tensors(url, "cuda", dtype=...)."""
    url = http.url("layered.safetensors")
    options = {"part_size": 16384, "pinned_pool_bytes": 2 * 16384, "max_inflight_bytes": 100_000}
    got = list(sst.iter_tensors(url, "cpu", dtype=torch.float16, **options))
    expected = safetensors.torch.load_file(str(root / "layered.safetensors"))
    assert [name for name, _ in got] == [t.name for t in sst.read_header(str(root / "layered.safetensors"))]
    for name, tensor in got:
        assert_tensor_same(tensor, expected[name].to(torch.float16), name)
    assert only_pool().idle == only_pool().allocated


def test_slot_size_caps_the_part_size(staged: None, http: RangeServer, root: Path) -> None:
    stats = sst.Stats()
    loaded = sst.load_file(http.url("layered.safetensors"), "cpu", part_size=65536, pinned_pool_bytes=1, stats=stats)
    assert_same(loaded, safetensors.torch.load_file(str(root / "layered.safetensors")))
    assert only_pool().count == 1  # at least one slot, whatever the budget says


def concurrent_loads(http: RangeServer, root: Path, device: str) -> None:
    """Three loads at once through one pool of two slots: each gets its own tensors, bit for bit."""
    names = ["dtypes.safetensors", "layered.safetensors", "tiny.safetensors"]
    options: dict[str, int] = {"part_size": 16384, "pinned_pool_bytes": 2 * 16384, "header_prefetch": 1024}
    with ThreadPoolExecutor(len(names)) as pool:
        loaded = list(pool.map(lambda name: sst.load_file(http.url(name), device, **options), names))
    for name, state in zip(names, loaded, strict=True):
        assert_same(state, safetensors.torch.load_file(str(root / name), device=device))
    slots = only_pool()
    assert 1 <= slots.allocated <= 2 and slots.idle == slots.allocated


def test_concurrent_staged_loads_share_the_pool(staged: None, http: RangeServer, root: Path) -> None:
    concurrent_loads(http, root, "cpu")


_FORK_CHILD = """
import multiprocessing, sys
import stream_st as sst
from stream_st import gpu
from stream_st.remote import RemoteFile
RemoteFile.stage_cpu_loads = True
options = {"part_size": 16384, "pinned_pool_bytes": 2 * 16384}
sst.load_file(sys.argv[1], "cpu", **options)
assert gpu._pools
def child(results):
    empty = not gpu._pools  # pinned memory does not survive fork: the child must not reuse the parent's pool
    state = sst.load_file(sys.argv[1], "cpu", **options)
    results.put((empty, len(state), len(gpu._pools)))
context = multiprocessing.get_context("fork")
results = context.Queue()
process = context.Process(target=child, args=(results,), daemon=True)
process.start()
print(results.get(timeout=60))
process.join(10)
"""


def test_a_forked_child_starts_its_own_pool(http: RangeServer, root: Path) -> None:
    # In a fresh interpreter: forking the multi-threaded test process can deadlock the child.
    ran = subprocess.run(
        [sys.executable, "-c", _FORK_CHILD, http.url("tiny.safetensors")], capture_output=True, text=True, timeout=120
    )
    assert ran.returncode == 0, ran.stderr
    expected = len(safetensors.torch.load_file(str(root / "tiny.safetensors")))
    assert ran.stdout.strip().splitlines()[-1] == f"(True, {expected}, 1)"


# --- on a GPU -------------------------------------------------------------------------------------------

cuda = pytest.mark.cuda


@cuda
@pytest.mark.parametrize("name", ["dtypes.safetensors", "layered.safetensors", "tiny.safetensors"])
def test_cuda_bit_exact_against_safetensors(http: RangeServer, root: Path, name: str) -> None:
    loaded = sst.load_file(http.url(name), "cuda", part_size=65536)
    expected = safetensors.torch.load_file(str(root / name), device="cuda")
    assert all(t.is_cuda for t in loaded.values())
    assert_same(loaded, expected)


@cuda
def test_cuda_dtype_cast_happens_on_the_gpu(http: RangeServer, root: Path) -> None:
    loaded = sst.load_file(http.url("layered.safetensors"), "cuda:0", dtype=torch.float16)
    expected = safetensors.torch.load_file(str(root / "layered.safetensors"), device="cuda:0")
    for name, tensor in expected.items():
        assert loaded[name].device == tensor.device
        assert_tensor_same(loaded[name], tensor.to(torch.float16), name)  # NaNs too: compared bit for bit


@cuda
def test_cuda_many_small_and_few_huge_tensors_reuse_slots(http: RangeServer, root: Path, tmp_path: Path) -> None:
    state = {**tiny_state(3000), "huge.a": torch.randn(3_000_000), "huge.b": torch.randn(2_000_000)}
    path = write(root / "mixed.safetensors", state)
    try:
        loaded = sst.load_file(http.url(path.name), "cuda", part_size=1 << 20, pinned_pool_bytes=4 << 20)
        assert_same(loaded, safetensors.torch.load_file(str(path), device="cuda"))
    finally:
        path.unlink()


@cuda
def test_cuda_failed_load_returns_every_slot_and_the_pool_still_works(
    http: RangeServer, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gpu, "_pools", ProcessCache())
    options: dict[str, int] = {"part_size": 8192, "pinned_pool_bytes": 2 * 8192, "header_prefetch": 4096}
    http.quirks.faults, http.quirks.fault_from = 1000, 4096
    with pytest.raises(sst.IncompleteReadError):
        sst.load_file(http.url("layered.safetensors"), "cuda", retries=1, backoff_base=0.001, **options)
    pool = only_pool()
    assert pool.allocated >= 1 and pool.idle == pool.allocated
    http.quirks.faults = 0  # the same slots, their last copies' events pending or done, serve the next load
    loaded = sst.load_file(http.url("layered.safetensors"), "cuda", **options)
    assert_same(loaded, safetensors.torch.load_file(str(root / "layered.safetensors"), device="cuda"))
    assert pool.idle == pool.allocated


@cuda
def test_cuda_concurrent_loads_share_the_pool(http: RangeServer, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu, "_pools", ProcessCache())
    concurrent_loads(http, root, "cuda")


# Run in a fresh process, and read VmHWM (the peak RSS of this process image): ru_maxrss would carry the
# test process's peak over fork and exec.
_BOUNDED_LOAD = """
import json, re, sys, torch, stream_st as sst
def peak() -> int:
    with open("/proc/self/status") as status:
        return int(re.search(r"VmHWM:\\s+(\\d+) kB", status.read()).group(1)) << 10
url, options = sys.argv[1], json.loads(sys.argv[2])
device = options.pop("device")
torch.zeros(1, device=device)  # CUDA's own host memory belongs to the baseline
before = peak()
state = sst.load_file(url, device, **options)
print(json.dumps({"grown": peak() - before, "bytes": sum(t.numel() * t.element_size() for t in state.values())}))
"""


def peak_rss_growth(url: str, options: dict[str, object]) -> tuple[int, int]:
    """(peak host RSS growth, bytes loaded) of one load_file in a fresh process."""
    ran = subprocess.run(
        [sys.executable, "-c", _BOUNDED_LOAD, url, json.dumps(options)], capture_output=True, text=True, timeout=120
    )
    assert ran.returncode == 0, ran.stderr
    measured = json.loads(ran.stdout.splitlines()[-1])
    return measured["grown"], measured["bytes"]


@pytest.fixture()
def big_checkpoint(root: Path) -> Iterator[Path]:
    path = write(root / "bounded.safetensors", layered_state(layers=16, width=1024))  # ~100 MB of bf16
    yield path
    path.unlink()


def test_the_rss_probe_sees_a_host_load(http: RangeServer, big_checkpoint: Path) -> None:
    """The control for the bound below: a CPU load's peak growth is the checkpoint, and the probe sees it."""
    grown, loaded = peak_rss_growth(http.url(big_checkpoint.name), {"device": "cpu", "part_size": 1 << 20})
    assert loaded > big_checkpoint.stat().st_size - 100_000
    assert grown > 0.9 * loaded


@cuda
@pytest.mark.parametrize("verify", [False, True], ids=["plain", "verify"])
def test_cuda_host_memory_stays_bounded_by_the_pool(http: RangeServer, big_checkpoint: Path, verify: bool) -> None:
    """A checkpoint 8× the pinned pool: peak host RSS grows by about the pool, not the checkpoint, also
    when every byte is hashed (read back from the GPU in small chunks)."""
    size = big_checkpoint.stat().st_size
    options: dict[str, object] = {"device": "cuda", "part_size": 1 << 20, "pinned_pool_bytes": 12 << 20}
    if verify:
        options["verify"] = "sha256:" + hashlib.sha256(big_checkpoint.read_bytes()).hexdigest()
    grown, loaded = peak_rss_growth(http.url(big_checkpoint.name), options)
    assert size > 8 * (12 << 20) and loaded > size - 100_000
    assert grown < size / 2, f"host RSS grew {grown} bytes for a {size}-byte checkpoint"


@cuda
def test_cuda_verify_checks_the_bytes_on_the_gpu(http: RangeServer, root: Path) -> None:
    url = http.url("layered.safetensors")
    digest = "sha256:" + hashlib.sha256((root / "layered.safetensors").read_bytes()).hexdigest()
    loaded = sst.load_file(url, "cuda", verify=digest, part_size=65536, header_prefetch=4096)
    assert_same(loaded, safetensors.torch.load_file(str(root / "layered.safetensors"), device="cuda"))
    with pytest.raises(sst.IntegrityError, match="sha256 of the streamed bytes is"):
        sst.load_file(url, "cuda", verify="sha256:" + "0" * 64, part_size=65536)


def test_filling_the_pool_while_a_load_takes_slots() -> None:
    import threading

    pool = gpu.PinnedPool(1024, 4, pinned=False)
    taken = pool.acquire(threading.Event())  # a load took one slot before the fill got to it
    pool.fill()
    assert (pool.allocated, pool.idle) == (4, 3)
    pool.release(taken)
    pool.fill()  # nothing left to allocate
    assert (pool.allocated, pool.idle) == (4, 4)


@cuda
def test_cuda_load_pins_the_whole_pool_while_it_reads_the_header(
    http: RangeServer, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gpu, "_pools", ProcessCache())
    options: dict[str, int] = {"part_size": 8192, "pinned_pool_bytes": 64 * 8192}
    loaded = sst.load_file(http.url("small.safetensors"), "cuda", **options)  # one part: one slot needed
    assert_same(loaded, safetensors.torch.load_file(str(root / "small.safetensors"), device="cuda"))
    pool = only_pool()
    deadline = time.monotonic() + 10
    while pool.allocated < pool.count and time.monotonic() < deadline:  # the fill may still be running
        time.sleep(0.01)
    assert pool.allocated == pool.count == 64
