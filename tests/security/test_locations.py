"""Locations: one display form without secrets, and no index or listing can name a file outside the
checkpoint's folder, however its name is encoded."""

from __future__ import annotations

import json
import posixpath
from pathlib import Path
from urllib.parse import unquote

import pytest
import torch
from conftest import PASSWORD, SECRET, assert_no_secret, checkpoint_bytes, texts_of, write
from hostile import Client, HostileServer, answer, ranged
from hypothesis import given
from hypothesis import strategies as st

import stream_st as sst
from stream_st.location import Location, redact

PRIVATE = checkpoint_bytes({"private": torch.full((4,), 7.0)})
SHARD = checkpoint_bytes({"a": torch.arange(4, dtype=torch.float32)})
ESCAPES = [
    "%2e%2e/private/other.safetensors",
    "%2E%2E/private/other.safetensors",
    "%252e%252e/private/other.safetensors",  # decoded twice on the way (a proxy, then the server)
    "..%2fprivate/other.safetensors",
    "..%5cprivate%5cother.safetensors",
    "..\\private\\other.safetensors",
    "a/../../private/other.safetensors",
    "/etc/passwd",
    "%2fetc%2fpasswd",
    "file:///etc/passwd",
    "x\x00.safetensors",
    "x%00.safetensors",
    "",
    ".",
]


def _index(shard: str) -> bytes:
    return json.dumps({"metadata": {}, "weight_map": {"a": shard}}).encode()


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    write(tmp_path / "private" / "other.safetensors", PRIVATE)
    write(tmp_path / "ckpt" / "model-1.safetensors", SHARD)
    return tmp_path


@pytest.mark.parametrize("name", ESCAPES)
@pytest.mark.parametrize("form", ["path", "file"])
def test_local_index_cannot_name_a_file_outside(tree: Path, name: str, form: str) -> None:
    index = write(tree / "ckpt" / "model.safetensors.index.json", _index(name))
    url = str(index) if form == "path" else f"file://{index}"
    with pytest.raises(sst.HeaderError, match="refusing file name|must be a non-empty") as caught:
        sst.load_file(url, progress=False)
    assert "private" not in (caught.value.url or "")
    assert_no_secret(texts_of(caught.value), ["root:", "\x00\x00"])


def _decoding_server(root: Path) -> HostileServer:
    """A static server that percent-decodes and normalises the path as nginx does."""

    def handle(client: Client) -> None:
        path = posixpath.normpath(unquote(client.request.target.partition("?")[0]))
        file = root / path.lstrip("/")
        if file.is_file():
            client.send(ranged(file.read_bytes(), client.request))
        else:
            client.send(answer("404 Not Found", {"Content-Length": "0", "Connection": "close"}))

    return HostileServer(handle)


@pytest.mark.parametrize("name", ESCAPES)
def test_http_index_cannot_name_a_file_outside(tree: Path, name: str) -> None:
    write(tree / "ckpt" / "model.safetensors.index.json", _index(name))
    with _decoding_server(tree) as server:
        with pytest.raises(sst.HeaderError):
            sst.load_file(server.url("ckpt/model.safetensors.index.json"), progress=False, retries=0)
        assert not any("private" in unquote(unquote(t)) or "passwd" in t for t in server.targets())


def test_a_legitimate_index_still_loads_over_http_and_file(tree: Path) -> None:
    write(tree / "ckpt" / "sub dir" / "model 2.safetensors", SHARD)
    write(tree / "ckpt" / "model.safetensors.index.json", _index("sub dir/./model 2.safetensors"))
    with _decoding_server(tree) as server:
        got = sst.load_file(server.url("ckpt/model.safetensors.index.json"), progress=False)
    assert torch.equal(got["a"], torch.arange(4, dtype=torch.float32))
    assert torch.equal(sst.load_file(f"file://{tree}/ckpt/model.safetensors.index.json")["a"], got["a"])


_FRAGMENTS = st.sampled_from(
    ["..", ".", "/", "%2e", "%2E", "%25", "%2f", "%5c", "\\", "a", "b.safetensors", "%00", "~", "%", "?", "#", ":"]
)
_NAMES = st.lists(_FRAGMENTS, min_size=1, max_size=8).map("".join)
_FOLDERS = st.sampled_from(
    [
        "http://h/ckpt/model.safetensors.index.json",
        "https://u:p@h:8443/a/ckpt/model.safetensors.index.json?X-Amz-Signature=s",
        "file:///data/ckpt/model.safetensors.index.json",
        "/data/ckpt/model.safetensors.index.json",
        "s3://bucket/ckpt/model.safetensors.index.json",
        "hf://org/repo@main/ckpt/model.safetensors.index.json",
    ]
)


def _fully_decoded(path: str) -> str:
    for _ in range(10):
        path = unquote(path)
    return posixpath.normpath(path.replace("\\", "/"))


@given(index=_FOLDERS, name=_NAMES)
def test_a_child_is_inside_its_folder_or_refused(index: str, name: str) -> None:
    folder = Location.parse(index).folder()
    try:
        child = folder.child(name)
    except sst.HeaderError as exc:
        assert exc.url == folder.shown
        return
    inside = _fully_decoded(folder.path) + "/"
    assert _fully_decoded(child.path).startswith(inside), (folder, name, child)
    assert child.query == "" and "\x00" not in _fully_decoded(child.path)


_QUERY_KEYS = st.sampled_from(["X-Amz-Signature", "sig", "token", "X-Goog-Signature", "se"])
_PATH_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E, exclude_characters="?#@"), max_size=30)


@given(
    scheme=st.sampled_from(["http", "https", "s3", "gs", "hf", "file", "abfs", "memory"]),
    user=st.sampled_from(["", "user", "user:"]),
    host=st.sampled_from(["h", "h:1", "[::1", "h:99999", "bucket", ""]),
    path=_PATH_TEXT,
    key=_QUERY_KEYS,
)
def test_the_display_form_holds_no_secret(scheme: str, user: str, host: str, path: str, key: str) -> None:
    userinfo = f"{user}{PASSWORD}@" if user.endswith(":") else (f"{user}@" if user else "")
    url = f"{scheme}://{userinfo}{host}/{path}?{key}={SECRET}&X-Amz-Credential=c#frag"
    where = Location.parse(url)
    texts = [where.shown, str(where), repr(where), redact(url), where.sibling("x.sha256.json").shown]
    assert_no_secret(texts, [PASSWORD, SECRET, "frag", "\n"])
    if user == "user" and scheme in ("http", "https"):
        assert "user@" not in where.shown  # a user name may be a token too
    assert SECRET not in where.sibling("x.sha256.json").url  # a signature signs one path only
    assert redact(where.shown) == where.shown  # idempotent: display forms can be passed around


def test_sibling_of_a_presigned_url_is_built_on_the_path() -> None:
    where = Location.parse("https://b.s3.amazonaws.com/m/model.safetensors?X-Amz-Signature=abc&X-Amz-Date=1")
    assert (
        where.sibling("model.safetensors.sha256.json").url
        == "https://b.s3.amazonaws.com/m/model.safetensors.sha256.json"
    )
    assert Location.parse("hf://org/repo@abc/model.safetensors").sibling("x.json").url == "hf://org/repo@abc/x.json"
    assert Location.parse("file:///a%20b/m.safetensors").sibling("m 2.json").url == "file:///a%20b/m%202.json"
    assert Location.parse("abfs://container@acct/m.safetensors").shown == "abfs://container@acct/m.safetensors"
    assert Location.parse("hf://datasets/org/repo@v1/m.safetensors").revision == "v1"


def test_digest_writes_sidecars_only_into_the_output_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from stream_st import cli

    out = tmp_path / "out" / "deep"
    out.mkdir(parents=True)

    def handle(client: Client) -> None:
        client.send(ranged(SHARD, client.request))  # whatever the path asks for

    with HostileServer(handle) as server:
        assert cli.main(["digest", server.url("..%2F..%2Fevil.safetensors"), "--output-dir", str(out)]) == 1
        assert cli.main(["digest", server.url("good%20one.safetensors"), "--output-dir", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.rglob("*.json")) == ["good one.safetensors.sha256.json"]
    assert "refusing file name '../../evil.safetensors.sha256.json'" in capsys.readouterr().err
