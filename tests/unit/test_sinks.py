from __future__ import annotations

import gc

import torch

from stream_st.sinks import writable_view


def test_writable_view_keeps_its_tensor_alive() -> None:
    view = writable_view(torch.zeros(1 << 20, dtype=torch.uint8))  # the only reference is the view's
    gc.collect()
    torch.ones(1 << 20, dtype=torch.uint8)  # would reuse freed memory
    view[:3] = b"abc"
    assert bytes(view[:3]) == b"abc" and len(view) == 1 << 20


def test_empty_tensor_view() -> None:
    assert len(writable_view(torch.empty(0))) == 0
