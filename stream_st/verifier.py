"""The ``verify=`` policy of one file, in one place: which check a load of it gets, where the expected
digest comes from, and what happens to bytes that cannot be checked.

- A load of every tensor (no slices) is hashed in file order as its parts land and compared with a
  whole-file digest: the caller's (``"sha256:<hex>"``), else the one the store publishes, else the
  ``<file>.sha256.json`` sidecar's. A file read whole batch after batch (``iter_tensors``) is hashed
  across its batches and checked as the last one lands, unless a sidecar checks each batch instead.
- A partial load is checked tensor by tensor against the sidecar. Without one, ``verify=True`` warns
  (``IntegrityWarning``, issued once per public call by ``_loop``) and ``"strict"`` raises.
- Slices cannot be checked (digests cover whole tensors): a warning, or an error under ``"strict"``.

One ``Verifier`` per opened file (``RemoteFile.verifier``) keeps what outlives a load: the store's digest
and the sidecar, each fetched at most once, and the hasher of a file read in batches. Hashing runs on the
engine's worker threads, never on the IO loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, TypeVar

from ._loop import warn_caller
from .errors import ConfigError, IntegrityError, IntegrityWarning
from .integrity import (
    SIDECAR_SUFFIX,
    Digest,
    Memory,
    OrderedHasher,
    Sidecar,
    VerifyOption,
    check_tensors,
    parse_digest,
    sidecar_location,
)

if TYPE_CHECKING:  # torch is imported only where tensors are hashed
    from .fetch import Engine
    from .header import Header
    from .sinks import OutputTensor
    from .sources import Source

logger = logging.getLogger(__name__)

T = TypeVar("T")
ReadSmall = Callable[[str], Awaitable[bytes]]  # a small whole object (the sidecar) by URL

_READ_BACK_BYTES = 4 << 20  # device→host chunk when hashing bytes on a GPU: large enough to run at copy speed


def check_option(verify: VerifyOption, url: str, shards: int | None) -> None:
    """Reject a malformed digest, or one digest for a sharded checkpoint (``shards``: its number of files;
    None for a single file), before anything is fetched."""
    if _is_digest(verify):
        assert isinstance(verify, str)
        parse_digest(verify)
        if shards is not None:
            raise ConfigError(
                f"{url}: verify={verify!r} is one digest, but the checkpoint has {shards} files; use verify=True "
                "(each file's published digest or sidecar)"
            )


def _is_digest(verify: VerifyOption) -> bool:
    """Whether ``verify`` is the caller's digest of the file (``"sha256:<hex>"``)."""
    return isinstance(verify, str) and verify != "strict"


class Verifier:
    """How the bytes of one file are checked, across every load of it (see the module's docstring)."""

    def __init__(
        self, source: Source, header: Header, prefix: memoryview, engine: Engine, location: str, read: ReadSmall
    ) -> None:
        self._source, self._header, self._engine = source, header, engine
        self._prefix = prefix  # the object's first bytes, fetched with the header: hashed, never fetched again
        self._location, self._read = location, read  # where the sidecar is looked for, and how it is read
        self._published = _Once(lambda: engine.run(source.published_digest))
        self._sidecar = _Once(self._read_sidecar)
        self._in_batches = False
        self._batches: OrderedHasher | None = None  # the hasher of a file read whole, batch after batch

    @property
    def url(self) -> str:
        return self._source.url

    def read_in_batches(self) -> None:
        """Every tensor of the file is about to be read, batch after batch in file order (``iter_tensors``): a
        whole-file digest then applies across the batches."""
        self._in_batches = True

    async def begin(
        self, verify: VerifyOption, outputs: Mapping[str, OutputTensor], sliced: set[str], staged: bool
    ) -> Check:
        """The check of one load of ``outputs`` (allocated, to be filled; ``sliced``: those holding a slice);
        ``staged``: they are on a device, read back to be hashed. Raises or warns at once if the load asks
        for a check that cannot be made."""
        check = Check(self)
        if not verify:
            return check
        memories = _hashable_memories(outputs, staged)
        check.whole = len(outputs) == len(self._header) and not sliced
        if check.whole:
            check.hasher = await self._whole_file_hasher(verify, memories)
        elif self._in_batches and not sliced and (_is_digest(verify) or await self._sidecar.get() is None):
            check.hasher = await self._batch_hasher(verify, memories)
        else:
            if _is_digest(verify):
                self._refuse_whole_file_digest(str(verify), len(outputs) - len(sliced), len(sliced))
            check.sidecar = await self._sidecar_for_partial(verify)
            check.tensors = _tensors(outputs, memories, sliced)
        if sliced:
            self._unverifiable(verify, f"{len(sliced)} tensor(s) were sliced, and digests cover whole tensors")
        return check

    async def check_received(self, verify: VerifyOption, outputs: Mapping[str, OutputTensor]) -> None:
        """Check whole tensors that came some other way (from another rank): all of the file against its
        digest, or each against the sidecar; a partial load without a sidecar warns or fails."""
        memories = _hashable_memories(outputs, staged=any(o.buffer.device.type != "cpu" for o in outputs.values()))
        check = Check(self, whole=len(outputs) == len(self._header))
        if check.whole:
            check.hasher = await self._whole_file_hasher(verify, memories)
            await check.landed_before([(0, self._header.file_size)])
        else:
            check.sidecar = await self._sidecar_for_partial(verify)
            check.tensors = _tensors(outputs, memories, set())
        await check.finish()

    async def _batch_hasher(self, verify: VerifyOption, memories: Mapping[str, Memory]) -> OrderedHasher:
        """The hasher of a file read whole in consecutive batches, given this batch's tensors: the file's
        digest is checked as its last batch lands, before that batch is returned. The batches before it
        were returned unchecked: a sidecar's per-tensor digests check each batch instead."""
        if self._batches is None:
            self._batches = await self._whole_file_hasher(verify, memories)
        else:
            infos = [(self._header.tensors[name], memory) for name, memory in memories.items()]
            segments = [(info.start, info.end, memory) for info, memory in infos if info.nbytes]
            await self._engine.run(self._batches.extend, segments)
        return self._batches

    async def _whole_file_hasher(self, verify: VerifyOption, memories: Mapping[str, Memory]) -> OrderedHasher:
        """A hasher over the whole object: header bytes, then every tensor of ``memories`` where it lands;
        the bytes that came with the header are hashed already."""
        expected = parse_digest(str(verify)) if _is_digest(verify) else await self._expected()
        header = self._header
        segments: list[tuple[int, int, Memory]] = [(0, header.data_start, self._prefix[: header.data_start])]
        segments += [(i.start, i.end, memories[i.name]) for i in header if i.nbytes and i.name in memories]
        hasher = OrderedHasher(self.url, header.file_size, expected, segments)
        await self._engine.run(hasher.landed, 0, len(self._prefix))  # the header, and tensor bytes copied from it
        return hasher

    async def _expected(self) -> Digest:
        """The whole file's digest: the one the store publishes, else the sidecar's."""
        found = await self._published.get()
        if found is None:
            sidecar = await self._sidecar.get()
            found = sidecar.whole(self.url) if sidecar else None
        if found is None:
            raise IntegrityError(
                f"{self.url}: verify asked, but the source publishes no digest and there is no "
                f"{SIDECAR_SUFFIX} sidecar; pass verify='sha256:<hex>' or write one with 'stream-st digest'",
                url=self.url,
            )
        return found

    async def _read_sidecar(self) -> Sidecar | None:
        """``<file>.sha256.json`` next to the file (of the file's own version where the store pins one), or
        None when there is none. A refused one counts as absent: a presigned URL's signature covers its own
        path only, and S3 answers 403 for a missing key to a client that may not list the bucket."""
        where = sidecar_location(self._source.pinned_url() or self._location)
        try:
            raw = await self._read(where.url)
        except (FileNotFoundError, PermissionError) as exc:
            logger.debug("%s: no sidecar (%s)", where.shown, type(exc).__name__)
            return None
        return Sidecar.parse(raw, where.shown)

    async def _sidecar_for_partial(self, verify: VerifyOption) -> Sidecar | None:
        """Per-tensor digests for a partial load; without them, warn (verify=True) or fail ("strict")."""
        sidecar = await self._sidecar.get()
        if sidecar is None:
            self._unverifiable(
                verify,
                "a partial load cannot be checked against a whole-file digest and there is no "
                f"{SIDECAR_SUFFIX} sidecar with per-tensor digests ('stream-st digest' writes one)",
            )
        return sidecar

    def _unverifiable(self, verify: VerifyOption, why: str) -> None:
        """Some bytes asked to be verified cannot be: warn (verify=True) or fail (verify="strict")."""
        if verify == "strict":
            raise IntegrityError(f"{self.url}: {why}; not verified", url=self.url)
        warn_caller(f"{self.url}: {why}; loading unverified", IntegrityWarning)

    def _refuse_whole_file_digest(self, verify: str, whole: int, sliced: int) -> None:
        raise ConfigError(
            f"{self.url}: verify={verify[:15]}... is a digest of the whole file, but this load reads "
            f"{whole} whole tensors of {len(self._header)}"
            + (f" and slices of {sliced}" if sliced else "")
            + "; load the whole file, or use verify=True with a sidecar of per-tensor digests",
            url=self.url,
        )


@dataclass
class Check:
    """What one load of a file verifies: its bytes hashed in file order as they land (``hasher``, given to
    ``Engine.fetch`` as ``landed``), or each whole tensor against the sidecar once all have landed."""

    verifier: Verifier
    whole: bool = False  # every tensor of the file: the digest is checked when this load ends
    hasher: OrderedHasher | None = None
    sidecar: Sidecar | None = None
    tensors: list[tuple[str, int, Memory]] = field(default_factory=list)  # (name, size, memory) to check

    @property
    def landed(self) -> Callable[[int, int], None] | None:
        """Called from worker threads as each span of the file lands (None: nothing to hash in order)."""
        return self.hasher.landed if self.hasher is not None else None

    async def landed_before(self, spans: list[tuple[int, int]]) -> None:
        """Spans that are in place before the fetch starts (a prefetch's), hashed on a worker thread."""
        hasher = self.hasher
        if hasher is not None and spans:

            def hash_spans() -> None:
                for start, end in spans:
                    hasher.landed(start, end)

            await self.verifier._engine.run(hash_spans)

    async def finish(self) -> None:
        """Raise ``IntegrityError`` on a mismatch: a whole-file digest once every byte is hashed (the last
        batch of a file read in batches), per-tensor digests on a worker thread."""
        verifier, hasher = self.verifier, self.hasher
        if hasher is not None and (self.whole or hasher.frontier == verifier._header.file_size):
            verifier._batches = None
            hasher.check()
        if self.sidecar is not None:
            await verifier._engine.run(check_tensors, verifier.url, self.sidecar, self.tensors)


class _Once(Generic[T]):
    """A value fetched on first use and shared by every load that asks, also concurrently; a failure is
    not kept (the next load asks again)."""

    def __init__(self, make: Callable[[], Awaitable[T]]) -> None:
        self._make = make
        self._future: asyncio.Future[T] | None = None

    async def get(self) -> T:
        future = self._future
        if future is None or (future.done() and (future.cancelled() or future.exception() is not None)):
            future = self._future = asyncio.ensure_future(self._make())
        return await asyncio.shield(future)  # one load's cancel does not cancel it for the others


def _tensors(
    outputs: Mapping[str, OutputTensor], memories: Mapping[str, Memory], sliced: set[str]
) -> list[tuple[str, int, Memory]]:
    """(name, size, memory) of each whole tensor, as ``check_tensors`` takes them."""
    return [(name, out.buffer.numel(), memories[name]) for name, out in outputs.items() if name not in sliced]


def _hashable_memories(outputs: Mapping[str, OutputTensor], staged: bool) -> dict[str, Memory]:
    """Each output's bytes as the hasher reads them: host memory directly, device memory in chunks."""
    if not staged:
        return {name: out.view() for name, out in outputs.items()}
    import torch

    from .gpu import DeviceBytes

    # One for the load (hashing is serialised); pinned on a GPU, where a pageable destination made the
    # read-back several times slower and it runs in series with the hash.
    on_gpu = any(out.buffer.device.type == "cuda" for out in outputs.values())
    bounce = torch.empty(_READ_BACK_BYTES, dtype=torch.uint8, pin_memory=on_gpu)
    return {name: DeviceBytes(out.buffer, bounce) for name, out in outputs.items()}
