"""One safetensors object opened for reading: source, validated header, and the bytes already fetched."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from . import held
from ._loop import warn_caller
from .cache import open_cached
from .errors import (
    ConfigError,
    FetchError,
    IntegrityError,
    IntegrityWarning,
    ObjectChangedError,
    RangeIgnoredWarning,
    credentials_error,
)
from .fetch import Engine
from .header import (
    LENGTH_PREFIX,
    Header,
    HeaderReader,
    TensorInfo,
    WholeHeaderNeededError,
    declared_header_size,
    parse_header,
)
from .integrity import (
    SIDECAR_SUFFIX,
    Memory,
    OrderedHasher,
    Sidecar,
    VerifyOption,
    check_tensors,
    parse_digest,
    sidecar_location,
)
from .location import redact
from .plan import Want
from .regions import Region
from .sources import Probe, Source, open_source

if TYPE_CHECKING:  # torch is imported where tensors are made: opening a file and reading headers need none
    import torch

    from .sinks import OutputTensor

logger = logging.getLogger(__name__)

_READ_BACK_BYTES = 4 << 20  # device→host chunk when hashing bytes on a GPU: large enough to run at copy speed


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


def _no_host_destination(key: object) -> memoryview:
    raise AssertionError(f"staged parts land in slots, not in host memory ({key!r})")


class RemoteFile:
    """A safetensors object whose header has been read and validated; fetches tensors on demand."""

    # The tests set this to run CPU loads through the device path's pinned-slot pipeline (with plain
    # memory and synchronous copies), so its slot logic is exercised on machines without a GPU.
    stage_cpu_loads = False

    def __init__(
        self,
        source: Source,
        header: Header,
        prefix: bytes | bytearray,
        engine: Engine,
        location: str = "",
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.source, self.header, self.engine = source, header, engine
        self._prefix = memoryview(prefix)  # first bytes of the object: header, then possibly tensor data
        self._location, self._storage_options = location, storage_options  # to find a digest sidecar
        self._held: held.HeldFile | None = None  # the prefetch of this file, if one holds its tensors
        # Set by iter_tensors when it reads every tensor of this file, batch after batch, in file order: a
        # whole-file digest is then checked across the batches (``_batch_hasher``).
        self.verified_in_batches = False
        self._batches_hasher: OrderedHasher | None = None
        self._sidecar_read: asyncio.Future[Sidecar | None] | None = None  # read once per file

    @property
    def url(self) -> str:
        return self.source.url

    @property
    def requested_url(self) -> str:
        """The URL this file was opened with (``url`` is its redacted form): a prefetch's key."""
        return self._location

    def fetched_prefix(self) -> memoryview:
        """The object's first bytes fetched with the header: the header, then possibly tensor data."""
        return self._prefix

    @classmethod
    async def open(cls, url: str, engine: Engine, storage_options: Mapping[str, Any] | None = None) -> RemoteFile:
        """Read the header with one ranged GET (two if it is longer than ``header_prefetch``) and validate it.

        If a prefetch holds this file (held.py), the GET asks for the header bytes alone, and the answer
        must match what the prefetch read: the tensors then come from the prefetch's memory."""
        config = engine.config
        found = None
        if held.active():
            found = await engine.run(held.find, url, held.options_key(storage_options), config.stall_timeout)
        source, probe = await probed(url, engine, storage_options, len(found.header_bytes) if found else None)
        try:
            size = declared_header_size(
                probe.prefix, url=source.url, file_size=probe.size, max_header_size=config.max_header_size
            )
            header_end = LENGTH_PREFIX + size
            prefix = await _extend(engine, source, probe.prefix, header_end)
            header = parse_header(memoryview(prefix)[LENGTH_PREFIX:header_end], url=source.url, file_size=probe.size)
            if found is not None:
                _check_same_version(found, source, prefix[:header_end])
            _warn_if_ranges_ignored(source)
        except BaseException:
            source.close()
            raise
        file = cls(source, header, prefix, engine, url, storage_options)
        file._held = found
        return file

    def header_bytes(self) -> memoryview:
        """The object's first bytes up to the end of the JSON header."""
        return self._prefix[: self.header.data_start]

    def info(self, name: str) -> TensorInfo:
        return self.header.tensors[name]

    async def load(
        self,
        requests: Iterable[tuple[str, Region | None]],
        verify: VerifyOption = None,
        device: torch.device | None = None,
        into: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, OutputTensor]:
        """Fetch tensors (or a region of one dimension of them) into newly allocated tensors, concurrently,
        or into the flat buffers ``into`` names for them where those are where the bytes land anyway.

        On the host, bytes land straight in the outputs; for another ``device`` they pass through the
        shared pinned slot pool (gpu.py). With ``verify``, they are checked against a digest before being
        returned: hashed in order as parts land (read back from the device in small chunks on a GPU)."""
        requested = list(requests)
        staged = device is not None and (device.type != "cpu" or self.stage_cpu_loads) and self.source.ranges
        landing = device if staged else None
        outputs = await self._take_prefetched([name for name, region in requested if region is None], landing, into)
        prefetched = [(self.header.tensors[name].start, self.header.tensors[name].end) for name in outputs]
        wants = self._allocate(requested, landing, into, outputs)
        memories = _hashable_memories(outputs, staged) if verify else {}
        sliced = {name for name, region in requested if region}
        whole = len(outputs) == len(self.header) and not sliced
        hasher: OrderedHasher | None = None
        sidecar: Sidecar | None = None
        explicit = isinstance(verify, str) and verify != "strict"
        if verify and whole:
            hasher = await self._whole_file_hasher(verify, memories)
        elif verify and self.verified_in_batches and not sliced and (explicit or await self._sidecar() is None):
            hasher = await self._batch_hasher(verify, memories)  # the whole file, batch after batch
        elif verify:
            if explicit:
                self._refuse_whole_file_digest(str(verify), len(outputs) - len(sliced), len(sliced))
            sidecar = await self._sidecar_for_partial(verify)
        if verify and sliced:
            self._unverifiable(verify, f"{len(sliced)} tensor(s) were sliced, and digests cover whole tensors")
        landed = hasher.landed if hasher else None
        if landed is not None and prefetched:
            await self.engine.run(lambda: [landed(start, end) for start, end in prefetched])
        gap = 0 if prefetched else None  # the spans between the wanted ones may be a prefetch's: not again
        if staged:
            assert device is not None
            buffers = {name: out.buffer for name, out in outputs.items()}
            await self._fetch_to_device(wants, buffers, device, landed, gap)
        else:
            views = {name: out.view() for name, out in outputs.items()}
            await self.engine.fetch(self.source, wants, lambda key: views[str(key)], landed, max_gap=gap)
        self.source.check_unchanged()
        if hasher is not None and (whole or hasher.frontier == self.header.file_size):
            self._batches_hasher = None
            hasher.check()  # a file read in batches: before its last batch is returned
        if sidecar is not None:
            checked = [(name, outputs[name].buffer.numel(), memories[name]) for name in outputs if name not in sliced]
            await self.engine.run(check_tensors, self.url, sidecar, checked)
        return outputs

    def _allocate(
        self,
        requested: list[tuple[str, Region | None]],
        device: torch.device | None,
        into: Mapping[str, torch.Tensor] | None,
        outputs: dict[str, OutputTensor],
    ) -> list[Want]:
        """An output for every requested tensor (or region) not in ``outputs`` yet, on ``device`` (None: host
        memory) or in its ``into`` buffer; returns the spans still to fetch (the header read's are copied)."""
        import torch

        from .sinks import output_tensor

        wants: list[Want] = []
        for name, region in requested:
            info = self.header.tensors[name]
            if name in outputs:
                continue
            if region is not None:
                region.check(info, self.url)
            shape = region.shape(info) if region else info.shape
            given = (into or {}).get(name)
            if given is not None and given.device != (device or torch.device("cpu")):
                given = None  # e.g. a server without ranges: the bytes land in host memory first
            out = output_tensor(info, shape, url=self.url, device=device, buffer=given)
            outputs[name] = out
            spans = region.spans(info) if region else [(info.start, info.end, 0)]
            for start, end, offset in spans:
                wants.extend(self._take_from_prefix(Want(name, start, end, offset), out.buffer))
        return wants

    def _refuse_whole_file_digest(self, verify: str, whole: int, sliced: int) -> None:
        raise ConfigError(
            f"{self.url}: verify={verify[:15]}... is a digest of the whole file, but this load reads "
            f"{whole} whole tensors of {len(self.header)}"
            + (f" and slices of {sliced}" if sliced else "")
            + "; load the whole file, or use verify=True with a sidecar of per-tensor digests",
            url=self.url,
        )

    async def _take_prefetched(
        self, names: list[str], device: torch.device | None, into: Mapping[str, torch.Tensor] | None
    ) -> dict[str, OutputTensor]:
        """The tensors of ``names`` a prefetch holds, once their bytes are in: on the host they become the
        outputs' memory as they are; on a device (or into ``into``) they are copied there."""
        import torch

        from .sinks import output_tensor

        if self._held is None or not names:
            return {}
        taken = self._held.take(names)
        results = await asyncio.gather(*(asyncio.wrap_future(f) for f in taken.values()), return_exceptions=True)
        outputs: dict[str, OutputTensor] = {}
        for name, result in zip(taken, results):
            if isinstance(result, held.PrefetchCancelledError):
                continue  # fetched by this load instead
            if isinstance(result, BaseException):
                raise result  # the prefetch's own failure, a named error, surfaces here
            info = self.header.tensors[name]
            memory = (
                torch.frombuffer(result.memory, dtype=torch.uint8, count=result.nbytes, offset=result.offset)
                if result.nbytes
                else torch.empty(0, dtype=torch.uint8)
            )
            target = (into or {}).get(name)
            if target is None and device is not None:
                target = torch.empty(result.nbytes, dtype=torch.uint8, device=device)
            if target is not None:
                target.copy_(memory)
                memory = target
            outputs[name] = output_tensor(info, info.shape, url=self.url, buffer=memory)
            if self.engine.progress is not None:
                self.engine.progress.advance(result.nbytes)
        return outputs

    async def verify_loaded(self, verify: VerifyOption, outputs: Mapping[str, OutputTensor]) -> None:
        """Check whole tensors loaded some other way (received from another rank): all of the file against
        its digest, or each against the sidecar; a partial load without a sidecar warns or fails."""
        memories = _hashable_memories(outputs, staged=any(o.buffer.device.type != "cpu" for o in outputs.values()))
        if len(outputs) == len(self.header):
            hasher = await self._whole_file_hasher(verify, memories)
            await self.engine.run(hasher.landed, 0, self.header.file_size)
            hasher.check()
            return
        sidecar = await self._sidecar_for_partial(verify)
        if sidecar is not None:
            checked = [(name, out.buffer.numel(), memories[name]) for name, out in outputs.items()]
            await self.engine.run(check_tensors, self.url, sidecar, checked)

    async def _fetch_to_device(
        self,
        wants: list[Want],
        buffers: dict[str, torch.Tensor],
        device: torch.device,
        landed: Callable[[int, int], None] | None,
        max_gap: int | None,
    ) -> None:
        from .gpu import DeviceStaging, shared_pool

        config = self.engine.config
        pool = shared_pool(config.part_size, config.pinned_pool_bytes, pinned=device.type == "cuda")
        staging = DeviceStaging(buffers, device, pool)
        try:
            await self.engine.fetch(self.source, wants, _no_host_destination, landed, staging, max_gap)
        finally:
            # Wait for every queued copy, on success and on failure alike: the caller must not see a
            # half-copied tensor, nor may memory still being copied into be freed.
            await self.engine.run(staging.finish)

    async def _batch_hasher(self, verify: VerifyOption, memories: Mapping[str, Memory]) -> OrderedHasher:
        """The hasher of a file read whole in consecutive batches (``iter_tensors``), given this batch's
        tensors: the file's digest is checked as its last batch lands, before that batch is returned. The
        batches before it were returned unchecked: a sidecar's per-tensor digests check each batch instead."""
        if self._batches_hasher is None:
            self._batches_hasher = await self._whole_file_hasher(verify, memories)
        else:
            infos = [(self.info(name), memory) for name, memory in memories.items()]
            self._batches_hasher.extend([(info.start, info.end, memory) for info, memory in infos if info.nbytes])
        return self._batches_hasher

    async def _whole_file_hasher(self, verify: VerifyOption, memories: Mapping[str, Memory]) -> OrderedHasher:
        """A hasher over the whole object: header bytes, then every tensor of ``memories`` where it lands."""
        if isinstance(verify, str) and verify != "strict":
            expected = parse_digest(verify)
        else:
            found = await self.engine.run(self.source.published_digest)
            if found is None:
                sidecar = await self._sidecar()
                found = sidecar.whole(self.url) if sidecar else None
            if found is None:
                raise IntegrityError(
                    f"{self.url}: verify asked, but the source publishes no digest and there is no "
                    f"{SIDECAR_SUFFIX} sidecar; pass verify='sha256:<hex>' or write one with 'stream-st digest'",
                    url=self.url,
                )
            expected = found
        segments: list[tuple[int, int, Memory]] = [(0, self.header.data_start, self.header_bytes())]
        segments += [(i.start, i.end, memories[i.name]) for i in self.header if i.nbytes and i.name in memories]
        hasher = OrderedHasher(self.url, self.header.file_size, expected, segments)
        hasher.landed(0, len(self._prefix))  # the header, and tensor bytes copied from the prefix
        return hasher

    async def _sidecar(self) -> Sidecar | None:
        """``<file>.sha256.json`` next to the file (of the file's own version where the store pins one), or
        None when there is none; read once per file. A refused one counts as absent: a presigned URL's
        signature covers its own path only, and S3 answers 403 for a missing key to a client that may not
        list the bucket."""
        if self._sidecar_read is None:
            self._sidecar_read = asyncio.ensure_future(self._read_sidecar())
        return await asyncio.shield(self._sidecar_read)

    async def _read_sidecar(self) -> Sidecar | None:
        where = sidecar_location(self.source.pinned_url() or self._location)
        try:
            raw = await read_whole(where.url, self.engine, self._storage_options)
        except (FileNotFoundError, PermissionError) as exc:
            logger.debug("%s: no sidecar (%s)", where.shown, type(exc).__name__)
            return None
        return Sidecar.parse(raw, where.shown)

    async def _sidecar_for_partial(self, verify: VerifyOption) -> Sidecar | None:
        """Per-tensor digests for a partial load; without them, warn (verify=True) or fail ("strict")."""
        sidecar = await self._sidecar()
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

    def _take_from_prefix(self, want: Want, buffer: torch.Tensor) -> list[Want]:
        """Copy what the header read already fetched; return what is still missing."""
        have = min(want.end, len(self._prefix)) - want.start
        if have <= 0:
            return [want]
        import torch

        from .sinks import writable_view

        known = self._prefix[want.start : want.start + have]
        at = want.dest_offset
        if buffer.device.type == "cpu":
            writable_view(buffer)[at : at + have] = known
        else:  # at most the header prefetch (256 KiB): a plain copy
            buffer[at : at + have].copy_(torch.frombuffer(bytearray(known), dtype=torch.uint8))
        if self.engine.progress is not None:
            self.engine.progress.advance(have)
        rest = Want(want.key, want.start + have, want.end, want.dest_offset + have)
        return [rest] if rest.end > rest.start else []

    def close(self) -> None:
        self.source.close()


def _warn_if_ranges_ignored(source: Source) -> None:
    if not source.ranges:
        warn_caller(
            f"{source.url}: the server ignores Range requests, so every load of it streams the object from "
            "its first byte and drops what it does not need (a partial load costs the whole download)",
            RangeIgnoredWarning,
        )


async def fetch_header(url: str, engine: Engine, storage_options: Mapping[str, Any] | None = None) -> Header:
    """The validated header of ``url`` alone. ``RemoteFile.open`` keeps the header's bytes (a load reuses
    them); this drops them as they are parsed: a header longer than the first GET is read a window
    (``part_size``) at a time into a ``HeaderReader``, so that a 99 MB header of metadata peaks near the
    size of its parsed strings, not twice it."""
    source, probe = await probed(url, engine, storage_options)
    try:
        size = declared_header_size(
            probe.prefix, url=source.url, file_size=probe.size, max_header_size=engine.config.max_header_size
        )
        end = LENGTH_PREFIX + size
        header = None
        if end > len(probe.prefix) and source.ranges:
            header = await _read_in_windows(engine, source, probe, size)
        if header is None:
            prefix = await _extend(engine, source, probe.prefix, end)
            header = parse_header(memoryview(prefix)[LENGTH_PREFIX:end], url=source.url, file_size=probe.size)
        _warn_if_ranges_ignored(source)
        return header
    finally:
        source.close()


async def _read_in_windows(engine: Engine, source: Source, probe: Probe, size: int) -> Header | None:
    """The header of ``size`` bytes parsed window after window; None where the reader dropped bytes it then
    needed (an invalid header, most likely), for the caller to read it again whole."""
    reader = HeaderReader(url=source.url, header_size=size, file_size=probe.size, window=engine.config.part_size)
    first = memoryview(probe.prefix)[LENGTH_PREFIX : LENGTH_PREFIX + size]
    try:
        while reader.received < len(first):
            space = reader.space()
            count = min(len(space), len(first) - reader.received)
            space[:count] = first[reader.received : reader.received + count]
            reader.landed(count)
        while reader.missing:
            space = reader.space()
            start = LENGTH_PREFIX + reader.received
            await engine.fetch(source, [Want("<header>", start, start + len(space), 0)], _into(space))
            reader.landed(len(space))
        return reader.header()
    except WholeHeaderNeededError:
        logger.debug("%s: header read again whole, to be parsed by the whole-text parser", source.url)
        return None


def _into(space: memoryview) -> Callable[[object], memoryview]:
    return lambda _: space


def _check_same_version(found: held.HeldFile, source: Source, header_bytes: memoryview | bytes | bytearray) -> None:
    """A load taking a prefetch's bytes must see the very object the prefetch read."""
    same = source.size == found.size and bytes(header_bytes) == found.header_bytes
    if same and found.version is not None and source.version is not None:
        same = source.version == found.version
    if not same:
        raise ObjectChangedError(
            f"{source.url}: the object changed between the prefetch and this load "
            f"(version {found.version} of {found.size} bytes became {source.version} of {source.size} bytes)",
            url=source.url,
        )


def _open_source(url: str, engine: Engine, storage_options: Mapping[str, Any] | None) -> Source:
    """``open_source``, through the local cache where one is configured or offline (cache.py)."""
    direct = engine.config.direct_http
    return open_cached(
        url, engine.config, storage_options, lambda: open_source(url, engine.pool, storage_options, direct=direct)
    )


async def read_whole(url: str, engine: Engine, storage_options: Mapping[str, Any] | None) -> bytes:
    """A small whole object (an index), through the same sources, retries and checks as tensor data."""
    return (await read_whole_pinned(url, engine, storage_options))[0]


async def read_whole_pinned(
    url: str, engine: Engine, storage_options: Mapping[str, Any] | None
) -> tuple[bytes, str | None]:
    """``read_whole``, and the URL naming the version read where the store has one (``Source.pinned_url``)."""
    config = engine.config
    source, probe = await probed(url, engine, storage_options)
    try:
        if probe.size > config.max_small_file_bytes:  # the size a server declared: checked before allocating
            raise FetchError(
                f"{source.url}: {probe.size} bytes, more than max_small_file_bytes={config.max_small_file_bytes} "
                "allows for an index, a digest sidecar or a config.json",
                url=source.url,
            )
        return bytes(await _extend(engine, source, probe.prefix, probe.size)), source.pinned_url()
    finally:
        source.close()


async def probed(
    url: str, engine: Engine, storage_options: Mapping[str, Any] | None, length: int | None = None
) -> tuple[Source, Probe]:
    """The source of ``url`` and its first ``length`` bytes (default ``header_prefetch``); a credential stack
    that finds no credentials is a ``CredentialsError`` naming the URL."""
    source: Source | None = None
    try:
        source = await engine.run(_open_source, url, engine, storage_options)
        return source, await engine.probe(source, length)
    except BaseException as exc:
        if source is not None:
            source.close()
        named = credentials_error(exc, redact(url))
        if named is not None:
            raise named from None
        raise


async def _extend(engine: Engine, source: Source, prefix: bytes, end: int) -> bytes | bytearray:
    """``prefix`` grown to the object's first ``end`` bytes with one more ranged GET if it is shorter: one
    buffer the rest lands in (a huge header is held once, not copied twice)."""
    if end <= len(prefix):
        return prefix
    logger.debug("%s: need %d bytes, the first GET brought %d; second GET", source.url, end, len(prefix))
    whole = bytearray(end)
    whole[: len(prefix)] = prefix
    await engine.fetch(source, [Want("<prefix>", len(prefix), end, len(prefix))], lambda _: memoryview(whole))
    return whole
