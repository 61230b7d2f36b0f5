"""The one correctness check of the benchmarks: tensors bit for bit as ``safetensors.torch.load_file`` returns
them (names, dtypes, shapes and every byte). Children import it from this folder by path, so it checks any
revision of stream_st; it needs only torch and safetensors."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from typing import Any


def differences(got: Mapping[str, Any], ref: Mapping[str, Any]) -> list[str]:
    """Names missing, extra, or whose tensor differs from the reference in dtype, shape or any byte."""
    import torch

    def same(a: Any, b: Any) -> bool:
        return (
            a.dtype == b.dtype
            and a.shape == b.shape
            and a.device.type == b.device.type
            and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
        )

    bad = [f"missing {k}" for k in sorted(set(ref) - set(got))] + [f"extra {k}" for k in sorted(set(got) - set(ref))]
    return bad + [k for k in ref if k in got and not same(got[k], ref[k])]


def verify(sd: Mapping[str, Any], local: str, patterns: Iterable[str] | None = None, device: str = "cpu") -> str:
    """Raise unless ``sd`` is the file at ``local`` (only the tensors matching ``patterns``, if given)."""
    import safetensors.torch

    ref = safetensors.torch.load_file(local, device=device)
    if patterns is not None:
        chosen = list(patterns)
        ref = {k: v for k, v in ref.items() if any(fnmatch.fnmatchcase(k, p) for p in chosen)}
    bad = differences(sd, ref)
    if bad:
        raise AssertionError(f"{len(bad)} tensors differ from safetensors.torch.load_file: {bad[:5]}")
    return f"verified {len(sd)} tensors"
