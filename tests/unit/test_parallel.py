from __future__ import annotations

import pytest

from stream_st.header import TensorInfo
from stream_st.parallel import TensorParallel, owners
from stream_st.regions import Region, split


def test_owners_are_consecutive_balanced_runs() -> None:
    sizes = [(f"t{i}", 10) for i in range(10)]
    owner = owners(sizes, 3)
    ranks = [owner[name] for name, _ in sizes]
    assert ranks == sorted(ranks) and set(ranks) == {0, 1, 2}
    assert max(ranks.count(r) for r in range(3)) - min(ranks.count(r) for r in range(3)) <= 1
    assert owners([("big", 100), ("small", 1)], 4) == {"big": 1, "small": 3}


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
