"""az:// and abfs:// against Azurite on 127.0.0.1: credentials found as adlfs finds them, SAS-authorised or
bearer-token ranged GETs on stream_st's data plane, adlfs's cat_file with direct_http=False."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import pytest
import safetensors.torch
import torch
from dist_worker import describe

import stream_st as sst
from azure_server import ACCOUNT, ACCOUNT_KEY
from checkpoints import assert_same, assert_tensor_same, sharded_reference
from stream_st.azure import parse_blob_url, service_sas

pytestmark = pytest.mark.azure
TESTS = Path(__file__).resolve().parents[1]
CONTAINER = "stream-st-test"
WRONG_KEY = base64.b64encode(b"not the account key, 64 bytes long, like a real one.............").decode()


def url(name: str, scheme: str = "az") -> str:
    return f"{scheme}://{CONTAINER}/checkpoints/{name}"


@pytest.fixture(autouse=True)
def _no_ambient_azure_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("AZURE_STORAGE_"):
            monkeypatch.delenv(name)


@pytest.mark.parametrize("direct_http", [True, False], ids=["sas-data-plane", "adlfs-cat-file"])
@pytest.mark.parametrize("name", ["dtypes.safetensors", "layered.safetensors", "tiny.safetensors"])
def test_bit_exact(azure: Any, root: Path, name: str, direct_http: bool) -> None:
    loaded = sst.load_file(url(name), storage_options=azure.storage_options, direct_http=direct_http, part_size=65536)
    assert_same(loaded, safetensors.torch.load_file(str(root / name)))


@pytest.mark.parametrize("scheme", ["abfs", "abfss"])
def test_abfs_urls(azure: Any, root: Path, scheme: str) -> None:
    loaded = sst.load_file(url("layered.safetensors", scheme), storage_options=azure.storage_options)
    assert_same(loaded, safetensors.torch.load_file(str(root / "layered.safetensors")))


@pytest.mark.parametrize("form", ["sharded/model.safetensors.index.json", "sharded/", "sharded"])
def test_sharded_index_and_prefix(azure: Any, root: Path, form: str) -> None:
    assert_same(sst.load_file(url(form), storage_options=azure.storage_options), sharded_reference(root / "sharded"))


def test_sharded_folder_without_index_is_listed(azure: Any, root: Path) -> None:
    for shard in sorted((root / "sharded").glob("*.safetensors")):
        azure.upload(CONTAINER, f"checkpoints/unindexed/{shard.name}", shard.read_bytes())
    loaded = sst.load_file(url("unindexed/"), storage_options=azure.storage_options)
    assert_same(loaded, sharded_reference(root / "sharded"))


def test_partial_load_counts_bytes_and_requests(azure: Any, root: Path) -> None:
    header = sst.read_header(str(root / "layered.safetensors"))
    selected = [t for t in header if t.name.startswith("model.layers.1.")]
    stats = sst.Stats()
    loaded = sst.load_file(
        url("layered.safetensors"),
        tensors="model.layers.1.*",
        storage_options=azure.storage_options,
        header_prefetch=4096,
        stats=stats,
    )
    assert sorted(loaded) == sorted(t.name for t in selected)
    assert stats.bytes == 4096 + sum(t.nbytes for t in selected)  # header prefetch + exactly the selection
    assert stats.requests == 2  # one header GET, one coalesced range (layer 1 is contiguous)


def test_partial_load_of_a_sharded_checkpoint_touches_one_shard(azure: Any, root: Path) -> None:
    stats = sst.Stats()
    wanted = "model.layers.3.mlp.up_proj.weight"
    loaded = sst.load_file(url("sharded/"), tensors=[wanted], storage_options=azure.storage_options, stats=stats)
    assert_tensor_same(loaded[wanted], sharded_reference(root / "sharded")[wanted])
    assert stats.requests == 1 + 1 + 1  # index, the shard's header, the tensor (which follows the prefix)


def test_safe_open_and_slices(azure: Any, root: Path) -> None:
    expected = safetensors.torch.load_file(str(root / "layered.safetensors"))
    with sst.safe_open(url("layered.safetensors"), storage_options=azure.storage_options) as handle:
        assert handle.keys() == sorted(expected)
        assert_tensor_same(handle.get_slice("lm_head.weight")[100:200], expected["lm_head.weight"][100:200])


def test_missing_blob_and_container_are_file_not_found(azure: Any) -> None:
    missing = url("absent.safetensors")
    with pytest.raises(FileNotFoundError, match=missing):
        sst.load_file(missing, storage_options=azure.storage_options)
    with pytest.raises(FileNotFoundError, match="az://no-such-container/x.safetensors"):
        sst.load_file("az://no-such-container/x.safetensors", storage_options=azure.storage_options)


def test_wrong_key_is_permission_error_and_never_shown(azure: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    options = {"connection_string": azure.connection_string.replace(ACCOUNT_KEY, WRONG_KEY)}
    target = url("small.safetensors")
    with pytest.raises(PermissionError, match=target) as caught:
        sst.load_file(target, storage_options=options)
    for secret in (WRONG_KEY, ACCOUNT_KEY, "sig="):
        assert secret not in str(caught.value)
        assert secret not in caplog.text
    assert "/stream-st-test/checkpoints/small.safetensors bytes=0-262143 -> 403" in caplog.text  # it was logged


def test_blob_overwritten_mid_load(azure: Any) -> None:
    blob = "checkpoints/overwritten.safetensors"
    azure.upload(CONTAINER, blob, safetensors.torch.save({"a": torch.zeros(50_000), "b": torch.ones(50_000)}))
    with sst.safe_open(f"az://{CONTAINER}/{blob}", storage_options=azure.storage_options, header_prefetch=4096) as f:
        azure.upload(CONTAINER, blob, safetensors.torch.save({"a": torch.ones(50_000), "b": torch.zeros(50_000)}))
        with pytest.raises(sst.ObjectChangedError, match=f"az://{CONTAINER}/{blob}: object changed during the load"):
            f.get_tensor("b")


def test_verify_against_the_stored_content_md5(azure: Any, root: Path) -> None:
    data = (root / "layered.safetensors").read_bytes()
    azure.upload(CONTAINER, "checkpoints/md5.safetensors", data)
    loaded = sst.load_file(url("md5.safetensors"), storage_options=azure.storage_options, verify="strict")
    assert_same(loaded, safetensors.torch.load_file(str(root / "layered.safetensors")))
    # A blob whose stored MD5 is of other bytes (Set Blob Properties stores the caller's MD5 as is).
    from azure.storage.blob import ContentSettings

    azure.upload(CONTAINER, "checkpoints/md5-wrong.safetensors", data)
    client = azure.service().get_blob_client(CONTAINER, "checkpoints/md5-wrong.safetensors")
    client.set_http_headers(ContentSettings(content_md5=bytearray(hashlib.md5(b"other bytes").digest())))
    with pytest.raises(sst.IntegrityError, match="Azure's Content-MD5"):
        sst.load_file(url("md5-wrong.safetensors"), storage_options=azure.storage_options, verify=True)


def test_verify_without_a_stored_md5_says_so(azure: Any, root: Path) -> None:
    azure.upload(CONTAINER, "checkpoints/blocks.safetensors", (root / "layered.safetensors").read_bytes(), blocks=True)
    with pytest.raises(sst.IntegrityError, match="publishes no digest"):
        sst.load_file(url("blocks.safetensors"), storage_options=azure.storage_options, verify=True)
    loaded = sst.load_file(url("blocks.safetensors"), storage_options=azure.storage_options)  # unverified: fine
    assert_same(loaded, safetensors.torch.load_file(str(root / "layered.safetensors")))


def _container_sas(azure: Any, permission: str = "rl") -> str:
    from azure.storage.blob import generate_container_sas

    expiry = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))
    return str(
        generate_container_sas(ACCOUNT, CONTAINER, account_key=ACCOUNT_KEY, permission=permission, expiry=expiry)
    )


def test_sas_in_a_connection_string(azure: Any, root: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    sas = _container_sas(azure)
    options = {"connection_string": f"BlobEndpoint={azure.blob_endpoint};SharedAccessSignature={sas}"}
    assert_same(sst.load_file(url("sharded/"), storage_options=options), sharded_reference(root / "sharded"))
    forged = sas.replace("sig=", "sig=A")
    with pytest.raises(PermissionError) as caught:
        forged_options = {"connection_string": options["connection_string"].replace(sas, forged)}
        sst.load_file(url("small.safetensors"), storage_options=forged_options)
    assert "sig=" not in str(caught.value) and "sig=" not in caplog.text


def test_connection_string_from_the_environment(azure: Any, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azure.connection_string)
    assert_same(sst.load_file(url("small.safetensors")), safetensors.torch.load_file(str(root / "small.safetensors")))
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azure.connection_string.replace(ACCOUNT_KEY, WRONG_KEY))
    with pytest.raises(PermissionError):
        sst.load_file(url("small.safetensors"))


def test_anonymous_read_of_a_public_container(azure: Any, root: Path) -> None:
    public = "stream-st-public"
    azure.service().create_container(public, public_access="blob")
    azure.upload(public, "small.safetensors", (root / "small.safetensors").read_bytes())
    endpoint = {"connection_string": f"BlobEndpoint={azure.blob_endpoint}"}  # no key, no SAS: anonymous
    loaded = sst.load_file(f"az://{public}/small.safetensors", storage_options=endpoint)
    assert_same(loaded, safetensors.torch.load_file(str(root / "small.safetensors")))
    with pytest.raises(PermissionError):  # the private container refuses the same anonymous reads
        sst.load_file(url("small.safetensors"), storage_options=endpoint)


# -- https: account_host, account key, sas_token and bearer tokens as adlfs takes them ------------------------


def _jwt(audience: str = "https://storage.azure.com", lifetime_s: int = 3600) -> str:
    """An Entra ID access token as Azurite's basic OAuth checks it (issuer, audience, times; not the signature)."""

    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    now = int(time.time())
    claims = {
        "aud": audience,
        "iss": "https://sts.windows.net/ab1f708d-50f6-404c-a006-d71b2ac7a606/",
        "iat": now - 60,
        "nbf": now - 60,
        "exp": now + lifetime_s,
        "oid": "00000000-0000-0000-0000-000000000001",
        "tid": "ab1f708d-50f6-404c-a006-d71b2ac7a606",
    }
    return f"{part({'alg': 'RS256', 'typ': 'JWT'})}.{part(claims)}.c2lnbmF0dXJl"


class _TokenCredential:
    """A token credential as azure-identity's are (``get_token(*scopes)``), handing out a fixed token."""

    def __init__(self, token: str) -> None:
        self.token, self.scopes = token, []

    def get_token(self, *scopes: str, **kwargs: Any) -> Any:
        from azure.core.credentials import AccessToken

        self.scopes.append(scopes)
        return AccessToken(self.token, int(time.time()) + 3600)


@pytest.fixture()
def https_options(azure_https: Any, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.setenv("SSL_CERT_FILE", str(azure_https.ca_file))  # trust Azurite's self-signed certificate
    return {"account_name": ACCOUNT, "account_host": azure_https.account_host}


@pytest.mark.parametrize(
    "credential",
    ["account_key", "sas_token", "named_key_credential", "sas_credential", "environment"],
)
def test_https_credentials(
    azure_https: Any, root: Path, https_options: dict[str, Any], credential: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from azure.core.credentials import AzureNamedKeyCredential, AzureSasCredential

    sas = _container_sas(azure_https, "r")
    options: dict[str, Any] = {
        "account_key": {**https_options, "account_key": ACCOUNT_KEY},
        "sas_token": {**https_options, "sas_token": sas},
        "named_key_credential": {**https_options, "credential": AzureNamedKeyCredential(ACCOUNT, ACCOUNT_KEY)},
        "sas_credential": {**https_options, "credential": AzureSasCredential(sas)},
        "environment": {"account_host": azure_https.account_host},
    }[credential]
    if credential == "environment":
        monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_NAME", ACCOUNT)
        monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_KEY", ACCOUNT_KEY)
    loaded = sst.load_file(url("layered.safetensors"), storage_options=options, part_size=65536)
    assert_same(loaded, safetensors.torch.load_file(str(root / "layered.safetensors")))


def test_wrong_account_key_and_sas_token_over_https(https_options: dict[str, Any]) -> None:
    forged_sas = "se=2099-01-01T00%3A00%3A00Z&sp=r&sv=2025-01-05&sr=c&sig=AAAA"
    for bad in ({"account_key": WRONG_KEY}, {"sas_token": forged_sas}):
        with pytest.raises(PermissionError, match=url("small.safetensors")) as caught:
            sst.load_file(url("small.safetensors"), storage_options={**https_options, **bad})
        assert WRONG_KEY not in str(caught.value) and "sig=" not in str(caught.value)


class _AsyncTokenCredential(_TokenCredential):
    """The same as azure.identity.aio's credentials are, the kind adlfs is usually given."""

    async def get_token(self, *scopes: str, **kwargs: Any) -> Any:  # type: ignore[override]
        return super().get_token(*scopes, **kwargs)


@pytest.mark.parametrize("kind", [_TokenCredential, _AsyncTokenCredential], ids=["sync", "async"])
def test_bearer_token_from_a_token_credential(
    azure_https: Any, root: Path, https_options: dict[str, Any], kind: type[_TokenCredential]
) -> None:
    credential = kind(_jwt())
    loaded = sst.load_file(url("layered.safetensors"), storage_options={**https_options, "credential": credential})
    assert_same(loaded, safetensors.torch.load_file(str(root / "layered.safetensors")))
    assert credential.scopes == [("https://storage.azure.com/.default",)]
    expired = _TokenCredential(_jwt(lifetime_s=-600))
    with pytest.raises(PermissionError, match=url("small.safetensors")) as caught:
        sst.load_file(url("small.safetensors"), storage_options={**https_options, "credential": expired})
    assert expired.token not in str(caught.value)


# -- no Azure SDK on the way, and our SAS is azure-storage-blob's ------------------------------------------

_WHICH_MODULES = """
import json, sys
import stream_st as sst
from dist_worker import describe
state = sst.load_file(sys.argv[1], storage_options=json.loads(sys.argv[2]))
sdk = ("adlfs", "azure.storage.blob", "azure.identity")
print(json.dumps({"tensors": {n: describe(t) for n, t in state.items()},
                  "imported": sorted(m for m in sdk if m in sys.modules)}))
"""


def test_a_blob_is_read_without_importing_the_azure_sdk(azure: Any, root: Path) -> None:
    """A single blob and an indexed folder need neither adlfs nor azure-storage-blob (0.3-0.4 s to import)."""
    for name, reference in (
        ("layered.safetensors", safetensors.torch.load_file(str(root / "layered.safetensors"))),
        ("sharded/", sharded_reference(root / "sharded")),
    ):
        ran = subprocess.run(
            [sys.executable, "-c", _WHICH_MODULES, url(name), json.dumps(azure.storage_options)],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])},
        )
        assert ran.returncode == 0, ran.stderr
        seen = json.loads(ran.stdout.splitlines()[-1])
        assert seen["tensors"] == {n: describe(t) for n, t in reference.items()}
        assert seen["imported"] == []


def test_service_sas_is_the_one_azure_storage_blob_signs() -> None:
    from azure.storage.blob import generate_blob_sas
    from azure.storage.blob._shared.constants import X_MS_VERSION

    expiry = "2030-01-01T00:00:00Z"
    blob = "checkpoints/a b/model.safetensors"
    theirs = generate_blob_sas(ACCOUNT, CONTAINER, blob, account_key=ACCOUNT_KEY, permission="r", expiry=expiry)
    ours = service_sas(ACCOUNT, base64.b64decode(ACCOUNT_KEY), CONTAINER, blob, expiry, version=X_MS_VERSION)
    assert dict(parse_qsl(ours)) == dict(parse_qsl(theirs))


@pytest.mark.parametrize(
    ("given", "container", "blob", "account"),
    [
        ("az://c1/a/b.safetensors", "c1", "a/b.safetensors", None),
        ("abfs://c1@acct.dfs.core.windows.net/a/b.safetensors", "c1", "a/b.safetensors", "acct"),
        ("abfss://acct.dfs.core.windows.net/c1/b.safetensors", "c1", "b.safetensors", "acct"),
        ("https://acct.blob.core.windows.net/c1/a%20b/m.safetensors", "c1", "a b/m.safetensors", "acct"),
        ("https://acct.blob.core.chinacloudapi.cn/c1/m.safetensors", "c1", "m.safetensors", "acct"),
    ],
)
def test_url_forms(given: str, container: str, blob: str, account: str | None) -> None:
    address = parse_blob_url(given)
    assert address is not None
    assert (address.container, address.blob, address.account) == (container, blob, account)


@pytest.mark.parametrize(
    "given", ["az://c1/", "az://c1", "az://c1/m.safetensors?versionid=x", "https://example.com/c1/m.safetensors"]
)
def test_not_a_single_blob(given: str) -> None:
    assert parse_blob_url(given) is None


def test_default_azure_credential_when_nothing_else_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    """With no key, SAS, connection string or credential, the token comes from DefaultAzureCredential, which
    gets the options adlfs would not take itself (here: all its sources but the environment, which is empty).
    Its failure is a PermissionError naming the URL; nothing is sent anywhere."""
    for name in ("AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET", "AZURE_TENANT_ID", "AZURE_USERNAME", "AZURE_AUTHORITY_HOST"):
        monkeypatch.delenv(name, raising=False)
    others = ("workload_identity", "managed_identity", "shared_token_cache", "visual_studio_code", "cli")
    others += ("powershell", "developer_cli", "interactive_browser", "broker")
    options = {"account_name": "acct", **{f"exclude_{other}_credential": True for other in others}}
    with pytest.raises(PermissionError, match="az://c1/m.safetensors: no Azure credential could give a token"):
        sst.load_file("az://c1/m.safetensors", storage_options=options)


def test_a_sas_in_an_https_url_is_used_and_never_shown() -> None:
    from stream_st.azure import azure_source
    from stream_st.transport import ConnectionPool

    pool = ConnectionPool(connect_timeout=1, read_timeout=1)
    given = "https://acct.blob.core.windows.net/c1/dir/m.safetensors?sv=2025-01-05&sr=b&sp=r&sig=SECRETSIG"
    source = azure_source(given, {}, pool)  # builds the request; sends nothing
    assert source is not None
    assert source.url == "https://acct.blob.core.windows.net/c1/dir/m.safetensors"
    assert source.endpoint.url == given and "SECRETSIG" not in repr(source.endpoint)
    assert azure_source(given, {"headers": {"Authorization": "Bearer x"}}, pool) is None  # the caller's own headers
