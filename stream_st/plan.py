"""Turn wanted byte spans into the ranged requests that fetch them: pure, no I/O.

Spans are sorted by offset, neighbours closer than ``max_gap`` are merged into one request (the gap
bytes are fetched and dropped: one request costs more than a small gap), and merged spans are cut into
parts of at most ``part_size`` bytes so that many requests run at once. Every part lists its pieces:
which destination each of its bytes lands in, and at which offset.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Want:
    """Bytes [start, end) of the object, to land at ``dest_offset`` of destination ``key``."""

    key: Hashable
    start: int
    end: int
    dest_offset: int = 0


@dataclass(frozen=True)
class Piece:
    """A run of a part's bytes that lands in one destination."""

    key: Hashable
    start: int
    end: int
    dest_offset: int

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Part:
    """One ranged request [start, end); the bytes between its pieces are gap bytes to drop."""

    start: int
    end: int
    pieces: tuple[Piece, ...]

    @property
    def size(self) -> int:
        return self.end - self.start


def plan_parts(wants: Iterable[Want], *, max_gap: int, part_size: int) -> list[Part]:
    """Coalesce and split ``wants`` into parts, in offset order. Wants must not overlap."""
    if part_size <= 0 or max_gap < 0:
        raise ValueError(f"part_size must be > 0 and max_gap >= 0, got {part_size} and {max_gap}")
    parts: list[Part] = []
    pieces: list[Piece] = []

    def flush() -> None:
        if pieces:
            parts.append(Part(pieces[0].start, pieces[-1].end, tuple(pieces)))
            pieces.clear()

    last_end = -1
    for want in sorted((w for w in wants if w.end > w.start), key=lambda w: w.start):
        if want.start < last_end:
            raise ValueError(f"wanted spans overlap at byte {want.start} (key {want.key!r})")
        if pieces and want.start - pieces[-1].end > max_gap:
            flush()
        position = want.start
        while position < want.end:
            if pieces and position + 1 - pieces[0].start > part_size:
                flush()  # not even one more byte fits: the gap filled this part
            part_start = pieces[0].start if pieces else position
            take = min(part_start + part_size - position, want.end - position)
            pieces.append(Piece(want.key, position, position + take, want.dest_offset + position - want.start))
            position += take
            if position - part_start == part_size:
                flush()
        last_end = want.end
    flush()
    return parts
