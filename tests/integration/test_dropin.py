"""Drop-in for safetensors users: what safetensors accepts is accepted, and misuse fails clearly, early
and with stream_st's named errors (which code catching safetensors' SafetensorError also catches)."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch

import stream_st as sst
from checkpoints import assert_same, mapping_of, write
from servers import Nginx, RangeServer


@pytest.mark.parametrize("backend", ["mmap", "pread"])
def test_backend_is_accepted_as_safetensors_accepts_it(http: RangeServer, root: Path, backend: str) -> None:
    path = root / "dtypes.safetensors"
    expected = safetensors.torch.load_file(str(path), backend=backend)
    for where in (str(path), http.url("dtypes.safetensors")):
        assert_same(sst.load_file(where, backend=backend), expected)
        with sst.safe_open(where, framework="pt", backend=backend) as handle:
            assert handle.get_tensor("F32.odd").equal(expected["F32.odd"])


def test_backend_mmap_maps_a_local_file_as_safetensors_does(root: Path) -> None:
    path = root / "dtypes.safetensors"
    expected = safetensors.torch.load_file(str(path))
    mapped = sst.load_file(path, backend="mmap")
    assert_same(mapped, expected)
    assert {mapping_of(t) for t in mapped.values() if t.numel()} == {str(path)}
    with sst.safe_open(path, framework="pt", backend="mmap") as handle:
        assert mapping_of(handle.get_tensor("F32.odd")) == str(path)
    for owned in (sst.load_file(path), sst.load_file(path, backend="pread"), sst.load_file(path, memory_map="never")):
        assert_same(owned, expected)  # by default a local file is read into memory the tensors own
        assert {mapping_of(t) for t in owned.values() if t.numel()} == {None}
    next(iter(mapped.values())).view(torch.uint8).fill_(7)  # copy-on-write: the file is not written
    assert_same(safetensors.torch.load_file(str(path)), expected)


def test_an_invalid_backend_raises_what_safetensors_raises(http: RangeServer, root: Path) -> None:
    path = root / "small.safetensors"
    with pytest.raises(safetensors.SafetensorError) as theirs:
        safetensors.torch.load_file(str(path), backend="bogus")
    for call in (
        lambda: sst.load_file(str(path), backend="bogus"),
        lambda: sst.load_model(torch.nn.Module(), str(path), strict=False, backend="bogus"),
        lambda: sst.safe_open(http.url("small.safetensors"), framework="pt", backend="bogus"),
    ):
        with pytest.raises(sst.ConfigError) as ours:
            call()
        assert isinstance(ours.value, safetensors.SafetensorError)
        assert str(ours.value) == str(theirs.value)
    assert http.gets() == []  # refused before any request


def test_every_stream_st_error_is_a_safetensor_error() -> None:
    names = [name for name in sst.__all__ if name.endswith("Error")]
    assert len(names) >= 10
    for name in names:
        assert issubclass(getattr(sst, name), safetensors.SafetensorError), name


def test_a_closed_handle_raises_what_code_for_safetensors_catches(http: RangeServer) -> None:
    with sst.safe_open(http.url("small.safetensors"), framework="pt") as handle:
        pass
    with pytest.raises(safetensors.SafetensorError, match="the handle is closed"):
        handle.keys()
    with pytest.raises(sst.HandleClosedError):
        handle.get_tensor("x")


def test_get_tensors_without_names_returns_every_tensor(http: RangeServer, root: Path) -> None:
    with sst.safe_open(http.url("dtypes.safetensors"), framework="pt") as handle:
        got = handle.get_tensors()
    expected = safetensors.torch.load_file(str(root / "dtypes.safetensors"))
    assert_same(got, expected)
    assert list(got) == list(sst.read_header(http.url("dtypes.safetensors")).tensors)  # file order


def test_path_like_works_wherever_a_path_does(root: Path) -> None:
    path = root / "dtypes.safetensors"
    expected = safetensors.torch.load_file(path)
    assert_same(sst.load_file(path), expected)
    assert list(sst.read_header(path).tensors) == list(sst.read_header(str(path)).tensors)
    with sst.safe_open(path, framework="pt") as handle:
        assert handle.get_tensor("I64.odd").equal(expected["I64.odd"])
    assert_same(dict(sst.iter_tensors(path)), expected)


@pytest.mark.parametrize(
    "index",
    [None, (None, 1), (Ellipsis, None), (slice(1, 3), None), (Ellipsis,), 2, (-1, slice(None, None, 2))],
    ids=repr,
)
def test_get_slice_indexes_as_safetensors_does(http: RangeServer, root: Path, index: object) -> None:
    path = root / "dtypes.safetensors"
    with safetensors.safe_open(str(path), framework="pt") as theirs:
        expected = theirs.get_slice("F32.odd")[index]
    with sst.safe_open(http.url("dtypes.safetensors"), framework="pt") as ours:
        got = ours.get_slice("F32.odd")[index]
    assert got.shape == expected.shape
    assert torch.equal(got, expected)


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, "int8", "bogus", "cpu"])
def test_a_cast_to_a_non_floating_dtype_is_refused_before_any_request(http: RangeServer, dtype: object) -> None:
    with pytest.raises(sst.ConfigError, match="is not a floating-point dtype to cast to"):
        sst.load_file(http.url("layered.safetensors"), dtype=dtype)  # type: ignore[arg-type]
    assert http.gets() == []


@pytest.mark.parametrize("name", ["bf16", "bfloat16", "torch.bfloat16", torch.bfloat16])
def test_cast_names_are_accepted(http: RangeServer, root: Path, name: object) -> None:
    got = sst.load_file(http.url("small.safetensors"), dtype=name)  # type: ignore[arg-type]
    assert got["x"].dtype == torch.bfloat16
    assert torch.equal(got["x"], torch.arange(6, dtype=torch.float32).to(torch.bfloat16))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_gpu_device_without_a_gpu_is_a_named_error(http: RangeServer) -> None:
    with pytest.raises(sst.ConfigError, match="CUDA is not available"):
        sst.load_file(http.url("small.safetensors"), device="cuda")
    with pytest.raises(sst.ConfigError, match="is not a device"):
        sst.load_file(http.url("small.safetensors"), device="bf16")
    assert http.gets() == []


def _stalled(http: RangeServer) -> None:
    http.quirks.faults, http.quirks.fault_kind, http.quirks.stall_seconds = 100, "stall", 4.0


def test_timeout_bounds_read_header_iter_tensors_and_safe_open(http: RangeServer) -> None:
    url = http.url("layered.safetensors")
    options = {"header_prefetch": 4096, "backoff_base": 0.01, "timeout": 0.5}
    _stalled(http)  # every body stalls, the header read's too
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="read_header did not finish within timeout=0.5s"):
        sst.read_header(url, **options)
    with pytest.raises(TimeoutError, match="safe_open open did not finish within timeout=0.5s"):
        sst.safe_open(url, framework="pt", **options)
    with pytest.raises(TimeoutError, match="the next tensor did not finish within timeout=0.5s"):
        next(sst.iter_tensors(url, **options))
    assert time.monotonic() - started < 10  # each gave up after its 0.5 s, not after the server's 4 s stalls


def test_a_whole_file_digest_on_a_partial_load_is_refused(http: RangeServer, root: Path) -> None:
    digest = "sha256:" + "0" * 64
    with pytest.raises(sst.ConfigError, match="is a digest of the whole file, but this load reads 1 whole tensors"):
        sst.load_file(http.url("layered.safetensors"), tensors="lm_head.weight", verify=digest)
    header_only = [r for r in http.gets() if r.range and r.range.startswith("bytes=0-")]
    assert http.gets() == header_only  # no tensor bytes were fetched


def test_one_integrity_warning_per_load_pointing_at_the_callers_line(http: RangeServer, root: Path) -> None:
    url = http.url("layered.safetensors")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sst.load_file(url, tensors="model.layers.*", verify=True)
        list(sst.iter_tensors(url, tensors="model.layers.*", verify=True, max_inflight_bytes=64 << 10))
    integrity = [w for w in caught if issubclass(w.category, sst.IntegrityWarning)]
    assert len(integrity) == 2, [str(w.message) for w in integrity]  # one per load, the iterator's batches too
    assert {Path(w.filename).name for w in integrity} == {Path(__file__).name}
    assert "loading unverified" in str(integrity[0].message)


def test_an_exact_name_with_glob_characters_can_be_selected(http: RangeServer, root: Path) -> None:
    path = write(
        root / "globby.safetensors", {"w[0]": torch.ones(2), "w0": torch.zeros(2), "w*": torch.full((2,), 7.0)}
    )
    try:
        got = sst.load_file(http.url(path.name), tensors=["w[0]", "w*"])
        assert set(got) == {"w[0]", "w*"}
        assert torch.equal(got["w[0]"], torch.ones(2))
        assert set(sst.load_file(http.url(path.name), tensors="w?")) == {"w0", "w*"}  # not a name: a glob
        with pytest.raises(sst.TensorNotFoundError, match="no tensor matches 'v\\*'"):
            sst.load_file(http.url(path.name), tensors="v*")  # an unmatched glob raises
    finally:
        path.unlink()


def test_a_file_is_a_file_whatever_its_name_over_http(http: RangeServer, root: Path) -> None:
    path = root / "weights.bin"
    path.write_bytes((root / "small.safetensors").read_bytes())
    try:
        assert torch.equal(sst.load_file(http.url("weights.bin"))["x"], torch.arange(6, dtype=torch.float32))
        assert len(http.gets("weights.bin")) == 1  # the one header read that found out it is a file
    finally:
        path.unlink()
    with pytest.raises(FileNotFoundError, match="no-such: not found: no file there, and no model.safetensors.index"):
        sst.load_file(http.url("no-such"))


def test_a_host_that_accepts_and_never_answers_fails_within_two_connect_timeouts() -> None:
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:  # accept every connection, never answer
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/model.safetensors"
    try:
        started = time.monotonic()
        with pytest.raises(sst.FetchError, match="failed after 2 attempts"):
            sst.load_file(url, connect_timeout=1.0, backoff_base=0.01)  # stall_timeout stays 30 s
        assert time.monotonic() - started < 10  # two first-contact timeouts, not 6 × stall_timeout
        assert len(accepted) == 2
    finally:
        stop.set()
        thread.join(5)
        for conn in accepted:
            conn.close()
        listener.close()


def test_an_unknown_scheme_is_a_named_error() -> None:
    with pytest.raises(sst.ConfigError, match="bogus://bucket/x.safetensors: no filesystem can read this URL"):
        sst.load_file("bogus://bucket/x.safetensors")


def test_missing_s3_credentials_are_a_named_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for variable in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(sst.CredentialsError, match="s3://bucket/x.safetensors: no usable credentials") as caught:
        sst.load_file("s3://bucket/x.safetensors", storage_options={"endpoint_url": "http://127.0.0.1:9"})
    assert isinstance(caught.value, PermissionError)


def test_cli_misuse_is_named(http: RangeServer, capsys: pytest.CaptureFixture[str]) -> None:
    from stream_st.cli import main

    # "--verify URL": the URL is the checkpoint (verified, here without a digest to check), not a digest.
    assert main(["load", "--verify", http.url("small.safetensors"), "--no-progress"]) == 1
    assert "small.safetensors: verify asked, but the source publishes no digest" in capsys.readouterr().err
    assert main(["load", http.url("small.safetensors"), "--storage-options", "{bad"]) == 1
    assert "--storage-options: not valid JSON" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["load", http.url("small.safetensors"), "--dtype", "int8"])
    assert "invalid choice: 'int8'" in capsys.readouterr().err


def test_an_http_folder_that_refuses_to_be_listed_is_still_a_folder(nginx: Nginx, root: Path) -> None:
    # nginx answers a folder without an index page with 403 (after a redirect adding its "/"): the folder's
    # index is then looked for, as for any folder URL.
    got = sst.load_file(nginx.url("sharded"))
    expected = {}
    for shard in sorted((root / "sharded").glob("*.safetensors")):
        expected.update(safetensors.torch.load_file(str(shard)))
    assert_same(got, expected)
