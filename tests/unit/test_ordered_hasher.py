"""The ordered hasher: parts landing in any order, from many threads, hash to the file's digest, and a
part that lands while another thread hashes does not wait for that hash."""

from __future__ import annotations

import hashlib
import random
import threading
from collections.abc import Iterator
from itertools import pairwise

import pytest

from stream_st.errors import IntegrityError
from stream_st.integrity import Digest, OrderedHasher

DATA = random.Random(7).randbytes(100_000)


def _hasher(segments: list[tuple[int, int, object]], data: bytes = DATA) -> OrderedHasher:
    expected = Digest("sha256", hashlib.sha256(data).digest(), "the test")
    return OrderedHasher("http://x/f.safetensors", len(data), expected, segments)  # type: ignore[arg-type]


class GatedBytes:
    """Device-like memory (read back in chunks) whose first chunk waits until the test opens a gate."""

    def __init__(self, data: bytes) -> None:
        self.data, self.gate, self.entered = data, threading.Event(), threading.Event()

    def chunks(self, start: int, end: int) -> Iterator[memoryview]:
        self.entered.set()
        assert self.gate.wait(10)
        for at in range(start, end, 997):
            yield memoryview(self.data)[at : min(end, at + 997)]


@pytest.mark.parametrize("seed", range(5))
def test_parts_landing_in_any_order_from_many_threads_hash_to_the_digest(seed: int) -> None:
    cuts = sorted(random.Random(seed).sample(range(1, len(DATA)), 40))
    bounds = [0, *cuts, len(DATA)]
    runs = sorted({*bounds[::3], len(DATA)})  # the memory segments (tensors) differ from the parts
    hasher = _hasher([(a, b, memoryview(DATA)[a:b]) for a, b in pairwise(runs)])
    parts = list(pairwise(bounds))
    random.Random(seed + 100).shuffle(parts)
    threads = [threading.Thread(target=hasher.landed, args=part) for part in parts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert hasher.frontier == len(DATA)
    hasher.check()


def test_a_part_landing_during_a_hash_does_not_wait_for_it() -> None:
    gated = GatedBytes(DATA)
    hasher = _hasher([(0, len(DATA), gated)])
    first = threading.Thread(target=hasher.landed, args=(0, 40_000))
    first.start()
    assert gated.entered.wait(10)  # the first thread is hashing (and stuck until the gate opens)
    second = threading.Thread(target=hasher.landed, args=(40_000, len(DATA)))
    second.start()
    second.join(5)
    assert not second.is_alive(), "landed() waited for another thread's hash"
    gated.gate.set()
    first.join(10)
    assert hasher.frontier == len(DATA)  # the hashing thread took the later bytes too
    hasher.check()


def test_a_flipped_byte_and_missing_bytes_fail_the_check() -> None:
    flipped = bytearray(DATA)
    flipped[12_345] ^= 1
    hasher = _hasher([(0, len(DATA), memoryview(bytes(flipped)))])
    hasher.landed(0, len(DATA))
    with pytest.raises(IntegrityError, match="sha256 of the streamed bytes"):
        hasher.check()
    partial = _hasher([(0, len(DATA), memoryview(DATA))])
    partial.landed(0, 10)
    partial.landed(20, len(DATA))  # a hole at 10-20: nothing past it can be hashed
    with pytest.raises(IntegrityError, match="only 10 of"):
        partial.check()


def test_bytes_landed_past_the_segments_end_the_hash_instead_of_spinning() -> None:
    hasher = _hasher([(0, 60_000, memoryview(DATA)[:60_000])])
    done = threading.Thread(target=hasher.landed, args=(0, len(DATA)))
    done.start()
    done.join(5)
    assert not done.is_alive(), "landed() kept looping on bytes no segment holds"
    with pytest.raises(IntegrityError, match="only 60000 of"):
        hasher.check()
