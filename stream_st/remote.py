"""One safetensors object opened for reading: source, validated header, and the bytes already fetched."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from . import held
from ._loop import off_loop, warn_caller
from .cache import open_cached
from .errors import FetchError, ObjectChangedError, RangeIgnoredWarning, credentials_error
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
from .integrity import VerifyOption
from .location import redact
from .opening import open_source
from .plan import Want
from .progress import Progress
from .regions import Region
from .sources import LocalSource, Probe, Source
from .verifier import Verifier

if TYPE_CHECKING:  # torch is imported where tensors are made: opening a file and reading headers need none
    import torch

    from .sinks import OutputTensor

logger = logging.getLogger(__name__)


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
        self._location = location
        self._held: held.HeldFile | None = None  # the prefetch of this file, if one holds its tensors
        # verify= for this file: its digests (the sidecar is looked for beside ``location``) and their checks.
        self.verifier = Verifier(
            source, header, self._prefix, engine, location, lambda url: read_whole(url, engine, storage_options)
        )

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
        progress: Progress | None = None,
    ) -> dict[str, OutputTensor]:
        """Fetch tensors (or a region of one dimension of them) into newly allocated tensors, concurrently,
        or into the flat buffers ``into`` names for them where those are where the bytes land anyway.

        On the host, bytes land straight in the outputs; for another ``device`` they pass through the
        shared pinned slot pool (gpu.py). With ``verify``, they are checked against a digest before being
        returned: hashed in order as parts land (read back from the device in small chunks on a GPU).
        ``progress`` counts the bytes of the outputs as they land, wherever they come from."""
        requested = list(requests)
        staged = device is not None and (device.type != "cpu" or self.stage_cpu_loads) and self.source.ranges
        landing = device if staged else None
        unsliced = [name for name, region in requested if region is None]
        outputs = await self._take_prefetched(unsliced, landing, into, progress)
        if landing is None:
            mapped = await self.engine.run(self._take_mapped, [name for name in unsliced if name not in outputs], into)
            outputs.update(mapped)
            if progress is not None and mapped:
                progress.advance(sum(out.buffer.numel() for out in mapped.values()))
        prefetched = [(self.header.tensors[name].start, self.header.tensors[name].end) for name in outputs]
        wants = self._allocate(requested, landing, into, outputs, progress)
        check = await self.verifier.begin(verify, outputs, {name for name, region in requested if region}, staged)
        await check.landed_before(prefetched)
        landed = check.landed
        gap = 0 if prefetched else None  # the spans between the wanted ones may be a prefetch's: not again
        if staged:
            assert device is not None
            buffers = {name: out.buffer for name, out in outputs.items()}
            await self._fetch_to_device(wants, buffers, device, landed, gap, progress)
        else:
            views = {name: out.view() for name, out in outputs.items()}
            memory = self._held_for_writes(outputs)
            self.source.hold_outputs(memory)
            try:
                await self.engine.fetch(
                    self.source, wants, lambda key: views[str(key)], landed, max_gap=gap, progress=progress
                )
            finally:  # writes from the outputs' memory are done before they are returned or freed
                await off_loop(self.source.release_outputs, memory)
        self.source.check_unchanged()
        await check.finish()
        return outputs

    def _held_for_writes(self, outputs: Mapping[str, OutputTensor]) -> list[tuple[int, int]]:
        """The memory of the large outputs, where a cache entry being written may take whole blocks from."""
        from .sinks import ALIGN_FROM

        if not self.source.aligned_destinations:
            return []
        buffers = (out.buffer for out in outputs.values() if out.buffer.numel() >= ALIGN_FROM)
        return [(buffer.data_ptr(), buffer.data_ptr() + buffer.numel()) for buffer in buffers]

    def _allocate(
        self,
        requested: list[tuple[str, Region | None]],
        device: torch.device | None,
        into: Mapping[str, torch.Tensor] | None,
        outputs: dict[str, OutputTensor],
        progress: Progress | None,
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
            aligned = info.start if region is None and self.source.aligned_destinations else None
            out = output_tensor(info, shape, url=self.url, device=device, buffer=given, aligned_with=aligned)
            outputs[name] = out
            spans = region.spans(info) if region else [(info.start, info.end, 0)]
            for start, end, offset in spans:
                wants.extend(self._take_from_prefix(Want(name, start, end, offset), out.buffer, progress))
        return wants

    async def _take_prefetched(
        self,
        names: list[str],
        device: torch.device | None,
        into: Mapping[str, torch.Tensor] | None,
        progress: Progress | None,
    ) -> dict[str, OutputTensor]:
        """The tensors of ``names`` a prefetch holds, once their bytes are in: on the host they become the
        outputs' memory as they are; on a device (or into ``into``) they are copied there, on a worker thread."""
        if self._held is None or not names:
            return {}
        taken = self._held.take(names)
        results = await asyncio.gather(*(asyncio.wrap_future(f) for f in taken.values()), return_exceptions=True)
        return await off_loop(self._adopt_prefetched, dict(zip(taken, results)), device, into, progress)

    def _adopt_prefetched(
        self,
        results: dict[str, held.Held | BaseException],
        device: torch.device | None,
        into: Mapping[str, torch.Tensor] | None,
        progress: Progress | None,
    ) -> dict[str, OutputTensor]:
        import torch

        from .sinks import output_tensor

        outputs: dict[str, OutputTensor] = {}
        for name, result in results.items():
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
            if progress is not None:
                progress.advance(result.nbytes)
        return outputs

    def _take_mapped(self, names: list[str], into: Mapping[str, torch.Tensor] | None) -> dict[str, OutputTensor]:
        """Host outputs over a copy-on-write map of the local file that already holds their bytes (a complete
        cache range, or a local path with ``memory_map="all"``): nothing to read or copy (mapping.py)."""
        import torch

        from .sinks import output_tensor

        mode = self.engine.config.memory_map
        if mode == "never" or not self.source.maps_files or (mode == "cache" and isinstance(self.source, LocalSource)):
            return {}
        outputs: dict[str, OutputTensor] = {}
        for name in names:
            info = self.header.tensors[name]
            memory = self.source.mapped(info.start, info.end) if info.nbytes and name not in (into or {}) else None
            if memory is not None:
                buffer = torch.frombuffer(memory, dtype=torch.uint8, count=info.nbytes, offset=info.start)
                outputs[name] = output_tensor(info, info.shape, url=self.url, buffer=buffer)
        return outputs

    async def _fetch_to_device(
        self,
        wants: list[Want],
        buffers: dict[str, torch.Tensor],
        device: torch.device,
        landed: Callable[[int, int], None] | None,
        max_gap: int | None,
        progress: Progress | None,
    ) -> None:
        from .gpu import DeviceStaging, shared_pool

        config = self.engine.config
        pool = shared_pool(config.part_size, config.pinned_pool_bytes, pinned=device.type == "cuda")
        staging = DeviceStaging(buffers, device, pool)
        try:
            await self.engine.fetch(self.source, wants, _no_host_destination, landed, staging, max_gap, progress)
        finally:
            # Wait for every queued copy, on success and on failure alike: the caller must not see a
            # half-copied tensor, nor may memory still being copied into be freed.
            await self.engine.run(staging.finish)

    def _take_from_prefix(self, want: Want, buffer: torch.Tensor, progress: Progress | None) -> list[Want]:
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
        if progress is not None:
            progress.advance(have)
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
