"""prefetch(): bytes streamed before a load asks for them, taken by the load without a second download."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import safetensors.torch
import torch

import stream_st as sst
from checkpoints import assert_same, layered_state, write
from servers import Nginx, RangeServer
from stream_st.header import LENGTH_PREFIX

ROOT = Path(__file__).resolve().parents[2]


def served_bytes(http: RangeServer, name: str) -> int:
    return sum(request.sent for request in http.gets(name))


def data_start(path: Path) -> int:
    return LENGTH_PREFIX + int.from_bytes(path.read_bytes()[:LENGTH_PREFIX], "little")


def _load_file(url: str) -> dict[str, torch.Tensor]:
    return sst.load_file(url)


def _iter_tensors(url: str) -> dict[str, torch.Tensor]:
    return dict(sst.iter_tensors(url, max_inflight_bytes=64 << 10))


def _safe_open(url: str) -> dict[str, torch.Tensor]:
    with sst.safe_open(url, framework="pt") as handle:
        names = handle.keys()
        return {name: handle.get_tensor(name) for name in names}


CONSUMERS: dict[str, Callable[[str], dict[str, torch.Tensor]]] = {
    "load_file": _load_file,
    "iter_tensors": _iter_tensors,
    "safe_open": _safe_open,
}


@pytest.mark.parametrize("consumer", sorted(CONSUMERS))
@pytest.mark.parametrize("name", ["dtypes.safetensors", "tiny.safetensors", "layered.safetensors"])
def test_prefetch_then_load_is_bit_exact_and_each_data_byte_is_served_once(
    http: RangeServer, root: Path, name: str, consumer: str
) -> None:
    url = http.url(name)
    with sst.prefetch(url) as early:
        early.wait(30)
        got = CONSUMERS[consumer](url)
    expected = safetensors.torch.load_file(str(root / name))
    assert_same(got, expected)
    if consumer != "safe_open":  # whose keys() are sorted, as safetensors' are
        assert list(got) == list(expected)
    # The prefetch read the whole object once; the load only re-read the header to check the version.
    path = root / name
    assert served_bytes(http, name) == path.stat().st_size + data_start(path)


def test_load_model_on_a_meta_skeleton_takes_the_prefetch(http: RangeServer, root: Path) -> None:
    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.x = torch.nn.Parameter(torch.empty(6))

    url = http.url("small.safetensors")
    with torch.device("meta"):
        model = Tiny()
    with sst.prefetch(url) as early:
        early.wait(30)
        missing, unexpected = sst.load_model(model, url, assign=True)
    assert (missing, unexpected) == ([], [])
    assert torch.equal(model.x.detach(), torch.arange(6, dtype=torch.float32))
    path = root / "small.safetensors"
    assert served_bytes(http, "small.safetensors") == path.stat().st_size + data_start(path)


def test_load_started_while_the_prefetch_runs_waits_for_it_instead_of_downloading(
    http: RangeServer, root: Path
) -> None:
    http.quirks.faults, http.quirks.fault_kind, http.quirks.stall_seconds = 1, "stall", 0.5  # a slow first part
    http.quirks.fault_from = 1 << 20
    name = "layered.safetensors"
    url = http.url(name)
    with sst.prefetch(url, part_size=1 << 20, backoff_base=0.01, stall_timeout=5):
        got = sst.load_file(url)  # not waited for: the load takes parts as they land
    assert_same(got, safetensors.torch.load_file(str(root / name)))
    requested = [r for r in http.gets(name) if r.status == 206]
    stalled_retry = 1  # the stalled part's resumption
    assert len(requested) <= len({r.range for r in requested}) + stalled_retry


def test_sharded_checkpoint_and_partial_prefetch_then_full_load(http: RangeServer, root: Path) -> None:
    url = http.url("sharded/model.safetensors.index.json")
    reference = {}
    for shard in sorted((root / "sharded").glob("*.safetensors")):
        reference.update(safetensors.torch.load_file(str(shard)))
    with sst.prefetch(url, tensors="model.layers.1.*") as early:
        early.wait(30)
        before = len(http.gets())
        got = sst.load_file(url)
    assert_same(got, reference)
    # What the prefetch held was not requested again: no data range of the load covers a prefetched tensor.
    header = {
        shard.name: sst.read_header(http.url(f"sharded/{shard.name}"))
        for shard in (root / "sharded").glob("*.safetensors")
    }
    prefetched = [
        (f"/sharded/{shard}", info.start, info.end)
        for shard, head in header.items()
        for info in head
        if info.name.startswith("model.layers.1.")
    ]
    for request in http.gets()[before:]:
        if not request.range or request.path.endswith(".json"):
            continue
        first, last = (int(x) for x in request.range.removeprefix("bytes=").split("-"))
        for path, start, end in prefetched:
            assert request.path != path or last < start or first >= end or first < data_start(root / path[1:])


def test_two_prefetches_do_not_interfere(http: RangeServer, root: Path) -> None:
    a, b = "dtypes.safetensors", "layered.safetensors"
    with sst.prefetch(http.url(a)) as first, sst.prefetch(http.url(b)) as second:
        first.wait(30)
        second.wait(30)
        got_b = sst.load_file(http.url(b))
        got_a = sst.load_file(http.url(a))
    assert_same(got_a, safetensors.torch.load_file(str(root / a)))
    assert_same(got_b, safetensors.torch.load_file(str(root / b)))
    for name in (a, b):
        assert served_bytes(http, name) == (root / name).stat().st_size + data_start(root / name)


def test_other_storage_options_do_not_take_the_prefetch(http: RangeServer, root: Path) -> None:
    name = "small.safetensors"
    url = http.url(name)
    with sst.prefetch(url, storage_options={"headers": {"X-Tenant": "a"}}) as early:
        early.wait(30)
        sst.load_file(url, storage_options={"headers": {"X-Tenant": "b"}})
    # Two full reads: another tenant's prefetch is not this load's.
    assert served_bytes(http, name) == 2 * (root / name).stat().st_size


def test_object_changed_between_prefetch_and_load_raises(http: RangeServer, root: Path) -> None:
    path = write(root / "changing.safetensors", layered_state(layers=2))
    url = http.url(path.name)
    try:
        with sst.prefetch(url) as early:
            early.wait(30)
            time.sleep(0.01)
            write(path, layered_state(layers=2, width=128))  # another object (and another ETag)
            with pytest.raises(sst.ObjectChangedError, match="changed between the prefetch and this load"):
                sst.load_file(url)
    finally:
        path.unlink()


def test_a_prefetch_failure_surfaces_at_the_load_not_at_prefetch(http: RangeServer) -> None:
    http.quirks.faults, http.quirks.fault_kind, http.quirks.fault_from = 100, "reset", 1 << 16
    url = http.url("layered.safetensors")
    early = sst.prefetch(url, header_prefetch=1 << 16, retries=1, backoff_base=0.01)  # does not raise
    with contextlib.suppress(sst.FetchError):
        early.wait(30)
    http.quirks.faults = 0  # the server is healthy again, but the prefetch's failure is what the load gets
    try:
        with pytest.raises(sst.FetchError, match="failed after 2 attempts"):
            sst.load_file(url)
    finally:
        early.cancel()
    missing = sst.prefetch(http.url("no-such.safetensors"))  # does not raise either
    with pytest.raises(FileNotFoundError, match="no-such.safetensors"):
        sst.load_file(http.url("no-such.safetensors"))
    missing.cancel()


def test_larger_than_prefetch_max_bytes_pauses_then_resumes(http: RangeServer, root: Path) -> None:
    name = "layered.safetensors"
    path = root / name
    budget = 256 << 10
    url = http.url(name)
    with sst.prefetch(url, prefetch_max_bytes=budget, part_size=64 << 10) as early:
        deadline = time.monotonic() + 10
        previous = -1
        while time.monotonic() < deadline:  # until the transfer stops growing: paused at the bound
            time.sleep(0.3)
            if early.stats.bytes == previous:
                break
            previous = early.stats.bytes
        assert not early.done()
        assert early.stats.bytes <= budget + sst.Config().header_prefetch
        got = dict(sst.iter_tensors(url, max_inflight_bytes=128 << 10))
        early.wait(30)
    assert_same(got, safetensors.torch.load_file(str(path)))
    assert served_bytes(http, name) == path.stat().st_size + data_start(path)


def _stream_st_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("stream_st_")]


def _sockets() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
    return count


def test_cancel_leaves_no_thread_or_socket(http: RangeServer) -> None:
    sockets = _sockets()
    http.quirks.faults, http.quirks.fault_kind, http.quirks.stall_seconds = 100, "stall", 6.0
    http.quirks.fault_from = 1 << 16
    early = sst.prefetch(http.url("layered.safetensors"), header_prefetch=1 << 16, part_size=1 << 16)
    deadline = time.monotonic() + 10
    while not _stream_st_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # the parts are now stuck on the silent server
    early.cancel()
    assert early.done()
    deadline = time.monotonic() + 5
    while (_stream_st_threads() or _sockets() > sockets) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _stream_st_threads() == []
    assert _sockets() <= sockets


def _run_python(code: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=timeout
    )


def test_unconsumed_prefetch_does_not_hold_up_interpreter_exit(http: RangeServer) -> None:
    # Every data part stalls for 6 s: an exit that waited for the downloads would take at least that long.
    http.quirks.faults, http.quirks.fault_kind, http.quirks.stall_seconds = 100, "stall", 6.0
    http.quirks.fault_from = 1 << 16
    url = http.url("layered.safetensors")
    done = _run_python(
        f"""
        import time, stream_st
        stream_st.prefetch({url!r}, header_prefetch=1 << 16, part_size=1 << 16)
        time.sleep(1.0)  # the parts are stuck on the silent server by now
        print(time.monotonic(), flush=True)
        """
    )
    assert done.returncode == 0, done.stderr
    assert len([r for r in http.gets() if r.status == 206]) >= 2  # it was downloading when asked to exit
    assert time.monotonic() - float(done.stdout.split()[-1]) < 3.0


def test_import_stream_st_imports_no_torch_and_no_backend() -> None:
    done = _run_python(
        """
        import sys, stream_st
        heavy = {"torch", "fsspec", "s3fs", "gcsfs", "huggingface_hub", "botocore", "aiohttp", "numpy"}
        print(sorted(heavy & set(sys.modules)))
        stream_st.Config(); stream_st.StreamSTError
        print(sorted(heavy & set(sys.modules)))
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["[]", "[]"]


@pytest.mark.parametrize("early", [True, False])
def test_load_file_before_torch_starts_the_transfer_before_importing_torch(
    http: RangeServer, root: Path, early: bool
) -> None:
    name = "layered.safetensors"
    done = _run_python(
        f"""
        import sys, stream_st, stream_st.held as held

        class Watch:  # notes, when torch starts importing, whether a prefetch was already under way
            def find_spec(self, fullname, path=None, target=None):
                if fullname == "torch" and not hasattr(self, "seen"):
                    self.seen = bool(held._files or held._resolving)
                return None

        watch = Watch()
        sys.meta_path.insert(0, watch)
        state = stream_st.load_file({http.url(name)!r}, early_start={early!r})  # whatever this machine's CPUs
        import safetensors.torch, torch
        expected = safetensors.torch.load_file({str(root / name)!r})
        same = list(state) == list(expected) and all(
            torch.equal(state[k].view(torch.uint8), expected[k].view(torch.uint8)) for k in expected
        )
        print(watch.seen, same)
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(early), "True"]
    path = root / name
    served = path.stat().st_size + (data_start(path) if early else 0)  # a prefetch's load re-reads the header
    assert served_bytes(http, name) == served


@pytest.mark.cuda
def test_cuda_prefetch_then_load_to_gpu_is_bit_exact(http: RangeServer, root: Path) -> None:
    name = "dtypes.safetensors"
    with sst.prefetch(http.url(name)) as early:
        early.wait(30)
        got = sst.load_file(http.url(name), device="cuda")
    assert all(t.device.type == "cuda" for t in got.values())
    assert_same({k: v.cpu() for k, v in got.items()}, safetensors.torch.load_file(str(root / name)))


@pytest.fixture(autouse=True)
def _no_prefetch_left() -> Iterator[None]:
    yield
    from stream_st import held

    assert not held._files, "a test left a prefetch registered"


def _rss_mib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


def test_cancel_frees_what_no_load_took(nginx: Nginx, root: Path) -> None:
    import gc

    # Served by nginx, another process: only the prefetch's own memory shows in this process's RSS.
    path = write(root / "big-prefetch.safetensors", layered_state(layers=8, width=1024))  # ~54 MiB
    try:
        before = _rss_mib()
        early = sst.prefetch(nginx.url(path.name))
        early.wait(60)
        held_mib = _rss_mib() - before
        assert held_mib > 40  # the bytes are in this process's memory
        early.cancel()  # the handle stays referenced, as after a ``with`` block: its memory must not
        gc.collect()
        assert _rss_mib() - before < held_mib / 4
        assert early.done()
    finally:
        path.unlink()
