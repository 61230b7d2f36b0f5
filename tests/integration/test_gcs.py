"""gs:// against gcp-storage-emulator on 127.0.0.1, through gcsfs for endpoint and credentials, and
the JSON API media URL on stream_st's data plane."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

import stream_st as sst
from checkpoints import assert_same, assert_tensor_same, sharded_reference

pytestmark = pytest.mark.gcs
BUCKET = "stream-st-test"


def url(name: str) -> str:
    return f"gs://{BUCKET}/checkpoints/{name}"


@pytest.mark.parametrize("direct_http", [True, False], ids=["media-url-data-plane", "gcsfs-cat-file"])
@pytest.mark.parametrize("name", ["dtypes.safetensors", "layered.safetensors", "tiny.safetensors"])
def test_bit_exact(gcs: Any, root: Path, name: str, direct_http: bool) -> None:
    loaded = sst.load_file(url(name), storage_options=gcs.storage_options, direct_http=direct_http, part_size=65536)
    assert_same(loaded, safetensors.torch.load_file(str(root / name)))


@pytest.mark.parametrize("form", ["sharded/model.safetensors.index.json", "sharded/"])
def test_sharded_index_and_prefix(gcs: Any, root: Path, form: str) -> None:
    assert_same(sst.load_file(url(form), storage_options=gcs.storage_options), sharded_reference(root / "sharded"))


def test_partial_load_counts_bytes_and_requests(gcs: Any, root: Path) -> None:
    header = sst.read_header(str(root / "layered.safetensors"))
    selected = [t for t in header if t.name.startswith("model.layers.2.")]
    stats = sst.Stats()
    loaded = sst.load_file(
        url("layered.safetensors"),
        tensors="model.layers.2.*",
        storage_options=gcs.storage_options,
        header_prefetch=4096,
        stats=stats,
    )
    assert sorted(loaded) == sorted(t.name for t in selected)
    assert stats.bytes == 4096 + sum(t.nbytes for t in selected)
    assert stats.requests == 2


def test_safe_open_slices(gcs: Any, root: Path) -> None:
    expected = safetensors.torch.load_file(str(root / "layered.safetensors"))["lm_head.weight"]
    with sst.safe_open(url("layered.safetensors"), storage_options=gcs.storage_options) as handle:
        assert_tensor_same(handle.get_slice("lm_head.weight")[7:70], expected[7:70])


def test_missing_object_and_bucket(gcs: Any) -> None:
    with pytest.raises(FileNotFoundError, match=url("absent.safetensors")):
        sst.load_file(url("absent.safetensors"), storage_options=gcs.storage_options)
    with pytest.raises(FileNotFoundError, match="gs://no-such-bucket/x.safetensors"):
        sst.load_file("gs://no-such-bucket/x.safetensors", storage_options=gcs.storage_options)


def test_object_replaced_mid_load(gcs: Any) -> None:
    # The emulator ignores ifGenerationMatch and sends no ETag (real GCS honours both), so the change it
    # can show is a new size, which every range's Content-Range reveals.
    name = "checkpoints/replaced.safetensors"
    gcs.upload(BUCKET, name, safetensors.torch.save({"a": torch.zeros(50_000), "b": torch.ones(50_000)}))
    with sst.safe_open(f"gs://{BUCKET}/{name}", storage_options=gcs.storage_options, header_prefetch=4096) as handle:
        gcs.upload(BUCKET, name, safetensors.torch.save({"a": torch.ones(60_000), "b": torch.zeros(50_000)}))
        with pytest.raises(sst.ObjectChangedError, match=f"gs://{BUCKET}/{name}: object size changed"):
            handle.get_tensor("b")
