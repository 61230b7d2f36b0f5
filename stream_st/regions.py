"""Part of a tensor along one dimension, and the byte spans of the file that hold it: pure, no I/O.

A dim-0 region (rows) is one contiguous span. A region of a later dimension (columns, for tensor-parallel
weights split along dim 1) is one span per index of the leading dimensions; the planner merges spans
closer than ``max_gap``, so a small gap is fetched and dropped rather than paid for with a request.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .dtypes import DTYPE_BITS
from .header import TensorInfo


@dataclass(frozen=True)
class Region:
    """Indices [start, stop) of dimension ``dim`` of a tensor, everything of the other dimensions."""

    dim: int
    start: int
    stop: int

    def shape(self, info: TensorInfo) -> tuple[int, ...]:
        shape = list(info.shape)
        shape[self.dim] = self.stop - self.start
        return tuple(shape)

    def check(self, info: TensorInfo, url: str) -> None:
        if not 0 <= self.dim < len(info.shape):
            raise IndexError(f"{url}: tensor {info.name!r} of shape {list(info.shape)} has no dim {self.dim}")
        if not 0 <= self.start <= self.stop <= info.shape[self.dim]:
            raise IndexError(
                f"{url}: {self.start}:{self.stop} is outside dim {self.dim} of tensor {info.name!r} "
                f"of shape {list(info.shape)}"
            )

    def spans(self, info: TensorInfo) -> list[tuple[int, int, int]]:
        """(first byte, end byte, offset in the output) of every run of the file the region needs."""
        inner_bits = math.prod(info.shape[self.dim + 1 :]) * DTYPE_BITS[info.dtype]  # one index of ``dim``
        if inner_bits % 8:  # F4 (4 bits) along its last dim
            raise ValueError(f"tensor {info.name!r}: sub-byte dtype {info.dtype} cannot be sliced along dim {self.dim}")
        inner = inner_bits // 8
        run = (self.stop - self.start) * inner
        stride = info.shape[self.dim] * inner  # bytes of one index of the dimension before ``dim``
        outer = math.prod(info.shape[: self.dim])
        if run == 0:
            return []
        first = info.start + self.start * inner
        return [(first + i * stride, first + i * stride + run, i * run) for i in range(outer)]


def split(length: int, parts: int, index: int) -> tuple[int, int]:
    """The [start, stop) of chunk ``index`` of ``parts`` near-equal chunks of ``length`` (as torch.chunk)."""
    size = -(-length // parts)
    return min(index * size, length), min((index + 1) * size, length)
