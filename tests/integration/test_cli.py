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
