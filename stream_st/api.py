"""The public loading functions, mirroring ``safetensors.torch``, each with an ``*_async`` twin."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Mapping
from functools import partial
from typing import Any

import torch

from ._loop import close_soon, issuing_warnings, off_loop, run_sync
from .arguments import Device, cast_target, path_or_url, to_device, with_backend, within
from .config import Config, resolve
from .distributed import Ranks, SplitLoad
from .fetch import Engine, Stats
from .header import Header
from .integrity import VerifyOption
from .location import redact
from .modules import apply_state, tied_groups
from .parallel import RegionOf, TensorParallel, load_raw, whole, with_regions
from .progress import Progress, ProgressOption, make_progress
from .remote import RemoteFile, fetch_header
from .select import Selection
from .shards import Checkpoint, open_checkpoint
from .sinks import OutputTensor
from .verifier import check_option

logger = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def open_engine(url: str, config: Config, stats: Stats | None = None) -> AsyncIterator[Engine]:
    """An engine for one load, closed on exit; logs one summary line per load."""
    engine = Engine(config, stats)
    started = time.perf_counter()
    try:
        yield engine
    finally:
        engine.close()
        seconds = time.perf_counter() - started
        stats = engine.stats
        logger.debug(
            "%s: %d bytes in %d requests (%d retries), %.3fs, %.2f GB/s",
            redact(url),
            stats.bytes,
            stats.requests,
            stats.retries,
            seconds,
            stats.bytes / seconds / 1e9 if seconds else 0.0,
        )


@contextlib.asynccontextmanager
async def open_remote(url: str, config: Config, storage_options: Mapping[str, Any] | None) -> AsyncIterator[RemoteFile]:
    """One opened safetensors file and its engine, both closed on exit."""
    async with open_engine(url, config) as engine:
        file = await RemoteFile.open(url, engine, storage_options)
        try:
            yield file
        finally:
            file.close()


@contextlib.asynccontextmanager
async def open_files(
    url: str,
    config: Config,
    storage_options: Mapping[str, Any] | None,
    stats: Stats | None = None,
    device: torch.device | None = None,
) -> AsyncIterator[Checkpoint]:
    """The checkpoint at ``url`` (a file, an index or a folder) and its engine, closed on exit. For a GPU
    ``device``, the pinned slot pool is filled on a worker thread while the headers are read."""
    async with open_engine(url, config, stats) as engine:
        if device is not None and device.type == "cuda":
            warm_pool(engine, device)
        checkpoint = await open_checkpoint(url, engine, storage_options)
        try:
            yield checkpoint
        finally:
            checkpoint.close()


async def _load_located(
    located: Mapping[RemoteFile, list[str]],
    device: Device,
    dtype: torch.dtype | None,
    verify: VerifyOption,
    progress: Progress | None,
) -> dict[str, torch.Tensor]:
    """Fetch every group concurrently (one engine), return tensors shard by shard in file order."""
    return await finished(
        await load_raw(with_regions(located), to_device(device), verify, progress=progress), device, dtype
    )


def _ranks(process_group: Any, device: Device) -> Ranks | None:
    """The group a split-and-exchange load runs over (``True``: the default group), or None."""
    if process_group is None:
        return None
    return Ranks(None if process_group is True else process_group, to_device(device))


@contextlib.asynccontextmanager
async def _together(ranks: Ranks | None) -> AsyncIterator[None]:
    """Around a whole load: a rank that fails before the ranks first meet still meets them, with its error."""
    try:
        yield
    except Exception as exc:
        if ranks is not None:
            await ranks.share_early_failure(exc)
        raise
    finally:
        if ranks is not None:
            ranks.close()


async def _split(
    checkpoint: Checkpoint,
    ranks: Ranks,
    tensors: Selection,
    device: Device,
    dtype: torch.dtype | None,
    verify: VerifyOption,
    progress: ProgressOption,
    region_of: RegionOf = whole,
) -> dict[str, torch.Tensor]:
    """Everything asked for, split and exchanged; this rank's slices (``region_of``) fetched by itself.
    The progress bar counts the bytes this rank downloads."""
    split = SplitLoad(checkpoint, ranks, verify)
    await split.agree(tensors, region_of)
    total = split.share_bytes(split.union) + total_bytes({f: [n for n, _ in w] for f, w in split.alone.items()})
    with reporting(checkpoint, total, progress) as counter:
        fetched = await split.fetch(split.union, with_own_slices=True, progress=counter)
        return await split.exchange(split.union, fetched, lambda outputs: finished(outputs, device, dtype))


async def finished(
    outputs: Mapping[str, OutputTensor], device: Device, dtype: torch.dtype | None
) -> dict[str, torch.Tensor]:
    """Each output as its typed tensor on ``device`` (``finish``), the GPU work settled: on a worker thread,
    as a cast of many GiB takes seconds, during which the IO loop keeps serving the other loads."""
    return await off_loop(_finish_all, outputs, device, dtype)


def _finish_all(
    outputs: Mapping[str, OutputTensor], device: Device, dtype: torch.dtype | None
) -> dict[str, torch.Tensor]:
    tensors = {name: finish(out, device, dtype) for name, out in outputs.items()}
    settle(device)
    return tensors


def warm_pool(engine: Engine, device: torch.device) -> None:
    """Pin the shared slot pool in the background: pinning costs ~0.6 s per GiB and, left to the first
    parts, it delayed a fresh process's first GPU load (0.83 of the link's speed against 1.10 warm)."""
    from .gpu import shared_pool

    config = engine.config
    pool = shared_pool(config.part_size, config.pinned_pool_bytes, pinned=True)
    if pool.allocated < pool.count:
        filling = asyncio.ensure_future(engine.run(use_device_and_fill, device, pool))
        filling.add_done_callback(lambda done: done.cancelled() or done.exception())  # a load's acquire says why


def use_device_and_fill(device: torch.device, pool: Any) -> None:
    from .gpu import use_device

    use_device(device)
    pool.fill()


def settle(device: Device) -> None:
    """Wait until the GPU work of a load (casts, small copies, transfers between ranks) is done: it was
    queued on stream_st's own threads, and the caller may read the tensors on a stream of its own."""
    target = to_device(device)
    if target.type == "cuda":
        torch.cuda.synchronize(target)


def total_bytes(located: Mapping[RemoteFile, list[str]]) -> int:
    return sum(file.info(name).nbytes for file, names in located.items() for name in names)


@contextlib.contextmanager
def reporting(checkpoint: Checkpoint, total: int, option: ProgressOption) -> Iterator[Progress | None]:
    """This load's counter of ``total`` bytes landing, reported as ``option`` asks (see
    ``progress.make_progress``); handed down the load's calls, never stored where another load sees it."""
    progress = make_progress(option, total, checkpoint.url.rsplit("/", 1)[-1])
    try:
        yield progress
    finally:
        if progress is not None:
            progress.close()


def check_verify(checkpoint: Checkpoint, verify: VerifyOption) -> None:
    """Reject a malformed digest, or one digest for many files, before anything is downloaded."""
    check_option(verify, checkpoint.url, len(checkpoint.shards) if checkpoint.sharded else None)


def finish(host: OutputTensor, device: Device, dtype: torch.dtype | None) -> torch.Tensor:
    """The typed tensor on ``device`` (already there after a staged load), floating-point tensors cast to
    ``dtype`` there (on the GPU for a GPU load, never on the host first). Packed 4-bit floats (F4) keep
    their dtype, as integer tensors do: two values share a byte, and torch has no cast for them."""
    tensor = host.tensor()
    target = to_device(device)
    if tensor.device != target:
        tensor = tensor.to(target)
    if dtype is not None and tensor.is_floating_point() and tensor.dtype not in (dtype, *_PACKED):
        tensor = tensor.to(dtype)
    return tensor


_PACKED = tuple(getattr(torch, name) for name in ("float4_e2m1fn_x2",) if hasattr(torch, name))


async def read_header_async(
    url: str | os.PathLike[str],
    *,
    storage_options: Mapping[str, Any] | None = None,
    config: Config | None = None,
    **options: Any,
) -> Header:
    """Fetch and validate only the header of ``url`` (one ranged GET for ordinary files).

    Returns:
        The [`Header`]: tensors in file order with dtype, shape and absolute byte spans; metadata; sizes.
    """
    url = path_or_url(url)
    cfg = resolve(config, options)

    async def read() -> Header:
        async with open_engine(url, cfg) as engine:
            return await fetch_header(url, engine, storage_options)

    return await within(cfg.timeout, f"{redact(url)}: read_header", read())


def read_header(
    url: str | os.PathLike[str],
    *,
    storage_options: Mapping[str, Any] | None = None,
    config: Config | None = None,
    **options: Any,
) -> Header:
    """Sync twin of [`read_header_async`]."""
    return run_sync(read_header_async(url, storage_options=storage_options, config=config, **options))


async def load_file_async(
    url: str | os.PathLike[str],
    device: Device = "cpu",
    *,
    tensors: Selection = None,
    dtype: torch.dtype | str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    config: Config | None = None,
    progress: ProgressOption = None,
    stats: Stats | None = None,
    verify: VerifyOption = None,
    tensor_parallel: TensorParallel | None = None,
    process_group: Any = None,
    backend: str | None = None,
    **options: Any,
) -> dict[str, torch.Tensor]:
    """Load the tensors of a safetensors checkpoint at ``url``, fetching only the bytes needed.

    Args:
        url: a ``.safetensors`` file, a ``model.safetensors.index.json``, or a folder / prefix / repo holding
            either, as any fsspec URL (``https://``, ``s3://``, ``gs://``, ``hf://``, ``memory://``) or local path.
            Shards share one engine and are read only if they hold selected tensors.
        device: where the tensors go (``"cpu"``, ``"cuda:0"``, an int GPU index, a ``torch.device``).
        tensors: which tensors: None for all, or names, glob patterns, compiled regexes or a predicate.
        dtype: cast floating-point tensors to this dtype; other tensors keep theirs.
        storage_options: passed unchanged to fsspec (credentials, endpoints); for http(s), ``headers``.
        config: a [`Config`]; any of its fields can also be given as a keyword argument.
        progress: None shows a progress bar on a terminal when the load lasts more than a second; True
            always, False never; a callable is called as ``callback(bytes_done, bytes_total)`` (from worker
            threads, at most ten times a second and once at the end).
        tensor_parallel: a [`TensorParallel`]: fetch only this rank's chunk of the tensors its plan splits
            (rows for dim 0, columns for dim 1; other tensors whole).
        process_group: a torch.distributed group (or True for the default one): every rank of it calls
            ``load_file`` together; each fetches a disjoint, balanced share of the tensors the ranks asked for
            (huge tensors split between rows) and the pieces are then exchanged (NCCL for GPU tensors, gloo
            for CPU ones), so storage serves each byte once. ``tensor_parallel`` slices are each rank's own.
            A failure on any rank raises on every rank.
        stats: a [`Stats`] that receives this load's requests, bytes received and retries.
        verify: check the bytes before returning them. ``True``: a whole file against the digest its store
            publishes (the Hub's LFS sha256, S3's full-object ChecksumSHA256/CRC32, GCS's md5Hash) or a
            ``<file>.sha256.json`` sidecar, hashed in order while later parts download; a partial load
            against the sidecar's per-tensor digests, or with an ``IntegrityWarning`` if there is none.
            ``"strict"``: the same, but an unverifiable load raises. ``"sha256:<hex>"``: the caller's digest
            of the (single) file. A mismatch raises ``IntegrityError`` and returns no tensors.

    Returns:
        ``dict[name, Tensor]`` in file order, equal bit for bit to ``safetensors.torch.load_file``.

    Raises:
        HeaderError: the header breaks a format rule or disagrees with the object's size.
        TensorNotFoundError: a requested name or pattern matches nothing (the closest names are suggested).
        FetchError: bytes could not be fetched after retries (subclasses say why).
        FileNotFoundError, PermissionError: from the storage layer, with the URL.

    Example:
        >>> state = stream_st.load_file("https://host/model.safetensors", tensors=["model.layers.0.*"])
    """
    url, dtype, cfg = path_or_url(url), cast_target(dtype), resolve(config, options)
    cfg = with_backend(cfg, backend)

    async def load() -> dict[str, torch.Tensor]:
        ranks = _ranks(process_group, device)
        async with _together(ranks), open_files(url, cfg, storage_options, stats, to_device(device)) as checkpoint:
            check_verify(checkpoint, verify)
            region_of = tensor_parallel.region if tensor_parallel else whole
            if ranks is not None:
                return await _split(checkpoint, ranks, tensors, device, dtype, verify, progress, region_of)
            located = await checkpoint.locate(tensors)
            with reporting(checkpoint, total_bytes(located), progress) as counter:
                requests = with_regions(located, region_of)
                outputs = await load_raw(requests, to_device(device), verify, progress=counter)
                return await finished(outputs, device, dtype)

    return await issuing_warnings(within(cfg.timeout, f"{redact(url)}: load", load()))


def load_file(
    url: str | os.PathLike[str],
    device: Device = "cpu",
    *,
    tensors: Selection = None,
    dtype: torch.dtype | str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    config: Config | None = None,
    progress: ProgressOption = None,
    stats: Stats | None = None,
    verify: VerifyOption = None,
    tensor_parallel: TensorParallel | None = None,
    process_group: Any = None,
    backend: str | None = None,
    **options: Any,
) -> dict[str, torch.Tensor]:
    """Sync twin of [`load_file_async`]: ``load_file(url, device="cpu", *, tensors=None, dtype=None, ...)``."""
    device = to_device(device)  # on the caller's thread (see to_device)
    return run_sync(
        load_file_async(
            url,
            device,
            tensors=tensors,
            dtype=dtype,
            storage_options=storage_options,
            config=config,
            progress=progress,
            stats=stats,
            verify=verify,
            tensor_parallel=tensor_parallel,
            process_group=process_group,
            backend=backend,
            **options,
        )
    )


async def iter_tensors_async(
    url: str | os.PathLike[str],
    device: Device = "cpu",
    *,
    tensors: Selection = None,
    dtype: torch.dtype | str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    config: Config | None = None,
    progress: ProgressOption = None,
    stats: Stats | None = None,
    verify: VerifyOption = None,
    process_group: Any = None,
    backend: str | None = None,
    **options: Any,
) -> AsyncGenerator[tuple[str, torch.Tensor], None]:
    """Yield ``(name, tensor)`` in file order while later tensors download, with bounded memory.

    Tensors are fetched in batches of about ``max_inflight_bytes``; the next batch downloads while the
    caller consumes the current one, so at most about two batches are held at once (a tensor larger than
    the budget forms a batch of its own). The first batch is one part (``part_size``) long, so the first
    tensor arrives as soon as possible. With ``process_group=`` (see [`load_file_async`]) every batch is
    split between the ranks and exchanged; every rank must then consume the whole iterator. With
    ``timeout=``, each step (the wait for the next tensor) must finish within it.
    """
    url, dtype, cfg = path_or_url(url), cast_target(dtype), resolve(config, options)
    cfg = with_backend(cfg, backend)
    steps = _iterate(url, device, tensors, dtype, storage_options, cfg, progress, stats, verify, process_group)
    issued: set[str] = set()  # each warning once per iteration, not once per batch
    try:
        while True:
            try:
                step = within(cfg.timeout, f"{redact(url)}: the next tensor", steps.__anext__())
                item = await issuing_warnings(step, issued)
            except StopAsyncIteration:
                return
            yield item
    finally:
        await steps.aclose()


async def _iterate(
    url: str,
    device: Device,
    tensors: Selection,
    dtype: torch.dtype | None,
    storage_options: Mapping[str, Any] | None,
    cfg: Config,
    progress: ProgressOption,
    stats: Stats | None,
    verify: VerifyOption,
    process_group: Any,
) -> AsyncGenerator[tuple[str, torch.Tensor], None]:
    """The body of [`iter_tensors_async`], its arguments checked."""
    ranks = _ranks(process_group, device)
    async with (
        _together(ranks),
        open_files(url, cfg, storage_options, stats, to_device(device)) as checkpoint,
        contextlib.AsyncExitStack() as stack,
    ):
        check_verify(checkpoint, verify)
        # Each batch starts ahead, while the caller consumes the one before. A split load only fetches its
        # share ahead; its collectives run when the batch's turn comes, inside this generator's own step,
        # never in the background while the caller may run collectives of its own.
        split = SplitLoad(checkpoint, ranks, verify) if ranks is not None else None
        if split is not None:
            await split.agree(tensors)
            located: Mapping[RemoteFile, list[str]] = split.union
        else:
            located = await checkpoint.locate(tensors)
            for file, names in located.items():
                if len(names) == len(file.header):
                    file.verifier.read_in_batches()

        batches = _batches(located, cfg.max_inflight_bytes, min(cfg.part_size, cfg.max_inflight_bytes))
        total = sum(split.share_bytes(b) for b in batches) if split is not None else total_bytes(located)
        counter = stack.enter_context(reporting(checkpoint, total, progress))

        def begin(batch: Mapping[RemoteFile, list[str]]) -> asyncio.Future[Any]:
            if split is not None:
                return asyncio.ensure_future(split.fetch(batch, progress=counter))
            return asyncio.ensure_future(_load_located(batch, device, dtype, verify, counter))

        ahead: asyncio.Future[Any] | None = None
        try:
            for index, batch in enumerate(batches):
                started = await (ahead if ahead is not None else begin(batch))
                ahead = begin(batches[index + 1]) if index + 1 < len(batches) else None
                loaded: dict[str, torch.Tensor] = started
                if split is not None:
                    loaded = await split.exchange(batch, started, lambda outputs: finished(outputs, device, dtype))
                for name in list(loaded):
                    yield name, loaded.pop(name)
        finally:
            if ahead is not None:
                ahead.cancel()
                with contextlib.suppress(BaseException):
                    await ahead


def _batches(
    located: Mapping[RemoteFile, list[str]], budget: int, first_budget: int
) -> list[dict[RemoteFile, list[str]]]:
    """Consecutive groups of about ``budget`` bytes (a larger tensor forms a group of its own). The first
    group holds only about ``first_budget`` bytes, so the first tensor arrives after one part, not one
    full batch (cold starts: time to first tensor = header round trip + one part)."""
    batches: list[dict[RemoteFile, list[str]]] = []
    size = 0
    for file, names in located.items():
        for name in names:
            nbytes = file.info(name).nbytes
            limit = first_budget if len(batches) == 1 else budget
            if not batches or (size and size + nbytes > limit):
                batches.append({})
                size = 0
            batches[-1].setdefault(file, []).append(name)
            size += nbytes
    return batches


def iter_tensors(
    url: str | os.PathLike[str],
    device: Device = "cpu",
    *,
    tensors: Selection = None,
    dtype: torch.dtype | str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    config: Config | None = None,
    progress: ProgressOption = None,
    stats: Stats | None = None,
    verify: VerifyOption = None,
    process_group: Any = None,
    backend: str | None = None,
    **options: Any,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Sync twin of [`iter_tensors_async`]; closing the iterator early cancels what is in flight."""
    device = to_device(device)  # on the caller's thread (see to_device)
    agen = iter_tensors_async(
        url,
        device,
        tensors=tensors,
        dtype=dtype,
        storage_options=storage_options,
        config=config,
        progress=progress,
        stats=stats,
        verify=verify,
        process_group=process_group,
        backend=backend,
        **options,
    )
    try:
        while True:
            try:
                yield run_sync(agen.__anext__())
            except StopAsyncIteration:
                return
    finally:
        close_soon(agen.aclose())


async def load_model_async(
    model: torch.nn.Module,
    url: str | os.PathLike[str],
    strict: bool = True,
    device: Device = "cpu",
    *,
    assign: bool = False,
    dtype: torch.dtype | str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    config: Config | None = None,
    progress: ProgressOption = None,
    stats: Stats | None = None,
    verify: VerifyOption = None,
    process_group: Any = None,
    backend: str | None = None,
    **options: Any,
) -> tuple[list[str], list[str]]:
    """Load a checkpoint into ``model`` like ``safetensors.torch.load_model``, fetching only its tensors.

    Tensors the model has no use for are not downloaded (they are still reported as unexpected). Tied
    parameters (one object under several names, such as ``lm_head.weight`` and ``embed.weight``) are
    handled as safetensors does: a name missing from the file but tied to one present is not missing, and
    a file that stores several of them is loaded once (its copies must be equal) and shared.
    With ``assign=True`` (for a model built on the ``meta`` device) the loaded tensors replace the
    parameters and tied names are re-tied to the replacement; non-persistent buffers are recomputed for a
    transformers model (see ``stream_st.modules``), and nothing may be left on ``meta``.

    Returns:
        ``(missing, unexpected)``: model names the file did not set, file names the model does not have.

    Raises:
        ModelLoadError: a ``RuntimeError``: ``strict`` and some names are missing or unexpected (safetensors'
            message), tied copies differ, or a parameter or buffer would stay on ``meta``.
    """
    url, dtype, cfg = path_or_url(url), cast_target(dtype), resolve(config, options)
    cfg = with_backend(cfg, backend)

    async def load() -> tuple[list[str], list[str]]:
        # Walking a module of many thousand tensors, and load_state_dict's copies, happen on a worker thread.
        model_keys, groups = await off_loop(_model_names, model)
        ranks = _ranks(process_group, device)
        async with _together(ranks), open_files(url, cfg, storage_options, stats, to_device(device)) as checkpoint:
            in_file = await checkpoint.names()
            check_verify(checkpoint, verify)
            if ranks is not None:
                state = await _split(checkpoint, ranks, model_keys.__contains__, device, dtype, verify, progress)
            else:
                located = await checkpoint.locate(lambda name: name in model_keys)
                with reporting(checkpoint, total_bytes(located), progress) as counter:
                    state = await _load_located(located, device, dtype, verify, counter)
        return await off_loop(
            partial(apply_state, strict=strict, assign=assign, device=to_device(device), url=url),
            model,
            state,
            in_file,
            groups,
        )

    return await issuing_warnings(within(cfg.timeout, f"{redact(url)}: load_model", load()))


def _model_names(model: torch.nn.Module) -> tuple[set[str], list[list[str]]]:
    """The names of ``model``'s state, and its groups of tied names."""
    return set(model.state_dict().keys()), tied_groups(model)


def load_model(
    model: torch.nn.Module,
    url: str | os.PathLike[str],
    strict: bool = True,
    device: Device = "cpu",
    *,
    assign: bool = False,
    dtype: torch.dtype | str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    config: Config | None = None,
    progress: ProgressOption = None,
    stats: Stats | None = None,
    verify: VerifyOption = None,
    process_group: Any = None,
    backend: str | None = None,
    **options: Any,
) -> tuple[list[str], list[str]]:
    """Sync twin of [`load_model_async`]."""
    device = to_device(device)  # on the caller's thread (see to_device)
    return run_sync(
        load_model_async(
            model,
            url,
            strict,
            device,
            assign=assign,
            dtype=dtype,
            storage_options=storage_options,
            config=config,
            progress=progress,
            stats=stats,
            verify=verify,
            process_group=process_group,
            backend=backend,
            **options,
        )
    )
