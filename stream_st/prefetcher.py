"""Move a checkpoint's bytes while the process is still starting (serverless cold starts).

``prefetch(url)`` returns at once. On stream_st's IO loop and worker threads, with the standard library
only (no torch), it reads the checkpoint's index and headers and streams the selected tensors into host
memory: anonymous mmaps, one per batch, each tensor at a 64-byte-aligned offset. A later load of the same
file in the same process (``load_file``, ``iter_tensors``, ``load_model``, ``safe_open``, the integrations)
finds it (held.py), checks that the object is still the version the prefetch read, and takes those bytes
as its output tensors' memory: no second download and, on the host, no copy.

Memory is bounded by ``prefetch_max_bytes``: a batch starts only while the bytes fetched and not yet taken
by a load leave room for it, so a checkpoint larger than the bound pauses until a load takes tensors.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import dataclasses
import logging
import mmap
import os
import sys
import threading
from collections.abc import Callable, Hashable, Iterator, Mapping
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from . import held
from ._loop import gather_or_cancel, get_loop, on_loop_thread
from .config import Config, resolve
from .fetch import Engine, Stats
from .header import TensorInfo
from .location import redact
from .plan import Want
from .remote import RemoteFile
from .select import Selection
from .shards import open_checkpoint

logger = logging.getLogger(__name__)

_ALIGN = 64  # every tensor starts at a multiple of this in its batch: any dtype can view it, cache-line aligned
_MAX_BATCH = 256 << 20  # large enough that batch boundaries cost nothing; small enough to resume promptly
_BATCHES_IN_FLIGHT = 2  # keeps the transfer roughly in file order, which streaming consumers read in
_EXIT_WAIT_S = 1.0
_EARLY_START_CPUS = 4  # below this, starting before torch's import measured slower (Config.early_start)


@dataclass
class _Entry:
    """One tensor being prefetched: where it lands and the future a load waits on."""

    info: TensorInfo
    future: Future[held.Held]


@dataclass
class _File:
    """One opened file of the checkpoint, its held-file registration, and its selected tensors."""

    file: RemoteFile
    held: held.HeldFile
    entries: list[_Entry]


class Prefetch:
    """A checkpoint's bytes moving into host memory in the background, for a later load to take.

    Returned by [`prefetch`]. A failure of the transfer is not raised here: the load that takes the bytes
    raises it (or [`Prefetch.wait`] does). Use it as a context manager, or call [`Prefetch.cancel`], to stop
    the transfer and free what no load took; one never consumed is cancelled at interpreter exit.
    """

    def __init__(self, url: str, tensors: Selection, storage_options: Mapping[str, Any] | None, config: Config) -> None:
        self.url = redact(url)
        self.stats = Stats()
        self._key = held.options_key(storage_options)
        self._resolved = held.resolving(self._key)
        self._budget = config.prefetch_max_bytes or _half_available_memory()
        self._holding = 0  # bytes fetched (or being fetched) that no load has taken yet
        self._lock = threading.Lock()
        self._room: asyncio.Event | None = None
        self._loop = get_loop()
        self._files: list[_File] = []  # while the transfer runs (their futures keep the memory alive)
        self._held: list[held.HeldFile] = []  # until cancelled: what loads may still take
        self._finished = threading.Event()
        self._error: BaseException | None = None
        _watch_exit(self)
        self._task = asyncio.run_coroutine_threadsafe(self._run(url, tensors, storage_options, config), self._loop)

    def done(self) -> bool:
        """Whether the transfer has ended (finished, failed or cancelled)."""
        return self._finished.is_set()

    def wait(self, timeout: float | None = None) -> None:
        """Block until every selected byte is in memory; raise the transfer's error if it failed.

        Raises:
            TimeoutError: still running after ``timeout`` seconds.
        """
        if not self._finished.wait(timeout):
            raise TimeoutError(f"{self.url}: prefetch still running after {timeout}s")
        if self._error is not None:
            raise self._error

    def cancel(self) -> None:
        """Stop the transfer and free every byte no load has taken (a load taking some keeps those).
        Waits until the worker threads have stopped, unless called from stream_st's own IO loop."""
        self._task.cancel()
        for held_file in self._held:
            held_file.drop()
        if not on_loop_thread():
            self._finished.wait(_EXIT_WAIT_S * 5)

    def finish(self, stats: Stats | None = None) -> None:
        """After the load that took this prefetch: add what it transferred to that load's ``stats`` and free
        what it did not take."""
        self.cancel()
        if stats is not None:
            stats.add(requests=self.stats.requests, nbytes=self.stats.bytes, retries=self.stats.retries)

    def __enter__(self) -> Prefetch:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.cancel()

    def __repr__(self) -> str:
        state = "done" if self.done() else "running"
        return f"Prefetch({self.url!r}, {state}, {self.stats.bytes} bytes received)"

    def _taken(self, nbytes: int) -> None:
        """A load took ``nbytes`` (from any thread): they are no longer the prefetch's to hold."""
        with self._lock:
            self._holding -= nbytes
        if self._room is not None:
            self._loop.call_soon_threadsafe(self._room.set)

    async def _run(
        self, url: str, tensors: Selection, storage_options: Mapping[str, Any] | None, config: Config
    ) -> None:
        self._room = asyncio.Event()
        held.prefetching.set(True)  # this task's context only
        engine = Engine(config, self.stats)
        checkpoint = None
        try:
            checkpoint = await open_checkpoint(url, engine, storage_options)
            located = await checkpoint.locate(tensors)
            for file, names in located.items():
                held_file = held.HeldFile(
                    file.requested_url,
                    bytes(file.header_bytes()),
                    file.header.file_size,
                    file.source.version,
                    self._taken,
                )
                entries = [_Entry(file.info(name), held_file.hold(name, file.info(name).nbytes)) for name in names]
                self._files.append(_File(file, held_file, entries))
            self._held = [f.held for f in self._files]
            held.register(self._key, self._held)
            self._resolved.set()
            await self._stream(engine)
        except asyncio.CancelledError:
            # Loads waiting for a tensor fetch it themselves; nothing untaken stays registered.
            self._settle_all(held.PrefetchCancelledError(f"{self.url}: the prefetch was cancelled", url=self.url))
            raise
        except BaseException as exc:
            # Stays registered: the load that takes a tensor raises this, the usual named error.
            logger.debug("%s: prefetch failed: %s", self.url, exc)
            self._error = exc
            self._settle_all(exc)
        finally:
            self._resolved.set()
            if checkpoint is not None:
                checkpoint.close()
            engine.close()
            with _exit_hook:
                _running.discard(self)
            self._files = []  # every future is settled: memory is now held only where a load or the registry keeps it
            self._finished.set()

    def _settle_all(self, error: BaseException) -> None:
        for file in self._files:
            for entry in file.entries:
                _settle(entry.future, error=error)
            if isinstance(error, held.PrefetchCancelledError):
                file.held.drop()

    async def _stream(self, engine: Engine) -> None:
        """Fetch the batches in file order, at most two at a time, each once there is room for it."""
        assert self._room is not None
        running: set[asyncio.Future[None]] = set()
        try:
            for batch in _batches(self._files, max(engine.config.part_size, min(self._budget // 4, _MAX_BATCH))):
                size = sum(_aligned(entry.info.nbytes) for _, entries in batch for entry in entries)
                while self._holding > 0 and self._holding + size > self._budget:
                    self._room.clear()
                    await self._room.wait()
                with self._lock:
                    self._holding += size
                running.add(asyncio.ensure_future(self._fetch_batch(engine, batch, size)))
                while len(running) >= _BATCHES_IN_FLIGHT:
                    done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                    for future in done:
                        future.result()
            await gather_or_cancel(*running)
        finally:
            for future in running:
                future.cancel()
            if running:
                await asyncio.wait(running)

    async def _fetch_batch(self, engine: Engine, batch: list[tuple[_File, list[_Entry]]], size: int) -> None:
        memory: Any = mmap.mmap(-1, size) if size >= mmap.PAGESIZE else bytearray(size)
        if isinstance(memory, mmap.mmap) and hasattr(mmap, "MADV_HUGEPAGE"):
            # 2 MiB pages where the kernel allows them: a 4 KiB page fault per 4 KiB landed is the largest CPU
            # cost of filling fresh memory, and on a few cores it is taken from the imports this overlaps.
            with contextlib.suppress(OSError):
                memory.madvise(mmap.MADV_HUGEPAGE)
        view = memoryview(memory)
        fetches = []
        offset = 0
        for file, entries in batch:
            landing = _Landing(memory)
            wants: list[Want] = []
            for entry in entries:
                info = entry.info
                destination = view[offset : offset + info.nbytes]
                have = max(0, min(info.end, len(file.file.fetched_prefix())) - info.start)
                destination[:have] = file.file.fetched_prefix()[info.start : info.start + have]
                landing.expect(entry, offset, info.nbytes - have)
                if have < info.nbytes:
                    wants.append(Want(info.name, info.start + have, info.end, have))
                offset += _aligned(info.nbytes)
            if wants:
                views = {entry.info.name: view[o : o + entry.info.nbytes] for entry, o in landing.offsets()}
                fetches.append(engine.fetch(file.file.source, wants, _destination(views), landing.landed))
        await gather_or_cancel(*fetches)
        for file, _ in batch:
            await engine.run(file.file.source.check_unchanged)


def _destination(views: Mapping[str, memoryview]) -> Callable[[Hashable], memoryview]:
    return lambda key: views[str(key)]


class _Landing:
    """Marks a batch's tensors of one file ready as the parts covering them land (from worker threads)."""

    def __init__(self, memory: Any) -> None:
        self._memory = memory
        self._starts: list[int] = []
        self._spans: list[tuple[int, int, _Entry, int]] = []  # file start, end, entry, offset in memory
        self._missing: dict[str, int] = {}
        self._lock = threading.Lock()

    def expect(self, entry: _Entry, offset: int, missing: int) -> None:
        self._starts.append(entry.info.start)
        self._spans.append((entry.info.start, entry.info.end, entry, offset))
        self._missing[entry.info.name] = missing
        if not missing:
            _settle(entry.future, held.Held(self._memory, offset, entry.info.nbytes))

    def offsets(self) -> Iterator[tuple[_Entry, int]]:
        return ((entry, offset) for _, _, entry, offset in self._spans)

    def landed(self, start: int, end: int) -> None:
        ready = []
        with self._lock:
            index = max(0, bisect.bisect_right(self._starts, start) - 1)
            while index < len(self._spans) and self._spans[index][0] < end:
                first, last, entry, offset = self._spans[index]
                overlap = min(end, last) - max(start, first)
                if overlap > 0:
                    self._missing[entry.info.name] -= overlap
                    if self._missing[entry.info.name] == 0:
                        ready.append((entry, offset))
                index += 1
        for entry, offset in ready:
            _settle(entry.future, held.Held(self._memory, offset, entry.info.nbytes))


def _settle(future: Future[held.Held], result: held.Held | None = None, *, error: BaseException | None = None) -> None:
    with contextlib.suppress(InvalidStateError):  # already settled: a cancel racing the last part
        if error is not None:
            future.set_exception(error)
        elif result is not None:
            future.set_result(result)


def _batches(files: list[_File], limit: int) -> list[list[tuple[_File, list[_Entry]]]]:
    """Consecutive runs of about ``limit`` bytes, in file order (a larger tensor is a batch of its own)."""
    batches: list[list[tuple[_File, list[_Entry]]]] = []
    size = 0
    for file in files:
        for entry in file.entries:
            nbytes = _aligned(entry.info.nbytes)
            if not batches or (size and size + nbytes > limit):
                batches.append([])
                size = 0
            if not batches[-1] or batches[-1][-1][0] is not file:
                batches[-1].append((file, []))
            batches[-1][-1][1].append(entry)
            size += nbytes
    return batches


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


def _half_available_memory() -> int:
    """Half of MemAvailable (Linux), else of the free physical pages, else 4 GiB."""
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 // 2
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    return 4 << 30


_running: set[Prefetch] = set()
_exit_hook = threading.Lock()
_exit_registered = False


def _watch_exit(prefetch: Prefetch) -> None:
    """Cancel unfinished prefetches at interpreter exit, before concurrent.futures joins worker threads
    (its own exit hook would otherwise wait for every download to finish)."""
    global _exit_registered
    with _exit_hook:
        _running.add(prefetch)
        if not _exit_registered:
            register = getattr(threading, "_register_atexit", None)
            if register is None:  # pragma: no cover - CPython has had it since 3.9
                import atexit

                register = atexit.register
            register(_cancel_all)
            _exit_registered = True


def _cancel_all() -> None:
    with _exit_hook:
        running = [p for p in _running if not p.done()]
        _running.clear()
    for prefetch in running:
        prefetch._task.cancel()
    for prefetch in running:
        prefetch._finished.wait(_EXIT_WAIT_S)


def prefetch(
    url: str,
    *,
    tensors: Selection = None,
    storage_options: Mapping[str, Any] | None = None,
    config: Config | None = None,
    **options: Any,
) -> Prefetch:
    """Start streaming a checkpoint into host memory now, for a later load of the same URL to take.

    Call it at the top of an entry point, before the heavy imports (torch, transformers, a serving
    engine): the network works while they run. It returns at once and imports no torch. A later
    ``load_file``, ``iter_tensors``, ``load_model``, ``safe_open`` or ``from_pretrained`` of the same
    ``url`` with the same ``storage_options``, in this process, takes the prefetched bytes instead of
    downloading them (after checking the object's version: a changed object raises ``ObjectChangedError``)
    and fetches only what the prefetch does not hold.

    Args:
        url: as for [`load_file`]: a file, an index, or a folder / prefix / repo holding either.
        tensors: which tensors to prefetch (None: all), as ``load_file``'s ``tensors=``.
        storage_options, config, options: as for [`load_file`]; ``prefetch_max_bytes`` bounds the host
            memory filled before a load takes it (default: half of the available memory).

    Returns:
        A [`Prefetch`]. Its failure surfaces at the load that consumes it (or at ``Prefetch.wait``).

    Example:
        >>> import stream_st
        >>> early = stream_st.prefetch("s3://bucket/llama/")   # before the heavy imports
        >>> import torch, transformers                          # the bytes move meanwhile
        >>> state = stream_st.load_file("s3://bucket/llama/")   # takes them
    """
    return Prefetch(url, tensors, storage_options, resolve(config, options))


def start_before_torch(url: str, device: Any, options: Mapping[str, Any]) -> Prefetch | None:
    """For ``load_file`` called before torch is imported: a prefetch of what it will load, so the bytes
    move while torch imports; None where that cannot help (torch already imported, a GPU destination,
    which keeps its bounded pinned-slot path, or slices of tensors; ``early_start`` off, or left to the machine
    and it has few CPUs) or the options are for the load to reject."""
    if "torch" in sys.modules or str(device) != "cpu":
        return None
    if options.get("tensor_parallel") is not None or options.get("process_group") is not None:
        return None
    fields = {f.name for f in dataclasses.fields(Config)}
    try:
        config = resolve(options.get("config"), {k: v for k, v in options.items() if k in fields})
        wanted = config.early_start
        if not (wanted if wanted is not None else (os.cpu_count() or 1) >= _EARLY_START_CPUS):
            return None
        return prefetch(
            url, tensors=options.get("tensors"), storage_options=options.get("storage_options"), config=config
        )
    except Exception:  # the load itself reports a bad option, with its own message
        return None
