"""Bytes a prefetch has fetched (or is fetching) and that a later load of the same file takes over.

A prefetch (prefetcher.py) registers each file it streams as a ``HeldFile`` under the file's URL and the
caller's storage options. A load opening that file (remote.py) finds it here, checks that the object is
still the version the prefetch read, and *takes* the tensors it wants: their host memory becomes the
output tensors' storage, so prefetched bytes are neither downloaded twice nor copied on the host.

Torch-free on purpose: prefetching starts before ``import torch``.
"""

from __future__ import annotations

import contextvars
import json
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from .errors import StreamSTError


class PrefetchCancelledError(StreamSTError):
    """The prefetch holding a tensor was cancelled before its bytes arrived; the load fetches it itself."""


@dataclass(frozen=True)
class Held:
    """A tensor's bytes in host memory: ``memory[offset : offset + nbytes]`` (page- or 64-byte aligned)."""

    memory: Any  # an anonymous mmap or a bytearray; torch.frombuffer shares it without a copy
    offset: int
    nbytes: int


class HeldFile:
    """One file of a prefetch: what its header read saw, and a future per tensor it is fetching."""

    def __init__(
        self, url: str, header_bytes: bytes, size: int, version: str | None, on_take: Callable[[int], None]
    ) -> None:
        self.url = url
        self.header_bytes = header_bytes  # the 8-byte length and the JSON header, as the prefetch read them
        self.size, self.version = size, version
        self._tensors: dict[str, tuple[int, Future[Held]]] = {}
        self._on_take = on_take  # tells the prefetch that ``nbytes`` are no longer its to hold
        self._lock = threading.Lock()

    def hold(self, name: str, nbytes: int) -> Future[Held]:
        future: Future[Held] = Future()
        with self._lock:
            self._tensors[name] = (nbytes, future)
        return future

    def take(self, names: Iterable[str]) -> dict[str, Future[Held]]:
        """Hand over the tensors of ``names`` this file holds (each once: a second take finds nothing)."""
        taken: dict[str, Future[Held]] = {}
        released = 0
        with self._lock:
            for name in names:
                entry = self._tensors.pop(name, None)
                if entry is not None:
                    released += entry[0]
                    taken[name] = entry[1]
            empty = not self._tensors
        if released:
            self._on_take(released)
        if empty:
            _forget(self)
        return taken

    def drop(self) -> None:
        """Forget every tensor not taken (a cancelled prefetch): its memory can be freed."""
        with self._lock:
            self._tensors.clear()
        _forget(self)


def options_key(storage_options: Mapping[str, Any] | None) -> str:
    """Loads match a prefetch only with the same storage options (the same credentials, endpoint, revision)."""
    return json.dumps(dict(storage_options or {}), sort_keys=True, default=repr)


# Set inside a prefetch's own task: its opens of the files it fetches must not look for themselves here.
prefetching: contextvars.ContextVar[bool] = contextvars.ContextVar("stream_st_prefetching", default=False)

_lock = threading.Lock()
_files: dict[tuple[str, str], list[HeldFile]] = {}
_resolving: list[tuple[str, threading.Event]] = []  # prefetches still finding their files, by options key


def active() -> bool:
    """Whether a load should look here: some prefetch is registered, and this is not a prefetch itself."""
    return bool(_files or _resolving) and not prefetching.get()


def register(key: str, files: Iterable[HeldFile]) -> None:
    with _lock:
        for file in files:
            _files.setdefault((file.url, key), []).append(file)


def _forget(file: HeldFile) -> None:
    with _lock:
        for key, files in list(_files.items()):
            if file in files:
                files.remove(file)
                if not files:
                    del _files[key]


def resolving(key: str) -> threading.Event:
    """Mark a prefetch as still finding its files; set the returned event once they are registered."""
    done = threading.Event()
    with _lock:
        _resolving.append((key, done))
    return done


def find(url: str, key: str, wait: float) -> HeldFile | None:
    """The held file for ``url`` (blocking): prefetches with the same options still finding their files
    are waited for, up to ``wait`` seconds, so a load that starts early does not download twice."""
    with _lock:
        _resolving[:] = [(k, event) for k, event in _resolving if not event.is_set()]
        pending = [event for k, event in _resolving if k == key]
    for event in pending:
        event.wait(wait)
    with _lock:
        files = _files.get((url, key))
        return files[0] if files else None
