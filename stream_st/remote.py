"""One safetensors object opened for reading: source, validated header, and the bytes already fetched."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from .errors import HeaderError
from .fetch import Engine
from .header import LENGTH_PREFIX, Header, TensorInfo, declared_header_size, parse_header
from .plan import Want
from .sinks import HostTensor, host_tensor, row_bytes
from .sources import Source, open_source

logger = logging.getLogger(__name__)

Rows = tuple[int, int]


class RemoteFile:
    """A safetensors object whose header has been read and validated; fetches tensors on demand."""

    def __init__(self, source: Source, header: Header, prefix: bytes, engine: Engine) -> None:
        self.source, self.header, self.engine = source, header, engine
        self._prefix = memoryview(prefix)  # first bytes of the object: header, then possibly tensor data

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
        return cls(source, header, prefix, engine)

    def info(self, name: str) -> TensorInfo:
        return self.header.tensors[name]

    async def load(self, requests: Iterable[tuple[str, Rows | None]]) -> dict[str, HostTensor]:
        """Fetch tensors (or dim-0 row ranges of them) into newly allocated host tensors, concurrently."""
        outputs: dict[str, HostTensor] = {}
        views: dict[str, memoryview] = {}
        wants: list[Want] = []
        for name, rows in requests:
            info = self.header.tensors[name]
            if name in outputs:
                continue
            out = host_tensor(info, url=self.url, rows=rows)
            start = info.start + (row_bytes(info) * rows[0] if rows else 0)
            outputs[name] = out
            views[name] = view = out.view()
            wants.extend(self._take_from_prefix(Want(name, start, start + len(view)), view))
        await self.engine.fetch(self.source, wants, lambda key: views[str(key)])
        self.source.check_unchanged()
        return outputs

    def _take_from_prefix(self, want: Want, view: memoryview) -> list[Want]:
        """Copy what the header read already fetched; return what is still missing."""
        have = min(want.end, len(self._prefix)) - want.start
        if have <= 0:
            return [want]
        view[:have] = self._prefix[want.start : want.start + have]
        if self.engine.progress is not None:
            self.engine.progress.advance(have)
        return [Want(want.key, want.start + have, want.end, have)] if want.end > want.start + have else []

    def close(self) -> None:
        self.source.close()


def check_rows(info: TensorInfo, rows: Rows, url: str) -> None:
    """Raise unless [start, stop) is a valid dim-0 row range of ``info``."""
    if not info.shape:
        raise HeaderError(f"{url}: tensor {info.name!r} is 0-d; it has no rows to slice", url=url, tensor=info.name)
    start, stop = rows
    if not 0 <= start <= stop <= info.shape[0]:
        raise IndexError(f"{url}: rows {start}:{stop} are outside tensor {info.name!r} of shape {list(info.shape)}")


async def read_whole(url: str, engine: Engine, storage_options: Mapping[str, Any] | None) -> bytes:
    """A small whole object (an index), through the same sources, retries and checks as tensor data."""
    source = await engine.run(lambda: open_source(url, engine.pool, storage_options, direct=engine.config.direct_http))
    try:
        probe = await engine.probe(source)
        return await _extend(engine, source, probe.prefix, probe.size)
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
