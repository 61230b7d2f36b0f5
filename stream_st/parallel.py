"""Tensor-parallel slices: ``TensorParallel(rank, world_size, {"*.q_proj.weight": 0, "*.o_proj.weight": 1})``
makes each rank fetch only its chunk (as ``torch.chunk``) of the matching tensors, along the given dimension.
Split-and-exchange between ranks (``process_group=``) is in distributed.py.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ._loop import gather_or_cancel
from .header import TensorInfo
from .progress import Progress
from .regions import Region, split
from .remote import RemoteFile
from .sinks import OutputTensor

RegionOf = Callable[[TensorInfo], Region | None]


@dataclass(frozen=True)
class TensorParallel:
    """Which tensors are split across ``world_size`` ranks along which dimension; ``rank`` is ours.

    ``plan`` maps glob patterns of tensor names to the dimension to split (0: rows, as for column-parallel
    linear weights; 1: columns, as for row-parallel ones). Tensors no pattern matches are loaded whole.
    """

    rank: int
    world_size: int
    plan: Mapping[str, int]

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in a world of {self.world_size}")

    def region(self, info: TensorInfo) -> Region | None:
        for pattern, dim in self.plan.items():
            if fnmatch.fnmatchcase(info.name, pattern):
                if dim >= len(info.shape):
                    raise ValueError(
                        f"tensor {info.name!r} of shape {list(info.shape)} cannot be split along dim {dim}"
                    )
                return Region(dim, *split(info.shape[dim], self.world_size, self.rank))
        return None


def whole(_: TensorInfo) -> Region | None:
    return None


Requests = Mapping[RemoteFile, list[tuple[str, Region | None]]]


def with_regions(located: Mapping[RemoteFile, list[str]], region_of: RegionOf = whole) -> Requests:
    return {file: [(name, region_of(file.info(name))) for name in names] for file, names in located.items()}


async def load_raw(
    requests: Requests,
    device: torch.device,
    verify: Any = None,
    into: Mapping[str, torch.Tensor] | None = None,
    progress: Progress | None = None,
) -> dict[str, OutputTensor]:
    """Every file's requests fetched concurrently as raw outputs (one engine), in file order; ``into`` and
    ``progress``: see ``RemoteFile.load``."""
    loads = await gather_or_cancel(
        *(file.load(wanted, verify, device, into, progress) for file, wanted in requests.items())
    )
    return {name: outputs.pop(name) for wanted, outputs in zip(requests.values(), loads) for name, _ in wanted}
