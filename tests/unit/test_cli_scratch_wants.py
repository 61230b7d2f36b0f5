"""``stream-st bench``'s raw read: the spans it hands the engine plan into the very parts a load plans
(whole tensors, less what the header read already holds), and no byte lands past the per-thread scratch
buffer."""

from __future__ import annotations

import json
import random

import pytest

from stream_st.cli import _scratch_wants
from stream_st.header import Header, parse_header
from stream_st.plan import Want, plan_parts


def _header(sizes: list[int]) -> Header:
    offsets, at = {}, 0
    for index, size in enumerate(sizes):
        offsets[f"t{index}"] = {"dtype": "U8", "shape": [size], "data_offsets": [at, at + size]}
        at += size
    raw = json.dumps(offsets).encode()
    return parse_header(raw, url="mem://x", file_size=8 + len(raw) + at)


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("ranges", [True, False])
def test_scratch_spans_plan_the_parts_of_whole_tensors(seed: int, ranges: bool) -> None:
    rng = random.Random(seed)
    part_size = rng.choice([7, 64, 1000, 4096])
    header = _header([rng.choice([0, 1, rng.randrange(1, 5 * part_size)]) for _ in range(rng.randrange(1, 30))])
    # As Engine.fetch plans them: coalesced up to max_gap, or one part for a server that ignores Range.
    gap, cut = (rng.choice([0, 10, 10**6]), part_size) if ranges else (header.file_size, header.file_size + 1)
    have = rng.randrange(header.data_start, header.file_size + 1)  # the header read's bytes
    load = [Want(t.name, max(t.start, have), t.end) for t in header]  # as RemoteFile._take_from_prefix leaves them
    whole = plan_parts(load, max_gap=gap, part_size=cut)
    scratch = plan_parts(_scratch_wants(header, have, part_size), max_gap=gap, part_size=cut)
    assert [(p.start, p.end) for p in scratch] == [(p.start, p.end) for p in whole]
    assert sum(piece.size for p in scratch for piece in p.pieces) == header.file_size - have
    assert all(piece.dest_offset + piece.size <= part_size for p in scratch for piece in p.pieces)
