"""Which hf:// URLs go straight to the Hub's resolve URL, and which are left to HfFileSystem."""

from __future__ import annotations

from typing import Any

import pytest

from stream_st.cloud import _hub_direct
from stream_st.transport import ConnectionPool

ENDPOINT = "http://hub.test"


def resolve_url(url: str, **options: Any) -> str | None:
    source = _hub_direct(
        url, {"endpoint": ENDPOINT, "token": False, **options}, ConnectionPool(connect_timeout=1, read_timeout=1)
    )
    return None if source is None else source.endpoint.url


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("hf://org/name/model.safetensors", "/org/name/resolve/main/model.safetensors"),
        ("hf://models/org/name/model.safetensors", "/org/name/resolve/main/model.safetensors"),
        ("hf://org/name@v1.0/sub/dir/x.safetensors", "/org/name/resolve/v1.0/sub/dir/x.safetensors"),
        ("hf://datasets/org/data/weights/x.safetensors", "/datasets/org/data/resolve/main/weights/x.safetensors"),
        ("hf://kernels/org/k/build/x.safetensors", "/kernels/org/k/resolve/main/build/x.safetensors"),
        ("hf://org/name@v 2/my model.safetensors", "/org/name/resolve/v%202/my%20model.safetensors"),
        (
            "hf://spaces/org/app@" + "a" * 40 + "/x.safetensors",
            "/spaces/org/app/resolve/" + "a" * 40 + "/x.safetensors",
        ),
    ],
)
def test_files_of_named_repos_go_to_their_resolve_url(url: str, expected: str) -> None:
    assert resolve_url(url) == ENDPOINT + expected


@pytest.mark.parametrize(
    "url",
    [
        "hf://gpt2/model.safetensors",  # no organisation: HfFileSystem says what is wrong
        "hf://org/name@refs/pr/1/model.safetensors",  # a revision with '/'
        "hf://org/name@refs%2Fpr%2F1/model.safetensors",
        "hf://org/name@/model.safetensors",
        "hf://org//model.safetensors",
        "hf://buckets/org/bucket/model.safetensors",  # a bucket is no repo: no resolve URL
    ],
)
def test_ambiguous_urls_are_left_to_hffilesystem(url: str) -> None:
    assert resolve_url(url) is None


def test_options_only_hffilesystem_knows_are_left_to_it() -> None:
    assert resolve_url("hf://org/name/model.safetensors", block_size=0) is None
    assert resolve_url("hf://org/name/model.safetensors", token=object()) is None


def test_token_given_from_the_environment_or_left_to_huggingface_hub(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    from huggingface_hub import constants

    pool = ConnectionPool(connect_timeout=1, read_timeout=1)
    url = "hf://org/name/model.safetensors"
    saved = tmp_path / "token"
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(saved))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_IMPLICIT_TOKEN", False)
    for variable in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(variable, raising=False)

    def auth(**options: Any) -> str | None:
        source = _hub_direct(url, {"endpoint": ENDPOINT, **options}, pool)
        assert source is not None
        return source.endpoint.headers.get("authorization")

    assert auth(token="hf_given") == "Bearer hf_given"
    assert auth() is None  # nothing saved, nothing in the environment: anonymous
    saved.write_text("hf_saved\n")  # a saved login may need huggingface_hub's refresh: it decides
    assert _hub_direct(url, {"endpoint": ENDPOINT}, pool) is None
    monkeypatch.setenv("HF_TOKEN", "hf_env")
    assert auth() == auth(token=True) == "Bearer hf_env"
    assert auth(token=False) is None
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_IMPLICIT_TOKEN", True)
    assert auth() is None and auth(token=True) == "Bearer hf_env"
    monkeypatch.setenv("HF_OIDC_RESOURCE", "x")
    assert _hub_direct(url, {"endpoint": ENDPOINT, "token": True}, pool) is None


def test_the_pinned_url_keeps_the_repo_id_as_written() -> None:
    source = _hub_direct(
        "hf://Org/Name/sub/x.safetensors",
        {"endpoint": ENDPOINT, "token": False},
        ConnectionPool(connect_timeout=1, read_timeout=1),
    )
    assert source is not None
    source.after_probe(lambda header: "a" * 40 if header == "X-Repo-Commit" else None)
    assert source.pinned_url() == "hf://Org/Name@" + "a" * 40 + "/sub/x.safetensors"
