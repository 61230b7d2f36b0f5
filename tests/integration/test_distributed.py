"""Several ranks (gloo, spawned processes on 127.0.0.1): split-and-exchange reads each byte from storage
once; tensor-parallel ranks read only their slice; a failing rank makes every rank raise, in bounded time."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import re
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from dist_worker import describe, run_rank

import stream_st as sst
from checkpoints import layered_state, random_tensor, write
from servers import RangeServer, free_port

PREFETCH = 4096
NAME = "layered.safetensors"


def run_world(world: int, job: dict[str, Any], tmp_path: Path, timeout: float = 90) -> list[dict[str, Any]]:
    context = multiprocessing.get_context("spawn")
    port = free_port()
    outs = [tmp_path / f"rank{r}.json" for r in range(world)]
    processes = [context.Process(target=run_rank, args=(r, world, port, job, str(outs[r]))) for r in range(world)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout)
    hung = [p for p in processes if p.is_alive()]
    for process in hung:
        process.kill()
    assert not hung, f"{len(hung)} rank(s) still running after {timeout} s"
    return [json.loads(out.read_text()) for out in outs]


def expected(root: Path) -> dict[str, list[Any]]:
    return {name: describe(t) for name, t in safetensors.torch.load_file(str(root / NAME)).items()}


def data_bytes(http: RangeServer, name: str = NAME) -> int:
    """Bytes served by ranged GETs past the header prefetch: the tensor bytes pulled from storage."""
    total = 0
    for request in http.gets(name):
        match = re.fullmatch(r"bytes=(\d+)-(\d+)", request.range or "")
        if match and int(match.group(1)) >= PREFETCH:
            total += request.sent
    return total


def test_split_and_exchange_reads_each_byte_once(http: RangeServer, root: Path, tmp_path: Path) -> None:
    job = {"url": http.url(NAME), "tensors": None, "options": {"header_prefetch": PREFETCH, "part_size": 65536}}
    results = run_world(3, job, tmp_path)
    want = expected(root)
    for rank, result in enumerate(results):
        assert result["ok"], result
        assert result["tensors"] == want, f"rank {rank}"
    assert data_bytes(http) == (root / NAME).stat().st_size - PREFETCH  # 1× egress, not 3×
    assert len([r for r in http.gets(NAME) if r.range == f"bytes=0-{PREFETCH - 1}"]) == 3  # a header read each


def test_load_model_splits_and_exchanges(http: RangeServer, root: Path, tmp_path: Path) -> None:
    job = {"url": http.url(NAME), "model": True, "options": {"process_group": True, "header_prefetch": PREFETCH}}
    results = run_world(2, job, tmp_path)
    for result in results:
        assert result["ok"], result
        assert result["tensors"] == expected(root)
    assert data_bytes(http) == (root / NAME).stat().st_size - PREFETCH


def test_ranks_asking_for_different_tensors(http: RangeServer, root: Path, tmp_path: Path) -> None:
    selections = [["model.layers.0.*"], ["model.layers.1.*", "lm_head.weight"], ["lm_head.weight"]]
    job = {"url": http.url(NAME), "per_rank": selections, "options": {"header_prefetch": PREFETCH}}
    results = run_world(3, job, tmp_path)
    want = expected(root)
    asked = [
        {n for n in want if n.startswith("model.layers.0.")},
        {n for n in want if n.startswith("model.layers.1.")} | {"lm_head.weight"},
        {"lm_head.weight"},
    ]
    for rank, result in enumerate(results):
        assert result["ok"], result
        assert result["tensors"] == {n: want[n] for n in asked[rank]}
    union = set().union(*asked)
    header = sst.read_header(str(root / NAME))
    beyond_prefetch = sum(max(0, t.end - max(t.start, PREFETCH)) for t in header if t.name in union)
    assert data_bytes(http) == beyond_prefetch  # the union, once


def test_tensor_parallel_ranks_read_only_their_slices(http: RangeServer, root: Path, tmp_path: Path) -> None:
    plan = {"*.q_proj.weight": 0, "*.up_proj.weight": 1}
    job = {
        "url": http.url(NAME),
        "tensors": ["*.q_proj.weight", "*.up_proj.weight"],
        "tensor_parallel": plan,
        "options": {"header_prefetch": PREFETCH, "max_gap": 0},
    }
    results = run_world(2, job, tmp_path)
    reference = safetensors.torch.load_file(str(root / NAME))
    selected_names = {n for n in reference if n.endswith(("q_proj.weight", "up_proj.weight"))}
    for rank, result in enumerate(results):
        assert result["ok"], result
        assert set(result["tensors"]) == selected_names
        for name, described in result["tensors"].items():
            dim = 0 if name.endswith("q_proj.weight") else 1
            assert described == describe(torch.chunk(reference[name], 2, dim=dim)[rank]), (rank, name)
    selected = sum(
        t.numel() * t.element_size() for n, t in reference.items() if n.endswith(("q_proj.weight", "up_proj.weight"))
    )
    assert data_bytes(http) == selected  # together the ranks read each selected byte once, no more


def test_a_failing_rank_makes_every_rank_raise(http: RangeServer, tmp_path: Path) -> None:
    job = {"url": http.url(NAME), "per_rank": [["lm_head.weight"], ["no.such.tensor"]], "options": {}}
    results = run_world(2, job, tmp_path, timeout=60)
    for result in results:
        assert not result["ok"]
        # Every rank raises the failed rank's own class (a KeyError for code that catches one), not a FetchError.
        assert result["error"].startswith("TensorNotFoundError: "), result["error"]
        assert "the distributed load failed on 1 rank(s) (rank 1: TensorNotFoundError" in result["error"]


def test_a_rank_failing_mid_load_makes_every_rank_raise(http: RangeServer, tmp_path: Path) -> None:
    http.quirks.faults, http.quirks.fault_from = 1000, PREFETCH
    job = {"url": http.url(NAME), "tensors": None, "options": {"header_prefetch": PREFETCH, "retries": 0}}
    results = run_world(2, job, tmp_path, timeout=60)
    for result in results:
        assert not result["ok"] and "the distributed load failed on" in result["error"], result


def test_a_huge_tensor_is_split_between_ranks(http: RangeServer, root: Path, tmp_path: Path) -> None:
    """An embedding holding most of the bytes is fetched in row ranges by all ranks, not by one."""
    state = {
        "embed": random_tensor((3000, 64), torch.float32, seed=3),
        "norm": random_tensor((64,), torch.float32, seed=4),
        "head": random_tensor((500, 64), torch.float32, seed=5),
    }
    path = write(root / "huge.safetensors", state)
    try:
        job = {"url": http.url(path.name), "options": {"header_prefetch": PREFETCH, "part_size": 65536}}
        results = run_world(3, job, tmp_path)
        want = {name: describe(t) for name, t in safetensors.torch.load_file(str(path)).items()}
        data = path.stat().st_size - PREFETCH
        for result in results:
            assert result["ok"], result
            assert result["tensors"] == want
            assert result["bytes"] - PREFETCH < 0.4 * data  # about a third each; whole, embed alone is 85%
            ((done, total),) = result["progress"]  # the bar counts what this rank downloads
            assert done == total
        assert data_bytes(http, path.name) == data
        tensor_bytes = sum(t.numel() * t.element_size() for t in state.values())
        assert sum(result["progress"][0][1] for result in results) == tensor_bytes
    finally:
        path.unlink()


def test_iter_tensors_splits_every_batch(http: RangeServer, root: Path, tmp_path: Path) -> None:
    selections = [["model.layers.*"], ["model.layers.1.*", "lm_head.weight"]]
    options = {"header_prefetch": PREFETCH, "max_inflight_bytes": 100_000, "part_size": 65536}
    job = {"url": http.url(NAME), "per_rank": selections, "iter": True, "options": options}
    results = run_world(2, job, tmp_path)
    want = expected(root)
    header = sst.read_header(str(root / NAME))
    in_file_order = [t.name for t in header]
    asked = [
        [n for n in in_file_order if n.startswith("model.layers.")],
        [n for n in in_file_order if n.startswith("model.layers.1.") or n == "lm_head.weight"],
    ]
    for rank, result in enumerate(results):
        assert result["ok"], result
        assert list(result["tensors"]) == asked[rank]
        assert result["tensors"] == {n: want[n] for n in asked[rank]}
    union = set(asked[0]) | set(asked[1])
    assert data_bytes(http) == sum(max(0, t.end - max(t.start, PREFETCH)) for t in header if t.name in union)


def test_verify_with_split_loads(http: RangeServer, root: Path, tmp_path: Path) -> None:
    digest = "sha256:" + hashlib.sha256((root / NAME).read_bytes()).hexdigest()
    job = {"url": http.url(NAME), "options": {"header_prefetch": PREFETCH, "verify": digest}}
    for result in run_world(2, job, tmp_path):
        assert result["ok"], result
        assert result["tensors"] == expected(root)
    assert data_bytes(http) == (root / NAME).stat().st_size - PREFETCH
    http.reset()
    job["options"]["verify"] = "sha256:" + "0" * 64
    for result in run_world(2, job, tmp_path):
        assert not result["ok"]
        assert result["error"].startswith("IntegrityError: ") and "sha256 of the streamed bytes is" in result["error"]


def test_tensor_parallel_slices_with_the_rest_split(http: RangeServer, root: Path, tmp_path: Path) -> None:
    """Sliced tensors are each rank's own; the replicated rest is split and exchanged: 1× egress in all."""
    plan = {"*.q_proj.weight": 0, "*.up_proj.weight": 1}
    job = {
        "url": http.url(NAME),
        "tensor_parallel": plan,
        "split": True,
        "options": {"header_prefetch": PREFETCH, "max_gap": 0},
    }
    results = run_world(2, job, tmp_path)
    reference = safetensors.torch.load_file(str(root / NAME))
    for rank, result in enumerate(results):
        assert result["ok"], result
        assert list(result["tensors"]) == [t.name for t in sst.read_header(str(root / NAME))]
        for name, tensor in reference.items():
            dim = 0 if name.endswith("q_proj.weight") else 1 if name.endswith("up_proj.weight") else None
            part = tensor if dim is None else torch.chunk(tensor, 2, dim=dim)[rank]
            assert result["tensors"][name] == describe(part), (rank, name)
    assert data_bytes(http) == (root / NAME).stat().st_size - PREFETCH


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["load_file", "iter_tensors"])
def test_nccl_on_one_gpu(http: RangeServer, root: Path, tmp_path: Path, mode: str) -> None:
    """The NCCL path (a one-rank world: NCCL takes one GPU per rank), verified, into GPU memory."""
    digest = "sha256:" + hashlib.sha256((root / NAME).read_bytes()).hexdigest()
    options = {"header_prefetch": PREFETCH, "part_size": 65536, "max_inflight_bytes": 200_000}
    if mode == "load_file":
        options["verify"] = digest
    job = {"url": http.url(NAME), "backend": "nccl", "device": "cuda:0", "iter": mode == "iter_tensors"}
    (result,) = run_world(1, {**job, "options": options}, tmp_path, timeout=120)
    assert result["ok"], result
    assert result["tensors"] == expected(root)
    assert data_bytes(http) == (root / NAME).stat().st_size - PREFETCH


def test_sharded_checkpoint_split_across_ranks(http: RangeServer, root: Path, tmp_path: Path) -> None:
    """An index.json checkpoint: every shard's bytes once in all, every rank with every tensor, in shard order."""
    shards = sorted((root / "sharded").glob("*.safetensors"))
    job = {"url": http.url("sharded/model.safetensors.index.json"), "options": {"header_prefetch": PREFETCH}}
    results = run_world(3, job, tmp_path)
    want: dict[str, list[Any]] = {}
    for shard in shards:
        want |= {name: describe(t) for name, t in safetensors.torch.load_file(str(shard)).items()}
    in_order = [t.name for shard in shards for t in sst.read_header(str(shard))]
    for result in results:
        assert result["ok"], result
        assert list(result["tensors"]) == in_order and result["tensors"] == want
    for shard in shards:
        header = sst.read_header(str(shard))
        assert data_bytes(http, f"sharded/{shard.name}") == sum(max(0, t.end - max(t.start, PREFETCH)) for t in header)


@pytest.mark.cuda
def test_nccl_refuses_a_cpu_destination(http: RangeServer, tmp_path: Path) -> None:
    job = {"url": http.url(NAME), "backend": "nccl", "device": "cpu", "options": {"header_prefetch": PREFETCH}}
    (result,) = run_world(1, job, tmp_path, timeout=120)
    assert not result["ok"] and "uses NCCL, which moves GPU tensors only" in result["error"], result


def test_folder_without_index_split_across_ranks(root: Path, tmp_path: Path) -> None:
    """Shards found by listing a folder: all ranks agree on one order (the shards' names), not on the order in
    which each rank happened to finish opening them."""
    folder = tmp_path / "listed"
    folder.mkdir()
    shards = sorted((root / "sharded").glob("*.safetensors"))
    for shard in shards:
        (folder / shard.name).write_bytes(shard.read_bytes())
    results = run_world(3, {"url": str(folder), "options": {"max_concurrency": 1}}, tmp_path)
    in_order = [t.name for shard in shards for t in sst.read_header(str(shard))]
    want: dict[str, list[Any]] = {}
    for shard in shards:
        want |= {name: describe(t) for name, t in safetensors.torch.load_file(str(shard)).items()}
    for result in results:
        assert result["ok"], result
        assert list(result["tensors"]) == in_order and result["tensors"] == want


def test_ranks_that_read_different_versions_all_raise(tmp_path: Path) -> None:
    """Rank 1 sees the file after it was replaced (same layout, new bytes, new ETag): mixing pieces of two
    versions would be silently wrong, so every rank raises ObjectChangedError instead."""
    folder = tmp_path / "versions"
    folder.mkdir()
    old = write(folder / "old.safetensors", layered_state())
    new = folder / "new.safetensors"
    data = bytearray(old.read_bytes())
    data[-1] ^= 0xFF
    new.write_bytes(bytes(data))
    server = RangeServer(folder)
    try:
        job = {"per_rank_url": [server.url(old.name), server.url(new.name)], "options": {}}
        results = run_world(2, job, tmp_path)
    finally:
        server.stop()
    for result in results:
        assert not result["ok"]
        assert result["error"].startswith("ObjectChangedError: ") and "read another version" in result["error"]


def test_ranks_with_different_settings_all_raise(http: RangeServer, tmp_path: Path) -> None:
    """part_size decides who fetches which rows: ranks that disagree would make different collective calls."""
    job = {"url": http.url(NAME), "per_rank_options": [{"part_size": 65536}, {}], "options": {}}
    for result in run_world(2, job, tmp_path):
        assert not result["ok"]
        assert result["error"].startswith("ValueError: ") and "the ranks differ in settings" in result["error"]


def test_a_rank_failing_to_open_the_checkpoint_makes_every_rank_raise(http: RangeServer, tmp_path: Path) -> None:
    """Rank 1 cannot even read the index: it still meets the others, with its error, so no rank waits."""
    missing = http.url("missing/model.safetensors.index.json")
    job = {"per_rank_url": [http.url(NAME), missing], "options": {}}
    results = run_world(2, job, tmp_path, timeout=60)
    assert results[1]["error"].startswith("FileNotFoundError: ")
    assert not results[0]["ok"]
    assert results[0]["error"].startswith("FileNotFoundError: "), results[0]["error"]
    assert "the distributed load failed on 1 rank(s) (rank 1: FileNotFoundError" in results[0]["error"]


def test_iter_tensors_failing_in_a_later_batch_makes_every_rank_raise(
    http: RangeServer, root: Path, tmp_path: Path
) -> None:
    """The failure comes from a batch downloaded ahead, while earlier batches were being yielded."""
    lm_head_end = sst.read_header(str(root / NAME)).tensors["lm_head.weight"].end
    http.quirks.faults, http.quirks.fault_from = 1000, lm_head_end + 200_000  # well past the first batches
    options = {"header_prefetch": PREFETCH, "max_inflight_bytes": 100_000, "part_size": 65536, "retries": 0}
    job = {"url": http.url(NAME), "iter": True, "options": options}
    for result in run_world(2, job, tmp_path, timeout=60):
        assert not result["ok"] and "the distributed load failed on" in result["error"], result
