"""A local, always-valid cache of fetched bytes: written through from the memory the bytes landed in.

Layout under the cache folder (``cache_dir``)::

    lock                      flock: creating, replacing and evicting entries
    entries/<key>/meta.json   the redacted URL, the object's version and size (mtime: last use, for LRU)
    entries/<key>/data        a sparse file of the object's size; bytes at their own offsets
    entries/<key>/ranges      the range map: one appended line per byte range that is in ``data``
    entries/<key>/lock        flock: shared while a process uses the entry (eviction skips it)

``<key>`` hashes the URL without query string or user info (``Location.shown``, location.py) and the non-secret option
naming the endpoint; the entry also records the version (ETag, generation, commit) and size the probe saw,
and a different version replaces the entry: a changed object is never served from the cache.

Crash safety: a range is appended to the map only after its bytes were written to ``data`` (so a process
killed at any point leaves the map describing bytes that are there). Against power loss, each record carries
the boot id; records of an earlier boot are trusted only if a later ``S`` line says the data file was
``fdatasync``-ed after they were appended (done off the load's path, after it finishes).
"""

from __future__ import annotations

import atexit
import ctypes
import fcntl
import json
import logging
import mmap
import os
import queue
import re
import shutil
import sys
import threading
import time
import uuid
from bisect import bisect_right
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .config import Config
from .errors import NotCachedError
from .integrity import Digest
from .location import redact
from .process_cache import ProcessCache
from .sources import ByteStream, LocalSource, Probe, Source

logger = logging.getLogger(__name__)

# Bytes a later load probes the network for when an entry exists: enough for the size, version and the
# header length; the header itself then comes from the cache when the version matches.
_SMALL_PROBE = 8
# Writes up to this size (gap bytes, small tensors, chunk ends) are plain buffered writes: too small for
# the aligned-buffer path to pay.
_WRITE_NOW_BELOW = (1 << 20) + 1
_WRITER_THREADS = 2
BLOCK = 4096  # O_DIRECT alignment of offsets, lengths and memory
_BOUNCE = 8 << 20  # the engine's largest chunk
_BOUNCES = 8  # aligned buffers queued for the writer threads (64 MiB): loads wait for one when all are taken
_DIRECT = True  # tests switch it off to cover the buffered path
_ENTRY_OPTIONS = ("endpoint", "endpoint_url", "account_host", "account_name")  # name the server, not secrets


def cache_root(setting: str) -> Path:
    """The folder of a ``cache_dir`` setting: ``"default"`` is the platform's user cache folder."""
    if setting != "default":
        return Path(setting).expanduser()
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "stream_st"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "stream_st"


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")
    except OSError:  # no boot id (macOS): records are trusted only once synced
        return "unknown"


_BOOT = _boot_id()


def entry_key(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[str, str]:
    """(folder name, the redacted description it hashes) of the entry for ``url``."""
    shown = redact(url)
    named = {k: str(v) for k, v in (storage_options or {}).items() if k in _ENTRY_OPTIONS and v}
    described = shown + ("\n" + json.dumps(named, sort_keys=True) if named else "")
    return sha256(described.encode()).hexdigest()[:32], shown


# --- byte ranges ------------------------------------------------------------------------------------------


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(r for r in ranges if r[1] > r[0]):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _segments(have: list[tuple[int, int]], start: int, end: int) -> list[tuple[int, int, bool]]:
    """[start, end) cut into (start, end, cached) runs."""
    out: list[tuple[int, int, bool]] = []
    at = start
    index = max(0, bisect_right(have, (start, sys.maxsize)) - 1)
    for a, b in have[index:]:
        if a >= end:
            break
        if b <= at:
            continue
        if a > at:
            out.append((at, a, False))
        out.append((max(a, at), min(b, end), True))
        at = min(b, end)
    if at < end:
        out.append((at, end, False))
    return out


def _parse_map(text: str, size: int) -> tuple[list[tuple[int, int]], bool]:
    """The trusted ranges of a map, and whether records of this boot still wait for a sync."""
    trusted: list[tuple[int, int]] = []
    waiting: dict[str, list[tuple[int, int, int]]] = {}
    offset = 0
    for line in text.splitlines(keepends=True):
        start_of_line, offset = offset, offset + len(line.encode())
        fields = line.split()
        if not line.endswith("\n"):
            break  # torn by a crash mid-append
        if len(fields) == 4 and fields[0] == "R" and fields[1].isdigit() and fields[2].isdigit():
            a, b = int(fields[1]), int(fields[2])
            if 0 <= a < b <= size:
                waiting.setdefault(fields[3], []).append((a, b, start_of_line))
        elif len(fields) == 3 and fields[0] == "S" and fields[2].isdigit():
            upto = int(fields[2])  # records that start before this map offset were synced
            pending = waiting.get(fields[1], [])
            trusted += [(a, b) for a, b, at in pending if at < upto]
            waiting[fields[1]] = [r for r in pending if r[2] >= upto]
    trusted += [(a, b) for a, b, _ in waiting.get(_BOOT, [])]  # this boot: the page cache holds them
    return _merge(trusted), bool(waiting.get(_BOOT))


# --- the store --------------------------------------------------------------------------------------------


class _Locked:
    """An exclusive flock on ``path`` for the duration of a ``with`` block."""

    def __init__(self, path: Path) -> None:
        self._path = path

    def __enter__(self) -> None:
        self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        os.close(self._fd)  # releases the lock


@dataclass(frozen=True)
class EntryInfo:
    """What ``stream-st cache ls`` shows of an entry."""

    key: str
    url: str
    version: str
    size: int
    cached: int  # bytes the range map vouches for
    disk: int  # bytes the sparse data file occupies
    last_used: float


class Store:
    """The entries under one cache folder."""

    def __init__(self, root: Path, max_bytes: int | None = None) -> None:
        self.root, self.max_bytes = root, max_bytes
        self._entries = root / "entries"
        self._trash = root / "trash"

    def _lock(self) -> _Locked:
        self._entries.mkdir(parents=True, exist_ok=True)
        return _Locked(self.root / "lock")

    def find(self, key: str) -> Entry | None:
        """The entry of ``key`` whatever its version (offline loads), or None."""
        with self._lock():
            meta = _read_meta(self._entries / key)
            return None if meta is None else Entry.open(self._entries / key, meta)

    def open(self, key: str, url: str, version: str, size: int, pinned: str | None) -> Entry | None:
        """The entry of ``key`` for this version, made (or replacing another version's) if needed; None if
        the object alone is larger than the cache may hold."""
        if self.max_bytes is not None and size > self.max_bytes:
            return None
        folder = self._entries / key
        with self._lock():
            meta = _read_meta(folder)
            if meta is None or meta.get("version") != version or meta.get("size") != size:
                if meta is not None or folder.exists():
                    self._discard(folder)  # another version (or debris): never served again
                self._evict(need=size, keep=key)
                meta = {"url": url, "version": version, "size": size, "pinned_url": pinned, "created": time.time()}
                building = self._entries / f".new-{uuid.uuid4().hex}"
                building.mkdir()
                with open(building / "data", "wb") as data:
                    data.truncate(_round_up(size))  # sparse; whole blocks, for O_DIRECT writes of the last one
                for name in ("ranges", "lock", "writer"):
                    (building / name).touch()
                (building / "meta.json").write_text(json.dumps(meta))
                os.rename(building, folder)
            return Entry.open(folder, meta)

    def entries(self) -> list[EntryInfo]:
        found = []
        for folder in sorted(self._entries.glob("[0-9a-f]*")) if self._entries.exists() else []:
            meta = _read_meta(folder)
            if meta is None:
                continue
            try:
                ranges, _ = _parse_map((folder / "ranges").read_text(errors="replace"), int(meta["size"]))
                disk = (folder / "data").stat().st_blocks * 512
                used = (folder / "meta.json").stat().st_mtime
            except OSError:
                continue
            cached = sum(b - a for a, b in ranges)
            found.append(EntryInfo(folder.name, meta["url"], meta["version"], meta["size"], cached, disk, used))
        return found

    def remove(self, keys: list[str]) -> int:
        """Remove these entries (in use or not: a process reading one keeps its open files); how many."""
        with self._lock():
            removed = 0
            for key in keys:
                if (self._entries / key).exists():
                    self._discard(self._entries / key)
                    removed += 1
            return removed

    def prune(self, max_bytes: int) -> int:
        """Evict least recently used entries not in use until the cache holds at most ``max_bytes``."""
        with self._lock():
            return self._evict(need=0, keep=None, cap=max_bytes)

    def _evict(self, *, need: int, keep: str | None, cap: int | None = None) -> int:
        cap = self.max_bytes if cap is None else cap
        shutil.rmtree(self._trash, ignore_errors=True)  # debris of a crash mid-removal
        if cap is None:
            return 0
        infos = sorted(self.entries(), key=lambda e: e.last_used)
        total = sum(e.disk for e in infos) + need
        evicted = 0
        for info in infos:
            if total <= cap:
                break
            if info.key == keep or not _try_exclusive(self._entries / info.key / "lock"):
                continue  # in use by a load (this process's or another's)
            self._discard(self._entries / info.key)
            total -= info.disk
            evicted += 1
            logger.info("cache: evicted %s (%d bytes)", info.url, info.disk)
        return evicted

    def _discard(self, folder: Path) -> None:
        self._trash.mkdir(parents=True, exist_ok=True)
        doomed = self._trash / uuid.uuid4().hex
        os.rename(folder, doomed)  # atomic: no process finds a half-removed entry
        shutil.rmtree(doomed, ignore_errors=True)


def _read_meta(folder: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(meta, dict) and isinstance(meta.get("version"), str) and isinstance(meta.get("size"), int)
    return meta if ok else None


def _try_exclusive(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return True  # no lock file: nobody can hold it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


class Entry:
    """One object's cached bytes, open for reading and writing by this process."""

    def __init__(
        self, folder: Path, meta: dict[str, Any], data: int, ranges: int, lock: int, writer: int | None
    ) -> None:
        self.folder, self.meta = folder, meta
        self.url: str = meta["url"]
        self.version: str = meta["version"]
        self.size: int = meta["size"]
        self.pinned_url: str | None = meta.get("pinned_url")
        self.data = data
        self._ranges_fd, self._lock_fd, self._writer_fd = ranges, lock, writer
        # Only the load holding the writer lock writes. Its chunks are disjoint, so a block is written either
        # whole by the one chunk covering it (O_DIRECT) or in pieces by the chunks sharing it (buffered, merged
        # in the page cache), never both at once; a later load's O_DIRECT write of a block first flushes and
        # then drops its cached pages (the kernel does both). O_DIRECT: no page cache to fill, measured at
        # 0.04-0.05 s of CPU per GiB against 0.5-2.3 s buffered (2-core VM).
        self.writing = writer is not None
        self.direct: int | None = None
        if self.writing:
            try:
                self.direct = os.open(folder / "data", os.O_WRONLY | getattr(os, "O_DIRECT", 0)) if _DIRECT else None
            except OSError:  # tmpfs and others refuse O_DIRECT: buffered writes
                self.direct = None
        self._have: list[tuple[int, int]] = []
        self._map_size = -1
        self._mapping: Any = None  # mapping.map_file of ``data``, made on first use
        self._mutex = threading.Lock()
        self.wrote = False
        self.unsynced = False
        self._pending = 0
        self._settled = threading.Condition()
        self.refresh()

    @classmethod
    def open(cls, folder: Path, meta: dict[str, Any]) -> Entry:
        lock = os.open(folder / "lock", os.O_RDWR)
        fcntl.flock(lock, fcntl.LOCK_SH)  # released when closed; eviction skips entries in use
        os.utime(folder / "meta.json")  # last use, for LRU
        data = os.open(folder / "data", os.O_RDWR)
        ranges = os.open(folder / "ranges", os.O_RDWR | os.O_APPEND)
        candidate = os.open(folder / "writer", os.O_RDWR | os.O_CREAT, 0o644)
        writer: int | None = candidate
        try:
            fcntl.flock(candidate, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # another load (of this process or another) writes this entry now: only read
            os.close(candidate)
            writer = None
        return cls(folder, meta, data, ranges, lock, writer)

    def refresh(self) -> None:
        """Re-read the map if it grew (another process, or another thread of this one, added ranges)."""
        size = os.fstat(self._ranges_fd).st_size
        with self._mutex:
            if size == self._map_size:
                return
            text = os.pread(self._ranges_fd, size, 0).decode(errors="replace")
            self._have, self.unsynced = _parse_map(text, self.size)
            self._map_size = size

    def segments(self, start: int, end: int) -> list[tuple[int, int, bool]]:
        self.refresh()
        with self._mutex:
            return _segments(self._have, start, end)

    def holds_any(self) -> bool:
        with self._mutex:
            return bool(self._have)

    def mapped(self, start: int, end: int) -> Any | None:
        """The data file mapped copy-on-write (made once), if bytes [start, end) are all in it. Safe to
        hand out as tensor memory: a recorded range is never rewritten, and replacing or evicting an entry
        only unlinks its files, which leaves existing maps intact."""
        with self._mutex:  # the ranges known since the probe: a range another process adds later is read
            if _segments(self._have, start, end) != [(start, end, True)]:
                return None
            if self._mapping is None:
                from .mapping import map_file

                self._mapping = map_file(self.data, self.size)
            return self._mapping or None  # False: the system refused to map it

    def cached_prefix(self, length: int) -> bytes:
        """The object's first bytes, up to ``length``, as far as the cache holds them contiguously."""
        first = self.segments(0, min(length, self.size))
        have = first[0][1] if first and first[0][2] else 0
        return os.pread(self.data, have, 0) if have else b""

    def record(self, ranges: list[tuple[int, int]]) -> None:
        """Vouch for ranges whose bytes are written to ``data`` (never before: see the module docstring)."""
        ranges = _merge(ranges)
        if not ranges:
            return
        os.write(self._ranges_fd, "".join(f"R {a} {b} {_BOOT}\n" for a, b in ranges).encode())
        with self._mutex:
            self._have = _merge(self._have + ranges)
        self.wrote = self.unsynced = True

    def write_now(self, offset: int, view: memoryview | bytes) -> None:
        _pwrite_all(self.data, memoryview(view), offset)

    def pending(self, change: int) -> None:
        """Count writes queued for this entry (it stays open until they are done)."""
        with self._settled:
            self._pending += change
            self._settled.notify_all()

    def settle(self) -> None:
        with self._settled:
            while self._pending:
                self._settled.wait()

    def sync(self) -> None:
        """Make the data durable, then mark every record appended so far as durable."""
        upto = os.fstat(self._ranges_fd).st_size
        os.fdatasync(self.data)
        os.write(self._ranges_fd, f"S {_BOOT} {upto}\n".encode())
        self.unsynced = False

    def close(self) -> None:
        for fd in (self.data, self._ranges_fd, self._lock_fd, self._writer_fd, self.direct):
            if fd is not None:
                os.close(fd)


def _copy(target: memoryview, source: memoryview) -> None:
    """``target[:len(source)] = source`` without holding the GIL (ctypes releases it around the call): a
    plain slice assignment would stop every other Python thread (the torch import a cold start overlaps
    with the download) for the whole copy."""
    if source.readonly:
        target[: len(source)] = source
        return
    ctypes.memmove(_address(target), _address(source), len(source))


def _address(view: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(view)) if len(view) else 0


def _round_up(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while len(view):
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


# --- the background writer and syncer --------------------------------------------------------------------


class _OutputMemory:
    """The host outputs of the loads in progress on one source (address ranges): blocks that lie in them, at
    addresses aligned like the file, are written to the cache from where they are, without a copy. A load
    waits for those writes (``release``) before its tensors are returned or freed; until then nothing else
    writes to that memory, so the bytes written are the bytes landed."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._ranges: dict[int, int] = {}  # start address -> end address
        self._writes = 0

    def hold(self, ranges: list[tuple[int, int]]) -> None:
        with self._changed:
            self._ranges.update(ranges)

    def take(self, view: memoryview) -> bool:
        """Whether ``view`` lies in a held output (then it is counted as a write in flight)."""
        start = _address(view)
        end = start + len(view)
        with self._changed:
            if not any(a <= start and end <= b for a, b in self._ranges.items()):
                return False
            self._writes += 1
            return True

    def written(self) -> None:
        with self._changed:
            self._writes -= 1
            self._changed.notify_all()

    def release(self, ranges: list[tuple[int, int]]) -> None:
        """Wait until no write from held memory is in flight, then forget ``ranges``."""
        with self._changed:
            while self._writes:
                self._changed.wait()
            for start, _ in ranges:
                self._ranges.pop(start, None)


class _Writer:
    """Writes cache bytes: buffered ones at once; whole blocks with O_DIRECT by daemon threads, each range
    recorded once it is on the disk. Blocks in a load's held outputs at addresses aligned like the file
    (``sinks.output_tensor`` places outputs so while a cache entry is written) are written from there, and
    the load waits for them (``_OutputMemory.release``); others are first copied into one of at most
    ``_BOUNCES`` aligned buffers, which frees the caller's memory at once (a pinned slot can be reused) and
    bounds what is queued."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Entry, int, memoryview, memoryview | None, _OutputMemory | None]] = (
            queue.SimpleQueue()
        )
        self._free: queue.SimpleQueue[memoryview] = queue.SimpleQueue()
        self._made = 0
        self._lock = threading.Lock()
        self._queued = 0
        self._idle = threading.Condition(self._lock)
        atexit.register(self.drain)  # what is queued (at most _BOUNCES buffers) reaches the disk before exit
        for n in range(_WRITER_THREADS):
            threading.Thread(target=self._run, name=f"stream_st-cache-{n}", daemon=True).start()

    def write(
        self, entry: Entry, offset: int, view: memoryview, outputs: _OutputMemory | None = None
    ) -> list[tuple[int, int]]:
        """Write ``view`` at ``offset`` of ``entry``; return the ranges already written (the caller records
        them); the whole blocks are recorded by the writer threads when written, from ``view`` itself if it
        lies in ``outputs`` aligned like the file."""
        end = offset + len(view)
        first, last = _round_up(offset), end // BLOCK * BLOCK
        if entry.direct is None or len(view) < _WRITE_NOW_BELOW or last - first < BLOCK:
            _pwrite_all(entry.data, view, offset)
            return [(offset, end)]
        _pwrite_all(entry.data, view[: first - offset], offset)
        _pwrite_all(entry.data, view[last - offset :], last)
        blocks = view[first - offset : last - offset]
        if outputs is not None and not blocks.readonly and _address(blocks) % BLOCK == 0 and outputs.take(blocks):
            self._queue(entry, first, blocks, None, outputs)  # no copy: the memory is aligned like the file
            return [(offset, first), (last, end)]
        at = first
        while at < last:
            bounce = self._bounce()
            size = min(len(bounce), last - at)
            _copy(bounce, view[at - offset : at - offset + size])  # the copy O_DIRECT's alignment costs
            self._queue(entry, at, bounce[:size], bounce, None)
            at += size
        return [(offset, first), (last, end)]

    def _queue(
        self, entry: Entry, at: int, memory: memoryview, bounce: memoryview | None, outputs: _OutputMemory | None
    ) -> None:
        entry.pending(+1)
        with self._lock:
            self._queued += 1
        self._jobs.put((entry, at, memory, bounce, outputs))

    def _bounce(self) -> memoryview:
        with self._lock:
            make = self._made < _BOUNCES and self._free.empty()
            self._made += make
        return memoryview(mmap.mmap(-1, _BOUNCE)) if make else self._free.get()  # page-aligned, as O_DIRECT needs

    def _run(self) -> None:
        while True:
            entry, at, memory, bounce, outputs = self._jobs.get()
            try:
                assert entry.direct is not None
                _pwrite_all(entry.direct, memory, at)
                entry.record([(at, at + len(memory))])
            except OSError as exc:
                logger.warning("cache: could not write to %s: %s", entry.folder, exc)
            finally:
                del memory
                if bounce is not None:
                    self._free.put(bounce)
                if outputs is not None:
                    outputs.written()
                entry.pending(-1)
                with self._lock:
                    self._queued -= 1
                    self._idle.notify_all()

    def drain(self) -> None:
        with self._idle:
            while self._queued:
                self._idle.wait()


class _Syncer:
    """One daemon thread that finishes entries after their loads, off the loads' path: waits for their
    queued writes, syncs what is not durable yet, and closes them."""

    def __init__(self) -> None:
        self.jobs: queue.Queue[Entry] = queue.Queue()
        threading.Thread(target=self._run, name="stream_st-cache-sync", daemon=True).start()

    def _run(self) -> None:
        while True:
            entry = self.jobs.get()
            try:
                entry.settle()
                if entry.unsynced:
                    entry.sync()
            except OSError as exc:
                logger.warning("cache: could not sync %s: %s", entry.url, exc)
            finally:
                entry.close()
                self.jobs.task_done()


_threads: ProcessCache[tuple[_Writer, _Syncer]] = ProcessCache()  # threads do not survive fork


def _background() -> tuple[_Writer, _Syncer]:
    return _threads.get("threads", lambda: (_Writer(), _Syncer()))


def wait_for_syncs() -> None:
    """Block until every entry closed so far is durable on disk (``stream-st download``)."""
    for _, syncer in _threads.values():
        syncer.jobs.join()


# --- the Hugging Face cache -------------------------------------------------------------------------------


@dataclass(frozen=True)
class HubFile:
    """A file of a Hub repo, as huggingface_hub's cache lays it out."""

    kind: str  # the URL prefix of the repo type: "", "datasets/", "spaces/"
    repo_id: str
    revision: str | None
    path: str

    @classmethod
    def parse(cls, url: str) -> HubFile | None:
        from .cloud import parse_hub_url

        where = parse_hub_url(url)
        return None if where is None else cls(where.kind, where.repo_id, where.revision, where.path)

    def folder(self) -> Path:
        from huggingface_hub import constants

        repo_type = self.kind.rstrip("/").removesuffix("s") or "model"
        return Path(constants.HF_HUB_CACHE) / f"{repo_type}s--{self.repo_id.replace('/', '--')}"

    def known_commit(self, offline: bool) -> str | None:
        """The commit without asking the network: a commit in the URL, or offline the ref the cache recorded."""
        if self.revision and re.fullmatch(r"[0-9a-f]{40}", self.revision):
            return self.revision
        if not offline:
            return None
        try:
            commit = (self.folder() / "refs" / (self.revision or "main")).read_text().strip()
        except OSError:
            return None
        return commit if re.fullmatch(r"[0-9a-f]{40}", commit) else None

    def snapshot(self, commit: str | None) -> Path | None:
        """The file in huggingface_hub's cache for ``commit``, if it is there (complete: it downloads
        to a temporary name and moves the file into place)."""
        if commit is None:
            return None
        path = self.folder() / "snapshots" / commit / self.path
        return path if path.is_file() else None

    def pinned(self, commit: str) -> str:
        return f"hf://{self.kind}{self.repo_id}@{commit}/{self.path}"


def _hub_offline() -> bool:
    from huggingface_hub import constants

    check = getattr(constants, "is_offline_mode", None)
    return bool(check() if callable(check) else constants.HF_HUB_OFFLINE)


_COMMIT_IN_URL = re.compile(r"@([0-9a-f]{40})/")


# --- the caching source -----------------------------------------------------------------------------------


class CachingSource(Source):
    """Any source, with its bytes kept in a local store (and, for hf://, huggingface_hub's cache read).

    ``probe`` learns the version from the network (a few bytes when an entry exists) or, offline, from the
    entry; ``open_range`` serves cached ranges with ``preadv`` and reads the others from the inner source,
    writing each chunk to the store from the memory it landed in before the stream is closed."""

    def __init__(
        self,
        url: str,
        key: str,
        opener: Callable[[], Source] | None,
        store: Store | None,
        hub: HubFile | None,
    ) -> None:
        self.url = redact(url)
        self._key, self._opener, self._store, self._hub = key, opener, store, hub
        self.inner: Source | None = None
        self.local: LocalSource | None = None  # a file of huggingface_hub's cache
        self.entry: Entry | None = None
        self._pinned: str | None = None
        self.outputs = _OutputMemory()  # the host outputs of this source's loads in progress

    @property
    def aligned_destinations(self) -> bool:  # type: ignore[override]
        return self.entry is not None and self.entry.writing and self.entry.direct is not None

    @property
    def maps_files(self) -> bool:  # type: ignore[override]
        return self.local is not None or (self.entry is not None and self.entry.holds_any())

    def hold_outputs(self, ranges: list[tuple[int, int]]) -> None:
        self.outputs.hold(ranges)

    def release_outputs(self, ranges: list[tuple[int, int]]) -> None:
        self.outputs.release(ranges)

    @property
    def version_is_global(self) -> bool:  # type: ignore[override]
        return self.local is None and (self.inner is None or self.inner.version_is_global)

    def probe(self, length: int) -> Probe:
        self._forget()  # a retried probe starts over (no write is pending before the first range)
        offline = self._opener is None
        if self._hub is not None:
            commit = self._hub.known_commit(offline)
            found = self._hub.snapshot(commit)
            if found is not None and commit is not None:
                return self._serve_local(found, commit, length, None)
        if offline:
            self.entry = self._store.find(self._key) if self._store else None
            if self.entry is None:
                raise NotCachedError(
                    f"{self.url}: offline ({_why_offline(self._hub)}) and not in the cache ({self._where()})",
                    url=self.url,
                )
            self._pinned = self.entry.pinned_url
            prefix = self.entry.cached_prefix(length)
            return self._remember(Probe(prefix, self.entry.size, self.entry.version))
        assert self._opener is not None
        inner = self.inner = self.inner or self._opener()
        hinted = (self._store is not None and (self._store._entries / self._key).exists()) or (
            self._hub is not None and self._hub.folder().exists()
        )
        probe = inner.probe(min(length, _SMALL_PROBE) if hinted else length)
        pinned = inner.pinned_url()
        if self._hub is not None and pinned:
            commit_match = _COMMIT_IN_URL.search(pinned)
            found = self._hub.snapshot(commit_match.group(1) if commit_match else None)
            if found is not None and commit_match is not None and found.stat().st_size == probe.size:
                return self._serve_local(found, commit_match.group(1), length, pinned)
        if self._store is None or probe.version is None:  # nothing to key a version on: not cached
            return self._remember(probe)
        self.entry = self._store.open(self._key, self.url, probe.version, probe.size, pinned)
        if self.entry is None:
            return self._remember(probe)
        prefix = probe.prefix
        if prefix and self.entry.writing and self.entry.segments(0, len(prefix)) != [(0, len(prefix), True)]:
            self.entry.write_now(0, prefix)
            self.entry.record([(0, len(prefix))])
        if len(prefix) < min(length, probe.size):
            prefix = max(prefix, self.entry.cached_prefix(length), key=len)
        return self._remember(Probe(prefix, probe.size, probe.version, probe.ranges))

    def _forget(self) -> None:
        for kept in (self.local, self.entry):
            if kept is not None:
                kept.close()
        self.local = self.entry = None

    def _serve_local(self, path: Path, commit: str, length: int, pinned: str | None) -> Probe:
        assert self._hub is not None
        self.local = LocalSource(str(path))
        self._pinned = pinned or self._hub.pinned(commit)
        logger.debug("%s: read from huggingface_hub's cache, %s", self.url, path)
        return self._remember(self.local.probe(length))

    def _where(self) -> str:
        places = [str(self._store.root)] if self._store else []
        if self._hub is not None:
            places.append(f"huggingface_hub's cache {self._hub.folder()}")
        return " nor ".join(places) if places else "no cache_dir is set"

    def open_range(self, start: int, end: int) -> ByteStream:
        if self.local is not None:
            return self.local.open_range(start, end)
        if self.entry is None:
            assert self.inner is not None
            return self.inner.open_range(start, end)
        segments = self.entry.segments(start, end)
        if self.inner is not None and not self.inner.ranges and not all(cached for _, _, cached in segments):
            segments = [(start, end, False)]  # the server streams from byte 0 anyway: one pass, all written
        if self.inner is None:
            missing = [(a, b) for a, b, cached in segments if not cached]
            if missing:
                raise NotCachedError(
                    f"{self.url}: offline ({_why_offline(self._hub)}), and {self._describe(missing)} "
                    f"not in the cache ({self._where()})",
                    url=self.url,
                    start=missing[0][0],
                    end=missing[-1][1],
                )
        return _CachedStream(self, segments)

    def _describe(self, missing: list[tuple[int, int]]) -> str:
        """The tensors (from the cached header) or byte ranges that are missing, for the offline message."""
        assert self.entry is not None
        names = []
        try:
            prefix = self.entry.cached_prefix(self.entry.size)
            length = int.from_bytes(prefix[:8], "little")
            header = json.loads(prefix[8 : 8 + length]) if 8 + length <= len(prefix) else {}
            for name, info in header.items():
                if name == "__metadata__" or not isinstance(info, dict):
                    continue
                a, b = (8 + length + int(x) for x in info["data_offsets"])
                if any(a < y and x < b for x, y in missing):
                    names.append(name)
        except (ValueError, KeyError, TypeError):
            names = []
        if names:
            shown = ", ".join(repr(n) for n in names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            return f"tensor(s) {shown} are"
        return "bytes " + ", ".join(f"{a}-{b - 1}" for a, b in missing[:5]) + " are"

    def mapped(self, start: int, end: int) -> Any | None:
        if self.local is not None:
            return self.local.mapped(start, end)
        return self.entry.mapped(start, end) if self.entry is not None else None

    def published_digest(self) -> Digest | None:
        return self.inner.published_digest() if self.inner is not None else None

    def pinned_url(self) -> str | None:
        if self._pinned is not None:
            return self._pinned
        return self.inner.pinned_url() if self.inner is not None else None

    def check_unchanged(self) -> None:
        for source in (self.local, self.inner):
            if source is not None:
                source.check_unchanged()

    def close(self) -> None:
        for source in (self.local, self.inner):
            if source is not None:
                source.close()
        entry, self.entry = self.entry, None
        if entry is None:
            return
        if self._store is not None and self._store.max_bytes is not None and entry.writing:
            with self._store._lock():
                self._store._evict(need=0, keep=entry.folder.name)
        if entry.writing or entry.unsynced:
            _background()[1].jobs.put(entry)  # queued writes, then fdatasync, off the load's path; then close
        else:
            entry.close()


def _why_offline(hub: HubFile | None) -> str:
    return "STREAM_ST_OFFLINE / offline=True" + (" or HF_HUB_OFFLINE" if hub is not None else "")


class _CachedStream:
    """Bytes [start, end) of a cached source: cached runs by ``preadv`` into the caller's memory; missing
    runs from the inner source, each chunk then written to the store from that same memory."""

    def __init__(self, source: CachingSource, segments: list[tuple[int, int, bool]]) -> None:
        assert source.entry is not None
        self._source, self._entry = source, source.entry
        self._segments: Iterator[tuple[int, int, bool]] = iter(segments)
        self._current: tuple[int, int, bool] | None = next(self._segments, None)
        self._position = self._current[0] if self._current else 0
        self._inner: ByteStream | None = None
        self._written: list[tuple[int, int]] = []

    def readinto(self, buffer: memoryview) -> int:
        while self._current is not None and self._position >= self._current[1]:
            self._finish_inner(reusable=True)
            self._current = next(self._segments, None)
        if self._current is None or not len(buffer):
            return 0
        _, end, cached = self._current
        view = buffer[: end - self._position]
        if cached:
            got = os.preadv(self._entry.data, [view], self._position)
            self._position += got
            return got
        if self._inner is None:
            assert self._source.inner is not None
            self._inner = self._source.inner.open_range(self._position, end)
        filled = 0
        try:
            while filled < len(view):
                got = self._inner.readinto(view[filled:])
                if not got:
                    break
                filled += got
        finally:
            if filled:
                self._write(self._position, view[:filled])
                self._position += filled
        return filled

    def _write(self, offset: int, view: memoryview) -> None:
        if not self._entry.writing:
            return  # another load writes this entry right now: it will hold these bytes
        try:
            self._written += _background()[0].write(self._entry, offset, view, self._source.outputs)
        except OSError as exc:
            logger.warning("cache: could not write to %s: %s", self._entry.folder, exc)

    def _finish_inner(self, *, reusable: bool) -> None:
        if self._inner is not None:
            self._inner.close(reusable=reusable)
            self._inner = None

    def close(self, *, reusable: bool) -> None:
        try:
            self._finish_inner(reusable=reusable and self._current is not None and self._position >= self._current[1])
        finally:
            try:
                self._entry.record(self._written)  # written (or copied for the writer) before this returns
            except OSError as exc:
                logger.warning("cache: could not update %s: %s", self._entry.folder, exc)


# --- the hook ---------------------------------------------------------------------------------------------


def open_cached(
    url: str, config: Config, storage_options: Mapping[str, Any] | None, opener: Callable[[], Source]
) -> Source:
    """The source for ``url``: ``opener()`` as it is when no cache applies (no ``cache_dir``, not offline,
    or a local file), else a CachingSource around it (which calls ``opener`` only when it needs the
    network)."""
    scheme = urlsplit(url).scheme.lower() if "://" in url else ""
    if scheme in ("", "file", "local"):
        return opener()
    hub = HubFile.parse(url) if scheme == "hf" else None
    offline = config.offline or (scheme == "hf" and _hub_offline())
    store = Store(cache_root(config.cache_dir), config.cache_max_bytes) if config.cache_dir else None
    if store is None and not offline:
        return opener()
    key, _ = entry_key(url, storage_options)
    return CachingSource(url, key, None if offline else opener, store, hub)
