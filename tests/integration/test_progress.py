"""progress=: each load counts its own bytes, also when loads run at the same time in one process and when
they share one engine (the counter travels down the load's calls; the engine holds none)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

import stream_st as sst
from servers import RangeServer
from stream_st import gpu
from stream_st.api import open_files
from stream_st.config import Config
from stream_st.parallel import load_raw, with_regions
from stream_st.process_cache import ProcessCache
from stream_st.progress import Progress
from stream_st.remote import RemoteFile

Calls = list[tuple[int, int]]


@pytest.fixture(params=["host", "staged"])
def staged(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Loads land in host memory, or pass through the device path's slot pool (counted per part there)."""
    if request.param == "staged":
        monkeypatch.setattr(RemoteFile, "stage_cpu_loads", True)
        monkeypatch.setattr(gpu, "_pools", ProcessCache())
    return bool(request.param == "staged")


def tensor_bytes(path: Path, selected: str | None = None) -> int:
    return sum(t.nbytes for t in sst.read_header(str(path)) if selected is None or t.name.startswith(selected))


def assert_counted(calls: Calls, expected: int) -> None:
    """Every report of one load: its own total, never decreasing, ending at that total."""
    assert calls, "no progress reported"
    assert {total for _, total in calls} == {expected}
    assert all(b[0] >= a[0] for a, b in zip(calls, calls[1:]))
    assert calls[-1] == (expected, expected)


def counter(located: dict[RemoteFile, list[str]], calls: Calls) -> Progress:
    total = sum(file.info(name).nbytes for file, names in located.items() for name in names)
    return Progress(total, lambda done, of: calls.append((done, of)))


def test_concurrent_loads_report_their_own_bytes(http: RangeServer, root: Path, staged: bool) -> None:
    """Three loads at once on the IO loop: two callbacks of different sizes and a load without progress."""
    whole: Calls = []
    part: Calls = []
    options = {"part_size": 16384, "header_prefetch": 4096, "pinned_pool_bytes": 4 * 16384}

    async def together() -> None:
        await asyncio.gather(
            sst.load_file_async(http.url("layered.safetensors"), progress=lambda d, t: whole.append((d, t)), **options),
            sst.load_file_async(
                http.url("sharded"), tensors="model.layers.3.*", progress=lambda d, t: part.append((d, t)), **options
            ),
            sst.load_file_async(http.url("layered.safetensors"), progress=False, **options),
        )

    asyncio.run(together())
    assert_counted(whole, tensor_bytes(root / "layered.safetensors"))
    layer3 = sum(tensor_bytes(shard, "model.layers.3.") for shard in sorted((root / "sharded").glob("*.safetensors")))
    assert layer3 > 0
    assert_counted(part, layer3)


def test_loads_sharing_an_engine_count_separately(http: RangeServer, root: Path, staged: bool) -> None:
    """Two loads on one engine (as a safe_open handle's calls share one), each with its own counter. Part of
    the first tensor comes with the header read, the rest in many small parts."""
    first, second = Calls(), Calls()
    path = root / "layered.safetensors"
    names = sst.read_header(str(path)).offset_keys()
    half = len(names) // 2
    config = Config(part_size=8192, header_prefetch=65536, pinned_pool_bytes=4 * 8192)

    async def both() -> None:
        async with open_files(http.url("layered.safetensors"), config, None) as checkpoint:
            a = await checkpoint.locate(names[:half])
            b = await checkpoint.locate(names[half:])
            cpu = torch.device("cpu")  # through the slot pool when the fixture stages CPU loads
            await asyncio.gather(
                load_raw(with_regions(a), cpu, progress=counter(a, first)),
                load_raw(with_regions(b), cpu, progress=counter(b, second)),
            )

    asyncio.run(both())
    header = sst.read_header(str(path))
    assert_counted(first, sum(header.tensors[n].nbytes for n in names[:half]))
    assert_counted(second, sum(header.tensors[n].nbytes for n in names[half:]))


def test_mapped_tensors_are_counted(root: Path) -> None:
    """Tensors made over a map of the local file (memory_map="all") are in place at once: counted too, so
    the callback still ends at the total."""
    calls: Calls = []
    path = root / "layered.safetensors"
    sst.load_file(path, memory_map="all", progress=lambda done, total: calls.append((done, total)))
    assert_counted(calls, tensor_bytes(path))
