"""s3:// against a real S3 server (LocalStack on 127.0.0.1, or STREAM_ST_TEST_S3_ENDPOINT), through s3fs
for credentials and presigned ranged GETs on stream_st's data plane."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

import stream_st as sst
from checkpoints import assert_same, assert_tensor_same, sharded_reference

pytestmark = pytest.mark.s3


def url(s3: Any, name: str) -> str:
    return f"s3://{s3.bucket}/checkpoints/{name}"


@pytest.mark.parametrize("direct_http", [True, False], ids=["presigned-data-plane", "s3fs-cat-file"])
@pytest.mark.parametrize("name", ["dtypes.safetensors", "layered.safetensors", "tiny.safetensors"])
def test_bit_exact(s3: Any, root: Path, name: str, direct_http: bool) -> None:
    loaded = sst.load_file(url(s3, name), storage_options=s3.storage_options, direct_http=direct_http, part_size=65536)
    assert_same(loaded, safetensors.torch.load_file(str(root / name)))


@pytest.mark.parametrize("form", ["sharded/model.safetensors.index.json", "sharded/", "sharded"])
def test_sharded_index_and_prefix(s3: Any, root: Path, form: str) -> None:
    assert_same(sst.load_file(url(s3, form), storage_options=s3.storage_options), sharded_reference(root / "sharded"))


def test_partial_load_counts_bytes_and_requests(s3: Any, root: Path) -> None:
    header = sst.read_header(str(root / "layered.safetensors"))
    selected = [t for t in header if t.name.startswith("model.layers.1.")]
    stats = sst.Stats()
    loaded = sst.load_file(
        url(s3, "layered.safetensors"),
        tensors="model.layers.1.*",
        storage_options=s3.storage_options,
        header_prefetch=4096,
        stats=stats,
    )
    assert sorted(loaded) == sorted(t.name for t in selected)
    assert stats.bytes == 4096 + sum(t.nbytes for t in selected)  # header prefetch + exactly the selection
    assert stats.requests == 2  # one header GET, one coalesced range (layer 1 is contiguous)


def test_partial_load_of_a_sharded_checkpoint_touches_one_shard(s3: Any, root: Path) -> None:
    stats = sst.Stats()
    wanted = "model.layers.3.mlp.up_proj.weight"
    loaded = sst.load_file(url(s3, "sharded/"), tensors=[wanted], storage_options=s3.storage_options, stats=stats)
    assert_tensor_same(loaded[wanted], sharded_reference(root / "sharded")[wanted])
    assert stats.requests == 1 + 1 + 1  # index, the shard's header, the tensor (which follows the prefix)


def test_safe_open_and_slices(s3: Any, root: Path) -> None:
    expected = safetensors.torch.load_file(str(root / "layered.safetensors"))
    with sst.safe_open(url(s3, "layered.safetensors"), storage_options=s3.storage_options) as handle:
        assert handle.keys() == sorted(expected)
        assert_tensor_same(handle.get_slice("lm_head.weight")[100:200], expected["lm_head.weight"][100:200])


def test_missing_object_and_bucket_are_file_not_found(s3: Any) -> None:
    missing = url(s3, "absent.safetensors")
    with pytest.raises(FileNotFoundError, match=missing):
        sst.load_file(missing, storage_options=s3.storage_options)
    with pytest.raises(FileNotFoundError, match="s3://no-such-bucket-stream-st/x.safetensors"):
        sst.load_file("s3://no-such-bucket-stream-st/x.safetensors", storage_options=s3.storage_options)


def test_bad_credentials_are_permission_error(s3: Any) -> None:
    if s3.external:
        pytest.skip("an external endpoint may not check signatures")
    options = {**s3.storage_options, "secret": "wrong-secret-value"}
    target = url(s3, "small.safetensors")
    with pytest.raises(PermissionError, match=target) as caught:
        sst.load_file(target, storage_options=options)
    assert "wrong-secret-value" not in str(caught.value)


def test_object_overwritten_mid_load(s3: Any) -> None:
    key = "checkpoints/overwritten.safetensors"
    first = {"a": torch.zeros(50_000), "b": torch.ones(50_000)}
    s3.upload(s3.bucket, key, safetensors.torch.save(first))
    with sst.safe_open(f"s3://{s3.bucket}/{key}", storage_options=s3.storage_options, header_prefetch=4096) as handle:
        s3.upload(s3.bucket, key, safetensors.torch.save({"a": torch.ones(50_000), "b": torch.zeros(50_000)}))
        with pytest.raises(sst.ObjectChangedError, match=f"s3://{s3.bucket}/{key}: object changed during the load"):
            handle.get_tensor("b")


def test_credentials_from_the_environment_as_aws_tools_find_them(
    s3: Any, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if s3.external:
        pytest.skip("an external endpoint has its own credentials")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret)
    monkeypatch.setenv("AWS_DEFAULT_REGION", s3.region)
    options = {k: v for k, v in s3.storage_options.items() if k not in ("key", "secret", "token")}
    loaded = sst.load_file(url(s3, "small.safetensors"), storage_options=options)
    assert_same(loaded, safetensors.torch.load_file(str(root / "small.safetensors")))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(PermissionError):
        sst.load_file(url(s3, "small.safetensors"), storage_options={**options, "skip_instance_cache": True})
