"""The stream-st command, run in-process as a user would call it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from servers import RangeServer
from stream_st.cli import main


def test_demo_streams_checks_and_summarises(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "bit-exact against safetensors.torch.load_file: yes" in out
    assert "partial load of model.layers.1.*: loaded 9 tensors" in out


def test_inspect_json_over_http(http: RangeServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "--json", http.url("dtypes.safetensors")]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["metadata"] == {"format": "pt", "note": "all dtypes"}
    assert {"name": "BF16.scalar", "dtype": "BF16", "shape": []}.items() <= next(
        t for t in document["tensors"] if t["name"] == "BF16.scalar"
    ).items()


def test_inspect_and_ls_a_sharded_checkpoint(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ls", str(root / "sharded")]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert len(listing) == 4 and listing[-1].endswith("total") and "model-00002-of-00003.safetensors" in listing[1]
    assert main(["inspect", str(root / "sharded")]) == 0
    assert "tensors in 3 file(s)" in capsys.readouterr().out


def test_load_and_bench_report(http: RangeServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["load", http.url("layered.safetensors"), "--select", "lm_head.*", "--dtype", "f16"]) == 0
    assert "loaded 1 tensors" in capsys.readouterr().out
    assert main(["bench", "--repeats", "1", http.url("layered.safetensors")]) == 0
    assert "× the raw read of the same bytes" in capsys.readouterr().out


def test_load_verify(http: RangeServer, root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = http.url("layered.safetensors")
    digest = "sha256:" + hashlib.sha256((root / "layered.safetensors").read_bytes()).hexdigest()
    assert main(["load", url, "--verify", digest]) == 0
    assert "verified: every byte matched its digest" in capsys.readouterr().out
    assert main(["load", url, "--verify", "sha256:" + "0" * 64]) == 1
    assert "sha256 of the streamed bytes is" in capsys.readouterr().err
    assert main(["load", url, "--select", "lm_head.weight", "--verify"]) == 0  # partial, and no sidecar
    assert "NOT verified:" in capsys.readouterr().out
    assert main(["load", url, "--select", "lm_head.weight", "--verify", "strict"]) == 1


def test_errors_are_one_line_and_exit_non_zero(http: RangeServer, capsys: pytest.CaptureFixture[str]) -> None:
    url = http.url("absent.safetensors")
    assert main(["load", url]) == 1
    err = capsys.readouterr().err
    assert err == f"stream-st: error: {url}: not found (HTTP 404)\n"
    with pytest.raises(FileNotFoundError):
        main(["--debug", "load", url])


@pytest.mark.parametrize("command", ["inspect", "ls", "load", "bench", "demo"])
def test_every_subcommand_has_help_with_an_example(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0
    assert "example:" in capsys.readouterr().out


def test_digest_creates_its_output_folder(http: RangeServer, tmp_path: Path) -> None:
    target = tmp_path / "not" / "there" / "yet"
    assert main(["digest", http.url("small.safetensors"), "--output-dir", str(target)]) == 0
    assert (target / "small.safetensors.sha256.json").exists()


def _reference_sidecar(path: Path) -> dict[str, object]:
    """What a sidecar of ``path`` must say, computed here from the file's bytes with hashlib alone."""
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    offsets = {k: v["data_offsets"] for k, v in json.loads(data[8 : 8 + length]).items() if k != "__metadata__"}
    base = 8 + length
    tensors = {name: hashlib.sha256(data[base + a : base + b]).hexdigest() for name, (a, b) in offsets.items()}
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "tensors": tensors}


@pytest.mark.parametrize("name", ["dtypes.safetensors", "tiny.safetensors"])  # empty tensors; a 6000-tensor header
def test_digest_over_http_writes_what_verify_accepts(
    root: Path, tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import safetensors.torch

    import stream_st as sst
    from checkpoints import assert_same
    from stream_st.errors import IntegrityError

    path = tmp_path / name
    path.write_bytes((root / name).read_bytes())
    server = RangeServer(tmp_path)
    try:
        url = server.url(name)
        assert main(["digest", url, "--output-dir", str(tmp_path)]) == 0
        written = json.loads((tmp_path / f"{name}.sha256.json").read_text())
        assert written == _reference_sidecar(path)
        assert f"(sha256 {written['sha256']} of {url})" in capsys.readouterr().out
        assert_same(sst.load_file(url, verify="strict"), safetensors.torch.load_file(str(path)))
        last = sst.read_header(str(path)).offset_keys()[-1]
        assert len(sst.load_file(url, tensors=[last], verify="strict")) == 1
        info = sst.read_header(str(path)).tensors[last]
        data = bytearray(path.read_bytes())
        data[info.end - 1] ^= 0x01
        path.write_bytes(bytes(data))
        with pytest.raises(IntegrityError, match="sha256 of the streamed bytes is"):
            sst.load_file(url, verify="strict")
        with pytest.raises(IntegrityError, match=f"tensor '{last}' has sha256"):
            sst.load_file(url, tensors=[last], verify="strict")
    finally:
        server.stop()


def test_bench_raw_read_makes_the_requests_of_a_load(
    http: RangeServer, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    import stream_st as sst
    from stream_st.cli import _raw_read

    monkeypatch.setenv("STREAM_ST_PART_SIZE", "65536")  # several parts per tensor, read into a 64 KiB scratch
    url = http.url("layered.safetensors")
    size = (root / "layered.safetensors").stat().st_size
    seconds, nbytes, ranges = asyncio.run(_raw_read(url, None))
    assert seconds > 0 and ranges and nbytes == size  # the header read's 256 KiB, then the rest
    raw = sorted(r.range or "" for r in http.gets("layered.safetensors"))
    http.reset()
    sst.load_file(url, part_size=65536)
    assert raw == sorted(r.range or "" for r in http.gets("layered.safetensors"))
    assert len(raw) == 1 + (size - 256 * 1024 + 65535) // 65536
    sharded = asyncio.run(_raw_read(str(root / "sharded"), None))  # local files: the same engine, every shard
    assert sharded[1] == sum(p.stat().st_size for p in (root / "sharded").iterdir())  # and the index


def test_bench_help_says_what_each_number_counts(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    out = capsys.readouterr().out
    assert "the requests load_file makes" in out and "scratch buffer" in out and "their medians" in out
