"""Loading for many ranks: tensor-parallel slices, and split-and-exchange over torch.distributed.

* ``TensorParallel(rank, world_size, {"*.q_proj.weight": 0, "*.o_proj.weight": 1})``: each rank fetches
  only its chunk (as ``torch.chunk``) of the matching tensors, along the given dimension.
* ``process_group=``: the tensors the ranks asked for (whole) are cut into consecutive runs of about equal
  bytes, a tensor that a cut falls in split between rows; every rank fetches its run, then the owners
  send each piece to the ranks that asked (broadcast when all did), so storage serves each byte once
  (each rank still reads the headers). Tensors a rank takes a tensor-parallel slice of are its own to
  fetch. All ranks agree on failures before exchanging and after verifying, so a rank that fails makes
  every rank raise instead of leaving the others waiting.
"""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ._loop import gather_or_cancel
from .errors import FetchError, IntegrityError, ObjectChangedError, StreamSTError
from .header import TensorInfo
from .regions import Region, split
from .remote import RemoteFile
from .select import Selection
from .shards import Checkpoint
from .sinks import OutputTensor, output_tensor

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


Requests = Mapping[RemoteFile, list[tuple[str, Region | None]]]


def with_regions(located: Mapping[RemoteFile, list[str]], region_of: RegionOf = whole) -> Requests:
    return {file: [(name, region_of(file.info(name))) for name in names] for file, names in located.items()}


async def load_raw(requests: Requests, device: torch.device, verify: Any = None) -> dict[str, OutputTensor]:
    """Every file's requests fetched concurrently as raw outputs (one engine), in file order."""
    loads = await gather_or_cancel(*(file.load(wanted, verify, device) for file, wanted in requests.items()))
    return {name: outputs.pop(name) for wanted, outputs in zip(requests.values(), loads) for name, _ in wanted}


@dataclass(frozen=True)
class Share:
    """Rows [start, stop) of dim 0 of tensor ``name``, fetched by ``rank`` (``whole``: all of the tensor)."""

    name: str
    rank: int
    start: int
    stop: int
    whole: bool


def shares(tensors: list[tuple[str, int, int]], world_size: int, min_split: int) -> dict[str, list[Share]]:
    """Cut ``tensors`` ((name, bytes, rows of dim 0), in file order) into ``world_size`` consecutive runs of
    about equal bytes: deterministic, so every rank computes the same. A tensor of at least ``min_split``
    bytes that a cut falls in is split there, at the nearest row; smaller ones go whole to the run holding
    their midpoint. Consecutive runs leave no other rank's bytes between a rank's pieces, so gap coalescing
    never fetches bytes another rank also fetches."""
    total = sum(nbytes for _, nbytes, _ in tensors) or 1

    def rank_of(start: int, end: int) -> int:  # the run holding the midpoint
        return min(world_size - 1, (start + end) * world_size // (2 * total))

    result: dict[str, list[Share]] = {}
    done = 0
    for name, nbytes, rows in tensors:
        cuts = [0]
        if nbytes >= min_split and rows > 1 and nbytes % rows == 0:
            row_bytes = nbytes // rows
            for boundary in (r * total // world_size for r in range(1, world_size)):
                row = (2 * (boundary - done) + row_bytes) // (2 * row_bytes)  # nearest row
                if cuts[-1] < row < rows:
                    cuts.append(row)
        cuts.append(rows)
        row_bytes = nbytes // rows if rows else 0
        pieces: list[Share] = []
        for start, stop in zip(cuts, cuts[1:]):
            rank = rank_of(done + start * row_bytes, done + stop * row_bytes)
            if pieces and pieces[-1].rank == rank:
                start = pieces.pop().start
            pieces.append(Share(name, rank, start, stop, False))
        if len(pieces) == 1:
            pieces = [Share(name, rank_of(done, done + nbytes), 0, rows, True)]
        result[name] = pieces
        done += nbytes
    return result


class SplitLoad:
    """One split-and-exchange load over a torch.distributed group; every rank makes the same calls.

    ``agree`` learns what every rank asked for; ``run`` then fetches this rank's share of some of those
    tensors (all of them, or one batch of ``iter_tensors``), exchanges them and returns this rank's.
    """

    def __init__(self, checkpoint: Checkpoint, device: torch.device, group: Any) -> None:
        import torch.distributed as dist

        self.checkpoint, self.device, self.group = checkpoint, device, group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        if dist.get_backend(group) == "nccl" and device.type != "cuda":
            raise ValueError(
                f"{checkpoint.url}: the process group uses NCCL, which moves GPU tensors only, but device={device}; "
                "load to this rank's GPU or pass a gloo group"
            )
        self.asked_by: dict[str, list[int]] = {}
        self.union: dict[RemoteFile, list[str]] = {}  # what some rank asked for whole, by file, in file order
        self.alone: dict[RemoteFile, list[tuple[str, Region | None]]] = {}  # this rank's own slices

    async def agree(self, selection: Selection, region_of: RegionOf = whole) -> None:
        """Learn what every rank asked for (a rank whose request failed sends its error instead)."""
        error: str | None = None
        mine: list[str] = []
        try:
            for file, names in (await self.checkpoint.locate(selection)).items():
                for name in names:
                    region = region_of(file.info(name))
                    if region is None:
                        mine.append(name)
                    else:
                        self.alone.setdefault(file, []).append((name, region))
        except Exception as exc:  # shared, then raised on every rank
            error = _describe(exc)
        requests = await self._all_gather((error, mine))
        self._raise_if_failed([failure for failure, _ in requests])
        asked = [set(names) for _, names in requests]
        wanted = set().union(*asked)
        if wanted:
            self.union = await self.checkpoint.locate(lambda name: name in wanted)
        self.asked_by = {name: [r for r in range(self.world) if name in asked[r]] for name in wanted}
        await self._check_same_versions()

    async def _check_same_versions(self) -> None:
        """Every rank must have read the same version of each file, or the pieces would not fit together
        (a file replaced between the ranks' header reads): each rank pins its own version, not the others'."""
        seen = [_fingerprint(file) for file in self.union]
        everyone = await self._all_gather(seen)
        for rank, theirs in enumerate(everyone):
            for file, ours, other in zip(self.union, seen, theirs):
                if ours != other:
                    raise ObjectChangedError(
                        f"{file.url}: rank {rank} read another version of this file than rank {self.rank} "
                        f"(size, header digest, version: {other} vs {ours}); it changed while the ranks opened it",
                        url=file.url,
                    )

    def plan(self, part: Mapping[RemoteFile, list[str]]) -> dict[str, list[Share]]:
        """Who fetches which rows of the tensors of ``part``."""
        infos = [file.info(name) for file, names in part.items() for name in names]
        min_split = self.checkpoint.engine.config.part_size  # smaller tensors are not worth a collective each
        return shares([(i.name, i.nbytes, i.shape[0] if i.shape else 1) for i in infos], self.world, min_split)

    def share_bytes(self, part: Mapping[RemoteFile, list[str]]) -> int:
        """The bytes of ``part`` this rank fetches (for its progress bar)."""
        sizes = {name: file.info(name).nbytes for file, names in part.items() for name in names}
        mine = 0
        for name, pieces in self.plan(part).items():
            row_bytes = sizes[name] // max(1, pieces[-1].stop)
            for share in pieces:
                if share.rank == self.rank:
                    mine += sizes[name] if share.whole else (share.stop - share.start) * row_bytes
        return mine

    async def run(
        self, part: Mapping[RemoteFile, list[str]], verify: Any = None, *, with_own_slices: bool = False
    ) -> dict[str, OutputTensor]:
        """Fetch our share of ``part`` (a subset of ``union``; and our own slices), exchange, verify; returns
        what this rank asked for, in file order."""
        infos = {name: file.info(name) for file, names in part.items() for name in names}
        plan = self.plan(part)

        # 1. Fetch our pieces; agree that every rank succeeded before anyone waits on a transfer.
        error: str | None = None
        fetched: dict[str, OutputTensor] = {}
        sliced: dict[str, OutputTensor] = {}
        try:
            ours = {
                file: [(share.name, _region(share)) for n in names for share in plan[n] if share.rank == self.rank]
                for file, names in part.items()
            }
            loads = [load_raw({f: wanted for f, wanted in ours.items() if wanted}, self.device)]
            if with_own_slices and self.alone:
                loads.append(load_raw(self.alone, self.device, verify))
            loaded = await gather_or_cancel(*loads)
            fetched, sliced = loaded[0], loaded[1] if len(loaded) > 1 else {}
        except Exception as exc:
            error = _describe(exc)
        self._raise_if_failed(await self._all_gather(error))

        # 2. Exchange, piece by piece, in the one order every rank follows.
        received: dict[str, OutputTensor] = {}
        for file, names in part.items():
            for name in names:
                out = await self._exchange(file, infos[name], plan[name], fetched.get(name))
                if out is not None:
                    received[name] = out

        # 3. Verify what we hold now, and agree on the outcome.
        if verify:
            error = None
            try:
                for file, names in part.items():
                    held = {name: received[name] for name in names if name in received}
                    if held:
                        await file.verify_loaded(verify, held)
            except Exception as exc:
                error = _describe(exc)
            self._raise_if_failed(await self._all_gather(error), IntegrityError)
        files = self.checkpoint.in_order([*part, *(self.alone if with_own_slices else {})])
        both = {**received, **sliced}
        return {name: both[name] for file in files for name in file.header.offset_keys() if name in both}

    async def _exchange(
        self, file: RemoteFile, info: TensorInfo, pieces: list[Share], fetched: OutputTensor | None
    ) -> OutputTensor | None:
        """Send our piece of one tensor to the ranks that asked for it, receive the others' pieces;
        returns the whole tensor if this rank asked for it."""
        receivers = self.asked_by[info.name]
        asked = self.rank in receivers
        if fetched is not None and pieces[0].whole:
            full: OutputTensor | None = fetched
        elif asked:
            full = output_tensor(info, info.shape, url=file.url, device=self.device)
        else:
            full = None
        if not info.nbytes:
            return full if asked else None
        row_bytes = info.nbytes // max(1, pieces[-1].stop)
        for share in pieces:
            source = share.rank
            if self.rank != source and not asked:
                continue  # a point-to-point exchange that does not involve us
            if self.rank == source:
                assert fetched is not None
                buffer = fetched.buffer
                if full is not None and full is not fetched:  # our rows of a split tensor we also keep
                    full.buffer[share.start * row_bytes : share.stop * row_bytes].copy_(buffer)
            else:
                assert full is not None
                buffer = full.buffer if share.whole else full.buffer[share.start * row_bytes : share.stop * row_bytes]
            await self._collective(_transfer, buffer, source, receivers, self.rank, self.world, self.group)
        return full if asked else None

    async def _all_gather(self, value: Any) -> list[Any]:
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.world
        await self._collective(dist.all_gather_object, gathered, value, self.group)
        return gathered

    async def _collective(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a blocking collective on a helper thread, with this rank's GPU current there: CUDA's
        current device is per thread, and NCCL's object collectives stage through the current one."""

        def call() -> Any:
            if self.device.type != "cuda":
                return fn(*args)
            with torch.cuda.device(self.device):
                return fn(*args)

        return await asyncio.to_thread(call)

    def _raise_if_failed(self, errors: list[str | None], error: type[StreamSTError] = FetchError) -> None:
        failed = [(r, e) for r, e in enumerate(errors) if e]
        if failed:
            url = self.checkpoint.url
            detail = "; ".join(f"rank {r}: {e}" for r, e in failed)
            raise error(f"{url}: the distributed load failed on {len(failed)} rank(s) ({detail})", url=url)


def _fingerprint(file: RemoteFile) -> tuple[int, str, str | None]:
    """What identifies the version of a file a rank read: size, header digest, and the store's version."""
    version = file.source.version if file.source.version_is_global else None
    return file.header.file_size, hashlib.sha256(file.header_bytes()).hexdigest()[:16], version


def _region(share: Share) -> Region | None:
    return None if share.whole else Region(0, share.start, share.stop)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


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
