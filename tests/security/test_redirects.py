"""Redirects: credentials stay with their origin; other schemes and hostile Location values are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
from conftest import SECRET, TOKEN, assert_no_secret, checkpoint_bytes, log_texts, texts_of
from hostile import Client, HostileServer, answer, make_tls, ranged
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import stream_st as sst
from stream_st.transport import _keeps_credentials, _split

DATA = checkpoint_bytes()
CALLER_HEADERS = {"Authorization": TOKEN, "X-Api-Key": f"k-{SECRET}", "Private-Token": SECRET, "Cookie": f"s={SECRET}"}
FAST = {"retries": 0, "stall_timeout": 5.0, "connect_timeout": 2.0}


def _redirecting(location_for: dict[bool, str | None]) -> object:
    """TLS requests get ``location_for[True]``, plain ones ``location_for[False]``; None: the file."""

    def handle(client: Client) -> None:
        location = location_for[client.request.tls]
        if location is None:
            client.send(ranged(DATA, client.request))
        else:
            client.send(answer("302 Found", {"Location": location, "Content-Length": "0", "Connection": "close"}))

    return handle


@pytest.fixture()
def tls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> object:
    made = make_tls(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(made.ca_file))  # what ssl.create_default_context trusts
    return made


def _load(url: str) -> dict[str, object]:
    return sst.load_file(url, storage_options={"headers": CALLER_HEADERS}, progress=False, **FAST)


def _leaked(request_headers: dict[str, str]) -> list[str]:
    return [name for name in CALLER_HEADERS if name.lower() in request_headers]


def test_https_to_http_on_the_same_host_and_port_drops_every_caller_header(tls: object) -> None:
    # One port speaks TLS and plain HTTP: the old check (same netloc) kept the token for the downgrade.
    server = HostileServer(lambda c: None, tls=tls.server)  # type: ignore[attr-defined]
    with server:
        server.handler = _redirecting({True: f"http://127.0.0.1:{server.port}/model.safetensors", False: None})
        state = _load(server.url("model.safetensors", "https"))
        assert set(state) == set(safetensors.torch.load(DATA))
        first, *plain = server.requests
        assert first.tls and _leaked(first.headers) == list(CALLER_HEADERS)  # the origin got them
        assert plain and all(not r.tls and not _leaked(r.headers) for r in plain)


def test_same_origin_and_https_upgrade_keep_credentials(tls: object) -> None:
    server = HostileServer(lambda c: None, tls=tls.server)  # type: ignore[attr-defined]
    with server:
        server.handler = _redirecting({False: f"https://127.0.0.1:{server.port}/model.safetensors", True: None})
        _load(server.url("model.safetensors", "http"))
        assert all(_leaked(r.headers) == list(CALLER_HEADERS) for r in server.requests)
        assert any(r.tls for r in server.requests)


def test_cross_origin_redirect_drops_every_caller_header() -> None:
    with HostileServer(lambda c: c.send(ranged(DATA, c.request))) as cdn:
        target = f"http://localhost:{cdn.port}/blob"  # another host name, as a CDN is
        with HostileServer(_redirecting({False: target})) as origin:
            _load(origin.url("model.safetensors"))
            assert _leaked(origin.requests[0].headers) == list(CALLER_HEADERS)
        assert cdn.requests and all(not _leaked(r.headers) for r in cdn.requests)


@pytest.mark.parametrize("location", ["ftp://127.0.0.1:{port}/x", "file:///etc/passwd", "gopher://127.0.0.1/"])
def test_redirect_to_another_scheme_is_refused(location: str, debug_logs: pytest.LogCaptureFixture) -> None:
    with HostileServer(lambda c: None) as server:
        server.handler = _redirecting({False: location.format(port=server.port)})
        with pytest.raises(sst.FetchError, match="only http and https") as caught:
            _load(server.url("model.safetensors"))
        assert len(server.requests) == 1  # nothing was sent to the other scheme's target
    assert_no_secret(texts_of(caught.value) + log_texts(debug_logs))


@pytest.mark.parametrize(
    "location", ["http://127.0.0.1:99999/x", "http://[::1", "http://127.0.0.1:abc/x", "http:///x", "http://[zz]/"]
)
def test_hostile_location_is_a_named_error(location: str) -> None:
    with HostileServer(_redirecting({False: location})) as server, pytest.raises(sst.FetchError) as caught:
        _load(server.url("model.safetensors"))
    assert_no_secret(texts_of(caught.value))


_HOSTS = st.sampled_from(["127.0.0.1", "localhost", "[::1", "[::1]", "", "127.0.0.1:abc", "127.0.0.1:99999", "h:0"])
_SCHEMES = st.sampled_from(["http://", "https://", "ftp://", "file://", "javascript:", "", "//", "HTTP://"])
_PATHS = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=20)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(scheme=_SCHEMES, host=_HOSTS, path=_PATHS)
def test_any_location_gives_a_file_or_a_named_error(scheme: str, host: str, path: str) -> None:
    location = f"{scheme}{host}/{path}"
    with HostileServer(_redirecting({False: location})) as server:
        try:
            _load(server.url("model.safetensors"))
        except sst.StreamSTError as exc:
            assert_no_secret(texts_of(exc))
        except OSError as exc:  # connection refused to a closed port, a 404: with the URL, from the storage layer
            assert type(exc) in (FileNotFoundError, PermissionError), repr(exc)
            assert_no_secret(texts_of(exc))
        for request in server.requests[1:]:  # back on this server: only under the same host name keeps them
            same_origin = request.headers.get("host") == f"127.0.0.1:{server.port}"
            assert same_origin or not _leaked(request.headers), (location, request)


_URLS = st.builds(
    lambda s, h, p: f"{s}://{h}{p}",
    st.sampled_from(["http", "https"]),
    st.sampled_from(["a.example", "A.example", "b.example", "a.example:80", "a.example:443", "a.example:8080"]),
    st.sampled_from(["/", "/x"]),
)


@given(old=_URLS, new=_URLS)
def test_credentials_follow_only_same_origin_or_https_upgrade(old: str, new: str) -> None:
    (old_parts, old_port), (new_parts, new_port) = _split(old, "x"), _split(new, "x")
    kept = _keeps_credentials(old_parts, old_port, new_parts, new_port)
    same_host = old_parts.hostname == new_parts.hostname
    if kept:
        assert same_host
        assert not (old_parts.scheme == "https" and new_parts.scheme == "http")  # never a downgrade
        assert old_port == new_port or (old_port, new_port) == (80, 443)
    elif same_host and old_parts.scheme == new_parts.scheme:
        assert old_port != new_port
