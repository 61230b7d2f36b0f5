"""Objects as byte-range sources: one interface over HTTP(S), local files and any fsspec filesystem.

A source answers two questions for the engine: "what are the object's first bytes, size and version?"
(``probe``, one request) and "give me a stream of bytes [start, end)" (``open_range``, blocking, called on
worker threads, the stream writing into caller memory).
"""

from __future__ import annotations

import os
import resource
import stat
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from .errors import ConfigError, FetchError, IncompleteReadError, ObjectChangedError, RangeNotSupportedError
from .integrity import Digest
from .location import Location, redact, redact_text
from .transport import ConnectionPool, Endpoint, RangeStream, open_range


class ByteStream(Protocol):
    """Bytes of one range, read into caller memory."""

    def readinto(self, buffer: memoryview) -> int: ...

    def close(self, *, reusable: bool) -> None: ...


@dataclass(frozen=True)
class Probe:
    """What the first request told: the object's first bytes, its size and version."""

    prefix: bytes
    size: int
    version: str | None
    ranges: bool = True  # False: the server ignores Range, so the object must be read in one stream


class Source(ABC):
    """One object. ``url`` is safe to print (no query string, no credentials)."""

    url: str
    size: int | None = None
    version: str | None = None
    ranges: bool = True
    maps_files = False  # whether ``mapped`` may return a map (else loads need not ask, tensor by tensor)
    # Whether host destinations should be block-aligned like the object (a cache entry being written: its
    # whole blocks then go to disk straight from them).
    aligned_destinations = False
    # Whether every machine reading this URL sees the same version string (an ETag, a generation); not
    # for local paths, whose inode and mtime differ between copies of one file on different nodes.
    version_is_global = True

    @abstractmethod
    def probe(self, length: int) -> Probe:
        """Fetch bytes [0, length) or fewer if the object is shorter; learn size and version."""

    @abstractmethod
    def open_range(self, start: int, end: int) -> ByteStream:
        """Start reading bytes [start, end) of the version seen by ``probe``."""

    def published_digest(self) -> Digest | None:
        """The digest the store publishes for the whole object, if any (blocking; may cost a request)."""
        return None

    def pinned_url(self) -> str | None:
        """After ``probe``: a URL that names the very version read where the store has immutable versions (a
        Hub commit), so that files beside this one (shards of its index, its sidecar) come from that
        version too; else None."""
        return None

    def check_unchanged(self) -> None:  # noqa: B027 - optional hook; most sources check on every request
        """Raise ObjectChangedError if the object is known to have changed since ``probe``."""

    def hold_outputs(self, ranges: list[tuple[int, int]]) -> None:  # noqa: B027 - optional hook
        """A load's host outputs (address ranges) stay put until ``release_outputs``: a source that keeps a
        copy of what it reads (cache.py) may write it from there."""

    def release_outputs(self, ranges: list[tuple[int, int]]) -> None:  # noqa: B027 - optional hook
        """Called before the outputs of ``hold_outputs`` are returned or freed; waits until none is in use."""

    def mapped(self, start: int, end: int) -> Any | None:
        """After ``probe``: a copy-on-write map of a local file holding the object's bytes at their own
        offsets, if bytes [start, end) are all in it (mapping.py); else None (read them)."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the source holds (file descriptors)."""

    def _remember(self, probe: Probe) -> Probe:
        self.size, self.version, self.ranges = probe.size, probe.version, probe.ranges
        return probe


def read_exactly(stream: ByteStream, buffer: memoryview, *, url: str, start: int) -> None:
    """Fill ``buffer`` from ``stream``; a short body raises IncompleteReadError."""
    filled = 0
    while filled < len(buffer):
        got = stream.readinto(buffer[filled:])
        if not got:
            raise IncompleteReadError(
                f"{url}: body ended after {filled} of {len(buffer)} bytes starting at byte {start}",
                url=url,
                start=start,
                end=start + len(buffer),
            )
        filled += got


class HttpSource(Source):
    """http(s):// through the threaded ``http.client`` data plane."""

    def __init__(
        self, url: str, pool: ConnectionPool, headers: Mapping[str, str] | None = None, *, name: str = ""
    ) -> None:
        self.endpoint = Endpoint(url, dict(headers or {}), name)
        self.url = self.endpoint.shown
        self._pool = pool

    def probe(self, length: int) -> Probe:
        stream, total = open_range(self._pool, self.endpoint, 0, length, size=None, etag=None)
        want = min(length, total)
        try:
            prefix = bytearray(want)
            read_exactly(stream, memoryview(prefix), url=self.url, start=0)
        except BaseException:
            stream.close(reusable=False)
            raise
        # A server that ignored Range is still sending the whole object: drop that connection.
        stream.close(reusable=stream.partial or want == total)
        # Resolve redirects once (the Hub sends every file to a CDN): later ranges go straight there.
        self.endpoint = stream.endpoint
        self.after_probe(stream.header)
        return self._remember(Probe(bytes(prefix), total, stream.etag, ranges=stream.partial or want == total))

    def after_probe(self, header: Callable[[str], str | None]) -> None:
        """Hook for protocols that pin the version the probe saw in the URL (beyond If-Match)."""

    def open_range(self, start: int, end: int) -> RangeStream:
        stream, _ = open_range(
            self._pool, self.endpoint, start, end, size=self.size, etag=self.version, ranged=self.ranges
        )
        return stream


class _FileRange:
    """Positional reads (``preadv``) from an open file straight into caller memory; holds the file's
    descriptor open (see ``_OpenFiles``) until closed."""

    def __init__(self, source: LocalSource, fd: int, start: int, end: int) -> None:
        self._source: LocalSource | None = source
        self._fd, self._position, self._end = fd, start, end

    def readinto(self, buffer: memoryview) -> int:
        if self._position >= self._end:
            return 0
        view = buffer[: self._end - self._position]
        got = os.preadv(self._fd, [view], self._position)
        self._position += got
        return got

    def close(self, *, reusable: bool) -> None:
        if self._source is not None:
            _open_files.done(self._source)
            self._source = None


class _OpenFiles:
    """Bounds the descriptors local sources hold open: a checkpoint of 5,000 local shards must load under
    ``ulimit -n 1024``. Each source keeps its descriptor while in use and after (reads through one
    descriptor see one inode); past the limit, the least recently used idle one is closed, and reopened
    when needed, which fails with ObjectChangedError if the path now names another file or version."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: OrderedDict[LocalSource, int] = OrderedDict()  # source -> readers using its descriptor

    def use(self, source: LocalSource) -> int:
        """The source's open descriptor (reopened if it was closed), held until ``done``."""
        with self._lock:
            if source._fd is None:
                self._make_room()
                source._fd = source._reopen()
            self._open[source] = self._open.get(source, 0) + 1
            self._open.move_to_end(source)
            return source._fd

    def done(self, source: LocalSource) -> None:
        with self._lock:
            if source in self._open:
                self._open[source] = max(0, self._open[source] - 1)

    def forget(self, source: LocalSource) -> None:
        with self._lock:
            self._open.pop(source, None)
            fd, source._fd = source._fd, None
        if fd is not None:
            os.close(fd)

    @staticmethod
    def limit() -> int:
        """A quarter of the process's descriptor limit (read each time: a program may lower it), at most
        1024: room for sockets, the caller's own files and the files of other loads."""
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        return max(16, min(1024, soft // 4)) if soft > 0 else 1024

    def _make_room(self) -> None:
        excess = len(self._open) - self.limit() + 1
        for idle in [s for s, users in self._open.items() if not users][: max(0, excess)]:
            del self._open[idle]
            if idle._fd is not None:
                os.close(idle._fd)
                idle._fd = None

    def reset_after_fork(self) -> None:
        self._lock = threading.Lock()


_open_files = _OpenFiles()
os.register_at_fork(after_in_child=_open_files.reset_after_fork)


class LocalSource(Source):
    """A local path or file:// URL, read with positional reads.

    Reads through one open descriptor see one inode: a file replaced by rename mid-load is still read
    whole and consistent; an in-place rewrite is caught by comparing size and mtime at the end. Anything
    but a regular file (a FIFO, a device) is refused without blocking on it.
    """

    version_is_global = False
    maps_files = True

    def __init__(self, url: str) -> None:
        where = Location.parse(url)
        self.url = where.shown
        self.path = where.local_path or url
        self._fd: int | None = None
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) the probe saw
        self._mapping: Any = None  # mapping.map_file of the whole file, made on first use

    def _reopen(self) -> int:
        """Open the path without blocking (a FIFO would wait for a writer), check it is a regular file
        and, after the first open, the same file and version as before."""
        if "\x00" in self.path:
            raise FetchError(f"{self.url}: a path cannot hold a NUL byte", url=self.url)
        fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)  # FileNotFoundError etc. pass
        try:
            info = os.fstat(fd)
            if stat.S_ISDIR(info.st_mode):
                raise IsADirectoryError(f"{self.url}: is a directory, not a safetensors file")
            if not stat.S_ISREG(info.st_mode):
                raise FetchError(f"{self.url}: not a regular file ({_file_kind(info.st_mode)})", url=self.url)
            if self._identity is not None and (
                (info.st_dev, info.st_ino) != self._identity or _file_version(info) != self.version
            ):
                raise ObjectChangedError(f"{self.url}: file was replaced or modified during the load", url=self.url)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def probe(self, length: int) -> Probe:
        fd = _open_files.use(self)
        try:
            info = os.fstat(fd)
            self._identity = (info.st_dev, info.st_ino)
            want = min(length, info.st_size)
            prefix = os.pread(fd, want, 0)
        finally:
            _open_files.done(self)
        return self._remember(Probe(prefix, info.st_size, _file_version(info)))

    def open_range(self, start: int, end: int) -> _FileRange:
        assert self._identity is not None, "probe() first"
        return _FileRange(self, _open_files.use(self), start, end)

    def mapped(self, start: int, end: int) -> Any | None:
        assert self._identity is not None, "probe() first"
        if self._mapping is None and self.size:
            from .mapping import map_file

            fd = _open_files.use(self)  # the descriptor of the probed inode (a reopen checks it)
            try:
                self._mapping = map_file(fd, self.size)
            finally:
                _open_files.done(self)
        return self._mapping or None  # False: the system refused to map it

    def check_unchanged(self) -> None:
        fd = _open_files.use(self)
        try:
            if _file_version(os.fstat(fd)) != self.version:
                raise ObjectChangedError(f"{self.url}: file was modified during the load", url=self.url)
        finally:
            _open_files.done(self)

    def close(self) -> None:
        _open_files.forget(self)


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
    for test, kind in (*kinds, (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a regular file"


def _file_version(info: os.stat_result) -> str:
    return f"{info.st_ino}:{info.st_size}:{info.st_mtime_ns}"


class _BytesRange:
    """A range fetched whole by fsspec's ``cat_file``; handed out as ``readinto`` calls."""

    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)
        self._position = 0

    def readinto(self, buffer: memoryview) -> int:
        got = min(len(buffer), len(self._data) - self._position)
        buffer[:got] = self._data[self._position : self._position + got]
        self._position += got
        return got

    def close(self, *, reusable: bool) -> None:
        pass


_VERSION_KEYS = ("VersionId", "generation", "ETag", "etag", "mtime", "LastModified", "created")


class FsspecSource(Source):
    """Any other fsspec filesystem (memory://, s3://, gs://, hf://, ...) through ``cat_file``."""

    def __init__(self, url: str, storage_options: Mapping[str, Any]) -> None:
        import fsspec

        self.url = redact(url)
        try:
            self.fs, self.path = fsspec.core.url_to_fs(url, **storage_options)
        except (ValueError, ImportError) as exc:  # "Protocol not known", or its package is not installed
            raise ConfigError(
                f"{self.url}: no filesystem can read this URL ({redact_text(str(exc))})", url=self.url
            ) from None
        self._lock = threading.Lock()

    def probe(self, length: int) -> Probe:
        info = self.fs.info(self.path)
        if info.get("type") == "directory":
            raise IsADirectoryError(f"{self.url}: is a directory, not a safetensors file")
        size = int(info["size"])
        prefix = self.fs.cat_file(self.path, start=0, end=min(length, size)) if size else b""
        version = next((str(info[k]) for k in _VERSION_KEYS if info.get(k) is not None), None)
        return self._remember(Probe(bytes(prefix), size, version))

    def open_range(self, start: int, end: int) -> _BytesRange:
        data = self.fs.cat_file(self.path, start=start, end=end)
        if len(data) > end - start:
            raise RangeNotSupportedError(
                f"{self.url}: asked for bytes {start}-{end - 1}, got {len(data)} bytes",
                url=self.url,
                start=start,
                end=end,
            )
        return _BytesRange(data)  # a short answer surfaces as IncompleteReadError where the part is read
