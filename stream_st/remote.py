"""One safetensors object opened for reading: source, validated header, and the bytes already fetched."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from .errors import FetchError, IntegrityError, IntegrityWarning
from .fetch import Engine
from .gpu import DeviceBytes, DeviceStaging, shared_pool
from .header import LENGTH_PREFIX, Header, TensorInfo, declared_header_size, parse_header
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
from .plan import Want
from .regions import Region
from .sinks import OutputTensor, output_tensor, writable_view
from .sources import Source, open_source

logger = logging.getLogger(__name__)

_READ_BACK_BYTES = 4 << 20  # device→host chunk when hashing bytes on a GPU: large enough to run at copy speed


def _hashable_memories(outputs: Mapping[str, OutputTensor], staged: bool) -> dict[str, Memory]:
    """Each output's bytes as the hasher reads them: host memory directly, device memory in chunks."""
    if not staged:
        return {name: out.view() for name, out in outputs.items()}
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
        prefix: bytes,
        engine: Engine,
        location: str = "",
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.source, self.header, self.engine = source, header, engine
        self._prefix = memoryview(prefix)  # first bytes of the object: header, then possibly tensor data
        self._location, self._storage_options = location, storage_options  # to find a digest sidecar

    @property
    def url(self) -> str:
        return self.source.url

    @classmethod
    async def open(cls, url: str, engine: Engine, storage_options: Mapping[str, Any] | None = None) -> RemoteFile:
        """Read the header with one ranged GET (two if it is longer than ``header_prefetch``) and validate it."""
        config = engine.config
        source = await engine.run(lambda: open_source(url, engine.pool, storage_options, direct=config.direct_http))
        try:
            probe = await engine.probe(source)
            size = declared_header_size(
                probe.prefix, url=source.url, file_size=probe.size, max_header_size=config.max_header_size
            )
            header_end = LENGTH_PREFIX + size
            prefix = await _extend(engine, source, probe.prefix, header_end)
            header = parse_header(bytes(prefix[LENGTH_PREFIX:header_end]), url=source.url, file_size=probe.size)
        except BaseException:
            source.close()
            raise
        return cls(source, header, prefix, engine, url, storage_options)

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
        outputs: dict[str, OutputTensor] = {}
        wants: list[Want] = []
        for name, region in requested:
            info = self.header.tensors[name]
            if name in outputs:
                continue
            if region is not None:
                region.check(info, self.url)
            shape = region.shape(info) if region else info.shape
            landing = device if staged else None
            given = (into or {}).get(name)
            if given is not None and given.device != (landing or torch.device("cpu")):
                given = None  # e.g. a server without ranges: the bytes land in host memory first
            out = output_tensor(info, shape, url=self.url, device=landing, buffer=given)
            outputs[name] = out
            spans = region.spans(info) if region else [(info.start, info.end, 0)]
            for start, end, offset in spans:
                wants.extend(self._take_from_prefix(Want(name, start, end, offset), out.buffer))
        memories = _hashable_memories(outputs, staged) if verify else {}
        sliced = {name for name, region in requested if region}
        whole = len(outputs) == len(self.header) and not sliced
        hasher = await self._whole_file_hasher(verify, memories) if verify and whole else None
        sidecar = await self._sidecar_for_partial(verify) if verify and not whole else None
        if verify and sliced:
            self._unverifiable(verify, f"{len(sliced)} tensor(s) were sliced, and digests cover whole tensors")
        landed = hasher.landed if hasher else None
        if staged:
            assert device is not None
            await self._fetch_to_device(wants, {name: out.buffer for name, out in outputs.items()}, device, landed)
        else:
            views = {name: out.view() for name, out in outputs.items()}
            await self.engine.fetch(self.source, wants, lambda key: views[str(key)], landed)
        self.source.check_unchanged()
        if hasher is not None:
            hasher.check()
        if sidecar is not None:
            checked = [(name, outputs[name].buffer.numel(), memories[name]) for name in outputs if name not in sliced]
            await self.engine.run(check_tensors, self.url, sidecar, checked)
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
    ) -> None:
        config = self.engine.config
        pool = shared_pool(config.part_size, config.pinned_pool_bytes, pinned=device.type == "cuda")
        staging = DeviceStaging(buffers, device, pool)
        try:
            await self.engine.fetch(self.source, wants, _no_host_destination, landed, staging)
        finally:
            # Wait for every queued copy, on success and on failure alike: the caller must not see a
            # half-copied tensor, nor may memory still being copied into be freed.
            await self.engine.run(staging.finish)

    async def _whole_file_hasher(self, verify: VerifyOption, memories: Mapping[str, Memory]) -> OrderedHasher:
        """A hasher over the whole object: header bytes, then every tensor where it lands."""
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
        segments += [(info.start, info.end, memories[info.name]) for info in self.header if info.nbytes]
        hasher = OrderedHasher(self.url, self.header.file_size, expected, segments)
        hasher.landed(0, len(self._prefix))  # the header, and tensor bytes copied from the prefix
        return hasher

    async def _sidecar(self) -> Sidecar | None:
        """``<file>.sha256.json`` next to the file (of the file's own version where the store pins one), or
        None when there is none. A refused one counts as absent: a presigned URL's signature covers its
        own path only, and S3 answers 403 for a missing key to a client that may not list the bucket."""
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
        warnings.warn(f"{self.url}: {why}; loading unverified", IntegrityWarning, stacklevel=3)

    def _take_from_prefix(self, want: Want, buffer: torch.Tensor) -> list[Want]:
        """Copy what the header read already fetched; return what is still missing."""
        have = min(want.end, len(self._prefix)) - want.start
        if have <= 0:
            return [want]
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


async def read_whole(url: str, engine: Engine, storage_options: Mapping[str, Any] | None) -> bytes:
    """A small whole object (an index), through the same sources, retries and checks as tensor data."""
    return (await read_whole_pinned(url, engine, storage_options))[0]


async def read_whole_pinned(
    url: str, engine: Engine, storage_options: Mapping[str, Any] | None
) -> tuple[bytes, str | None]:
    """``read_whole``, and the URL naming the version read where the store has one (``Source.pinned_url``)."""
    config = engine.config
    source = await engine.run(lambda: open_source(url, engine.pool, storage_options, direct=config.direct_http))
    try:
        probe = await engine.probe(source)
        if probe.size > config.max_small_file_bytes:  # the size a server declared: checked before allocating
            raise FetchError(
                f"{source.url}: {probe.size} bytes, more than max_small_file_bytes={config.max_small_file_bytes} "
                "allows for an index, a digest sidecar or a config.json",
                url=source.url,
            )
        return await _extend(engine, source, probe.prefix, probe.size), source.pinned_url()
    finally:
        source.close()


async def _extend(engine: Engine, source: Source, prefix: bytes, end: int) -> bytes:
    """``prefix`` grown to the object's first ``end`` bytes with one more ranged GET if it is shorter."""
    if end <= len(prefix):
        return prefix
    logger.debug("%s: need %d bytes, the first GET brought %d; second GET", source.url, end, len(prefix))
    rest = bytearray(end - len(prefix))
    await engine.fetch(source, [Want("<prefix>", len(prefix), end)], lambda _: memoryview(rest))
    return prefix + bytes(rest)
