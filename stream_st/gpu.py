"""The device path: network bytes land in reusable pinned host slots, then ``copy_(non_blocking=True)``
on a per-thread CUDA stream moves them into the destination tensors on the GPU while the thread goes on
downloading the next part. Host memory stays bounded by the slot pool, whatever the model size.

Measured on an H200 (docs/ARCHITECTURE.md §5): pinned host→device copies reach 48 GB/s at 1 MiB, 55 GB/s at ≥ 16 MiB;
16 threads reading ``http.client`` bodies into 16 MiB pinned slots and copying each on the thread's own
stream moved 19–23 GB/s bit-exact, at the loopback server's ceiling. Pinning costs ~0.6 s per GiB, so the
pool is allocated lazily, once per process, and reused by every load.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .plan import Part, Piece
from .process_cache import ProcessCache
from .sinks import writable_view


class SlotWaitCancelledError(Exception):
    """The load waiting for a free slot was cancelled."""


@dataclass
class Slot:
    """A pinned host buffer and the event that marks when its last copy to the device finished."""

    buffer: torch.Tensor
    view: memoryview
    event: Any = None  # torch.cuda.Event of the last copy out of this slot, or None

    def wait_until_free(self) -> None:
        if self.event is not None:
            self.event.synchronize()
            self.event = None


@dataclass
class PinnedPool:
    """At most ``count`` slots of ``slot_bytes``, allocated on first need and shared by concurrent loads."""

    slot_bytes: int
    count: int
    pinned: bool = True
    _free: list[Slot] = field(default_factory=list)
    _allocated: int = 0
    _condition: threading.Condition = field(default_factory=threading.Condition)

    def acquire(self, cancelled: threading.Event) -> Slot:
        with self._condition:
            while not self._free and self._allocated >= self.count:
                if cancelled.is_set():
                    raise SlotWaitCancelledError()
                self._condition.wait(timeout=0.1)
            if self._free:
                slot = self._free.pop()
            else:
                self._allocated += 1
                slot = None
        if slot is None:
            buffer = torch.empty(self.slot_bytes, dtype=torch.uint8, pin_memory=self.pinned)
            slot = Slot(buffer, writable_view(buffer))
        slot.wait_until_free()  # its previous copy to the device must be done before it is overwritten
        return slot

    def fill(self) -> None:
        """Allocate every slot not allocated yet (pinning them), one at a time so that loads already
        running take slots as they come."""
        while True:
            with self._condition:
                if self._allocated >= self.count:
                    return
                self._allocated += 1
            buffer = torch.empty(self.slot_bytes, dtype=torch.uint8, pin_memory=self.pinned)
            self.release(Slot(buffer, writable_view(buffer)))

    def release(self, slot: Slot) -> None:
        with self._condition:
            self._free.append(slot)
            self._condition.notify()

    @property
    def idle(self) -> int:
        """Slots allocated and free now (all of them, between loads)."""
        with self._condition:
            return len(self._free)

    @property
    def allocated(self) -> int:
        return self._allocated


_pools: ProcessCache[PinnedPool] = ProcessCache()  # pinned memory and CUDA state do not survive fork


def shared_pool(slot_bytes: int, pool_bytes: int, *, pinned: bool) -> PinnedPool:
    """The process-wide pool for this slot size (at least one slot, whatever ``pool_bytes`` says)."""
    count = max(1, pool_bytes // slot_bytes)
    return _pools.get((slot_bytes, count, pinned), lambda: PinnedPool(slot_bytes, count, pinned))


def use_device(device: torch.device) -> None:
    """Make ``device`` this thread's current CUDA device, for good. CUDA's current device is per thread and
    starts at 0: a worker that merely switched to GPU k and back (a device guard) would create a context on
    GPU 0 in every rank of a multi-GPU job (~0.5 GiB each), and pinned memory would belong to GPU 0."""
    if device.type == "cuda" and device.index is not None and torch.cuda.current_device() != device.index:
        torch.cuda.set_device(device)


class DeviceStaging:
    """Moves staged parts into flat uint8 destination tensors on ``device``.

    On CUDA, each worker thread copies on its own stream and records an event per slot; ``finish()``
    waits for every copy, so no caller sees a half-copied tensor. On CPU (used by the tests to exercise
    the same slot logic without a GPU) the copies are plain synchronous copies.
    """

    def __init__(self, outputs: Mapping[str, torch.Tensor], device: torch.device, pool: PinnedPool) -> None:
        self.outputs, self.device, self.pool = outputs, device, pool
        self._cuda = device.type == "cuda"
        self._local = threading.local()
        self._streams: list[Any] = []
        self._lock = threading.Lock()
        self._allocated: Any = None
        if self._cuda:
            # The outputs were just allocated on this thread's current stream; the caching allocator may
            # have handed out memory that work queued there still uses. Copies on the side streams wait
            # for it (side streams do not synchronise with the default stream by themselves).
            self._allocated = torch.cuda.Event()  # type: ignore[no-untyped-call]
            self._allocated.record(torch.cuda.current_stream(device))

    def enter_thread(self) -> None:
        """Called by a worker thread before it touches CUDA for this load (see ``use_device``)."""
        if self._cuda:
            use_device(self.device)

    def staged_part(self, part: Part) -> Part:
        """The whole range of ``part`` as one piece landing at offset 0 of a slot (gap bytes included)."""
        return Part(part.start, part.end, (Piece("<slot>", part.start, part.end, 0),))

    def ship(self, slot: Slot, part: Part) -> None:
        """Queue the copies of ``part``'s pieces from ``slot`` to their destinations."""
        if not self._cuda:
            for piece in part.pieces:
                self._copy(slot, part, piece, non_blocking=False)
            return
        stream = self._stream()
        with torch.cuda.stream(stream):
            for piece in part.pieces:
                self._copy(slot, part, piece, non_blocking=True)
            slot.event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            slot.event.record(stream)

    def _copy(self, slot: Slot, part: Part, piece: Piece, *, non_blocking: bool) -> None:
        offset = piece.start - part.start
        target = self.outputs[str(piece.key)][piece.dest_offset : piece.dest_offset + piece.size]
        target.copy_(slot.buffer[offset : offset + piece.size], non_blocking=non_blocking)

    def _stream(self) -> Any:
        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = self._local.stream = torch.cuda.Stream(device=self.device)  # type: ignore[no-untyped-call]
            stream.wait_event(self._allocated)
            with self._lock:
                self._streams.append(stream)
        return stream

    def finish(self) -> None:
        """Wait for every queued copy (and make the caller's stream see the results)."""
        with self._lock:
            streams = list(self._streams)
        for stream in streams:
            stream.synchronize()


class DeviceBytes:
    """A flat uint8 tensor on the device, read back through one small host buffer so that its bytes can
    be hashed on the host (``integrity.ChunkedBytes``). Device→host copies run at 10–50 GB/s, far above
    the hash rate (~2 GB/s), and host memory stays bounded whatever the tensor's size."""

    def __init__(self, tensor: torch.Tensor, bounce: torch.Tensor) -> None:
        self.tensor, self.bounce, self._view = tensor, bounce, writable_view(bounce)

    def chunks(self, start: int, end: int) -> Iterator[memoryview]:
        use_device(self.tensor.device)
        step = len(self.bounce)
        for at in range(start, end, step):
            size = min(step, end - at)
            # A blocking copy: it completes before the bytes are hashed, and it runs after every copy
            # into this tensor that landed() reported (their events were waited on).
            self.bounce[:size].copy_(self.tensor[at : at + size])
            yield self._view[:size]
