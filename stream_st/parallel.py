"""Loading for many ranks: tensor-parallel slices, and split-and-exchange over torch.distributed.

* ``TensorParallel(rank, world_size, {"*.q_proj.weight": 0, "*.o_proj.weight": 1})``: each rank fetches
  only its chunk (as ``torch.chunk``) of the matching tensors, along the given dimension.
* ``process_group=``: every rank fetches a disjoint, balanced share of the tensors the ranks asked for,
  then the owners send them to the ranks that asked (broadcast when all did), so storage serves each
  byte once (each rank still reads the headers). All ranks agree on failures before exchanging, so a
  rank that fails makes every rank raise instead of leaving the others waiting.
"""

from __future__ import annotations

import asyncio
import fnmatch
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ._loop import gather_or_cancel
from .errors import FetchError
from .header import TensorInfo
from .regions import Region, split
from .remote import RemoteFile
from .select import Selection
from .shards import Checkpoint
from .sinks import OutputTensor

RegionOf = Callable[[TensorInfo], Region | None]


@dataclass(frozen=True)
class TensorParallel:
    """Which tensors are split across ``world_size`` ranks along which dimension; ``rank`` is ours.

    ``plan`` maps glob patterns of tensor names to the dimension to split (0: rows, as for column-parallel
    linear weights; 1: columns, as for row-parallel ones). Tensors no pattern matches are loaded whole.
    """

    rank: int
    world_size: int
    plan: Mapping[str, int]

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in a world of {self.world_size}")

    def region(self, info: TensorInfo) -> Region | None:
        for pattern, dim in self.plan.items():
            if fnmatch.fnmatchcase(info.name, pattern):
                if dim >= len(info.shape):
                    raise ValueError(
                        f"tensor {info.name!r} of shape {list(info.shape)} cannot be split along dim {dim}"
                    )
                return Region(dim, *split(info.shape[dim], self.world_size, self.rank))
        return None


def whole(_: TensorInfo) -> Region | None:
    return None


async def load_raw(
    located: Mapping[RemoteFile, list[str]], device: torch.device, region_of: RegionOf, verify: Any = None
) -> dict[str, OutputTensor]:
    """Every group fetched concurrently as raw outputs (one engine), in file order."""
    loads = await gather_or_cancel(
        *(
            file.load([(name, region_of(file.info(name))) for name in names], verify, device)
            for file, names in located.items()
        )
    )
    return {name: outputs.pop(name) for names, outputs in zip(located.values(), loads) for name in names}


def owners(sizes: list[tuple[str, int]], world_size: int) -> dict[str, int]:
    """Deterministic, balanced shares: ``sizes`` (in file order) cut into ``world_size`` consecutive runs of
    about equal bytes. Consecutive runs leave no other rank's bytes between a rank's tensors, so gap
    coalescing never fetches bytes another rank also fetches."""
    total = sum(nbytes for _, nbytes in sizes) or 1
    owner: dict[str, int] = {}
    done = 0
    for name, nbytes in sizes:
        owner[name] = min(world_size - 1, (2 * done + nbytes) * world_size // (2 * total))  # by its midpoint
        done += nbytes
    return owner


async def split_and_exchange(
    checkpoint: Checkpoint, selection: Selection, device: torch.device, group: Any
) -> dict[str, OutputTensor]:
    """Fetch this rank's share of what all ranks asked for, then exchange; returns what this rank asked."""
    import torch.distributed as dist

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    url = checkpoint.url

    async def collective(fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)

    # 1. Agree on what everyone asked for (a rank whose request failed sends its error instead).
    error: str | None = None
    located: Mapping[RemoteFile, list[str]] = {}
    try:
        located = await checkpoint.locate(selection)
        mine = [name for names in located.values() for name in names]
    except Exception as exc:  # shared, then raised on every rank
        error, mine = f"{type(exc).__name__}: {exc}", []
    requests: list[Any] = [None] * world
    await collective(dist.all_gather_object, requests, (error, mine), group)
    _raise_if_failed(url, [r[0] for r in requests])
    union = sorted({name for _, names in requests for name in names})
    located = await checkpoint.locate(union)
    infos = {name: file.info(name) for file, names in located.items() for name in names}
    owner = owners([(name, info.nbytes) for name, info in infos.items()], world)  # infos is in file order

    # 2. Fetch our share; agree that every rank succeeded before anyone waits on a transfer.
    fetched: dict[str, OutputTensor] = {}
    try:
        ours = {file: [n for n in names if owner[n] == rank] for file, names in located.items()}
        fetched = await load_raw({f: n for f, n in ours.items() if n}, device, whole)
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    errors: list[Any] = [None] * world
    await collective(dist.all_gather_object, errors, error, group)
    _raise_if_failed(url, errors)

    # 3. Exchange in one agreed order: a broadcast when every rank asked, else point-to-point sends.
    asked_by = {name: [r for r, (_, names) in enumerate(requests) if name in names] for name in union}
    result: dict[str, OutputTensor] = {}
    for file, names in located.items():
        for name in names:
            info, source = infos[name], owner[name]
            if rank != source and rank not in asked_by[name]:
                continue  # only in a point-to-point exchange, which does not involve us
            out = fetched.get(name) or _empty_output(file, info, device)
            if info.nbytes:
                await collective(_transfer, out.buffer, source, asked_by[name], rank, world, group)
            if rank in asked_by[name]:
                result[name] = out
    return result


def _empty_output(file: RemoteFile, info: TensorInfo, device: torch.device) -> OutputTensor:
    from .sinks import output_tensor

    return output_tensor(info, info.shape, url=file.url, device=device)


def _transfer(buffer: torch.Tensor, source: int, receivers: list[int], rank: int, world: int, group: Any) -> None:
    import torch.distributed as dist

    if len(receivers) == world:
        dist.broadcast(buffer, src=_global(group, source), group=group)
        return
    for receiver in receivers:
        if receiver == source:
            continue
        if rank == source:
            dist.send(buffer, dst=_global(group, receiver), group=group)
        elif rank == receiver:
            dist.recv(buffer, src=_global(group, source), group=group)


def _global(group: Any, rank: int) -> int:
    import torch.distributed as dist

    return dist.get_global_rank(group, rank) if group is not None else rank


def _raise_if_failed(url: str, errors: list[str | None]) -> None:
    failed = [(r, e) for r, e in enumerate(errors) if e]
    if failed:
        detail = "; ".join(f"rank {r}: {e}" for r, e in failed)
        raise FetchError(f"{url}: the distributed load failed on {len(failed)} rank(s) ({detail})", url=url)
