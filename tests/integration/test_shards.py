"""Sharded checkpoints: an index.json (transformers layout) or a folder of shards, one engine for all."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import stream_st as sst
from checkpoints import assert_same, assert_tensor_same, layered_state, sharded_reference
from servers import RangeServer

INDEX = "sharded/model.safetensors.index.json"


def reference(root: Path) -> dict[str, torch.Tensor]:
    return sharded_reference(root / "sharded")


def weight_map(root: Path) -> dict[str, str]:
    return json.loads((root / INDEX).read_text())["weight_map"]  # type: ignore[no-any-return]


def test_index_over_http_bit_exact(http: RangeServer, root: Path) -> None:
    assert_same(sst.load_file(http.url(INDEX)), reference(root))
    assert reference(root).keys() == layered_state(layers=6).keys()


@pytest.mark.parametrize("form", ["index-path", "folder", "folder-url"])
def test_local_index_and_folder(root: Path, form: str) -> None:
    url = {"index-path": str(root / INDEX), "folder": str(root / "sharded"), "folder-url": (root / "sharded").as_uri()}
    assert_same(sst.load_file(url[form]), reference(root))


def test_folder_without_index_reads_every_shard(root: Path, tmp_path: Path) -> None:
    for shard in (root / "sharded").glob("*.safetensors"):
        shutil.copy(shard, tmp_path / shard.name)
    assert_same(sst.load_file(str(tmp_path)), reference(root))
    with sst.safe_open(str(tmp_path)) as handle:
        assert handle.keys() == sorted(reference(root))


def test_partial_load_touches_only_the_shard_that_holds_it(http: RangeServer, root: Path) -> None:
    wanted = "model.layers.4.mlp.up_proj.weight"
    shard = weight_map(root)[wanted]
    loaded = sst.load_file(http.url(INDEX), tensors=[wanted])
    assert_tensor_same(loaded[wanted], reference(root)[wanted])
    touched = {r.path for r in http.gets()}
    assert touched == {f"/{INDEX}", f"/sharded/{shard}"}


def test_safe_open_over_an_index(http: RangeServer, root: Path) -> None:
    expected = reference(root)
    with sst.safe_open(http.url(INDEX)) as handle:
        assert handle.keys() == sorted(expected)
        assert handle.metadata() == json.loads((root / INDEX).read_text())["metadata"]
        assert {r.path for r in http.gets()} == {f"/{INDEX}"}  # no shard opened yet
        got = handle.get_tensors(["lm_head.weight", "model.layers.0.input_layernorm.weight"])
        assert_tensor_same(got["lm_head.weight"], expected["lm_head.weight"])
        assert_tensor_same(handle.get_slice("lm_head.weight")[10:20], expected["lm_head.weight"][10:20])
        with pytest.raises(sst.TensorNotFoundError, match="did you mean 'lm_head.weight'"):
            handle.get_tensor("lm_head.weigh")


def test_iter_tensors_and_load_model_over_shards(http: RangeServer, root: Path) -> None:
    expected = reference(root)
    names = [name for name, tensor in sst.iter_tensors(http.url(INDEX), max_inflight_bytes=300_000)]
    assert sorted(names) == sorted(expected)

    model = torch.nn.Module()
    for name, tensor in expected.items():
        module = model
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, torch.nn.Module())
            module = getattr(module, part)
        module.register_parameter(leaf, torch.nn.Parameter(torch.zeros_like(tensor), requires_grad=False))
    assert sst.load_model(model, http.url(INDEX)) == ([], [])
    for name, tensor in model.state_dict().items():
        assert_tensor_same(tensor, expected[name], name)


def test_index_that_lies_about_a_tensor(root: Path, tmp_path: Path) -> None:
    for shard in (root / "sharded").glob("*.safetensors"):
        shutil.copy(shard, tmp_path / shard.name)
    mapping = weight_map(root)
    mapping["ghost.weight"] = next(iter(mapping.values()))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": mapping}))
    with pytest.raises(sst.HeaderError, match="the index puts tensor 'ghost.weight' in .* but that file does not"):
        sst.load_file(str(tmp_path))


def test_index_cannot_escape_its_folder(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../../etc/x.safetensors"}}))
    with pytest.raises(sst.HeaderError, match="outside the checkpoint.s folder"):
        sst.load_file(str(tmp_path))


def test_folder_with_nothing_to_load(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no model.safetensors.index.json and no"):
        sst.load_file(str(tmp_path))
