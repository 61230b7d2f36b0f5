"""Planning properties: every wanted byte is fetched exactly once and lands where it should; nothing
else is fetched except gaps of at most max_gap; no part is larger than part_size."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_st.plan import Want, plan_parts


@st.composite
def layouts(draw: st.DrawFn) -> tuple[list[Want], int, int]:
    """Non-overlapping wants with random gaps, in random order, plus max_gap and part_size."""
    count = draw(st.integers(0, 30))
    position = draw(st.integers(0, 50))
    wants = []
    for key in range(count):
        position += draw(st.integers(0, 40))
        size = draw(st.integers(0, 120))
        wants.append(Want(key, position, position + size, dest_offset=draw(st.integers(0, 10))))
        position += size
    return draw(st.permutations(wants)), draw(st.integers(0, 50)), draw(st.integers(1, 100))


@settings(max_examples=500, deadline=None)
@given(layouts())
def test_plan_properties(layout: tuple[list[Want], int, int]) -> None:
    wants, max_gap, part_size = layout
    parts = plan_parts(wants, max_gap=max_gap, part_size=part_size)
    landed: dict[tuple[object, int], int] = {}
    previous_end = -1
    for part in parts:
        assert part.start >= previous_end  # sorted, disjoint
        assert 0 < part.size <= part_size
        assert part.pieces[0].start == part.start and part.pieces[-1].end == part.end
        for before, after in zip(part.pieces, part.pieces[1:]):
            assert 0 <= after.start - before.end <= max_gap  # only small gaps are fetched
        for piece in part.pieces:
            for offset in range(piece.size):
                key = (piece.key, piece.dest_offset + offset)
                assert key not in landed  # fetched exactly once
                landed[key] = piece.start + offset
        previous_end = part.end
    expected = {(w.key, w.dest_offset + offset): w.start + offset for w in wants for offset in range(w.end - w.start)}
    assert landed == expected


def test_coalesces_small_gaps_and_splits_large_spans() -> None:
    wants = [Want("a", 0, 10), Want("b", 12, 30), Want("c", 100, 125)]
    parts = plan_parts(wants, max_gap=5, part_size=16)
    assert [(p.start, p.end) for p in parts] == [(0, 16), (16, 30), (100, 116), (116, 125)]
    assert [(x.key, x.start, x.end, x.dest_offset) for x in parts[0].pieces] == [("a", 0, 10, 0), ("b", 12, 16, 0)]
    assert [(x.key, x.dest_offset) for x in parts[1].pieces] == [("b", 4)]


def test_rejects_overlaps_and_bad_sizes() -> None:
    with pytest.raises(ValueError, match="overlap at byte 5"):
        plan_parts([Want("a", 0, 10), Want("b", 5, 12)], max_gap=0, part_size=8)
    with pytest.raises(ValueError, match="part_size must be > 0"):
        plan_parts([], max_gap=0, part_size=0)
