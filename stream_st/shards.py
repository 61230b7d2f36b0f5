"""Checkpoints of one or many files: a single ``.safetensors``, a ``model.safetensors.index.json``
(the transformers layout), or a folder / prefix / repo holding either.

All files of a checkpoint share one engine (threads, connections, concurrency), and a shard is opened
(its header read) only when a selected tensor lives in it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import posixpath
from collections.abc import Iterable, Mapping
from typing import Any

from ._loop import gather_or_cancel
from .errors import HeaderError, TensorNotFoundError, credentials_error
from .fetch import Engine
from .location import Location, inside
from .remote import RemoteFile, read_whole_pinned
from .select import Selection, select

logger = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SUFFIX = ".safetensors"


class Checkpoint:
    """The files of one checkpoint and which tensor lives in which file."""

    def __init__(
        self,
        url: str,
        engine: Engine,
        storage_options: Mapping[str, Any] | None,
        shards: list[str],
        weight_map: dict[str, str] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self.url, self.engine, self.shards = url, engine, shards
        self._storage_options = storage_options
        self._weight_map = weight_map  # tensor name -> shard URL, when an index says so
        self.index_metadata = metadata
        self._files: dict[str, RemoteFile] = {}
        self._opening: dict[str, asyncio.Future[RemoteFile]] = {}

    @property
    def sharded(self) -> bool:
        return self._weight_map is not None or len(self.shards) > 1

    def adopt(self, file: RemoteFile) -> Checkpoint:
        """Keep ``file``, opened while finding out what the URL names, as the shard of its URL."""
        self._files[file.requested_url] = file
        return self

    async def file(self, shard: str) -> RemoteFile:
        """The opened shard (header read once, even when asked for concurrently)."""
        if shard in self._files:
            return self._files[shard]
        if shard not in self._opening:
            self._opening[shard] = asyncio.ensure_future(RemoteFile.open(shard, self.engine, self._storage_options))
        try:
            file = await self._opening[shard]
        except BaseException:
            self._opening.pop(shard, None)
            raise
        self._files[shard] = file
        return file

    async def files(self, shards: Iterable[str]) -> list[RemoteFile]:
        return await gather_or_cancel(*(self.file(shard) for shard in shards))

    def in_order(self, files: Iterable[RemoteFile]) -> list[RemoteFile]:
        """``files`` (opened shards of this checkpoint) in shard order."""
        wanted = set(files)
        return [self._files[shard] for shard in self.shards if self._files.get(shard) in wanted]

    async def names(self) -> list[str]:
        """Every tensor name: per shard in file order, shards in order (an index's order without I/O)."""
        if self._weight_map is not None:
            return list(self._weight_map)
        return [name for file in await self.files(self.shards) for name in file.header.offset_keys()]

    async def locate(self, wanted: Selection) -> dict[RemoteFile, list[str]]:
        """The selected tensors grouped by the opened file that holds them, each group in file order."""
        names = select(await self.names(), wanted, url=self.url)
        if self._weight_map is None:
            chosen = set(names)
            # In shard order, not the order the shards finished opening: ranks splitting a load must agree.
            opened = self.in_order(self._files.values())
            by_shard = {file: [n for n in file.header.offset_keys() if n in chosen] for file in opened}
            return {file: group for file, group in by_shard.items() if group}
        shards: dict[str, set[str]] = {}
        for name in names:
            shards.setdefault(self._weight_map[name], set()).add(name)
        ordered = [shard for shard in self.shards if shard in shards]
        located: dict[RemoteFile, list[str]] = {}
        for shard, file in zip(ordered, await self.files(ordered)):
            group = shards[shard]
            absent = sorted(group - set(file.header.tensors))
            if absent:
                raise HeaderError(
                    f"{self.url}: the index puts tensor {absent[0]!r} in {file.url}, but that file does not have it",
                    url=self.url,
                    tensor=absent[0],
                )
            located[file] = [name for name in file.header.offset_keys() if name in group]
        return located

    async def find(self, name: str) -> RemoteFile:
        """The opened file that holds tensor ``name``."""
        if self._weight_map is not None:
            if name not in self._weight_map:
                select(list(self._weight_map), [name], url=self.url)  # raises with suggestions
                raise TensorNotFoundError(f"{self.url}: no tensor named {name!r}", url=self.url, tensor=name)
            return await self.file(self._weight_map[name])
        for file in await self.files(self.shards):
            if name in file.header.tensors:
                return file
        select(await self.names(), [name], url=self.url)
        raise TensorNotFoundError(f"{self.url}: no tensor named {name!r}", url=self.url, tensor=name)

    def close(self) -> None:
        for file in self._files.values():
            file.close()
        self._files.clear()


async def open_checkpoint(url: str, engine: Engine, storage_options: Mapping[str, Any] | None) -> Checkpoint:
    """Discover what ``url`` names: one file, an index, or a folder holding either."""
    options = dict(storage_options or {})
    where = Location.parse(url)
    if where.path.endswith(".json"):
        return await _from_index(where, engine, options)
    local = where.local_path
    if where.path.endswith(SUFFIX) or (local is not None and os.path.exists(local) and not os.path.isdir(local)):
        return Checkpoint(where.shown, engine, options, [url])
    not_a_checkpoint: HeaderError | PermissionError | None = None
    if local is None and _may_be_a_file(where):
        # A file is a file whatever its name (w.bin, model.st, noext): what the object is decides, not its
        # suffix. Its header read is the first request either way, and the opened file is kept.
        try:
            return Checkpoint(where.shown, engine, options, [url]).adopt(await RemoteFile.open(url, engine, options))
        except (FileNotFoundError, IsADirectoryError):
            pass  # a folder, prefix or repo
        except (HeaderError, PermissionError) as exc:
            if where.scheme not in ("http", "https"):
                raise
            # An HTTP folder may answer with a page (a listing) or refuse (nginx: 403 without autoindex): try
            # the folder names; if they are not there either, this answer is the error to report.
            not_a_checkpoint = exc
    if where.scheme in ("http", "https"):
        return await _guess_http_folder(where, engine, options, not_a_checkpoint)
    if where.scheme not in ("", "file", "local"):
        # An object store or repo: its index, where it has one, in one GET; the listing that would find it
        # there imports the protocol's filesystem (s3fs, gcsfs, HfFileSystem: 0.2-0.4 s) and costs a request.
        with contextlib.suppress(FileNotFoundError):
            return await _from_index(where.child(INDEX_NAME), engine, options)
    try:
        names = await engine.run(_list_folder, where, options)
    except Exception as exc:
        named = credentials_error(exc, where.shown)
        if named is not None:
            raise named from None
        raise
    if INDEX_NAME in names:
        return await _from_index(where.child(INDEX_NAME), engine, options)
    shards = [where.child(name).url for name in names if name.endswith(SUFFIX) and _listable(where, name)]
    if not shards:
        raise FileNotFoundError(f"{where.shown}: no {INDEX_NAME} and no *{SUFFIX} files there")
    return Checkpoint(where.shown.rstrip("/"), engine, options, shards)


async def _guess_http_folder(
    where: Location, engine: Engine, options: dict[str, Any], not_a_checkpoint: HeaderError | PermissionError | None
) -> Checkpoint:
    """A plain HTTP server cannot list a folder: try the transformers names, the index first. If neither is
    there, the URL's own answer says what went wrong (``not_a_checkpoint``), else that nothing was found."""
    try:
        return await _from_index(where.child(INDEX_NAME), engine, options)
    except FileNotFoundError:
        pass
    single = where.child(f"model{SUFFIX}")
    try:
        file = await RemoteFile.open(single.url, engine, options)
    except FileNotFoundError:
        if not_a_checkpoint is not None:
            raise not_a_checkpoint from None
        raise FileNotFoundError(
            f"{where.shown}: not found: no file there, and no {INDEX_NAME} or model{SUFFIX} under it"
        ) from None
    return Checkpoint(single.shown, engine, options, [single.url]).adopt(file)


def _may_be_a_file(where: Location) -> bool:
    """Whether a URL without a telling suffix may name one file: not a folder ("/" at the end), nor a Hub
    repo root (hf://org/repo, which would need a repo-info request to tell)."""
    if where.path.endswith("/") or (where.scheme in ("", "file", "local")):
        return False
    if where.scheme == "hf":
        from .cloud import parse_hub_url

        return parse_hub_url(where.url) is not None
    return True


async def _from_index(where: Location, engine: Engine, options: dict[str, Any]) -> Checkpoint:
    raw, pinned = await read_whole_pinned(where.url, engine, options)
    try:
        index = json.loads(raw)
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("weight_map must map tensor names to file names")
        metadata = index.get("metadata")
    except RecursionError:
        raise HeaderError(f"{where.shown}: not a safetensors index (JSON nested too deeply)", url=where.shown) from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        why = f"{type(exc).__name__}: {str(exc)[:200]}"
        raise HeaderError(f"{where.shown}: not a safetensors index ({why})", url=where.shown) from None
    # Shards are read from the version the index came from (a Hub commit), not from a branch that may move.
    folder = Location.parse(pinned or where.url).folder()
    files = {name: folder.child(name).url for name in dict.fromkeys(weight_map.values())}  # checked: inside
    shards = sorted(files.values())
    return Checkpoint(
        where.shown,
        engine,
        options,
        shards,
        {tensor: files[f] for tensor, f in weight_map.items()},
        metadata,
    )


def _listable(folder: Location, name: str) -> bool:
    """Whether a listed file name passes the inside-the-folder check (an odd name is skipped, not fatal)."""
    try:
        inside(folder, name)
    except HeaderError:
        logger.debug("%s: skipping listed file %r", folder.shown, name)
        return False
    return True


def _list_folder(where: Location, options: dict[str, Any]) -> list[str]:
    """File names in a folder, prefix or repo, sorted."""
    folder = where.local_path
    if folder is not None:
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{where.shown}: no such file or folder")
        return sorted(os.listdir(folder))
    import fsspec

    fs, path = fsspec.core.url_to_fs(where.url, **options)
    return sorted(posixpath.basename(entry.rstrip("/")) for entry in fs.ls(path, detail=False))
