"""hf:// against a Hub-compatible endpoint on 127.0.0.1 that redirects LFS files to a second "CDN" server,
as the real Hub does: revisions pinned to a commit, redirects followed once per file, tokens kept from
the CDN."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

import stream_st as sst
from checkpoints import assert_same, assert_tensor_same

pytestmark = pytest.mark.hub


@pytest.fixture()
def hf(hub: Any) -> Any:
    hub.reset_log()
    return hub


def reference(root: Path, name: str) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(root / name))


def test_bit_exact_through_the_cdn_resolving_once(hf: Any, root: Path) -> None:
    loaded = sst.load_file("hf://org/layered/model.safetensors", storage_options=hf.storage_options(), part_size=65536)
    assert_same(loaded, reference(root, "layered.safetensors"))
    resolves = [r for r in hf.log if "/resolve/" in r.path]
    assert len(resolves) == 1 and resolves[0].status == 302  # one redirect for the whole load
    assert len(hf.cdn_log) > 2 and all(r.status == 206 for r in hf.cdn_log)


@pytest.mark.parametrize(
    ("url", "name"),
    [
        ("hf://org/dtypes/model.safetensors", "dtypes.safetensors"),
        ("hf://org/layered@main/model.safetensors", "layered.safetensors"),
        ("hf://datasets/org/data/weights/tiny.safetensors", "tiny.safetensors"),
    ],
)
def test_repos_revisions_and_datasets(hf: Any, root: Path, url: str, name: str) -> None:
    assert_same(sst.load_file(url, storage_options=hf.storage_options()), reference(root, name))


def test_revision_is_pinned_to_one_commit(hf: Any, root: Path) -> None:
    before = hf.head("org/layered")
    small = "hf://org/layered/small.safetensors"  # not LFS: served by the Hub itself, no redirect
    with sst.safe_open(small, storage_options=hf.storage_options(), header_prefetch=16) as handle:
        hf.add_file("org/layered", "small.safetensors", safetensors.torch.save({"x": torch.zeros(6)}), lfs=False)
        try:
            # main moved on, but this load keeps reading the commit its header came from
            assert_tensor_same(handle.get_tensor("x"), reference(root, "small.safetensors")["x"])
        finally:
            hf.add_file("org/layered", "small.safetensors", root / "small.safetensors", lfs=False)
    data_reads = [r for r in hf.log if r.path.endswith("/small.safetensors") and r.range != "bytes=0-15"]
    assert data_reads and all(f"/resolve/{before}/" in r.path for r in data_reads)


def test_sharded_repo_and_partial_load_touch_one_shard(hf: Any, root: Path) -> None:
    expected: dict[str, torch.Tensor] = {}
    for shard in sorted((root / "sharded").glob("*.safetensors")):
        expected.update(safetensors.torch.load_file(str(shard)))
    assert_same(sst.load_file("hf://org/sharded", storage_options=hf.storage_options()), expected)
    hf.reset_log()
    wanted = "model.layers.2.mlp.up_proj.weight"
    loaded = sst.load_file("hf://org/sharded", tensors=[wanted], storage_options=hf.storage_options())
    assert_tensor_same(loaded[wanted], expected[wanted])
    shards_read = {
        r.path.rsplit("/", 1)[-1] for r in hf.log if "/resolve/" in r.path and r.path.endswith(".safetensors")
    }
    assert len(shards_read) == 1


def test_private_repo_token_never_reaches_the_cdn(hf: Any, root: Path) -> None:
    hf.commit("org/private", {"model.safetensors": root / "layered.safetensors"}, private=True)
    hf.add_token("hf_SECRETTOKEN123")
    url = "hf://org/private/model.safetensors"
    loaded = sst.load_file(url, storage_options=hf.storage_options(token="hf_SECRETTOKEN123"))
    assert_same(loaded, reference(root, "layered.safetensors"))
    assert any(r.auth for r in hf.log) and not hf.cdn_auth_seen()
    with pytest.raises(FileNotFoundError):  # the Hub does not reveal private repos to anonymous users
        sst.load_file(url, storage_options=hf.storage_options())


def test_missing_repo_revision_and_file(hf: Any) -> None:
    options = hf.storage_options()
    for url in [
        "hf://org/nope/model.safetensors",
        "hf://org/layered@nobranch/model.safetensors",
        "hf://org/layered/absent.safetensors",
    ]:
        with pytest.raises(FileNotFoundError, match=f"^{re.escape(url)}: "):
            sst.load_file(url, storage_options=options)


def test_bad_token_is_permission_error(hf: Any) -> None:
    with pytest.raises(PermissionError, match="hf://org/layered/model.safetensors") as caught:
        sst.load_file("hf://org/layered/model.safetensors", storage_options=hf.storage_options(token="hf_WRONG"))
    assert "hf_WRONG" not in str(caught.value)
