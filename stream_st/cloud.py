"""Object stores on the fast data plane: each protocol's fsspec filesystem turns an object into an
authenticated HTTPS request, and stream_st's threaded ``readinto`` transport moves the bytes.

Credential logic stays in s3fs/botocore, gcsfs/google-auth and huggingface_hub: we only ask them for a
presigned URL (S3: botocore alone when the options are plain botocore ones, else s3fs's client), a bearer
token for the JSON API media URL (GCS), or the resolve URL and token (Hub). Azure Blob Storage
(azure.py) finds credentials as adlfs does and signs a SAS itself or takes an Entra ID token.
Every range also carries ``If-Match`` with the ETag the header read saw (transport.py).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from .integrity import Digest, from_base64
from .location import redact
from .process_cache import ProcessCache
from .sources import HttpSource
from .transport import ConnectionPool, Endpoint, RangeStream

Signer = Callable[[], Endpoint]

# Presigned S3 URLs are made to live an hour and GCS access tokens live an hour; signing is local and
# cheap, so a long load re-signs every 15 minutes rather than meet an expiry mid-load.
_RESIGN_AFTER_S = 15 * 60
_PRESIGN_EXPIRES_S = 3600


class SignedSource(HttpSource):
    """An object read over HTTPS with a URL and headers that the protocol's filesystem produces."""

    resign_after: float | None = _RESIGN_AFTER_S

    def __init__(
        self, name: str, sign: Signer, pool: ConnectionPool, digest: Callable[[], Digest | None] | None = None
    ) -> None:
        self._sign, self._digest = sign, digest
        self._signed_at = time.monotonic()
        first = sign()
        super().__init__(first.url, pool, first.headers, name=name)

    def pinned(self, url: str) -> str:
        """``url`` made to address the version the header read saw (default: unchanged)."""
        return url

    def published_digest(self) -> Digest | None:
        return self._digest() if self._digest is not None else None

    def after_probe(self, header: Callable[[str], str | None]) -> None:
        self.endpoint = Endpoint(self.pinned(self.endpoint.url), self.endpoint.headers, self.endpoint.name)

    def open_range(self, start: int, end: int) -> RangeStream:
        if self.resign_after is not None and time.monotonic() - self._signed_at > self.resign_after:
            fresh = self._sign()
            self.endpoint = Endpoint(self.pinned(fresh.url), fresh.headers, self.endpoint.name)
            self._signed_at = time.monotonic()
        return super().open_range(start, end)


class GcsSource(SignedSource):
    """gs://: the media URL with gcsfs's bearer token; later ranges carry ``ifGenerationMatch``."""

    _generation: str | None = None

    def after_probe(self, header: Callable[[str], str | None]) -> None:
        self._generation = header("x-goog-generation")
        super().after_probe(header)

    def pinned(self, url: str) -> str:
        return f"{url}&ifGenerationMatch={self._generation}" if self._generation else url


class HubSource(SignedSource):
    """hf://: the resolve URL, its revision replaced by the commit sha the first answer names; a redirect
    to the CDN is followed once (transport.py drops the token when the host changes). The file's LFS sha256
    is the one the first answer (or its redirect) carries, ``X-Linked-Etag``, as huggingface_hub reads it."""

    resign_after = None  # a Hub token does not expire mid-load, and re-resolving would cost a redirect
    _RESOLVE = re.compile(r"/resolve/[^/]+/")
    _linked_etag: str | None = None
    _commit: str | None = None

    def __init__(self, hub_url: str, sign: Signer, pool: ConnectionPool) -> None:
        self.hub_url = hub_url  # as given: ``url`` is redacted, which lowercases the organisation
        super().__init__(redact(hub_url), sign, pool)

    def published_digest(self) -> Digest | None:
        sha256 = (self._linked_etag or "").removeprefix("W/").strip('"')
        if not re.fullmatch(r"[0-9a-f]{64}", sha256):  # not an LFS file: its ETag is a git blob id
            return None
        return Digest("sha256", bytes.fromhex(sha256), f"the Hub's LFS sha256 of {self.url}")

    def pinned_url(self) -> str | None:
        where = parse_hub_url(self.hub_url) if self._commit else None
        return f"hf://{where.kind}{where.repo_id}@{self._commit}/{where.path}" if where else None

    def after_probe(self, header: Callable[[str], str | None]) -> None:
        self._linked_etag = header("X-Linked-Etag")
        commit = header("X-Repo-Commit")
        self._commit = commit if commit and re.fullmatch(r"[0-9a-f]{40}", commit) else None
        if self._commit and "/resolve/" in self.endpoint.url:
            url = self._RESOLVE.sub(f"/resolve/{commit}/", self.endpoint.url, count=1)
            self.endpoint = Endpoint(url, self.endpoint.headers, self.endpoint.name)


def _s3(url: str, fs: Any, path: str, pool: ConnectionPool) -> SignedSource:
    def digest() -> Digest | None:
        bucket, key, version = fs.split_path(path)
        extra = {"VersionId": version} if version else {}
        return _s3_checksum(url, fs.call_s3("head_object", Bucket=bucket, Key=key, ChecksumMode="ENABLED", **extra))

    # A presigned GET made by s3fs's own botocore client: its credentials, endpoint and region.
    return SignedSource(redact(url), lambda: Endpoint(fs.url(path, expires=_PRESIGN_EXPIRES_S), {}), pool, digest)


def _s3_checksum(url: str, head: Mapping[str, Any]) -> Digest | None:
    """The full-object checksum of a HeadObject answer, stored when the object was uploaded with one;
    multipart uploads have composite checksums ("...-N"), which are not a digest of the bytes."""
    if head.get("ChecksumType", "FULL_OBJECT") != "FULL_OBJECT":
        return None
    for field, algorithm in (("ChecksumSHA256", "sha256"), ("ChecksumCRC32", "crc32")):
        value = head.get(field)
        if value and "-" not in value:
            return from_base64(algorithm, value, f"S3's {field} of {redact(url)}")
    return None


# storage_options that s3fs hands to botocore as they are, so botocore alone can take them (s3fs's own
# options, fsspec's s3 config and version ids go through s3fs).
_BOTOCORE_OPTIONS = frozenset(
    {"key", "secret", "token", "anon", "profile", "endpoint_url", "client_kwargs", "config_kwargs"}
)
_BOTOCORE_CLIENT_KWARGS = frozenset({"endpoint_url", "region_name"})
_s3_clients: ProcessCache[Any] = ProcessCache()  # like fsspec's instance cache: one client per set of options


def _s3_by_botocore(url: str, options: Mapping[str, Any], pool: ConnectionPool) -> SignedSource | None:
    """s3:// presigned by botocore alone, the client s3fs would build from the same options, or None when
    the options need s3fs. s3fs and aiobotocore are then not imported: 0.35 s → 0.20 s from the first call
    to the first presigned URL, measured after ``import torch`` on the 2-core machine."""
    client_kwargs = options.get("client_kwargs") or {}
    if set(options) - _BOTOCORE_OPTIONS or set(client_kwargs) - _BOTOCORE_CLIENT_KWARGS:
        return None
    bucket, _, key = url.split("://", 1)[1].partition("/")
    if not bucket or not key or "?" in key:
        return None
    import fsspec.config

    if fsspec.config.conf.get("s3") or fsspec.config.conf.get("s3a"):  # s3fs defaults the user set in fsspec
        return None
    client = _s3_client(options)

    def sign() -> Endpoint:
        params = {"Bucket": bucket, "Key": key}
        return Endpoint(client.generate_presigned_url("get_object", Params=params, ExpiresIn=_PRESIGN_EXPIRES_S), {})

    def digest() -> Digest | None:
        return _s3_checksum(url, client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED"))

    return SignedSource(redact(url), sign, pool, digest)


def _s3_client(options: Mapping[str, Any]) -> Any:
    """The cached botocore S3 client for these storage_options, built as s3fs builds its own."""
    return _s3_clients.get(json.dumps(options, sort_keys=True, default=repr), lambda: _new_s3_client(options))


def _new_s3_client(options: Mapping[str, Any]) -> Any:
    import botocore.session
    from botocore.config import Config

    config = dict(options.get("config_kwargs") or {})
    if options.get("anon"):
        from botocore import UNSIGNED

        config["signature_version"] = UNSIGNED
    client_kwargs = options.get("client_kwargs") or {}
    return botocore.session.Session(profile=options.get("profile")).create_client(
        "s3",
        aws_access_key_id=options.get("key"),
        aws_secret_access_key=options.get("secret"),
        aws_session_token=options.get("token"),
        endpoint_url=options.get("endpoint_url") or client_kwargs.get("endpoint_url"),
        region_name=client_kwargs.get("region_name"),
        config=Config(**config),
    )


def _gcs(url: str, fs: Any, path: str, pool: ConnectionPool) -> SignedSource:
    def sign() -> Endpoint:
        headers: dict[str, str] = {}
        fs.credentials.apply(headers)  # refreshes the token when needed; adds nothing for anonymous access
        return Endpoint(fs.url(path), headers)

    def digest() -> Digest | None:
        md5 = fs.info(path).get("md5Hash")  # composite (parallel-upload) objects have only crc32c
        return from_base64("md5", md5, f"GCS's md5Hash of {redact(url)}") if md5 else None

    return GcsSource(redact(url), sign, pool, digest)


def _hub(url: str, fs: Any, path: str, pool: ConnectionPool) -> SignedSource:
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers  # type: ignore[attr-defined]

    # resolve_path checks that repo and revision exist (FileNotFoundError otherwise); HfFileSystem.url()
    # would also list the folder to tell files from folders, a request we do not need.
    try:
        resolved = fs.resolve_path(path)
    except FileNotFoundError as exc:  # missing repo or revision: say which URL
        raise FileNotFoundError(f"{redact(url)}: {exc}") from None
    except Exception as exc:  # huggingface_hub's HTTP errors: a refused token is a PermissionError
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            raise PermissionError(f"{redact(url)}: access denied (HTTP {status}); check the token") from None
        raise
    target = hf_hub_url(
        resolved.repo_id,
        resolved.path_in_repo,
        repo_type=resolved.repo_type,
        revision=resolved.revision,
        endpoint=fs.endpoint,
    )
    headers = build_hf_headers(token=fs.token, library_name="stream_st")
    return HubSource(url, lambda: Endpoint(target, headers), pool)


_HUB_DIRECT_OPTIONS = frozenset({"endpoint", "token"})


@dataclass(frozen=True)
class _HubPath:
    kind: str  # the repo type's URL prefix: "" for models, "datasets/", "spaces/", ...
    repo_id: str
    revision: str | None
    path: str


def parse_hub_url(url: str) -> _HubPath | None:
    """hf://[TYPE/]org/name[@revision]/path (huggingface_hub's grammar), or None where HfFileSystem had
    better decide: a bucket, a revision with '/' (refs/pr/N) or escapes, no path in the repo."""
    from huggingface_hub import constants

    rest = url.split("://", 1)[1]
    segments = rest.split("/")
    prefixes = getattr(constants, "HF_URI_TYPE_PREFIXES", None)
    if prefixes is None:  # huggingface_hub before 2.x: its own rules (single-segment ids) apply
        return None
    repo_type = prefixes.get(segments[0])
    if repo_type == "bucket":
        return None
    kind = constants.REPO_TYPES_URL_PREFIXES.get(repo_type or "model", "")
    if repo_type is not None:
        segments = segments[1:]
    if len(segments) < 3 or not all(segments) or any(c in rest for c in "%?#") or "@" in segments[0]:
        return None
    name, at, revision = segments[1].partition("@")
    if not name or (at and not revision) or revision == "refs":
        return None
    return _HubPath(kind, f"{segments[0]}/{name}", revision or None, "/".join(segments[2:]))


def _hub_direct(url: str, options: Mapping[str, Any], pool: ConnectionPool) -> HubSource | None:
    """hf://[TYPE/]org/name[@revision]/path straight to the Hub's resolve URL, or None where
    HfFileSystem must decide (see ``parse_hub_url``; an option other than endpoint and token; offline).
    Nothing but ``huggingface_hub.constants`` is imported (HfFileSystem costs 0.21 s after torch) and no
    repo-info request precedes the first byte: the resolve answer says itself whether repo, revision or
    file is missing, and carries the commit and the LFS sha256."""
    from huggingface_hub import constants

    token = options.get("token")
    if set(options) - _HUB_DIRECT_OPTIONS or not isinstance(token, str | bool | None) or constants.HF_HUB_OFFLINE:
        return None
    where = parse_hub_url(url)
    if where is None:
        return None
    endpoint = str(options.get("endpoint") or constants.ENDPOINT).rstrip("/")
    revision = quote(where.revision or constants.DEFAULT_REVISION, safe="")  # quoted as hf_hub_url quotes
    target = f"{endpoint}/{where.kind}{where.repo_id}/resolve/{revision}/{quote(where.path)}"
    from . import __version__

    headers = {"user-agent": f"stream_st/{__version__}"}
    known, secret = _hub_token(token, constants)
    if not known:
        return None
    if secret:
        headers["authorization"] = f"Bearer {secret}"
    return HubSource(url, lambda: Endpoint(target, headers), pool)


def _hub_token(option: str | bool | None, constants: Any) -> tuple[bool, str | None]:
    """(known, token): the token huggingface_hub would send, where it is plain to see: the one given, none
    for False, else $HF_TOKEN / $HUGGING_FACE_HUB_TOKEN (None: unless HF_HUB_DISABLE_IMPLICIT_TOKEN), none
    when nothing is saved. Not known (HfFileSystem then decides): OIDC, Colab secrets, a saved login (which
    huggingface_hub may refresh). Read here because ``huggingface_hub.utils`` costs 0.13 s to import."""
    if isinstance(option, str) or option is False:
        return True, option or None
    if option is None and constants.HF_HUB_DISABLE_IMPLICIT_TOKEN:
        return True, None
    if os.environ.get("HF_OIDC_RESOURCE") or "google.colab" in sys.modules:
        return False, None
    for variable in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        if os.environ.get(variable, "").strip():
            return True, os.environ[variable].strip()
    if os.path.exists(constants.HF_TOKEN_PATH) or option is True:
        return False, None
    return True, None


_BUILDERS: Mapping[str, Callable[[str, Any, str, ConnectionPool], SignedSource]] = {
    "s3": _s3,
    "s3a": _s3,
    "gs": _gcs,
    "gcs": _gcs,
    "hf": _hub,
}


# Sources built without the protocol's fsspec filesystem when the options allow (None: they do not).
_WITHOUT_FSSPEC: Mapping[str, Callable[[str, Mapping[str, Any], ConnectionPool], SignedSource | None]] = {
    "s3": _s3_by_botocore,
    "s3a": _s3_by_botocore,
    "hf": _hub_direct,
}


def cloud_source(url: str, scheme: str, options: Mapping[str, Any], pool: ConnectionPool) -> SignedSource | None:
    """The fast-path source for ``url``, or None if its scheme has none."""
    fast = _WITHOUT_FSSPEC.get(scheme)
    direct = fast(url, options, pool) if fast is not None else None
    if direct is not None:
        return direct
    builder = _BUILDERS.get(scheme)
    if builder is None:
        return None
    import fsspec

    fs, path = fsspec.core.url_to_fs(url, **options)
    return builder(url, fs, path, pool)
