"""Azure Blob Storage on the data plane: ``az://container/blob``, ``abfs[s]://container/blob`` (also
``container@ACCOUNT.dfs.core.windows.net/blob``) and ``https://ACCOUNT.blob.core.windows.net/container/blob``.

Credentials are found as adlfs finds them (storage_options, then the ``AZURE_STORAGE_*`` variables, then
``DefaultAzureCredential``), and each becomes a plain ranged GET on the threaded transport:

* an account key (an option, a connection string or a variable) signs a read-only service SAS for the one
  blob, locally: the string azure-storage-blob's ``generate_blob_sas`` signs (importing that package costs
  0.3-0.4 s, more than the whole signing logic is worth);
* a SAS token is appended to the URL;
* a token credential (Microsoft Entra ID: ``DefaultAzureCredential``, a service principal, ...) gives a
  bearer token;
* anonymous access (``anon=True``, a public container) sends neither.

The probe's answer carries the blob's stored MD5 (``x-ms-blob-content-md5``), which ``verify=True`` checks.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import inspect
import json
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from .cloud import SignedSource
from .errors import ConfigError
from .integrity import Digest, from_base64
from .process_cache import ProcessCache
from .transport import ConnectionPool, Endpoint

# The REST version of our requests and SASes: recent enough for bearer tokens and the whole-blob MD5 on
# ranged reads, old enough for every Azure region and for Azurite 3.37 (which refuses versions it predates).
API_VERSION = "2025-01-05"
TOKEN_SCOPE = "https://storage.azure.com/.default"
_SAS_LIFETIME_S = 3600  # SignedSource signs again every 15 minutes, so a long load never meets the expiry
_DEFAULT_SUFFIX = "core.windows.net"
# Azurite's development account (public, documented by Microsoft) for ``UseDevelopmentStorage=true``.
_DEV_ACCOUNT = "devstoreaccount1"
_DEV_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
_DEV_ENDPOINT = "http://127.0.0.1:10000/devstoreaccount1"

AZURE_SCHEMES = frozenset({"az", "abfs", "abfss"})
_ACCOUNT_HOST = re.compile(r"(?P<account>[a-z0-9]+)\.(?:blob|dfs)\.(?P<suffix>core\..+)", re.IGNORECASE)

# adlfs's own options that do not change which bytes are read or how a request is authorised: accepted and
# ignored here. Other unknown options go, as adlfs passes them, to DefaultAzureCredential when it is used.
_IGNORED_OPTIONS = frozenset(
    {
        "blocksize",
        "socket_timeout",
        "request_session",
        "loop",
        "asynchronous",
        "default_fill_cache",
        "default_cache_type",
        "assume_container_exists",
        "max_concurrency",
        "timeout",
        "connection_timeout",
        "read_timeout",
        "use_listings_cache",
        "listings_expiry_time",
        "max_paths",
        "skip_instance_cache",
        "location_mode",
        "version_aware",
    }
)
_CREDENTIAL_OPTIONS = frozenset(
    {
        "account_name",
        "account_key",
        "connection_string",
        "credential",
        "sas_token",
        "client_id",
        "client_secret",
        "tenant_id",
        "anon",
        "account_host",
    }
)


@dataclass(frozen=True)
class BlobAddress:
    """Where a blob URL points: the container and blob, and what the URL itself says of the account."""

    container: str
    blob: str
    account: str | None = None  # from the host of an https or ``container@ACCOUNT.dfs...`` URL
    endpoint: str | None = None  # the account URL of an https URL
    sas: str | None = None  # the query string of an https URL


def parse_blob_url(url: str) -> BlobAddress | None:
    """The container and blob of an Azure URL, or None where it names no single blob (a container, a
    version of a versioned blob, an https URL of another host)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    account = endpoint = sas = None
    if scheme in ("http", "https"):
        match = _ACCOUNT_HOST.fullmatch(parts.hostname or "")
        if not match or ".blob." not in (parts.hostname or "").lower():
            return None
        port = f":{parts.port}" if parts.port else ""
        account, endpoint = match.group("account"), f"{scheme}://{parts.hostname}{port}"
        container, _, blob = parts.path.lstrip("/").partition("/")
        container, blob, sas = unquote(container), unquote(blob), parts.query or None
    elif scheme in AZURE_SCHEMES:
        if parts.query:  # ?versionid=...: adlfs's version-aware reads
            return None
        netloc = url.split("://", 1)[1].split("/", 1)[0]
        container, at, host = netloc.partition("@")
        if at:
            match = _ACCOUNT_HOST.fullmatch(host)
            if not match:
                return None
            account = match.group("account")
        elif match := _ACCOUNT_HOST.fullmatch(container):  # abfs://ACCOUNT.dfs.core.windows.net/container/blob
            account = match.group("account")
            container, _, rest = parts.path.lstrip("/").partition("/")
            return BlobAddress(container, rest, account) if container and rest else None
        blob = parts.path.lstrip("/")
    else:
        return None
    if not container or not blob or blob.endswith("/"):
        return None
    return BlobAddress(container, blob, account, endpoint, sas)


def shown_url(url: str) -> str:
    """``url`` as messages show it: without the query string (a SAS); the container before '@' stays."""
    base = url.split("?", 1)[0].split("#", 1)[0]
    scheme, sep, rest = base.partition("://")
    netloc, slash, path = rest.partition("/")
    user, at, host = netloc.rpartition("@")
    if at and ":" in user:  # user:password never comes from Azure's URL forms, but never show it
        netloc = host
    return f"{scheme}{sep}{netloc}{slash}{path}"


@dataclass(frozen=True)
class _Auth:
    """How requests to one account are authorised: at most one of key, sas and token is set."""

    endpoint: str  # the account URL, e.g. https://ACCOUNT.blob.core.windows.net or Azurite's .../devstoreaccount1
    account: str
    # Never in a repr (a log line or a traceback's locals must not show them).
    key: bytes | None = field(default=None, repr=False)  # the decoded account key: signs a SAS
    sas: str | None = field(default=None, repr=False)
    token: Any = field(default=None, repr=False)  # a credential with get_token (sync or async)


def service_sas(account: str, key: bytes, container: str, blob: str, expiry: str, version: str = API_VERSION) -> str:
    """A read-only service SAS for one blob (``sp=r&sr=b``), signed with the account key as Azure's string to
    sign for that version has it (the fields generate_blob_sas fills, in its order)."""
    resource = f"/blob/{account}/{container}/{blob}"
    fields = ["r", "", expiry, resource, "", "", "", version, "b", "", "", "", "", "", "", ""]
    signature = base64.b64encode(hmac.new(key, "\n".join(fields).encode(), hashlib.sha256).digest()).decode()
    return f"se={quote(expiry, safe='')}&sp=r&sv={version}&sr=b&sig={quote(signature, safe='')}"


def _connection_string(text: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for part in text.split(";"):
        name, eq, value = part.strip().partition("=")
        if eq:
            fields[name.strip().lower()] = value.strip()
    return fields


def _from_connection_string(text: str, shown: str) -> _Auth:
    """What a connection string says, as azure-storage-blob reads it (endpoint, account, key or SAS)."""
    fields = _connection_string(text)
    if fields.get("usedevelopmentstorage", "").lower() == "true":
        fields = {"accountname": _DEV_ACCOUNT, "accountkey": _DEV_KEY, "blobendpoint": _DEV_ENDPOINT, **fields}
    account = fields.get("accountname", "")
    endpoint = fields.get("blobendpoint", "").rstrip("/")
    if not endpoint and account:
        protocol = fields.get("defaultendpointsprotocol", "https")
        endpoint = f"{protocol}://{account}.blob.{fields.get('endpointsuffix', _DEFAULT_SUFFIX)}"
    if not account and endpoint:  # ACCOUNT.blob.core.windows.net, or an emulator's http://IP:PORT/ACCOUNT
        where = urlsplit(endpoint)
        match = _ACCOUNT_HOST.fullmatch(where.hostname or "")
        account = match.group("account") if match else where.path.strip("/").split("/")[0]
    sas = fields.get("sharedaccesssignature", "").lstrip("?") or None
    key = _decode_key(fields["accountkey"], shown) if "accountkey" in fields and not sas else None
    if not endpoint or (key is not None and not account):
        raise ConfigError(f"{shown}: the connection string names no account (AccountName or BlobEndpoint)", url=shown)
    return _Auth(endpoint, account, key=key, sas=sas)


def _decode_key(key: str, shown: str) -> bytes:
    try:
        return base64.b64decode(key, validate=True)
    except ValueError:
        raise ConfigError(f"{shown}: the account key is not base64", url=shown) from None


def _option(options: Mapping[str, Any], name: str, variable: str) -> Any:
    return options.get(name) or os.environ.get(variable) or None


def _anonymous(options: Mapping[str, Any]) -> bool:
    if options.get("anon") is not None:
        return bool(options["anon"])
    return os.environ.get("AZURE_STORAGE_ANON", "false").lower() not in ("false", "0", "f", "")


def resolve_auth(address: BlobAddress, options: Mapping[str, Any], shown: str, *, implicit: bool) -> _Auth:
    """The account URL and credential for ``address``, in adlfs's order: a connection string; else the account
    (options, ``AZURE_STORAGE_ACCOUNT_NAME``, the URL) with ``credential``, an account key, a SAS, a service
    principal; else, unless anonymous, ``DefaultAzureCredential`` (``implicit``; https URLs, which worked
    without credentials before, stay anonymous instead)."""
    if address.sas:  # an https URL that carries its SAS: nothing else is needed
        return _Auth(address.endpoint or "", address.account or "", sas=address.sas)
    connection = _option(options, "connection_string", "AZURE_STORAGE_CONNECTION_STRING")
    if connection:
        auth = _from_connection_string(str(connection), shown)
        if address.endpoint is None or auth.account == address.account:
            return auth
    account = options.get("account_name") or address.account or os.environ.get("AZURE_STORAGE_ACCOUNT_NAME")
    if not account:
        raise ConfigError(
            f"{shown}: no Azure storage account: set storage_options account_name (or connection_string) "
            "or AZURE_STORAGE_ACCOUNT_NAME",
            url=shown,
        )
    if address.endpoint is not None:
        endpoint = address.endpoint
    elif options.get("account_host"):
        endpoint = f"https://{options['account_host']}".rstrip("/")
    else:
        endpoint = f"https://{account}.blob.{_DEFAULT_SUFFIX}"
    credential = options.get("credential")
    if credential is not None:
        return _from_credential(credential, endpoint, account, shown)
    key = _option(options, "account_key", "AZURE_STORAGE_ACCOUNT_KEY")
    if key:
        return _Auth(endpoint, account, key=_decode_key(str(key), shown))
    sas = _option(options, "sas_token", "AZURE_STORAGE_SAS_TOKEN")
    if sas:
        return _Auth(endpoint, account, sas=str(sas).lstrip("?"))
    client_id = _option(options, "client_id", "AZURE_STORAGE_CLIENT_ID")
    if client_id:
        secret = _option(options, "client_secret", "AZURE_STORAGE_CLIENT_SECRET")
        tenant = _option(options, "tenant_id", "AZURE_STORAGE_TENANT_ID")
        return _Auth(endpoint, account, token=_identity("ClientSecretCredential", tenant, client_id, secret))
    if _anonymous(options) or not implicit:
        return _Auth(endpoint, account)
    extra = {k: v for k, v in options.items() if k not in _CREDENTIAL_OPTIONS | _IGNORED_OPTIONS}
    try:
        return _Auth(endpoint, account, token=_identity("DefaultAzureCredential", **extra))
    except ImportError:  # without azure-identity there is no ambient credential to find
        return _Auth(endpoint, account)


# azure-identity credentials built here, one per set of arguments (as fsspec caches one adlfs instance per set
# of options): each caches its token, so the shards of a checkpoint and later loads ask for it once.
_credentials: ProcessCache[Any] = ProcessCache()


def _identity(kind: str, *args: Any, **kwargs: Any) -> Any:
    def build() -> Any:
        import azure.identity

        return getattr(azure.identity, kind)(*args, **kwargs)

    return _credentials.get(json.dumps([kind, args, kwargs], sort_keys=True, default=repr), build)


def _from_credential(credential: Any, endpoint: str, account: str, shown: str) -> _Auth:
    """``storage_options["credential"]`` in the forms azure-storage-blob takes."""
    if isinstance(credential, str):  # a SAS token, else an account key (as azure-storage-blob decides)
        if "sig=" in credential:
            return _Auth(endpoint, account, sas=credential.lstrip("?"))
        return _Auth(endpoint, account, key=_decode_key(credential, shown))
    if isinstance(credential, Mapping) and "account_key" in credential:
        return _Auth(
            endpoint, credential.get("account_name") or account, key=_decode_key(credential["account_key"], shown)
        )
    named = getattr(credential, "named_key", None)  # AzureNamedKeyCredential
    if named is not None:
        return _Auth(endpoint, named.name, key=_decode_key(named.key, shown))
    signature = getattr(credential, "signature", None)  # AzureSasCredential
    if isinstance(signature, str):
        return _Auth(endpoint, account, sas=signature.lstrip("?"))
    if callable(getattr(credential, "get_token", None)):
        return _Auth(endpoint, account, token=credential)
    raise ConfigError(
        f"{shown}: storage_options credential of type {type(credential).__name__} is not supported", url=shown
    )


def _bearer(credential: Any, shown: str) -> str:
    """A bearer token from a token credential; an async one (what adlfs is usually given) runs on fsspec's
    I/O loop, where adlfs runs it too."""
    try:
        if inspect.iscoroutinefunction(credential.get_token):
            from fsspec.asyn import get_loop, sync

            token = sync(get_loop(), credential.get_token, TOKEN_SCOPE)
        else:
            token = credential.get_token(TOKEN_SCOPE)
    except Exception as exc:  # azure.identity's CredentialUnavailableError, ClientAuthenticationError
        if type(exc).__name__ in ("CredentialUnavailableError", "ClientAuthenticationError"):
            raise PermissionError(
                f"{shown}: no Azure credential could give a token ({type(exc).__name__}); pass storage_options "
                "account_key, sas_token, connection_string or credential, or anon=True for a public container"
            ) from None
        raise
    return str(token.token)


class AzureSource(SignedSource):
    """A blob read with SAS-authorised or bearer-token ranged GETs; its stored MD5 comes with the probe."""

    _md5: str | None = None

    def after_probe(self, header: Callable[[str], str | None]) -> None:
        # On a ranged read the blob's own MD5 is x-ms-blob-content-md5; Content-MD5 is that of a whole read.
        self._md5 = header("x-ms-blob-content-md5") or header("Content-MD5")
        super().after_probe(header)

    def published_digest(self) -> Digest | None:
        return from_base64("md5", self._md5, f"Azure's Content-MD5 of {self.url}") if self._md5 else None


def azure_source(url: str, options: Mapping[str, Any], pool: ConnectionPool) -> AzureSource | None:
    """The data-plane source for an Azure URL, or None where adlfs must read it (a version id, a secondary
    location, anything but a single blob) or, for https, where the caller set its own headers."""
    address = parse_blob_url(url)
    if address is None:
        return None
    https = urlsplit(url).scheme.lower() in ("http", "https")
    if https and (options.get("headers") or options.get("client_kwargs")):
        return None  # the caller authorises the request itself: plain HTTP
    if options.get("version_aware") or options.get("location_mode") not in (None, "primary"):
        return None
    import fsspec.config

    defaults = {} if https else fsspec.config.conf.get(urlsplit(url).scheme.lower(), {})
    options = {**defaults, **options}
    shown = shown_url(url)
    auth = resolve_auth(address, options, shown, implicit=not https)
    target = f"{auth.endpoint}/{quote(address.container)}/{quote(address.blob, safe='/~')}"

    def sign() -> Endpoint:
        headers = {"x-ms-version": API_VERSION}
        if auth.key is not None:
            expiry = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + _SAS_LIFETIME_S))
            return Endpoint(
                f"{target}?{service_sas(auth.account, auth.key, address.container, address.blob, expiry)}", headers
            )
        if auth.sas is not None:
            return Endpoint(f"{target}?{auth.sas}", headers)
        if auth.token is not None:
            headers["authorization"] = f"Bearer {_bearer(auth.token, shown)}"
        return Endpoint(target, headers)

    return AzureSource(shown, sign, pool)
