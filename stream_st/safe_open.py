"""The lazy handle: ``safe_open(url)`` reads the header once, then fetches tensors or slices on demand."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Iterable, Mapping
from types import TracebackType
from typing import Any, TypeVar

import torch

from ._loop import gather_or_cancel, off_loop, run_sync
from .api import check_verify, finish, finished, settle
from .arguments import Device, cast_target, path_or_url, to_device, with_backend, within
from .config import Config, resolve
from .errors import HandleClosedError
from .fetch import Engine
from .header import TensorInfo
from .integrity import VerifyOption
from .location import redact
from .regions import Region
from .remote import RemoteFile
from .shards import Checkpoint, open_checkpoint

Index = Any  # what tensor[...] accepts
T = TypeVar("T")


class AsyncSafeOpen:
    """``async with safe_open_async(url) as f: await f.get_tensor(name)``: the async handle."""

    def __init__(
        self,
        url: str | os.PathLike[str],
        framework: str = "pt",
        device: Device = "cpu",
        *,
        dtype: torch.dtype | str | None = None,
        storage_options: Mapping[str, Any] | None = None,
        config: Config | None = None,
        verify: VerifyOption = None,
        backend: str | None = None,
        **options: Any,
    ) -> None:
        if framework not in ("pt", "torch", "pytorch"):
            raise ValueError(f"framework {framework!r} is not supported; stream_st loads torch tensors ('pt')")
        # Resolved here, on the caller's thread: "cuda" means the GPU current there (see arguments.to_device).
        self._url, self._device, self._dtype = path_or_url(url), to_device(device), cast_target(dtype)
        self._storage_options, self._verify = storage_options, verify
        self._config = with_backend(resolve(config, options), backend)
        self._engine: Engine | None = None
        self._checkpoint: Checkpoint | None = None
        self._names: list[str] = []
        self._metadata: dict[str, Any] | None = None

    async def open(self) -> AsyncSafeOpen:
        """Read and validate the header (done by ``async with``); for an index, read the index only."""
        return await self._within("open", self._open())

    async def _within(self, what: str, awaitable: Awaitable[T]) -> T:
        return await within(self._config.timeout, f"{redact(self._url)}: safe_open {what}", awaitable)

    async def _open(self) -> AsyncSafeOpen:
        if self._checkpoint is None:
            engine = Engine(self._config)
            try:
                checkpoint = await open_checkpoint(self._url, engine, self._storage_options)
                check_verify(checkpoint, self._verify)
                self._names = await checkpoint.names()
                if not checkpoint.sharded:
                    self._metadata = (await checkpoint.file(checkpoint.shards[0])).header.metadata
                else:
                    self._metadata = checkpoint.index_metadata
            except BaseException:
                engine.close()
                raise
            self._engine, self._checkpoint = engine, checkpoint
        return self

    async def __aenter__(self) -> AsyncSafeOpen:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._checkpoint is not None:
            self._checkpoint.close()
            self._checkpoint = None
        if self._engine is not None:
            self._engine.close()
            self._engine = None

    @property
    def checkpoint(self) -> Checkpoint:
        if self._checkpoint is None:
            url = redact(self._url)
            raise HandleClosedError(f"{url}: the handle is closed (use it inside 'with')", url=url)
        return self._checkpoint

    def keys(self) -> list[str]:
        """Tensor names, sorted (as safetensors returns them)."""
        self.checkpoint  # noqa: B018 - raises if closed
        return sorted(self._names)

    def offset_keys(self) -> list[str]:
        """Tensor names in the order of their bytes (shard by shard for sharded checkpoints)."""
        self.checkpoint  # noqa: B018 - raises if closed
        return list(self._names)

    def metadata(self) -> dict[str, Any] | None:
        """The file's ``__metadata__`` (or, for an index, its ``metadata``), or None."""
        self.checkpoint  # noqa: B018 - raises if closed
        return self._metadata

    async def get_tensor(self, name: str) -> torch.Tensor:
        """Fetch one tensor."""
        return (await self.get_tensors([name]))[name]

    async def get_tensors(self, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """Fetch several tensors (None: all of them, in file order) with one plan per file (coalesced,
        concurrent)."""
        return await self._within("get_tensors", self._get_tensors(self.offset_keys() if names is None else names))

    async def _get_tensors(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        wanted = list(names)
        files = [await self.checkpoint.find(name) for name in wanted]
        located: dict[RemoteFile, list[str]] = {}
        for name, file in zip(wanted, files):
            located.setdefault(file, []).append(name)
        device = to_device(self._device)
        loads = await gather_or_cancel(
            *(file.load(((n, None) for n in group), self._verify, device) for file, group in located.items())
        )
        hosts = {name: host for loaded in loads for name, host in loaded.items()}
        return await finished({name: hosts[name] for name in wanted}, self._device, self._dtype)

    async def get_slice(self, name: str) -> AsyncTensorSlice:
        """A lazy view of one tensor: ``(await f.get_slice(name)).read(index)`` fetches what the index needs."""
        file = await self.checkpoint.find(name)
        return AsyncTensorSlice(self, file, file.info(name))


class AsyncTensorSlice:
    """Shape and dtype without I/O; ``read(index)`` fetches the dim-0 rows the index touches."""

    def __init__(self, handle: AsyncSafeOpen, file: RemoteFile, info: TensorInfo) -> None:
        self._handle, self._file, self._info = handle, file, info

    def get_shape(self) -> list[int]:
        return list(self._info.shape)

    def get_dtype(self) -> str:
        return self._info.dtype

    async def read(self, index: Index) -> torch.Tensor:
        return await self._handle._within("get_slice", self._read(index))

    async def _read(self, index: Index) -> torch.Tensor:
        info, handle = self._info, self._handle
        rows, local = covering_rows(info, index)
        region = Region(0, *rows) if rows else None
        hosts = await self._file.load([(info.name, region)], handle._verify, to_device(handle._device))

        def rows_of_index() -> torch.Tensor:  # a cast and a copy of the indexed rows: on a worker thread
            tensor = finish(hosts[info.name], handle._device, handle._dtype)[local].contiguous()
            settle(handle._device)
            return tensor

        return await off_loop(rows_of_index)


def covering_rows(info: TensorInfo, index: Index) -> tuple[tuple[int, int] | None, Index]:
    """The dim-0 rows [start, stop) that ``index`` reads, and the index rebased onto those rows.

    Returns ``(None, index)`` when the whole tensor is needed (0-d tensors, fancy indexing on dim 0).
    An int or a step slice on dim 0 fetches only rows from its first to its last element.
    """
    parts = index if isinstance(index, tuple) else (index,)
    if not info.shape or not parts:
        return None, index
    first, rest = parts[0], parts[1:]
    rows = info.shape[0]
    if isinstance(first, bool) or not isinstance(first, (int, slice)):
        return None, index
    if isinstance(first, int):
        position = first + rows if first < 0 else first
        if not 0 <= position < rows:
            raise IndexError(f"index {first} is out of bounds for dim 0 of {info.name!r} with size {rows}")
        return (position, position + 1), (0, *rest)
    start, stop, step = first.indices(rows)
    if step <= 0:
        raise ValueError(f"slice step must be positive, got {step} (torch does not support negative steps)")
    if stop <= start:
        return (0, 0), (slice(0, 0), *rest)
    last = start + (stop - start - 1) // step * step
    return (start, last + 1), (slice(0, last + 1 - start, step), *rest)


class safe_open:  # noqa: N801 - the name mirrors safetensors.safe_open
    """Open a safetensors file at a URL, as ``safetensors.safe_open`` opens a local one.

    The header is fetched and validated when the handle opens; tensors are fetched on demand. Use it as a
    context manager; keyword arguments as for [`load_file`].

    Example:
        >>> with stream_st.safe_open("https://host/model.safetensors", framework="pt") as f:
        ...     embed = f.get_slice("embed")[1000:2000]
    """

    def __init__(
        self,
        url: str | os.PathLike[str],
        framework: str = "pt",
        device: Device = "cpu",
        *,
        dtype: torch.dtype | str | None = None,
        storage_options: Mapping[str, Any] | None = None,
        config: Config | None = None,
        **options: Any,
    ) -> None:
        self._handle = AsyncSafeOpen(
            url, framework, device, dtype=dtype, storage_options=storage_options, config=config, **options
        )
        run_sync(self._handle.open())

    def __enter__(self) -> safe_open:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._handle.close()

    def keys(self) -> list[str]:
        return self._handle.keys()

    def offset_keys(self) -> list[str]:
        return self._handle.offset_keys()

    def metadata(self) -> dict[str, Any] | None:
        return self._handle.metadata()

    def get_tensor(self, name: str) -> torch.Tensor:
        return run_sync(self._handle.get_tensor(name))

    def get_tensors(self, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """The tensors of ``names`` (None: every tensor), fetched together."""
        return run_sync(self._handle.get_tensors(None if names is None else list(names)))

    def get_slice(self, name: str) -> TensorSlice:
        return TensorSlice(run_sync(self._handle.get_slice(name)))


class TensorSlice:
    """``f.get_slice(name)[index]``: fetches only the dim-0 rows the index touches."""

    def __init__(self, inner: AsyncTensorSlice) -> None:
        self._inner = inner

    def get_shape(self) -> list[int]:
        return self._inner.get_shape()

    def get_dtype(self) -> str:
        return self._inner.get_dtype()

    def __getitem__(self, index: Index) -> torch.Tensor:
        return run_sync(self._inner.read(index))


def safe_open_async(
    url: str | os.PathLike[str],
    framework: str = "pt",
    device: Device = "cpu",
    *,
    dtype: torch.dtype | str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    config: Config | None = None,
    **options: Any,
) -> AsyncSafeOpen:
    """Async twin of [`safe_open`]: ``async with safe_open_async(url) as f: t = await f.get_tensor(name)``."""
    return AsyncSafeOpen(url, framework, device, dtype=dtype, storage_options=storage_options, config=config, **options)
