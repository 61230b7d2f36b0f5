"""Verify streamed bytes against a known digest, hashing in file order while later parts still download.

Where digests come from: the caller (``verify="sha256:<hex>"``), the source (the Hub's LFS sha256, S3's
full-object ``ChecksumSHA256``, GCS's ``md5Hash``), or a sidecar ``<file>.sha256.json`` written by
``stream-st digest`` that also holds one sha256 per tensor, which makes partial loads verifiable.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import re
import threading
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from .errors import IntegrityError
from .location import Location

logger = logging.getLogger(__name__)

SIDECAR_SUFFIX = ".sha256.json"
VerifyOption = bool | str | None  # None/False: off; True: warn on partial loads; "strict": fail; "sha256:<hex>"
ALGORITHMS = ("sha256", "md5", "crc32")


class Hasher(Protocol):
    def update(self, data: memoryview) -> None: ...

    def digest(self) -> bytes: ...


class _Crc32:
    def __init__(self) -> None:
        self._value = 0

    def update(self, data: memoryview) -> None:
        self._value = zlib.crc32(data, self._value)

    def digest(self) -> bytes:
        return self._value.to_bytes(4, "big")


class ChunkedBytes(Protocol):
    """Bytes that are not in host memory (a GPU tensor): read back in bounded chunks to be hashed."""

    def chunks(self, start: int, end: int) -> Iterator[memoryview]: ...


Memory = memoryview | ChunkedBytes


def feed(hasher: Hasher, memory: Memory, start: int, end: int) -> None:
    """Hash ``memory[start:end]``."""
    if isinstance(memory, memoryview):
        hasher.update(memory[start:end])
    else:
        for chunk in memory.chunks(start, end):
            hasher.update(chunk)


def new_hasher(algorithm: str) -> Hasher:
    if algorithm == "crc32":
        return _Crc32()
    return hashlib.new(algorithm)


@dataclass(frozen=True)
class Digest:
    """An expected digest of a whole object: algorithm, raw value, and where it came from."""

    algorithm: str
    value: bytes
    origin: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.value.hex()}"


def parse_digest(text: str, origin: str = "the caller") -> Digest:
    """``"sha256:<hex>"`` (or md5 / crc32) into a Digest; a clear ValueError otherwise."""
    algorithm, _, value = text.partition(":")
    algorithm = algorithm.lower()
    if algorithm not in ALGORITHMS or not value:
        raise ValueError(f"verify={text!r}: expected '<algorithm>:<hex>' with algorithm one of {', '.join(ALGORITHMS)}")
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raise ValueError(f"verify={text!r}: the digest is not hexadecimal") from None
    if len(raw) != new_hasher(algorithm).digest().__len__():
        raise ValueError(f"verify={text!r}: a {algorithm} digest has {len(new_hasher(algorithm).digest())} bytes")
    return Digest(algorithm, raw, origin)


def from_base64(algorithm: str, value: str, origin: str) -> Digest:
    """A digest as S3 and GCS publish them (base64)."""
    try:
        return Digest(algorithm, base64.b64decode(value, validate=True), origin)
    except binascii.Error:
        raise IntegrityError(f"{origin}: {value[:100]!r} is not base64") from None


@dataclass
class OrderedHasher:
    """Hashes an object's bytes in order as the parts holding them land, in any order, in memory.

    ``segments`` are (start, end, memory) runs that together cover [0, size) once; memory on a GPU is
    read back in chunks (far faster than the hash rate, and host memory stays bounded). ``landed(start,
    end)`` is called from worker threads and never waits for the hash: one thread at a time hashes, and it
    goes on until it has caught up with every byte that landed in order meanwhile, while the other threads
    keep downloading. So a verified load takes about max(download, hash) instead of their sum.
    """

    url: str
    size: int
    expected: Digest
    segments: list[tuple[int, int, Memory]]
    hasher: Hasher = field(init=False)
    frontier: int = field(init=False, default=0)  # bytes hashed; only the hashing thread moves it
    _ready: int = field(init=False, default=0)  # end of the bytes landed in order so far
    _done: list[tuple[int, int]] = field(init=False, default_factory=list)
    _hashing: bool = field(init=False, default=False)
    _lock: threading.Lock = field(init=False, default_factory=threading.Lock)
    _next_segment: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.hasher = new_hasher(self.expected.algorithm)
        self.segments.sort(key=lambda s: s[0])

    def extend(self, segments: list[tuple[int, int, Memory]]) -> None:
        """More segments (a file hashed batch by batch); bytes that already landed in them are hashed now."""
        with self._lock:
            self.segments.extend(segments)
            self.segments.sort(key=lambda s: s[0])
        self.landed(0, 0)  # resumes hashing up to what has landed in order

    def landed(self, start: int, end: int) -> None:
        with self._lock:
            self._done.append((start, end))
            self._done.sort()
            while self._done and self._done[0][0] <= self._ready:
                self._ready = max(self._ready, self._done.pop(0)[1])
            if self._hashing:
                return  # the thread hashing now takes these bytes too before it stops
            self._hashing = True
        try:
            while True:
                with self._lock:
                    ready = self._ready
                    if self.frontier >= ready:
                        self._hashing = False
                        return
                before = self.frontier
                self._hash_until(ready)  # outside the lock: landing parts never wait for the hash
                if self.frontier == before:  # segments end short of what landed: check() reports it
                    with self._lock:
                        self._hashing = False
                    return
        except BaseException:
            with self._lock:
                self._hashing = False
            raise

    def _hash_until(self, end: int) -> None:
        while self.frontier < end and self._next_segment < len(self.segments):
            seg_start, seg_end, memory = self.segments[self._next_segment]
            stop = min(seg_end, end)
            feed(self.hasher, memory, self.frontier - seg_start, stop - seg_start)
            self.frontier = stop
            if stop == seg_end:
                self._next_segment += 1

    def digest(self) -> bytes:
        """The digest of every byte; IntegrityError if some were not hashed (segments short of ``size``)."""
        if self.frontier != self.size:
            raise IntegrityError(f"{self.url}: only {self.frontier} of {self.size} bytes were hashed", url=self.url)
        return self.hasher.digest()

    def check(self) -> None:
        """Raise IntegrityError unless every byte was hashed and the digest matches."""
        got = self.digest()
        if got != self.expected.value:
            raise IntegrityError(
                f"{self.url}: {self.expected.algorithm} of the streamed bytes is {got.hex()}, but "
                f"{self.expected.origin} says {self.expected.value.hex()}; no tensors are returned",
                url=self.url,
            )
        logger.debug("%s: %s verified against %s", self.url, self.expected.algorithm, self.expected.origin)


@dataclass(frozen=True)
class Sidecar:
    """``<file>.sha256.json``: the sha256 of the whole file and of each tensor's bytes."""

    file_sha256: str
    size: int
    tensors: dict[str, str]

    @classmethod
    def of_file(
        cls, url: str, size: int, segments: list[tuple[int, int, Memory]], tensors: Iterable[tuple[str, int, Memory]]
    ) -> Sidecar:
        """The sidecar of a file whose bytes are all in memory (``stream-st digest``), hashed by the code that
        checks it: the whole file as ``OrderedHasher`` hashes a verified load (``segments`` as it takes them,
        covering [0, size) once), each tensor (name, size, memory) as ``check_tensors`` does."""
        whole = OrderedHasher(url, size, Digest("sha256", b"", "nobody: computed, not checked"), segments)
        whole.landed(0, size)
        return cls(whole.digest().hex(), size, {name: tensor_sha256(memory, n) for name, n, memory in tensors})

    @classmethod
    def parse(cls, raw: bytes, url: str) -> Sidecar:
        """Read a sidecar; anything but the expected shape (sha256 hex digests, an integer size) is an
        IntegrityError naming ``url`` (a display form), never a raw ValueError or RecursionError."""
        try:
            document = json.loads(raw)
            sidecar = cls(document["sha256"], document["size"], document["tensors"])
        except RecursionError:
            raise IntegrityError(f"{url}: not a stream-st digest sidecar (JSON nested too deeply)", url=url) from None
        except (ValueError, KeyError, TypeError) as exc:
            why = f"{type(exc).__name__}: {str(exc)[:200]}"
            raise IntegrityError(f"{url}: not a stream-st digest sidecar ({why})", url=url) from None
        wrong = sidecar._malformed()
        if wrong:
            raise IntegrityError(f"{url}: not a stream-st digest sidecar ({wrong})", url=url)
        return sidecar

    def _malformed(self) -> str | None:
        if not _is_sha256(self.file_sha256):
            return "'sha256' must be 64 hexadecimal digits"
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 0:
            return "'size' must be a non-negative integer"
        if not isinstance(self.tensors, dict):
            return "'tensors' must map tensor names to sha256 digests"
        bad = next((name for name, value in self.tensors.items() if not _is_sha256(value)), None)
        if bad is not None:
            return f"the digest of tensor {str(bad)[:100]!r} is not 64 hexadecimal digits"
        return None

    def dumps(self) -> str:
        return json.dumps({"sha256": self.file_sha256, "size": self.size, "tensors": self.tensors}, indent=1)

    def whole(self, url: str) -> Digest:
        return Digest("sha256", bytes.fromhex(self.file_sha256), f"the sidecar {sidecar_location(url).shown}")


def sidecar_location(file: str | Location) -> Location:
    """Where the sidecar of ``file`` is: ``<name>.sha256.json`` in the same folder, built on the path (a
    presigned query string signs the file's own path only, so it is not carried over)."""
    where = Location.parse(file)
    return where.sibling(where.name + SIDECAR_SUFFIX)


def _is_sha256(value: object) -> bool:
    return isinstance(value, str) and re.fullmatch(r"[0-9a-fA-F]{64}", value) is not None


def tensor_sha256(memory: Memory, size: int) -> str:
    """The hex sha256 of a tensor's ``size`` bytes: what a sidecar holds for it."""
    hasher = hashlib.sha256()
    feed(hasher, memory, 0, size)
    return hasher.hexdigest()


def check_tensors(url: str, sidecar: Sidecar, tensors: Iterable[tuple[str, int, Memory]]) -> None:
    """Compare each tensor's bytes (name, size, memory) with its sha256 in the sidecar."""
    for name, size, memory in tensors:
        expected = sidecar.tensors.get(name)
        if expected is None:
            raise IntegrityError(f"{url}: the sidecar has no digest for tensor {name!r}", url=url, tensor=name)
        got = tensor_sha256(memory, size)
        if got != expected.lower():
            raise IntegrityError(
                f"{url}: tensor {name!r} has sha256 {got}, but the sidecar says {expected.lower()}",
                url=url,
                tensor=name,
            )
