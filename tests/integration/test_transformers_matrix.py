"""Tiny random models of several architecture families, saved by transformers' ``save_pretrained`` (one file
and sharded) and served over HTTP, loaded two ways and compared with transformers' own ``from_pretrained`` of
the same folder:

A. ``stream_st.integrations.transformers.from_pretrained(url)`` must give the same model;
B. a skeleton built on the ``meta`` device plus ``stream_st.load_model(model, url, assign=True)`` must give the
   same model or raise; it must raise where transformers converts the checkpoint's names on load.

Either way no parameter or buffer may stay on ``meta`` and the tied parameters must be one tensor."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from checkpoints import assert_tensor_same
from servers import RangeServer
from tiny_transformers import FAMILIES, Family

transformers = pytest.importorskip("transformers")

import stream_st as sst  # noqa: E402
from stream_st.integrations.transformers import from_pretrained  # noqa: E402

LAYOUTS = ["single", "sharded"]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RangeServer, Path]]:
    folder = tmp_path_factory.mktemp("families")
    for family in FAMILIES:
        torch.manual_seed(0)
        model = family.model_class()(family.config())
        model.save_pretrained(folder / family.name / "single")
        model.save_pretrained(folder / family.name / "sharded", max_shard_size="40KB")
    server = RangeServer(folder)
    yield server, folder
    server.stop()


def outputs(model: Any, family: Family) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        result = model(**family.inputs())
    return {key: value for key, value in result.items() if isinstance(value, torch.Tensor)}


def tie_groups(model: torch.nn.Module) -> list[list[str]]:
    """Names grouped by the memory they point at (tied names share it)."""
    by_pointer: dict[int, list[str]] = {}
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        if tensor.numel():
            by_pointer.setdefault(tensor.data_ptr(), []).append(name)
    return sorted(sorted(names) for names in by_pointer.values())


def assert_same_model(ours: Any, reference: Any, family: Family) -> None:
    assert not [name for name, t in [*ours.named_parameters(), *ours.named_buffers()] if t.is_meta]
    assert tie_groups(ours) == tie_groups(reference)
    ours_state, their_state = ours.state_dict(), reference.state_dict()
    assert list(ours_state) == list(their_state)
    for name, tensor in ours_state.items():
        assert_tensor_same(tensor, their_state[name], name)
    theirs_buffers = dict(reference.named_buffers())
    for name, buffer in ours.named_buffers():  # non-persistent ones too, which state_dict leaves out
        assert_tensor_same(buffer, theirs_buffers[name], name)
    # transformers' own tensors are views of the mmap'd file, some at addresses not 16-byte aligned (CLIP's),
    # where CPU kernels take another vectorised path and differ by an ulp (1.2e-6 on CLIP's logits); the same
    # weights copied to fresh (aligned) memory give bit-identical outputs, so the outputs are compared with that.
    mine, theirs = outputs(ours, family), outputs(copy.deepcopy(reference), family)
    assert list(mine) == list(theirs)
    for key, value in mine.items():
        assert torch.equal(value, theirs[key]), key


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_from_pretrained_equals_transformers(served: tuple[RangeServer, Path], family: Family, layout: str) -> None:
    server, folder = served
    ours = from_pretrained(server.url(f"{family.name}/{layout}"), family.model_class())
    reference = family.model_class().from_pretrained(folder / family.name / layout)
    assert_same_model(ours, reference, family)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_load_model_on_meta_skeleton_equals_or_raises(
    served: tuple[RangeServer, Path], family: Family, layout: str
) -> None:
    server, folder = served
    with torch.device("meta"):
        skeleton = family.model_class()(family.config())
    if family.converted:
        with pytest.raises(sst.ModelLoadError, match=r"converts some checkpoint names.*integrations\.transformers"):
            sst.load_model(skeleton, server.url(f"{family.name}/{layout}"), assign=True)
        with pytest.raises(sst.ModelLoadError, match="still on the meta device"):
            sst.load_model(skeleton, server.url(f"{family.name}/{layout}"), strict=False, assign=True)
        return
    assert sst.load_model(skeleton, server.url(f"{family.name}/{layout}"), assign=True) == ([], [])
    reference = family.model_class().from_pretrained(folder / family.name / layout)
    assert_same_model(skeleton.eval(), reference, family)
