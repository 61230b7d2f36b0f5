"""Split-and-exchange over torch.distributed (``process_group=``).

The tensors the ranks asked for (whole) are cut into consecutive runs of about equal bytes, a tensor that
a cut falls in split between rows; every rank fetches its run, then the owners send each piece to the
ranks that asked (broadcast when all did), so storage serves each byte once (each rank still reads the
headers). Tensors a rank takes a tensor-parallel slice of are its own to fetch. All ranks share their
failures before exchanging and after verifying, so a rank that fails makes every rank raise instead of
leaving the others waiting.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from . import errors
from ._loop import gather_or_cancel, off_loop
from .errors import FetchError, ObjectChangedError, StreamSTError
from .gpu import use_device
from .header import TensorInfo
from .parallel import RegionOf, load_raw, whole
from .progress import Progress
from .regions import Region
from .remote import RemoteFile
from .select import Selection
from .shards import Checkpoint
from .sinks import OutputTensor, output_tensor


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


class Ranks:
    """A torch.distributed group as one load uses it: its collectives run one at a time, in order, on a
    thread of their own that has this rank's GPU current (NCCL's object collectives stage through the
    current device, which is per thread). Every rank makes the same calls in the same order."""

    def __init__(self, group: Any, device: torch.device) -> None:
        import torch.distributed as dist

        self.group, self.device = group, device
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.backend = dist.get_backend(group)
        self.joined = False  # whether this rank took part in the load's first gather
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stream_st-collectives")

    async def collective(self, fn: Callable[..., Any], *args: Any) -> Any:
        def call() -> Any:
            use_device(self.device)
            return fn(*args)

        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def all_gather(self, value: Any) -> list[Any]:
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.world
        self.joined = True  # even if this gather fails: a second attempt would only wait as long again
        await self.collective(dist.all_gather_object, gathered, value, self.group)
        return gathered

    async def share_early_failure(self, exc: BaseException) -> None:
        """A rank that failed before the first gather (opening the checkpoint, checking its arguments) still
        takes part in it, with its error, so that the other ranks raise too instead of waiting."""
        if not self.joined and isinstance(exc, Exception):
            await self.all_gather((_describe(exc), [], None))

    def close(self) -> None:
        self._executor.shutdown(wait=False)  # a collective abandoned by a cancel cannot be waited for


@dataclass
class Fetched:
    """What one rank fetched of a part of a split load, before the exchange. A failure is kept in
    ``error`` (not raised): the ranks share their errors first, so that none waits on a failed one."""

    plan: dict[str, list[Share]]
    error: Failure | None = None
    pieces: dict[str, OutputTensor] = field(default_factory=dict)  # this rank's share
    sliced: dict[str, OutputTensor] = field(default_factory=dict)  # its own tensor-parallel slices
    receive: dict[str, OutputTensor] = field(default_factory=dict)  # whole tensors it asked for, to receive into


Finish = Callable[[dict[str, OutputTensor]], Awaitable[dict[str, torch.Tensor]]]


class SplitLoad:
    """One split-and-exchange load; every rank makes the same calls.

    ``agree`` learns what every rank asked for; then, for all of it or one ``iter_tensors`` batch at a time,
    ``fetch`` downloads this rank's share (no collective, so it can run ahead in the background) and
    ``exchange`` moves the pieces, verifies and finishes the tensors, sharing every failure before and
    after. Cancelling a load midway (``timeout=``, Ctrl-C, closing an iterator early) leaves the other
    ranks waiting until the group's timeout: the group is then unusable, as after any abandoned collective.
    """

    def __init__(self, checkpoint: Checkpoint, ranks: Ranks, verify: Any = None) -> None:
        self.checkpoint, self.ranks, self.verify = checkpoint, ranks, verify
        self.rank, self.world, self.device = ranks.rank, ranks.world, ranks.device
        self.asked_by: dict[str, list[int]] = {}
        self.union: dict[RemoteFile, list[str]] = {}  # what some rank asked for whole, by file, in file order
        self.alone: dict[RemoteFile, list[tuple[str, Region | None]]] = {}  # this rank's own slices

    async def agree(self, selection: Selection, region_of: RegionOf = whole) -> None:
        """Learn what every rank asked for, and check that all ranks will make the same collective calls."""
        error: Failure | None = None
        mine: list[str] = []
        try:
            self._check_backend()
            for file, names in (await self.checkpoint.locate(selection)).items():
                for name in names:
                    region = region_of(file.info(name))
                    if region is None:
                        mine.append(name)
                    else:
                        self.alone.setdefault(file, []).append((name, region))
        except Exception as exc:  # shared, then raised on every rank
            error = _describe(exc)
        requests = await self.ranks.all_gather((error, mine, self._settings()))
        self._raise_if_failed([failure for failure, _, _ in requests])
        self._check_same(
            [settings for _, _, settings in requests], "settings (part_size, max_inflight_bytes, verify, device type)"
        )
        asked = [set(names) for _, names, _ in requests]
        wanted = set().union(*asked)
        self.asked_by = {name: [r for r in range(self.world) if name in asked[r]] for name in wanted}
        point_to_point = any(len(ranks) < self.world for ranks in self.asked_by.values())
        if self.ranks.backend == "gloo" and self.device.type == "cuda" and point_to_point:  # the same on every rank
            raise ValueError(
                f"{self.checkpoint.url}: gloo cannot send GPU tensors point to point, and the ranks asked for "
                "different tensors; use an NCCL group for GPU tensors"
            )
        seen: list[tuple[int, str, str | None]] = []
        try:
            if wanted:
                self.union = await self.checkpoint.locate(lambda name: name in wanted)
            seen = [_fingerprint(file) for file in self.union]
        except Exception as exc:
            error = _describe(exc)
        versions = await self.ranks.all_gather((error, seen))
        self._raise_if_failed([failure for failure, _ in versions])
        for rank, theirs in enumerate(fingerprints for _, fingerprints in versions):
            for file, first, other in zip(self.union, versions[0][1], theirs):
                if first != other:  # each rank pins the version it read, but not the others'
                    raise ObjectChangedError(
                        f"{file.url}: rank {rank} read another version of this file than rank 0 "
                        f"(size, header digest, version: {other} vs {first}); it changed while the ranks opened it",
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

    async def fetch(
        self, part: Mapping[RemoteFile, list[str]], *, with_own_slices: bool = False, progress: Progress | None = None
    ) -> Fetched:
        """Download this rank's pieces of ``part`` (and its own slices) and allocate what it will receive;
        ``progress`` counts the bytes this rank downloads."""
        fetched = Fetched(self.plan(part))
        try:
            into: dict[str, torch.Tensor] = {}  # our rows of split tensors we keep: landed in place, not copied
            for file, names in part.items():  # allocated inside the try: running out of memory is shared too
                for name in names:
                    pieces, info = fetched.plan[name], file.info(name)
                    if self.rank in self.asked_by[name] and not (pieces[0].whole and pieces[0].rank == self.rank):
                        receive = output_tensor(info, info.shape, url=file.url, device=self.device)
                        fetched.receive[name] = receive
                        for share in pieces:
                            if share.rank == self.rank:
                                into[name] = receive.buffer[_byte_range(share, info, pieces)]
            ours = {
                file: [(s.name, _region(s)) for n in names for s in fetched.plan[n] if s.rank == self.rank]
                for file, names in part.items()
            }
            mine = {f: wanted for f, wanted in ours.items() if wanted}
            loads = [load_raw(mine, self.device, into=into, progress=progress)]
            if with_own_slices and self.alone:
                loads.append(load_raw(self.alone, self.device, self.verify, progress=progress))
            loaded = await gather_or_cancel(*loads)
            fetched.pieces, fetched.sliced = loaded[0], loaded[1] if len(loaded) > 1 else {}
        except Exception as exc:
            fetched.error = _describe(exc)
        return fetched

    async def exchange(
        self, part: Mapping[RemoteFile, list[str]], fetched: Fetched, finish: Finish
    ) -> dict[str, torch.Tensor]:
        """Move every piece to the ranks that asked for it; then verify and ``finish`` (cast, place) what
        this rank asked for. Failures are shared before the transfers and after the rest."""
        self._raise_if_failed(await self.ranks.all_gather(fetched.error))
        received: dict[str, OutputTensor] = {}
        for file, names in part.items():
            for name in names:  # in the one order every rank follows
                piece, into = fetched.pieces.pop(name, None), fetched.receive.pop(name, None)
                out = await self._exchange(file.info(name), fetched.plan[name], piece, into)
                if out is not None:
                    received[name] = out
        error: Failure | None = None
        finished: dict[str, torch.Tensor] = {}
        try:
            if self.verify:
                for file, names in part.items():
                    held = {name: received[name] for name in names if name in received}
                    if held:
                        await file.verifier.check_received(self.verify, held)
            files = self.checkpoint.in_order([*part, *(f for f in self.alone if fetched.sliced)])
            both = {**received, **fetched.sliced}
            finished = await finish(
                {name: both[name] for file in files for name in file.header.offset_keys() if name in both}
            )
        except Exception as exc:
            error = _describe(exc)
        self._raise_if_failed(await self.ranks.all_gather(error))
        return finished

    async def _exchange(
        self, info: TensorInfo, pieces: list[Share], piece: OutputTensor | None, into: OutputTensor | None
    ) -> OutputTensor | None:
        """Send our piece of one tensor to the ranks that asked for it and receive the others' into ``into``;
        returns the whole tensor if this rank asked for it."""
        receivers = self.asked_by[info.name]
        asked = self.rank in receivers
        full = piece if piece is not None and pieces[0].whole else into
        if info.nbytes:
            for share in pieces:
                source = share.rank
                if self.rank != source and not asked:
                    continue  # a point-to-point exchange that does not involve us
                if self.rank == source:
                    assert piece is not None
                    buffer = piece.buffer
                    if full is not None and full is not piece:  # our rows of a split tensor we also keep
                        ours = full.buffer[_byte_range(share, info, pieces)]
                        if ours.data_ptr() != buffer.data_ptr():  # they did not land in place (fetch)
                            await off_loop(ours.copy_, buffer)
                else:
                    assert full is not None
                    buffer = full.buffer[_byte_range(share, info, pieces)]
                args = (buffer, source, receivers, self.rank, self.world, self.ranks.group)
                await self.ranks.collective(_transfer, *args)
        return full if asked else None

    def _check_backend(self) -> None:
        if self.ranks.backend == "nccl" and self.device.type != "cuda":
            raise ValueError(
                f"{self.checkpoint.url}: the process group uses NCCL, which moves GPU tensors only, but "
                f"device={self.device}; load to this rank's GPU or pass a gloo group"
            )

    def _settings(self) -> tuple[int, int, bool, str]:
        """What decides the plan and the collective calls: it must be the same on every rank."""
        config = self.checkpoint.engine.config
        return config.part_size, config.max_inflight_bytes, bool(self.verify), self.device.type

    def _check_same(self, values: list[Any], what: str) -> None:
        if any(value != values[0] for value in values):
            detail = "; ".join(f"rank {r}: {v}" for r, v in enumerate(values))
            raise ValueError(f"{self.checkpoint.url}: the ranks differ in {what} ({detail}); they must agree")

    def _raise_if_failed(self, errors: list[Failure | None]) -> None:
        """Raise on every rank if any failed: the first failed rank's error, of its own class and fields
        (a ``TensorNotFoundError`` stays one), its message naming every failed rank."""
        failed = [(rank, failure) for rank, failure in enumerate(errors) if failure is not None]
        if failed:
            url = self.checkpoint.url
            detail = "; ".join(f"rank {rank}: {failure}" for rank, failure in failed)
            raise failed[0][1].rebuild(f"{url}: the distributed load failed on {len(failed)} rank(s) ({detail})")


def _fingerprint(file: RemoteFile) -> tuple[int, str, str | None]:
    """What identifies the version of a file a rank read: size, header digest, and the store's version."""
    version = file.source.version if file.source.version_is_global else None
    return file.header.file_size, hashlib.sha256(file.header_bytes()).hexdigest()[:16], version


def _byte_range(share: Share, info: TensorInfo, pieces: list[Share]) -> slice:
    """Where ``share``'s rows lie in the tensor's flat bytes."""
    if share.whole:
        return slice(None)
    row_bytes = info.nbytes // pieces[-1].stop  # split tensors have rows of whole bytes (see shares)
    return slice(share.start * row_bytes, share.stop * row_bytes)


def _region(share: Share) -> Region | None:
    return None if share.whole else Region(0, share.start, share.stop)


# Builtins a rank's failure keeps across ranks (others become FetchError); stream_st's errors keep their class.
_BUILTINS: dict[str, type[Exception]] = {
    cls.__name__: cls for cls in (FileNotFoundError, PermissionError, IsADirectoryError, TimeoutError, ValueError)
}


@dataclass(frozen=True)
class Failure:
    """A rank's error as the ranks exchange it (picklable, whatever the exception held): its class, its
    message and stream_st's fields, so that every rank raises the same class."""

    kind: str
    message: str
    url: str | None = None
    tensor: str | None = None
    start: int | None = None
    end: int | None = None

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"

    def rebuild(self, message: str) -> Exception:
        cls = getattr(errors, self.kind, None)
        if isinstance(cls, type) and issubclass(cls, StreamSTError):
            return cls(message, url=self.url or None, tensor=self.tensor, start=self.start, end=self.end)
        builtin = _BUILTINS.get(self.kind)
        return builtin(message) if builtin is not None else FetchError(message, url=self.url)


def _describe(exc: BaseException) -> Failure:
    if isinstance(exc, StreamSTError):
        return Failure(type(exc).__name__, str(exc), exc.url, exc.tensor, exc.start, exc.end)
    return Failure(type(exc).__name__, str(exc))


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
