"""Shared checks of the security suite: nothing left behind, and no secret anywhere a user could see it."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
import safetensors.torch
import torch

from stream_st._loop import get_loop

SECRET = "Sup3rS3cretSignature"  # a presigned query's signature
PASSWORD = "hunter2Passw0rd"  # URL user info
TOKEN = "Bearer tok-9f8e7d6c5b4a"  # a caller's header
SECRETS = (SECRET, PASSWORD, TOKEN, TOKEN.split()[1])


def checkpoint_bytes(state: dict[str, torch.Tensor] | None = None) -> bytes:
    state = state if state is not None else {"a": torch.arange(10, dtype=torch.float32), "b": torch.ones(3, 4)}
    return safetensors.torch.save(state)


@pytest.fixture(scope="session", autouse=True)
def _io_loop() -> None:
    get_loop()  # started once, before the first test counts threads and descriptors


def _ours() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("stream_st") and t.name != "stream_st-io"]


def _fds() -> dict[str, str]:
    found = {}
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            found[fd] = os.readlink(f"/proc/self/fd/{fd}")
    return found


@pytest.fixture(autouse=True)
def nothing_left_behind() -> Iterator[None]:
    """No stream_st thread (workers, watchdog) and no descriptor outlives a test (5 s to wind down)."""
    threads_before = set(_ours())
    fds_before = _fds()
    yield
    deadline = time.monotonic() + 5
    while True:
        threads = [t for t in _ours() if t not in threads_before]
        fds = {fd: target for fd, target in _fds().items() if fds_before.get(fd) != target}
        if (not threads and not fds) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not threads, f"threads left behind: {threads}"
    assert not fds, f"descriptors left behind: {fds}"


def chain(exc: BaseException | None) -> Iterator[BaseException]:
    """``exc`` and every exception it was raised from or during."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def texts_of(exc: BaseException | None) -> list[str]:
    out = []
    for e in chain(exc):
        out += [str(e), repr(e), repr(e.args), str(getattr(e, "url", "")), str(getattr(e, "filename", ""))]
    return out


def assert_no_secret(texts: Iterable[str], secrets: Iterable[str] = SECRETS) -> None:
    for text in texts:
        for secret in secrets:
            assert secret not in text, f"secret {secret!r} leaked in: {text[:500]}"


def log_texts(caplog: pytest.LogCaptureFixture) -> list[str]:
    out = []
    for record in caplog.records:
        out.append(record.getMessage())
        if record.exc_info and record.exc_info[1] is not None:
            out += texts_of(record.exc_info[1])
    return out


@pytest.fixture()
def debug_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG)
    return caplog


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path
