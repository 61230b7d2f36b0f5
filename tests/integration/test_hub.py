"""hf:// against a Hub-compatible endpoint on 127.0.0.1 that redirects LFS files to a second "CDN" server,
as the real Hub does: revisions pinned to a commit, redirects followed once per file, tokens kept from
the CDN."""

from __future__ import annotations

import json
import re
import subprocess
import sys
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


def api_requests(hub: Any) -> list[str]:
    return [r.path for r in hub.log if r.path.startswith("/api/")]


def test_bit_exact_through_the_cdn_resolving_once(hf: Any, root: Path) -> None:
    loaded = sst.load_file("hf://org/layered/model.safetensors", storage_options=hf.storage_options(), part_size=65536)
    assert_same(loaded, reference(root, "layered.safetensors"))
    resolves = [r for r in hf.log if "/resolve/" in r.path]
    assert len(resolves) == 1 and resolves[0].status == 302  # one redirect for the whole load
    assert len(hf.cdn_log) > 2 and all(r.status == 206 for r in hf.cdn_log)
    assert api_requests(hf) == []  # the resolve answer says what a repo-info request would have


def test_a_file_load_imports_no_hffilesystem(hf: Any) -> None:
    code = (
        "import json, sys, stream_st as sst\n"
        "sst.load_file(sys.argv[1], storage_options={'endpoint': sys.argv[2], 'token': False})\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('huggingface_hub'))))"
    )
    ran = subprocess.run(
        [sys.executable, "-c", code, "hf://org/layered/model.safetensors", hf.endpoint],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ran.returncode == 0, ran.stderr
    modules = json.loads(ran.stdout.splitlines()[-1])
    assert "huggingface_hub.constants" in modules  # the probe does see the import
    assert "huggingface_hub.hf_file_system" not in modules and "huggingface_hub.utils" not in modules


def test_an_option_only_hffilesystem_takes_goes_through_it(hf: Any, root: Path) -> None:
    options = {**hf.storage_options(), "block_size": 0}
    assert_same(
        sst.load_file("hf://org/layered/model.safetensors", storage_options=options),
        reference(root, "layered.safetensors"),
    )
    assert api_requests(hf)  # HfFileSystem checked the repo first


def test_token_from_the_environment(hf: Any, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hf.commit("org/private-env", {"model.safetensors": root / "layered.safetensors"}, private=True)
    hf.add_token("hf_FROMTHEENVIRONMENT")
    monkeypatch.setenv("HF_TOKEN", "hf_FROMTHEENVIRONMENT")
    url = "hf://org/private-env/model.safetensors"
    assert_same(sst.load_file(url, storage_options={"endpoint": hf.endpoint}), reference(root, "layered.safetensors"))
    with pytest.raises(FileNotFoundError):  # token=False sends none, whatever the environment holds
        sst.load_file(url, storage_options={"endpoint": hf.endpoint, "token": False})


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
    assert api_requests(hf) == []  # the index is read where transformers puts it: no listing
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


def test_a_repo_without_an_index_is_listed(hf: Any, root: Path) -> None:
    shards = sorted((root / "sharded").glob("*.safetensors"))
    hf.commit("org/noindex", {shard.name: shard for shard in shards})
    expected: dict[str, torch.Tensor] = {}
    for shard in shards:
        expected.update(safetensors.torch.load_file(str(shard)))
    assert_same(sst.load_file("hf://org/noindex", storage_options=hf.storage_options()), expected)


def test_shards_are_read_from_the_commit_the_index_came_from(hf: Any, root: Path) -> None:
    shards = sorted((root / "sharded").glob("*.safetensors"))
    hf.commit("org/moving", {p.name: p for p in (root / "sharded").iterdir()})
    first = safetensors.torch.load_file(str(shards[0]))
    name = next(iter(first))
    with sst.safe_open("hf://org/moving", storage_options=hf.storage_options()) as handle:
        # main moves on after the index was read: the shard is replaced by one whose tensors are all zero
        hf.commit(
            "org/moving", {shards[0].name: safetensors.torch.save({k: torch.zeros_like(t) for k, t in first.items()})}
        )
        assert_tensor_same(handle.get_tensor(name), first[name])
    assert_tensor_same(
        sst.load_file("hf://org/moving", tensors=[name], storage_options=hf.storage_options())[name],
        torch.zeros_like(first[name]),
    )
