"""The arguments of a public call, checked and normalised once, on the caller's thread, before any I/O:
paths, devices, cast targets, ``backend=``, and the deadline every operation applies the same way."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable
from typing import TypeVar

import torch

from .config import Config
from .dtypes import CAST_NAMES
from .errors import ConfigError

Device = str | int | torch.device
T = TypeVar("T")

BACKENDS = ("mmap", "pread")  # safetensors' names (config.py: memory_map)


def path_or_url(url: str | os.PathLike[str]) -> str:
    """A URL or local path as a string (``pathlib.Path`` and other ``os.PathLike`` objects included)."""
    if isinstance(url, str):
        return url
    if isinstance(url, os.PathLike):
        return os.fspath(url)
    raise TypeError(f"expected a URL, a path or an os.PathLike, got {type(url).__name__}")


def cast_target(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``dtype=`` as a floating torch dtype: a torch.dtype, or a name such as ``"bf16"``, ``"float16"`` or
    ``"torch.float16"``. Integer and bool targets are refused: casting weights to them destroys them."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        name = CAST_NAMES.get(dtype.removeprefix("torch.").lower())
        target = getattr(torch, name) if name else None
    else:
        target = dtype
    if isinstance(target, torch.dtype) and target.is_floating_point:
        return target
    names = ", ".join(sorted(CAST_NAMES))
    raise ConfigError(
        f"dtype={dtype!r} is not a floating-point dtype to cast to; pass a floating torch.dtype or one of: {names}"
    )


def with_backend(config: Config, backend: str | None) -> Config:
    """safetensors' ``backend=``: ``"mmap"`` maps local files too (``memory_map="all"``), ``"pread"`` reads
    every byte into memory the tensors own (``"never"``); anything else is safetensors' error."""
    if backend is None:
        return config
    if backend not in BACKENDS:
        expected = ", ".join(f'"{name}"' for name in BACKENDS)
        raise ConfigError(f'backend "{backend}" is invalid (expected one of: {expected})')
    return config.replace(memory_map="all" if backend == "mmap" else "never")


def to_device(device: Device) -> torch.device:
    """``"cuda"``, ``"cuda:1"``, ``1`` or a torch.device, as a torch.device (``"cuda"`` gets its index).

    The sync functions call this on the caller's thread before handing the load to the IO thread: CUDA's
    current device is per thread, and ``"cuda"`` must mean the GPU the caller made current
    (``torch.cuda.set_device(local_rank)``), not the IO thread's GPU 0."""
    try:
        target = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device={device!r} is not a device ({exc})") from None
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r}, but CUDA is not available to this torch ({torch.__version__})")
    if target.type == "cuda" and target.index is None:
        target = torch.device("cuda", torch.cuda.current_device())
    return target


async def within(timeout: float | None, what: str, awaitable: Awaitable[T]) -> T:
    """``awaitable`` bounded by ``timeout`` seconds (None: unbounded); on expiry it is cancelled (its
    sockets aborted, its threads stopped) and ``TimeoutError`` names ``what``."""
    if timeout is None:
        return await awaitable
    try:
        return await asyncio.wait_for(awaitable, timeout)
    except TimeoutError:  # distinct classes before Python 3.11
        raise TimeoutError(f"{what} did not finish within timeout={timeout}s") from None
