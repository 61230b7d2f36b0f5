"""The fetch engine: ranged requests scheduled from asyncio, bytes read on worker threads.

Control stays in asyncio (what to fetch next, at most ``max_concurrency`` requests in flight, first error
cancels the rest) while the bulk bytes move on a thread pool with blocking ``readinto`` straight into
destination memory, ~10× faster than reading through an event loop (measured: docs/ARCHITECTURE.md §5).
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
from collections.abc import Callable, Hashable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from .config import Config
from .errors import FetchError, IncompleteReadError
from .location import redact_text
from .plan import Part, Want, plan_parts
from .progress import Progress
from .sources import ByteStream, Probe, Source
from .transport import TRANSIENT_ERRORS, ConnectionPool, RetryableStatusError

if TYPE_CHECKING:  # torch is not imported for host loads and prefetches
    from .gpu import DeviceStaging

logger = logging.getLogger(__name__)

T = TypeVar("T")
Destination = Callable[[Hashable], memoryview]

# Bytes per readinto call: small enough to notice a cancel quickly, large enough to cost nothing.
_CHUNK = 8 << 20
_GAP_SCRATCH = 1 << 20
_FIRST_CONTACT_TIMEOUTS = 2  # attempts at the header read of a host that does not answer
_UNREACHABLE = (TimeoutError, ConnectionRefusedError)  # at first contact: a host down or silent, not a hiccup
_RETRYABLE: tuple[type[BaseException], ...] = (*TRANSIENT_ERRORS, IncompleteReadError)


class LoadCancelledError(Exception):
    """Raised inside a worker when the load it serves has failed or was cancelled."""


@dataclass
class Stats:
    """What a load did: requests sent, bytes received (header reads and gap bytes included), retries.

    Pass one as ``stats=`` to a loading function to have it filled; updated from worker threads."""

    requests: int = 0
    bytes: int = 0
    retries: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, *, requests: int = 0, nbytes: int = 0, retries: int = 0) -> None:
        with self._lock:
            self.requests += requests
            self.bytes += nbytes
            self.retries += retries


@dataclass(frozen=True)
class Position:
    """Where a request stands, for messages: the tensor being filled, the range, the next byte wanted."""

    tensor: str | None
    start: int
    end: int
    position: int

    def __str__(self) -> str:
        where = f"bytes {self.start}-{self.end - 1}"
        return f"tensor {self.tensor!r}, {where}" if self.tensor else where


class Engine:
    """Worker threads, keep-alive connections and counters shared by every file of one load."""

    def __init__(self, config: Config, stats: Stats | None = None) -> None:
        self.config = config
        self.pool = ConnectionPool(
            connect_timeout=config.connect_timeout, read_timeout=config.stall_timeout, min_speed=config.min_speed
        )
        self.stats = stats if stats is not None else Stats()
        self._executor = ThreadPoolExecutor(max_workers=config.max_concurrency, thread_name_prefix="stream_st")
        self._scratch = threading.local()

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """Run a blocking call on the worker threads."""
        return await asyncio.wrap_future(self._executor.submit(fn, *args))

    def close(self) -> None:
        # Every fetch has awaited its parts by now, so the threads are idle; waiting for them to exit
        # would block the event loop (and deadlock if one were in a finalizer waiting on that loop).
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.pool.close()

    async def fetch(
        self,
        source: Source,
        wants: Iterable[Want],
        destination: Destination,
        landed: Callable[[int, int], None] | None = None,
        staging: DeviceStaging | None = None,
        max_gap: int | None = None,
        progress: Progress | None = None,
    ) -> None:
        """Fetch every wanted span of ``source`` into ``destination(key)``, all or nothing.

        ``landed(start, end)`` is called from the worker thread as each part has fully arrived. With
        ``staging``, parts go through pinned slots to device tensors instead (``destination`` unused).
        ``max_gap`` overrides the config's (0: never read bytes between spans, which a prefetch holds).
        ``progress`` counts the wanted bytes as they land (the load's own counter: engines can be shared)."""
        config = self.config
        part_size = min(config.part_size, staging.pool.slot_bytes) if staging else config.part_size
        if source.ranges:
            gap = config.max_gap if max_gap is None else max_gap
            parts = plan_parts(wants, max_gap=gap, part_size=part_size)
        else:  # the server ignores Range: one streamed GET from byte 0 covers everything
            assert source.size is not None
            parts = plan_parts(wants, max_gap=source.size, part_size=source.size + 1)
        cancelled = threading.Event()
        into = _Into(destination, cancelled, landed, staging, progress)
        pending: set[asyncio.Future[None]] = set()
        try:
            for part in parts:
                while len(pending) >= config.max_concurrency:
                    pending = await _reap(pending, asyncio.FIRST_COMPLETED)
                work = self._executor.submit(self._fetch_part, source, part, into)
                pending.add(asyncio.wrap_future(work))
            while pending:  # the first failure surfaces at once, not after the other parts finish
                pending = await _reap(pending, asyncio.FIRST_EXCEPTION)
        except BaseException:
            cancelled.set()  # workers stop at their next chunk; wait so no thread writes after we return
            self.pool.abort(cancelled)  # and those blocked on a silent socket stop now
            if pending:
                await asyncio.wait(pending)
                for future in pending:  # consumed: the first error is the one that propagates
                    if not future.cancelled():
                        future.exception()
            raise

    async def probe(self, source: Source, length: int | None = None) -> Probe:
        """The source's first ``length`` bytes (default ``header_prefetch``), size and version, retried like
        any range. A cancel (``timeout=``, Ctrl-C) shuts its socket and waits for its thread, as ``fetch`` does."""
        length = self.config.header_prefetch if length is None else length
        cancelled = threading.Event()
        work = self._executor.submit(
            self._retrying,
            source,
            lambda: source.probe(length),
            cancelled,
            lambda: Position(None, 0, length, 0),
            True,
        )
        waiting = asyncio.wrap_future(work)
        try:
            probe: Probe = await asyncio.shield(waiting)
        except BaseException:
            cancelled.set()
            self.pool.abort(cancelled)
            if not waiting.done():  # an HTTP probe returns at once; an fsspec call is waited for, within bounds
                await asyncio.wait({waiting}, timeout=self.config.stall_timeout)
            if waiting.done() and not waiting.cancelled():
                waiting.exception()  # consumed: the error that propagates is the first one
            raise
        self.stats.add(requests=1, nbytes=len(probe.prefix))
        return probe

    def _fetch_part(self, source: Source, part: Part, into: _Into) -> None:
        """Read one part (straight into its destinations, or into a pinned slot then to the device)."""
        staging, cancelled = into.staging, into.cancelled
        if staging is None:
            self._read_part(source, _PartReader(part, into.destination, self._gap_scratch(), cancelled, into.progress))
        else:
            from .gpu import SlotWaitCancelledError

            staging.enter_thread()
            try:
                slot = staging.pool.acquire(cancelled)
            except SlotWaitCancelledError:
                raise LoadCancelledError() from None
            try:
                staged = staging.staged_part(part)
                self._read_part(source, _PartReader(staged, lambda _: slot.view, self._gap_scratch(), cancelled, None))
                staging.ship(slot, part)
                if into.landed is not None:
                    slot.wait_until_free()  # landed() means "readable on the device": its copy must be done
            finally:
                staging.pool.release(slot)  # its copy may still run: the next user waits on its event
            if into.progress is not None:
                into.progress.advance(sum(piece.size for piece in part.pieces))
        if into.landed is not None:
            into.landed(part.start, part.end)

    def _read_part(self, source: Source, reader: _PartReader) -> None:
        """Fill ``reader``'s part; a retry asks only for the bytes still missing."""
        cancelled, part = reader.cancelled, reader.part

        def attempt() -> None:
            stream = source.open_range(reader.position, part.end)
            before = reader.position
            self.stats.add(requests=1)
            try:
                reader.read(stream, url=source.url)
            finally:
                self.stats.add(nbytes=reader.position - before + getattr(stream, "skipped", 0))
                stream.close(reusable=reader.position == part.end)

        self._retrying(source, attempt, cancelled, reader.where)

    def _retrying(
        self,
        source: Source,
        attempt: Callable[[], T],
        cancelled: threading.Event,
        locate: Callable[[], Position],
        first_contact: bool = False,
    ) -> T:
        """Call ``attempt`` until it succeeds, retrying transient faults with capped, jittered backoff. On
        ``first_contact`` (the header read) a server that times out or refuses is tried twice, not ``retries``
        times: a dead or silent host fails in about 2 × connect_timeout, while a load under way stays patient."""
        failures = 0
        while True:
            if cancelled.is_set():
                raise LoadCancelledError()
            try:
                with self.pool.tagged(cancelled):  # so that a cancel shuts this load's sockets only
                    return attempt()
            except _RETRYABLE as exc:
                failures += 1
                where = locate()
                gave_up = first_contact and failures >= _FIRST_CONTACT_TIMEOUTS and isinstance(exc, _UNREACHABLE)
                if failures > self.config.retries or gave_up:
                    raise _give_up(source.url, where, failures, exc) from exc
                delay = self._backoff(failures, exc)
                logger.warning(
                    "%s: %s: %s; retry %d of %d in %.2fs from byte %d",
                    source.url,
                    where,
                    _describe(exc),
                    failures,
                    self.config.retries,
                    delay,
                    where.position,
                )
                self.stats.add(retries=1)
                if cancelled.wait(delay):
                    raise LoadCancelledError() from exc

    def _backoff(self, attempt: int, exc: BaseException) -> float:
        cap = min(self.config.backoff_max, self.config.backoff_base * 2 ** (attempt - 1))
        delay = random.uniform(0, cap)  # full jitter: retries from many workers do not line up
        hint = getattr(exc, "retry_after", None)
        return (
            max(delay, min(hint, self.config.backoff_max)) if isinstance(exc, RetryableStatusError) and hint else delay
        )

    def _gap_scratch(self) -> memoryview:
        scratch = getattr(self._scratch, "buffer", None)
        if scratch is None:
            scratch = self._scratch.buffer = memoryview(bytearray(_GAP_SCRATCH))
        return scratch


@dataclass(frozen=True)
class _Into:
    """Where the parts of one ``Engine.fetch`` go, and who hears of them: its own, so that loads sharing
    an engine (a ``safe_open`` handle's calls) neither mix their bytes nor their progress."""

    destination: Destination
    cancelled: threading.Event
    landed: Callable[[int, int], None] | None
    staging: DeviceStaging | None
    progress: Progress | None


class _PartReader:
    """Streams one part's bytes into its pieces' destinations; ``position`` is the next byte wanted."""

    def __init__(
        self,
        part: Part,
        destination: Destination,
        scratch: memoryview,
        cancelled: threading.Event,
        progress: Progress | None,
    ) -> None:
        self.part, self.position, self.cancelled = part, part.start, cancelled
        self._destination, self._scratch = destination, scratch
        self._progress = progress

    def where(self) -> Position:
        piece = next((p for p in self.part.pieces if p.end > self.position), self.part.pieces[-1])
        return Position(str(piece.key), self.part.start, self.part.end, self.position)

    def read(self, stream: ByteStream, *, url: str) -> None:
        """Read until the part's end; ``position`` follows every byte that lands, so a body that ends early
        is resumed from its first missing byte, not from the start of the chunk it was reading."""
        for piece in self.part.pieces:
            if piece.end <= self.position:
                continue
            while self.position < piece.start:  # gap bytes between coalesced pieces: read and drop
                gap = self._scratch[: min(len(self._scratch), piece.start - self.position)]
                self._landed(stream.readinto(gap), url)
            target = self._destination(piece.key)
            stop = piece.dest_offset + piece.size
            while self.position < piece.end:
                if self.cancelled.is_set():
                    raise LoadCancelledError()
                begin = piece.dest_offset + self.position - piece.start
                got = stream.readinto(target[begin : min(stop, begin + _CHUNK)])
                self._landed(got, url)
                if self._progress is not None:
                    self._progress.advance(got)

    def _landed(self, got: int, url: str) -> None:
        if not got:
            raise IncompleteReadError(
                f"{url}: body ended at byte {self.position}, before the end of bytes "
                f"{self.part.start}-{self.part.end - 1}",
                url=url,
                start=self.position,
                end=self.part.end,
            )
        self.position += got


async def _reap(pending: set[asyncio.Future[None]], when: str) -> set[asyncio.Future[None]]:
    done, still = await asyncio.wait(pending, return_when=when)
    for future in done:
        future.result()  # the first failure propagates
    return still


def _describe(exc: BaseException) -> str:
    text = redact_text(str(exc))  # in case it holds text a server sent
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _give_up(url: str, where: Position, attempts: int, exc: BaseException) -> FetchError:
    cls = IncompleteReadError if isinstance(exc, IncompleteReadError) else FetchError
    return cls(
        f"{url}: {where}: failed after {attempts} attempts ({where.end - where.position} bytes missing): "
        f"{_describe(exc)}",
        url=url,
        tensor=where.tensor,
        start=where.position,
        end=where.end,
    )
