"""s3:// against a real S3 server (LocalStack on 127.0.0.1, or STREAM_ST_TEST_S3_ENDPOINT), through s3fs
for credentials and presigned ranged GETs on stream_st's data plane."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
import safetensors.torch
import torch
from dist_worker import describe

import stream_st as sst
from checkpoints import assert_same, assert_tensor_same, sharded_reference

pytestmark = pytest.mark.s3
TESTS = Path(__file__).resolve().parents[1]


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


_WHICH_CLIENT = """
import json, sys
import stream_st as sst
from dist_worker import describe
state = sst.load_file(sys.argv[1], storage_options=json.loads(sys.argv[2]))
loaded = {name: describe(tensor) for name, tensor in state.items()}
print(json.dumps({"tensors": loaded, "s3fs": "s3fs" in sys.modules, "aiobotocore": "aiobotocore" in sys.modules}))
"""


@pytest.mark.parametrize("extra", [{}, {"default_block_size": 1 << 20}], ids=["botocore-only", "s3fs-option"])
def test_plain_options_skip_s3fs_others_use_it(s3: Any, root: Path, extra: dict[str, Any]) -> None:
    """Options botocore takes as they are need no s3fs (its import is most of an S3 cold start's overhead);
    an s3fs option (here default_block_size) still goes through s3fs. Both load the same tensors."""
    options = {**s3.storage_options, **extra}
    ran = subprocess.run(
        [sys.executable, "-c", _WHICH_CLIENT, url(s3, "layered.safetensors"), json.dumps(options)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])},
    )
    assert ran.returncode == 0, ran.stderr
    seen = json.loads(ran.stdout.splitlines()[-1])
    reference = safetensors.torch.load_file(str(root / "layered.safetensors"))
    assert seen["tensors"] == {name: describe(tensor) for name, tensor in reference.items()}
    assert seen["s3fs"] == seen["aiobotocore"] == bool(extra)


def test_botocore_presigns_the_url_s3fs_would(s3: Any) -> None:
    """The same host, path and signed parameters as s3fs's own presigned URL (dates and signatures aside)."""
    import s3fs

    from stream_st.cloud import _PRESIGN_EXPIRES_S, _s3_client

    key = "checkpoints/layered.safetensors"
    ours = _s3_client(s3.storage_options).generate_presigned_url(
        "get_object", Params={"Bucket": s3.bucket, "Key": key}, ExpiresIn=_PRESIGN_EXPIRES_S
    )
    theirs = s3fs.S3FileSystem(**s3.storage_options).url(f"{s3.bucket}/{key}", expires=_PRESIGN_EXPIRES_S)
    a, b = urlsplit(ours), urlsplit(theirs)
    assert (a.scheme, a.netloc, a.path) == (b.scheme, b.netloc, b.path)
    varying = {"X-Amz-Date", "X-Amz-Signature", "X-Amz-Credential"}
    assert {k: v for k, v in parse_qsl(a.query) if k not in varying} == {
        k: v for k, v in parse_qsl(b.query) if k not in varying
    }
