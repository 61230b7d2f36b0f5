"""verify=: whole files against a caller's digest, a sidecar, or the digest the store publishes (Hub LFS
sha256, S3 ChecksumSHA256, GCS md5Hash); partial loads against per-tensor sidecar digests; one flipped
byte on the server raises IntegrityError and returns nothing."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch

import stream_st as sst
from checkpoints import assert_same, layered_state, write
from servers import RangeServer
from stream_st import gpu, verifier
from stream_st.cli import main
from stream_st.errors import IntegrityError, IntegrityWarning
from stream_st.process_cache import ProcessCache
from stream_st.remote import RemoteFile


@pytest.fixture(params=["host", "staged"])
def served(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A folder of its own (files get corrupted here), served over HTTP; loads land in host memory, or
    pass through the device path's slot pool (as on a GPU: hashed from the destination, read back)."""
    if request.param == "staged":
        monkeypatch.setattr(RemoteFile, "stage_cpu_loads", True)
        monkeypatch.setattr(gpu, "_pools", ProcessCache())
        monkeypatch.setattr(verifier, "_READ_BACK_BYTES", 1000)  # many read-back chunks, odd boundaries
    folder = tmp_path / "served"
    folder.mkdir()
    write(folder / "model.safetensors", layered_state())
    server = RangeServer(folder)
    yield server, folder
    server.stop()
    if request.param == "staged":
        (pool,) = gpu._pools.values()  # the loads did pass through the slots, and gave every one back
        assert pool.allocated >= 1 and pool.idle == pool.allocated


def flip_byte(path: Path, offset: int) -> None:
    """Corrupt one byte in a new file put in place (other hard links to the old one stay intact)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    fresh = path.with_name(path.name + ".tmp")
    fresh.write_bytes(bytes(data))
    fresh.chmod(0o644)
    fresh.replace(path)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_caller_digest(served: Any) -> None:
    server, folder = served
    path = folder / "model.safetensors"
    url = server.url("model.safetensors")
    good = f"sha256:{sha256(path)}"
    assert_same(sst.load_file(url, verify=good, part_size=65536), safetensors.torch.load_file(str(path)))
    lm_head = sst.read_header(str(path)).tensors["lm_head.weight"]
    flip_byte(path, lm_head.start + 5)
    with pytest.raises(IntegrityError) as caught:
        sst.load_file(url, verify=good, part_size=65536)
    message = str(caught.value)
    assert url in message and good.split(":")[1] in message and sha256(path) in message
    with pytest.raises(ValueError, match="expected '<algorithm>:<hex>'"):
        sst.load_file(url, verify="sha1:abcd")


def test_sidecar_verifies_whole_and_partial_loads(served: Any, capsys: pytest.CaptureFixture[str]) -> None:
    server, folder = served
    path = folder / "model.safetensors"
    assert main(["digest", str(path), "--output-dir", str(folder)]) == 0
    assert (folder / "model.safetensors.sha256.json").exists()
    url = server.url("model.safetensors")
    assert_same(sst.load_file(url, verify=True), safetensors.torch.load_file(str(path)))
    partial = sst.load_file(url, tensors="model.layers.1.*", verify="strict")
    assert len(partial) == 3
    header = sst.read_header(str(path))
    flip_byte(path, header.tensors["model.layers.1.mlp.up_proj.weight"].start + 100)
    with pytest.raises(IntegrityError, match="tensor 'model.layers.1.mlp.up_proj.weight' has sha256"):
        sst.load_file(url, tensors="model.layers.1.*", verify=True)
    assert len(sst.load_file(url, tensors="model.layers.2.*", verify=True)) == 3  # untouched tensors still verify
    with pytest.raises(IntegrityError, match="sha256 of the streamed bytes is"):
        sst.load_file(url, verify=True)


def test_partial_load_without_sidecar_warns_or_fails(served: Any) -> None:
    server, _ = served
    url = server.url("model.safetensors")
    with pytest.warns(IntegrityWarning, match="a partial load cannot be checked"):
        sst.load_file(url, tensors="lm_head.weight", verify=True)
    with pytest.raises(IntegrityError, match="not verified"):
        sst.load_file(url, tensors="lm_head.weight", verify="strict")
    with pytest.raises(IntegrityError, match="publishes no digest and there is no .sha256.json sidecar"):
        sst.load_file(url, verify=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sst.load_file(url, tensors="lm_head.weight")  # not asked to verify: silent


def test_sharded_checkpoint_verifies_each_shard(root: Path, tmp_path: Path) -> None:
    folder = tmp_path / "sharded"
    shutil.copytree(root / "sharded", folder)
    assert main(["digest", str(folder), "--output-dir", str(folder)]) == 0
    assert len(list(folder.glob("*.sha256.json"))) == 3
    sst.load_file(str(folder), verify="strict")
    with pytest.raises(ValueError, match="is one digest, but the checkpoint has 3 files"):
        sst.load_file(str(folder), verify="sha256:" + "0" * 64)
    with pytest.raises(ValueError, match="is one digest, but the checkpoint has 3 files"):
        sst.safe_open(str(folder), framework="pt", verify="sha256:" + "0" * 64)
    shard = sorted(folder.glob("*.safetensors"))[1]
    flip_byte(shard, shard.stat().st_size - 1)
    with pytest.raises(IntegrityError, match=shard.name):
        sst.load_file(str(folder), verify=True)


@pytest.mark.hub
@pytest.mark.parametrize("resolver", ["direct", "HfFileSystem"])
def test_hub_lfs_sha256(hub: Any, root: Path, resolver: str) -> None:
    repo = f"org/verified-{resolver.lower()}"
    hub.commit(repo, {"model.safetensors": (root / "layered.safetensors").read_bytes()})
    url = f"hf://{repo}/model.safetensors"
    options = {**hub.storage_options(), **({"block_size": 0} if resolver == "HfFileSystem" else {})}
    loaded = sst.load_file(url, storage_options=options, verify="strict")
    assert_same(loaded, safetensors.torch.load_file(str(root / "layered.safetensors")))
    stored = Path(hub.file_info(repo, "model.safetensors")["local_path"])
    flip_byte(stored, stored.stat().st_size - 3)  # the CDN now serves other bytes than the LFS pointer says
    with pytest.raises(IntegrityError, match="the Hub's LFS sha256"):
        sst.load_file(url, storage_options=options, verify=True)


@pytest.mark.s3
def test_s3_full_object_sha256(s3: Any, root: Path) -> None:
    client = s3.boto3_client()
    key = "checkpoints/checksummed.safetensors"
    client.put_object(
        Bucket=s3.bucket, Key=key, Body=(root / "layered.safetensors").read_bytes(), ChecksumAlgorithm="SHA256"
    )
    loaded = sst.load_file(f"s3://{s3.bucket}/{key}", storage_options=s3.storage_options, verify="strict")
    assert_same(loaded, safetensors.torch.load_file(str(root / "layered.safetensors")))


@pytest.mark.gcs
def test_gcs_md5(gcs: Any, root: Path) -> None:
    url = "gs://stream-st-test/checkpoints/layered.safetensors"
    loaded = sst.load_file(url, storage_options=gcs.storage_options, verify="strict")
    assert_same(loaded, safetensors.torch.load_file(str(root / "layered.safetensors")))


def test_hashing_sees_every_byte_in_order_whatever_order_parts_land(served: Any) -> None:
    server, folder = served
    path = folder / "model.safetensors"
    # Many small parts on several threads land out of order; the digest must still match.
    loaded = sst.load_file(
        server.url("model.safetensors"),
        verify=f"sha256:{sha256(path)}",
        part_size=4096,
        max_concurrency=8,
        header_prefetch=1024,
        pinned_pool_bytes=3 * 4096,  # staged: fewer slots than threads
    )
    assert_same(loaded, safetensors.torch.load_file(str(path)))


def test_iter_tensors_verifies_each_batch(served: Any) -> None:
    """iter_tensors (sync and async) checks each batch against the sidecar's per-tensor digests."""
    server, folder = served
    path = folder / "model.safetensors"
    url = server.url("model.safetensors")
    # No digest anywhere: verify=True fails as load_file's does, not with a warning per batch.
    with pytest.raises(IntegrityError, match="publishes no digest and there is no .sha256.json sidecar"):
        sst.load_file(url, verify=True)
    with pytest.raises(IntegrityError, match="publishes no digest and there is no .sha256.json sidecar"):
        list(sst.iter_tensors(url, verify=True, max_inflight_bytes=100_000))
    assert len(sst.read_header(url)) > 3  # several batches of 100 kB
    assert main(["digest", str(path), "--output-dir", str(folder)]) == 0
    expected = safetensors.torch.load_file(str(path))
    assert_same(dict(sst.iter_tensors(url, verify="strict", max_inflight_bytes=100_000)), expected)
    flip_byte(path, sst.read_header(str(path)).tensors["lm_head.weight"].start + 7)
    with pytest.raises(IntegrityError, match="tensor 'lm_head.weight' has sha256"):
        list(sst.iter_tensors(url, verify=True, max_inflight_bytes=100_000))

    async def drain() -> None:
        async for _ in sst.iter_tensors_async(url, verify=True, max_inflight_bytes=100_000):
            pass

    with pytest.raises(IntegrityError, match="tensor 'lm_head.weight' has sha256"):
        asyncio.run(drain())


def test_iter_tensors_checks_a_whole_file_digest_across_its_batches(served: Any) -> None:
    """verify= behaves for iter_tensors as for load_file: a whole-file digest (the caller's, or the store's)
    is checked as the file's last batch lands, before that batch is yielded."""
    server, folder = served
    path = folder / "model.safetensors"
    url = server.url("model.safetensors")
    digest = f"sha256:{sha256(path)}"
    expected = safetensors.torch.load_file(str(path))
    assert_same(dict(sst.iter_tensors(url, verify=digest, max_inflight_bytes=100_000)), expected)
    names = list(sst.read_header(url).tensors)
    flip_byte(path, sst.read_header(url).tensors[names[-1]].start + 1)  # in the last batch
    yielded: list[str] = []
    with pytest.raises(IntegrityError, match="sha256 of the streamed bytes is"):
        for name, _ in sst.iter_tensors(url, verify=digest, max_inflight_bytes=100_000):
            yielded.append(name)
    assert names[-1] not in yielded and yielded == names[: len(yielded)]  # the failing batch never came out
    with pytest.raises(sst.ConfigError, match="is a digest of the whole file"):
        next(sst.iter_tensors(url, tensors=names[0], verify=digest))  # a part of the file: not applicable


def test_a_file_reads_its_sidecar_once(served: Any) -> None:
    """One Verifier per opened file: the calls of a safe_open handle (and the files of a load) share the
    sidecar they read, and each call still checks its own tensors."""
    server, folder = served
    path = folder / "model.safetensors"
    assert main(["digest", str(path), "--output-dir", str(folder)]) == 0
    server.reset()
    expected = safetensors.torch.load_file(str(path))
    with sst.safe_open(server.url("model.safetensors"), framework="pt", verify="strict") as f:
        for name in ("lm_head.weight", "model.layers.0.mlp.up_proj.weight", "model.layers.2.input_layernorm.weight"):
            assert_same({name: f.get_tensor(name)}, {name: expected[name]})
        assert_same(f.get_tensors(), expected)  # the whole file: its digest from the same sidecar
    assert len(server.gets("model.safetensors.sha256.json")) == 1
    flip_byte(path, sst.read_header(str(path)).tensors["lm_head.weight"].start + 3)
    with sst.safe_open(server.url("model.safetensors"), framework="pt", verify=True) as f:
        f.get_tensor("model.layers.0.mlp.up_proj.weight")  # untouched
        with pytest.raises(IntegrityError, match="tensor 'lm_head.weight' has sha256"):
            f.get_tensor("lm_head.weight")


def test_a_sidecar_that_failed_to_arrive_is_asked_for_again(served: Any) -> None:
    """A sidecar read that failed (retries exhausted) fails that call only; the handle's next call reads it."""
    server, folder = served
    path = folder / "model.safetensors"
    assert main(["digest", str(path), "--output-dir", str(folder)]) == 0
    expected = safetensors.torch.load_file(str(path))
    with sst.safe_open(server.url("model.safetensors"), framework="pt", verify="strict", retries=0) as f:
        server.reset()
        server.quirks.status_once = [503]  # the next request: the sidecar's
        with pytest.raises(sst.FetchError):
            f.get_tensor("lm_head.weight")
        assert_same({"lm_head.weight": f.get_tensor("lm_head.weight")}, {"lm_head.weight": expected["lm_head.weight"]})
    assert [r.status for r in server.gets("model.safetensors.sha256.json")] == [503, 206]
