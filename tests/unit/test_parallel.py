from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stream_st.distributed import Share, shares
from stream_st.header import TensorInfo
from stream_st.parallel import TensorParallel
from stream_st.regions import Region, split


def ranks_in_order(plan: dict[str, list[Share]]) -> list[int]:
    return [share.rank for pieces in plan.values() for share in pieces]


def test_small_tensors_go_whole_to_consecutive_balanced_runs() -> None:
    tensors = [(f"t{i}", 10, 2) for i in range(10)]
    plan = shares(tensors, 3, min_split=1000)
    ranks = ranks_in_order(plan)
    assert all(len(pieces) == 1 and pieces[0].whole for pieces in plan.values())
    assert ranks == sorted(ranks) and set(ranks) == {0, 1, 2}
    assert max(ranks.count(r) for r in range(3)) - min(ranks.count(r) for r in range(3)) <= 1
    assert {n: p[0].rank for n, p in shares([("big", 100, 1), ("small", 1, 1)], 4, 1000).items()} == {
        "big": 1,
        "small": 3,
    }


def test_a_huge_tensor_is_split_between_rows_at_the_cuts() -> None:
    plan = shares([("embed", 1000, 100), ("norm", 10, 1), ("head", 600, 60)], 4, min_split=100)
    assert plan["embed"] == [
        Share("embed", 0, 0, 40, False),
        Share("embed", 1, 40, 81, False),
        Share("embed", 2, 81, 100, False),
    ]
    assert plan["norm"] == [Share("norm", 2, 0, 1, True)]
    # bytes 1010-1609; the last cut, at 1207, falls 19.7 rows in
    assert plan["head"] == [Share("head", 2, 0, 20, False), Share("head", 3, 20, 60, False)]


@given(
    st.lists(st.tuples(st.integers(0, 50), st.integers(0, 8)), min_size=1, max_size=30),
    st.integers(1, 9),
    st.integers(1, 400),
)
def test_shares_cover_every_row_once_in_consecutive_balanced_runs(
    layout: list[tuple[int, int]], world: int, min_split: int
) -> None:
    tensors = [(f"t{i}", rows * row_bytes, rows) for i, (rows, row_bytes) in enumerate(layout)]
    plan = shares(tensors, world, min_split)
    assert list(plan) == [name for name, _, _ in tensors]
    ranks = ranks_in_order(plan)
    assert ranks == sorted(ranks) and all(0 <= r < world for r in ranks)  # each rank: one consecutive run
    load = [0] * world
    for name, nbytes, rows in tensors:
        pieces = plan[name]
        assert pieces[0].start == 0 and pieces[-1].stop == rows
        assert all(a.stop == b.start and a.rank < b.rank for a, b in zip(pieces, pieces[1:]))
        assert (len(pieces) == 1) == pieces[0].whole
        for piece in pieces:
            load[piece.rank] += nbytes * (piece.stop - piece.start) // rows if rows else 0
    total = sum(nbytes for _, nbytes, _ in tensors)
    unsplit = max([nbytes for name, nbytes, _ in tensors if plan[name][0].whole] + [0])
    slack = max(min_split, max(row_bytes for _, row_bytes in layout), unsplit)
    assert sum(load) == total
    assert max(load) <= total / world + 2 * slack


def test_split_matches_torch_chunk() -> None:
    assert [split(10, 4, i) for i in range(4)] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert split(2, 4, 3) == (2, 2)


def test_column_region_spans() -> None:
    info = TensorInfo("w", "F32", (3, 4), 100, 148)
    assert Region(1, 1, 3).spans(info) == [(104, 112, 0), (120, 128, 8), (136, 144, 16)]
    assert Region(0, 1, 2).spans(info) == [(116, 132, 0)]
    assert Region(1, 2, 2).spans(info) == []


def test_tensor_parallel_plan() -> None:
    plan = TensorParallel(1, 2, {"*.q.weight": 0, "*.o.weight": 1})
    assert plan.region(TensorInfo("l.q.weight", "F32", (4, 6), 0, 96)) == Region(0, 2, 4)
    assert plan.region(TensorInfo("l.o.weight", "F32", (4, 6), 0, 96)) == Region(1, 3, 6)
    assert plan.region(TensorInfo("l.norm", "F32", (4,), 0, 16)) is None
    with pytest.raises(ValueError, match="rank 2 is not in a world of 2"):
        TensorParallel(2, 2, {})
