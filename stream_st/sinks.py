"""Where fetched bytes land. On CPU: straight into the memory of the output tensors."""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass

import torch

from .cache import BLOCK  # the alignment of the cache's O_DIRECT writes
from .dtypes import to_torch, torch_shape
from .errors import UnsupportedDtypeError
from .header import TensorInfo

ALIGN_FROM = 1 << 20  # smaller outputs are written to the cache with plain writes anyway


@dataclass
class OutputTensor:
    """An output tensor's raw bytes (host or device memory), and how to present them as the typed tensor."""

    buffer: torch.Tensor  # flat uint8, owns the memory
    dtype: torch.dtype
    shape: tuple[int, ...]

    def view(self) -> memoryview:
        """A writable view of the bytes, for ``readinto`` (host memory only)."""
        return writable_view(self.buffer)

    def tensor(self) -> torch.Tensor:
        if self.buffer.numel() == 0:
            return torch.empty(self.shape, dtype=self.dtype, device=self.buffer.device)
        return self.buffer.view(self.dtype).reshape(self.shape)


def output_tensor(
    info: TensorInfo,
    shape: tuple[int, ...],
    *,
    url: str,
    device: torch.device | None = None,
    buffer: torch.Tensor | None = None,
    aligned_with: int | None = None,
) -> OutputTensor:
    """Allocate an output of ``shape`` for (part of) ``info`` on ``device`` (default: host memory), after
    the header was validated; or use ``buffer``, flat uint8 memory of that size (a slice of a larger output).
    ``aligned_with``: the object offset of the output's first byte, when the bytes will also be written to a
    file at that offset (a cache entry): large host outputs are then placed block-aligned like the file."""
    dtype = to_torch(info.dtype)
    if dtype is None:
        raise UnsupportedDtypeError(
            f"{url}: tensor {info.name!r} has dtype {info.dtype}, which this torch ({torch.__version__}) cannot hold",
            url=url,
            tensor=info.name,
        )
    held = torch_shape(info.dtype, shape)
    if held is None:
        raise UnsupportedDtypeError(
            f"{url}: tensor {info.name!r} has dtype {info.dtype} and shape {list(shape)}; torch holds F4 as "
            "float4_e2m1fn_x2 (two values per element), so the last dim must be even",
            url=url,
            tensor=info.name,
        )
    shape = held
    nbytes = math.prod(shape) * dtype.itemsize
    if buffer is not None:
        assert buffer.dtype == torch.uint8 and buffer.numel() == nbytes, (info.name, buffer.numel(), nbytes)
        return OutputTensor(buffer, dtype, shape)
    if aligned_with is not None and device is None and nbytes >= ALIGN_FROM and aligned_with % dtype.itemsize == 0:
        return OutputTensor(_aligned(nbytes, aligned_with), dtype, shape)
    return OutputTensor(torch.empty(nbytes, dtype=torch.uint8, device=device), dtype, shape)


def _aligned(nbytes: int, offset: int) -> torch.Tensor:
    """``nbytes`` of host memory whose address agrees with ``offset`` modulo ``BLOCK``, so that whole blocks of
    a file written from it need no aligned copy (``O_DIRECT``; cache.py). Costs < 4 KiB per tensor."""
    raw = torch.empty(nbytes + BLOCK - 1, dtype=torch.uint8)
    skip = (offset - raw.data_ptr()) % BLOCK
    return raw[skip : skip + nbytes]


def writable_view(tensor: torch.Tensor) -> memoryview:
    """A writable memoryview over a contiguous CPU tensor's bytes (no numpy needed)."""
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return memoryview(bytearray(0))
    array = (ctypes.c_char * nbytes).from_address(tensor.data_ptr())
    array.owner = tensor  # type: ignore[attr-defined]  # the view keeps the memory it points at alive
    return memoryview(array).cast("B")
