"""The local cache (cache_dir=): bit-exact loads, server byte counts, versions, crashes, concurrent processes,
offline mode, the LRU cap, huggingface_hub's cache, and the CLI, against the real servers of conftest.py."""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

import stream_st as sst
from checkpoints import assert_same, layered_state, mapping_of, write
from servers import RangeServer
from stream_st import cache, gpu
from stream_st.errors import NotCachedError
from stream_st.process_cache import ProcessCache
from stream_st.remote import RemoteFile

NAME = "layered.safetensors"
SMALL_PROBE = 8  # what a load with a cache entry asks the network for: size, version, header length


def reference(root: Path, name: str = NAME) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(root / name))


def sent(server: RangeServer) -> int:
    return sum(r.sent for r in server.gets())


def ranges(server: RangeServer) -> list[tuple[int, int]]:
    out = []
    for r in server.gets():
        assert r.range is not None
        a, b = r.range.removeprefix("bytes=").split("-")
        out.append((int(a), int(b) + 1))
    return out


def load(url: str, cache_dir: Path, **options: Any) -> dict[str, torch.Tensor]:
    return sst.load_file(url, cache_dir=str(cache_dir), part_size=65536, progress=False, **options)


@pytest.fixture(params=["direct", "buffered"])
def writes(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways the cache writes: whole blocks with O_DIRECT (where the file system has it), or buffered."""
    monkeypatch.setattr(cache, "_DIRECT", request.param == "direct")
    return str(request.param)


@pytest.fixture()
def own(tmp_path: Path) -> Any:
    """A range server of its own over a folder this test may rewrite."""
    folder = tmp_path / "served"
    folder.mkdir()
    write(folder / NAME, layered_state())
    server = RangeServer(folder)
    yield server
    server.stop()


def test_second_load_transfers_no_weight_bytes(http: RangeServer, root: Path, tmp_path: Path, writes: str) -> None:
    url = http.url(NAME)
    assert_same(load(url, tmp_path), reference(root))
    assert sent(http) == (root / NAME).stat().st_size
    http.reset()
    assert_same(load(url, tmp_path), reference(root))
    assert ranges(http) == [(0, SMALL_PROBE)]  # the version check; header and tensors came from the cache
    (entry,) = cache.Store(tmp_path).entries()
    assert entry.cached == entry.size == (root / NAME).stat().st_size


def data_file(cache_dir: Path) -> str:
    (entry,) = cache.Store(cache_dir).entries()
    return str(cache_dir / "entries" / entry.key / "data")


def counting_preadv(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = os.preadv

    def counting(fd: int, buffers: list[memoryview], offset: int) -> int:
        calls.append(sum(len(b) for b in buffers))
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", counting)
    return calls


def test_a_cached_load_maps_the_cache_file_and_reads_nothing(
    http: RangeServer, root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    load(http.url(NAME), tmp_path)
    calls = counting_preadv(monkeypatch)
    got = load(http.url(NAME), tmp_path)
    assert_same(got, reference(root))
    assert calls == []  # no byte copied: the tensors are the cache file's pages, as safetensors' are its file's
    assert {mapping_of(t) for t in got.values() if t.numel()} == {data_file(tmp_path)}


def test_a_cached_load_without_maps_reads_with_preadv(
    http: RangeServer, root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    load(http.url(NAME), tmp_path)
    calls = counting_preadv(monkeypatch)
    for how in ({"memory_map": "never"}, {"backend": "pread"}):
        calls.clear()
        got = load(http.url(NAME), tmp_path, **how)
        assert_same(got, reference(root))
        prefix = 256 * 1024  # header_prefetch: the first bytes come with the header, as from the network
        assert sum(calls) == (root / NAME).stat().st_size - prefix  # every other byte straight into its tensor
        assert {mapping_of(t) for t in got.values() if t.numel()} == {None}


def test_a_refused_map_reads_the_bytes_instead(
    http: RangeServer, root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stream_st import mapping

    load(http.url(NAME), tmp_path)
    calls: list[int] = []

    def refusing(*args: Any) -> int | None:
        calls.append(1)
        ctypes.set_errno(errno.ENODEV)  # as a file system without mmap answers
        return mapping._MAP_FAILED

    monkeypatch.setattr(mapping._libc, "mmap", refusing)
    for got in (load(http.url(NAME), tmp_path), sst.load_file(root / NAME, backend="mmap")):
        assert_same(got, reference(root))
        assert {mapping_of(t) for t in got.values() if t.numel()} == {None}
    assert len(calls) == 2  # once per file, not once per tensor


def test_writes_to_mapped_tensors_stay_in_the_process(http: RangeServer, root: Path, tmp_path: Path) -> None:
    load(http.url(NAME), tmp_path)
    got = load(http.url(NAME), tmp_path)
    for tensor in got.values():
        tensor.view(torch.uint8).fill_(0xAB) if tensor.numel() else None
    assert_same(load(http.url(NAME), tmp_path), reference(root))  # the cache file was not written through
    http.reset()
    assert_same(load(http.url(NAME), tmp_path, memory_map="never"), reference(root))
    assert ranges(http) == [(0, SMALL_PROBE)]


def test_mapped_tensors_outlive_their_entry(http: RangeServer, root: Path, tmp_path: Path) -> None:
    load(http.url(NAME), tmp_path)
    got = load(http.url(NAME), tmp_path)
    (entry,) = cache.Store(tmp_path).entries()
    assert cache.Store(tmp_path).remove([entry.key]) == 1  # stream-st cache rm, or eviction: files unlinked
    assert_same(got, reference(root))
    http.reset()
    assert_same(load(http.url(NAME), tmp_path), reference(root))
    assert sent(http) == (root / NAME).stat().st_size  # a new entry, fetched again


def test_a_partly_cached_load_maps_what_is_cached_and_fetches_the_rest(
    http: RangeServer, root: Path, tmp_path: Path
) -> None:
    url = http.url(NAME)
    load(url, tmp_path, tensors="model.layers.1.*", max_gap=0, header_prefetch=8)
    got = load(url, tmp_path)
    assert_same(got, reference(root))
    where = {name: mapping_of(t) for name, t in got.items() if t.numel()}
    assert {name for name, path in where.items() if path} == {n for n in where if n.startswith("model.layers.1.")}


def test_partial_then_full_fetches_only_the_rest(http: RangeServer, root: Path, tmp_path: Path, writes: str) -> None:
    url = http.url(NAME)
    expected = reference(root)
    first = load(url, tmp_path, tensors="model.layers.1.*", max_gap=0)
    assert_same(first, {k: v for k, v in expected.items() if k.startswith("model.layers.1.")})
    before = ranges(http)
    http.reset()
    assert_same(load(url, tmp_path), expected)
    after = ranges(http)[1:]  # past the version probe
    assert ranges(http)[0] == (0, SMALL_PROBE)
    overlap = sum(max(0, min(b, d) - max(a, c)) for a, b in before for c, d in after)
    assert overlap == 0 and after  # only the rest came over the network
    assert sum(b - a for a, b in before + after) == (root / NAME).stat().st_size


def test_a_changed_etag_refetches(own: RangeServer, tmp_path: Path) -> None:
    url = own.url(NAME)
    load(url, tmp_path)
    changed = {name: tensor + 1 for name, tensor in layered_state().items()}
    write(own.root / NAME, changed)  # same names, shapes and size; new bytes and ETag
    own.reset()
    assert_same(load(url, tmp_path), reference(own.root))
    assert sent(own) >= (own.root / NAME).stat().st_size  # every byte again, none served from the old entry
    own.reset()
    assert_same(load(url, tmp_path, offline=True), reference(own.root))  # the entry now holds the new version
    assert own.gets() == []


def test_a_retried_probe_still_writes_the_cache(http: RangeServer, root: Path, tmp_path: Path) -> None:
    http.quirks.status_once = [503]  # the first probe fails and is retried
    assert_same(load(http.url(NAME), tmp_path, backoff_base=0.01), reference(root))
    http.reset()
    assert_same(load(http.url(NAME), tmp_path), reference(root))
    assert ranges(http) == [(0, SMALL_PROBE)]


def test_no_etag_means_no_caching(http: RangeServer, root: Path, tmp_path: Path) -> None:
    http.quirks.no_etag = True
    load(http.url(NAME), tmp_path)
    http.reset()
    http.quirks.no_etag = True
    assert_same(load(http.url(NAME), tmp_path), reference(root))
    assert sent(http) == (root / NAME).stat().st_size  # nothing could tell a changed object: not cached
    assert cache.Store(tmp_path).entries() == []


def test_the_slot_path_writes_through_before_slots_are_reused(
    http: RangeServer, root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writes: str
) -> None:
    """The GPU path's pinned-slot pipeline, run on CPU memory: two slots, many parts, each slot reused often."""
    monkeypatch.setattr(RemoteFile, "stage_cpu_loads", True)
    monkeypatch.setattr(gpu, "_pools", ProcessCache())
    options = {"pinned_pool_bytes": 2 * 65536, "max_concurrency": 4}
    assert_same(load(http.url(NAME), tmp_path, device="cpu", **options), reference(root))
    http.reset()
    assert_same(load(http.url(NAME), tmp_path, device="cpu", **options), reference(root))
    assert ranges(http) == [(0, SMALL_PROBE)]


@pytest.mark.parametrize("name", ["tiny.safetensors", NAME])  # tiny: a header longer than the first GET
def test_a_prefetch_writes_through_too(http: RangeServer, root: Path, tmp_path: Path, name: str) -> None:
    url = http.url(name)
    with sst.prefetch(url, cache_dir=str(tmp_path), part_size=65536) as early:
        early.wait(30)
        assert_same(load(url, tmp_path), reference(root, name))  # takes the prefetched bytes
    assert sent(http) <= (root / name).stat().st_size + SMALL_PROBE  # each byte once, and the version probe
    http.reset()
    assert_same(load(url, tmp_path), reference(root, name))
    assert ranges(http) == [(0, SMALL_PROBE)]


def test_offline_hit_and_miss(http: RangeServer, root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = http.url(NAME)
    load(url, tmp_path, tensors="model.layers.0.*")
    http.reset()
    monkeypatch.setenv("STREAM_ST_OFFLINE", "1")
    partial = load(url, tmp_path, tensors="model.layers.0.*")
    assert_same(partial, {k: v for k, v in reference(root).items() if k.startswith("model.layers.0.")})
    with pytest.raises(NotCachedError, match=r"offline.*tensor\(s\) 'model\.layers\.1\.") as missing_tensor:
        load(url, tmp_path, tensors="model.layers.1.*")
    assert isinstance(missing_tensor.value, FileNotFoundError)
    with pytest.raises(NotCachedError, match="dtypes.safetensors: offline") as missing_file:
        load(http.url("dtypes.safetensors") + "?token=hush", tmp_path)
    assert "hush" not in str(missing_file.value)
    assert http.gets() == []  # offline: not one request


def test_no_secret_reaches_the_disk(http: RangeServer, tmp_path: Path) -> None:
    load(http.url(NAME) + "?signature=s3cr3t", tmp_path)
    http.reset()
    load(http.url(NAME) + "?signature=other", tmp_path)  # the same object: the same entry
    assert ranges(http) == [(0, SMALL_PROBE)]
    for path in tmp_path.rglob("*"):
        if path.is_file() and path.name != "data":
            assert b"s3cr3t" not in path.read_bytes()


def test_lru_cap_evicts_the_least_recently_used(own: RangeServer, tmp_path: Path) -> None:
    folder = own.root
    size = (folder / NAME).stat().st_size
    cap = int(size * 1.5)
    for name in ("a", "b"):
        os.link(folder / NAME, folder / f"{name}.safetensors")
    store = cache.Store(tmp_path / "c")
    load(own.url("a.safetensors"), store.root, cache_max_bytes=cap)
    load(own.url("b.safetensors"), store.root, cache_max_bytes=cap)  # a is evicted to make room
    assert [Path(e.url).name for e in store.entries()] == ["b.safetensors"]
    load(own.url("a.safetensors"), store.root, cache_max_bytes=cap)
    assert [Path(e.url).name for e in store.entries()] == ["a.safetensors"]
    assert sum(e.disk for e in store.entries()) <= cap
    own.reset()
    assert_same(load(own.url("a.safetensors"), store.root, cache_max_bytes=cap), reference(folder))
    assert ranges(own) == [(0, SMALL_PROBE)]


def test_options_come_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("STREAM_ST_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("STREAM_ST_CACHE_MAX_BYTES", "1000")
    monkeypatch.setenv("STREAM_ST_OFFLINE", "1")
    config = sst.Config.from_env()
    assert (config.cache_dir, config.cache_max_bytes, config.offline) == (str(tmp_path), 1000, True)
    assert sst.Config(cache_dir=tmp_path).cache_dir == str(tmp_path)  # type: ignore[arg-type]
    assert cache.cache_root("default").name == "stream_st"
    with pytest.raises(sst.ConfigError):
        sst.Config(cache_max_bytes=0)


@pytest.mark.parametrize("memory", ["unaligned", "aligned like the file", "aligned, not an output"])
@pytest.mark.parametrize("direct", [True, False])
def test_unaligned_writes_land_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct: bool, memory: str
) -> None:
    monkeypatch.setattr(cache, "_DIRECT", direct)
    size = 5 * 4096 + 123
    data = os.urandom(size)
    entry = cache.Store(tmp_path).open("k", "https://h/x", "v1", size, None)
    assert entry is not None and entry.writing
    monkeypatch.setattr(cache, "_WRITE_NOW_BELOW", 0)  # even these small writes take the O_DIRECT path
    monkeypatch.setattr(cache, "_BOUNCE", 2 * 4096)  # several windows per write
    monkeypatch.setattr(cache, "_threads", ProcessCache())  # a writer with those small buffers
    copied = copies(monkeypatch)
    source = memoryview(data)  # read-only bytes: copied into the aligned buffers
    if memory != "unaligned":
        source = memoryview(mmap.mmap(-1, size))  # page-aligned: offset n of the file sits at address ≡ n
        source[:] = data
    cuts = [0, 1, 4095, 4097, 3 * 4096, 3 * 4096 + 5, 5 * 4096 + 1, size]
    outputs = cache._OutputMemory()
    # only a load's own outputs are written from (a pinned slot is reused as soon as its part is read)
    held = [(cache._address(source), cache._address(source) + size)] if memory == "aligned like the file" else []
    outputs.hold(held)
    for a, b in zip(cuts, cuts[1:]):
        entry.record(cache._background()[0].write(entry, a, source[a:b], outputs))
    outputs.release(held)
    entry.settle()
    assert (sum(copied) == 0) == (memory == "aligned like the file" or not direct)
    assert entry.segments(0, size) == [(0, size, True)]
    assert (entry.direct is not None) == direct
    with open(tmp_path / "entries" / "k" / "data", "rb") as f:
        assert f.read(size) == data
    entry.close()


def copies(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Bytes the cache writer copies into its aligned buffers."""
    copied: list[int] = []
    real = cache._copy

    def counting(target: memoryview, source: memoryview) -> None:
        copied.append(len(source))
        real(target, source)

    monkeypatch.setattr(cache, "_copy", counting)
    return copied


def test_a_load_writing_the_cache_writes_large_tensors_from_their_own_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "served"
    folder.mkdir()
    state = {"a.odd": torch.arange(7, dtype=torch.uint8)}  # shifts every later tensor off block boundaries
    state |= {f"big.{i}": torch.randn(1 + i, 700_001, dtype=torch.float32) for i in range(3)}
    state["z.small"] = torch.randn(5, dtype=torch.bfloat16)
    write(folder / NAME, state)
    data_start, header = safetensors_header(folder / NAME)
    assert all((data_start + header[f"big.{i}"]["data_offsets"][0]) % 4096 for i in range(3))
    probe = os.open(folder / NAME, os.O_RDONLY | getattr(os, "O_DIRECT", 0))  # tmpfs refuses O_DIRECT
    os.close(probe)
    server = RangeServer(folder)
    try:
        copied = copies(monkeypatch)
        got = sst.load_file(server.url(NAME), cache_dir=str(tmp_path / "c"), progress=False)
        assert_same(got, state)
        assert sum(copied) < 3 * 4096  # every whole block of the big tensors went to disk from their own memory
        monkeypatch.setattr(sst.sinks, "ALIGN_FROM", 1 << 40)  # outputs placed anywhere: the blocks are copied
        got = sst.load_file(server.url(NAME), cache_dir=str(tmp_path / "d"), progress=False)
        assert_same(got, state)
        assert sum(copied) > 6 * 700_000
        server.reset()
        again = sst.load_file(server.url(NAME), cache_dir=str(tmp_path / "c"), progress=False)
        assert_same(again, state)  # from the cache file, mapped
        assert ranges(server) == [(0, SMALL_PROBE)]
    finally:
        server.stop()


def safetensors_header(path: Path) -> tuple[int, dict[str, Any]]:
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    return 8 + length, json.loads(raw[8 : 8 + length])


def test_one_load_at_a_time_writes_an_entry(tmp_path: Path) -> None:
    store = cache.Store(tmp_path)
    first = store.open("k", "https://h/x", "v1", 100, None)
    second = store.open("k", "https://h/x", "v1", 100, None)
    assert first is not None and second is not None
    assert first.writing and not second.writing  # the second only reads; its bytes are the first's to write
    first.close()
    third = store.open("k", "https://h/x", "v1", 100, None)
    assert third is not None and third.writing
    second.close()
    third.close()


def test_records_of_an_earlier_boot_count_only_once_synced() -> None:
    size = 1000
    text = f"R 0 100 {cache._BOOT}\nR 100 200 oldboot\nR 200 300 otherboot\nS otherboot 999\nR 300 400 bad\nR 400"
    have, unsynced = cache._parse_map(text, size)
    assert have == [(0, 100), (200, 300)] and unsynced  # oldboot: never synced; the torn last line ignored
    assert cache._parse_map("R 0 100 x\nS x 0\n", size)[0] == []  # the sync began before that record
    assert cache._parse_map("R 0 2000 " + cache._BOOT + "\n", size)[0] == []  # past the end of the object


_CHILD = """
import hashlib, json, sys
import stream_st as sst
state = sst.load_file(sys.argv[1], cache_dir=sys.argv[2], part_size=65536, max_concurrency=int(sys.argv[3]),
                      progress=False)
print(json.dumps({k: hashlib.sha256(v.contiguous().view(-1).view(torch.uint8).numpy()).hexdigest()
                  for k, v in state.items()}))
"""


def digests(state: dict[str, torch.Tensor]) -> dict[str, str]:
    import hashlib

    return {k: hashlib.sha256(v.contiguous().view(-1).view(torch.uint8).numpy()).hexdigest() for k, v in state.items()}


def child(url: str, cache_dir: Path, concurrency: int = 4) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", "import torch\n" + _CHILD, url, str(cache_dir), str(concurrency)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )


def test_two_processes_loading_at_once_both_get_correct_tensors(http: RangeServer, root: Path, tmp_path: Path) -> None:
    url = http.url(NAME)
    first, second = child(url, tmp_path), child(url, tmp_path)
    for process in (first, second):
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
        assert json.loads(out.splitlines()[-1]) == digests(reference(root))
    http.reset()
    assert_same(load(url, tmp_path), reference(root))
    assert ranges(http) == [(0, SMALL_PROBE)]


@pytest.mark.parametrize("memory", ["aligned buffers", "the tensors' own"])
def test_a_process_that_exits_right_after_its_load_leaves_a_complete_entry(
    own: RangeServer, tmp_path: Path, memory: str
) -> None:
    write(own.root / "big.safetensors", {"w": torch.arange(3 << 20, dtype=torch.float32)})  # 12 MiB: O_DIRECT path
    bounce = memory == "aligned buffers"
    code = (
        "import os, sys, threading, time, torch, stream_st as sst\n"
        "from stream_st import cache, sinks\n"
        + ("sinks.ALIGN_FROM = 1 << 40  # outputs anywhere: blocks go through the aligned buffers\n" if bounce else "")
        + "pwrite = os.pwrite\n"
        "def slow(fd, data, at):  # the disk is slow: writes are still queued when the load returns\n"
        "    if threading.current_thread().name.startswith('stream_st-cache'):\n"
        "        time.sleep(2)\n"
        "    return pwrite(fd, data, at)\n"
        "os.pwrite = slow\n"
        "sst.load_file(sys.argv[1], cache_dir=sys.argv[2], progress=False)\n"
        # from aligned buffers, writes are still queued when the load returns; from the tensors' own memory, the
        # load waits for them (the caller may change its tensors at once)
         + f"assert bool(cache._background()[0]._queued) == {bounce}\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    ran = subprocess.run([sys.executable, "-c", code, own.url("big.safetensors"), str(tmp_path)], env=env, timeout=120)
    assert ran.returncode == 0
    (entry,) = cache.Store(tmp_path).entries()
    assert entry.cached == entry.size  # the writes still queued at exit were waited for


def test_kill_9_while_writing_leaves_a_cache_the_next_load_can_trust(
    http: RangeServer, root: Path, tmp_path: Path
) -> None:
    size = (root / NAME).stat().st_size
    http.quirks.faults, http.quirks.fault_kind, http.quirks.stall_seconds = 1, "stall", 5
    http.quirks.fault_from = size // 2  # the load hangs halfway, with its first half written
    process = child(http.url(NAME), tmp_path, concurrency=1)
    try:
        deadline = time.monotonic() + 60
        while not any(r.range and int(r.range[6:].split("-")[0]) >= size // 2 for r in http.gets()):
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.05)
        time.sleep(0.2)
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.communicate(timeout=30)
    (entry,) = cache.Store(tmp_path).entries()
    assert 0 < entry.cached < size
    http.reset()
    assert_same(load(http.url(NAME), tmp_path), reference(root))
    assert 0 < sent(http) < size  # what was cached was trusted, the rest fetched


@pytest.mark.hub
def test_reads_huggingface_hubs_own_cache(
    hub: Any, root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants, hf_hub_download

    hf_cache = tmp_path / "hf"
    downloaded = hf_hub_download("org/layered", "model.safetensors", endpoint=hub.endpoint, cache_dir=hf_cache)
    assert Path(downloaded).is_relative_to(hf_cache / "models--org--layered" / "snapshots")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_cache))
    hub.reset_log()
    url, options = "hf://org/layered/model.safetensors", hub.storage_options()
    state = sst.load_file(url, storage_options=options, cache_dir=str(tmp_path / "own"), progress=False)
    assert_same(state, reference(root))
    assert [r.status for r in hub.log] == [302]  # resolving the commit (the redirect's own small body)
    assert [(r.range, r.sent) for r in hub.cdn_log] == [("bytes=0-7", SMALL_PROBE)]  # no weight bytes
    assert cache.Store(tmp_path / "own").entries() == []  # read in place, not copied
    hub.reset_log()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "is_offline_mode", lambda: True, raising=False)
    assert_same(sst.load_file(url, storage_options=options, progress=False), reference(root))  # refs/main
    assert hub.log == [] and hub.cdn_log == []
    with pytest.raises(NotCachedError, match="HF_HUB_OFFLINE"):
        sst.load_file("hf://org/dtypes/model.safetensors", storage_options=options, progress=False)


@pytest.mark.hub
def test_hf_loads_are_cached_by_commit_and_work_offline_sharded(
    hub: Any, root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    from checkpoints import sharded_reference

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    options = hub.storage_options()
    first = sst.load_file("hf://org/sharded", storage_options=options, cache_dir=str(tmp_path), progress=False)
    assert_same(first, sharded_reference(root / "sharded"))
    hub.reset_log()
    again = sst.load_file("hf://org/sharded", storage_options=options, cache_dir=str(tmp_path), offline=True)
    assert_same(again, sharded_reference(root / "sharded"))
    assert hub.log == [] and hub.cdn_log == []


def test_cli_download_ls_prune_rm(http: RangeServer, root: Path, tmp_path: Path, capsys: Any) -> None:
    from stream_st.cli import main

    url = http.url(NAME)
    assert main(["download", url, "--cache-dir", str(tmp_path)]) == 0
    assert sent(http) == (root / NAME).stat().st_size
    http.reset()
    assert_same(load(url, tmp_path, offline=True), reference(root))
    capsys.readouterr()
    assert main(["cache", "ls", "--cache-dir", str(tmp_path)]) == 0
    listed = capsys.readouterr().out
    assert url in listed and "100%" in listed
    assert main(["cache", "prune", "--cache-dir", str(tmp_path), "--max-bytes", "1"]) == 0
    assert cache.Store(tmp_path).entries() == []
    main(["download", url, "--cache-dir", str(tmp_path)])
    assert main(["cache", "rm", url, "--cache-dir", str(tmp_path)]) == 0
    assert cache.Store(tmp_path).entries() == []
    assert http.gets() and not any(r.status != 206 for r in http.gets())
