"""The IO loop, which every load in a process shares, stays free while one load does heavy synchronous work:
its cast to ``dtype=`` and ``load_model``'s ``load_state_dict`` run on worker threads.

The heavy step is real: a 512 MiB float8 tensor cast to bfloat16 (by ``dtype=``, or by ``load_state_dict``
copying it into a bfloat16 parameter), on one intra-op thread so that it takes seconds on any machine. On
the IO loop it held up every other load for all that time; the loop must now run a callback scheduled from
another thread within a bound far shorter than that step.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

import stream_st as sst
from stream_st import _loop

NUMEL = 512 << 20  # float8: one byte each; the cast writes twice as many bytes
BOUND_S = 1.0  # generous for a callback on an idle loop; the heavy step blocked it for several seconds


@pytest.fixture(scope="module")
def float8_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One float8_e4m3fn tensor of NUMEL bytes (every byte value, NaNs included), written by hand."""
    path = tmp_path_factory.mktemp("io_loop") / "f8.safetensors"
    header = json.dumps({"w": {"dtype": "F8_E4M3", "shape": [NUMEL], "data_offsets": [0, NUMEL]}}).encode()
    pattern = bytes(range(256)) * (1 << 20)
    with path.open("wb") as out:
        out.write(len(header).to_bytes(8, "little") + header)
        for _ in range(NUMEL // len(pattern)):
            out.write(pattern)
    return path


@pytest.fixture()
def one_thread() -> Iterator[None]:
    """One intra-op thread: the cast takes seconds however many cores the machine has."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def worst_loop_delay(load: Callable[[Callable[[int, int], None]], None]) -> float:
    """Run ``load(progress)`` on a thread; from the moment its bytes have all landed (the heavy step
    follows) until it returns, schedule callbacks on the IO loop and return the longest wait for one."""
    landed = threading.Event()
    failure: list[BaseException] = []

    def progress(done: int, total: int) -> None:
        if done == total:
            landed.set()

    def run() -> None:
        try:
            load(progress)
        except BaseException as exc:
            failure.append(exc)
            landed.set()

    loop = _loop.get_loop()
    worker = threading.Thread(target=run)
    worker.start()
    assert landed.wait(120), "the load's bytes never landed"
    worst = 0.0
    while worker.is_alive():
        ran = threading.Event()
        asked = time.monotonic()
        loop.call_soon_threadsafe(ran.set)
        assert ran.wait(120)
        worst = max(worst, time.monotonic() - asked)
        time.sleep(0.02)
    worker.join()
    if failure:
        raise failure[0]
    return worst


def test_a_large_cast_leaves_the_io_loop_free(float8_file: Path, one_thread: None) -> None:
    loaded: dict[str, torch.Tensor] = {}

    def load(progress: Callable[[int, int], None]) -> None:
        loaded.update(sst.load_file(float8_file, dtype=torch.bfloat16, progress=progress))

    worst = worst_loop_delay(load)
    weight = loaded.pop("w")
    assert weight.dtype == torch.bfloat16 and weight.numel() == NUMEL
    expected = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.bfloat16)
    assert torch.equal(weight[:256].view(torch.int16), expected.view(torch.int16))  # NaNs compared as bits
    assert worst < BOUND_S, f"the IO loop was blocked for {worst:.2f}s during the cast"


def test_load_state_dict_leaves_the_io_loop_free(float8_file: Path, one_thread: None) -> None:
    model = torch.nn.Module()
    model.w = torch.nn.Parameter(torch.empty(NUMEL, dtype=torch.bfloat16), requires_grad=False)

    def load(progress: Callable[[int, int], None]) -> None:
        assert sst.load_model(model, float8_file, progress=progress) == ([], [])

    worst = worst_loop_delay(load)
    expected = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.bfloat16)
    assert torch.equal(model.w[:256].view(torch.int16), expected.view(torch.int16))
    assert worst < BOUND_S, f"the IO loop was blocked for {worst:.2f}s during load_state_dict"
