"""Which ``Source`` reads a URL: the one place where a URL's scheme picks its source class.

It lives in a module of its own, above ``sources`` (the interface and the plain sources), ``cloud`` (the signed
object-store sources, built on ``sources``) and ``azure`` (built on ``cloud``), so that none of those imports
another back.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .azure import azure_source
from .cloud import cloud_source
from .location import Location
from .sources import FsspecSource, HttpSource, LocalSource, Source
from .transport import ConnectionPool

AZURE_SCHEMES = ("az", "abfs", "abfss")


def open_source(
    url: str, pool: ConnectionPool, storage_options: Mapping[str, Any] | None = None, *, direct: bool = True
) -> Source:
    """The source for ``url``: http(s), s3, gs and hf on the threaded data plane (``direct``), local files
    by path, anything else through fsspec's ``cat_file``."""
    options = dict(storage_options or {})
    scheme = Location.parse(url).scheme
    blob_host = scheme in ("http", "https") and ".blob." in url.split("/", 3)[2]  # ACCOUNT.blob.core.windows.net
    if direct and (scheme in AZURE_SCHEMES or blob_host):
        azure = azure_source(url, options, pool)  # None: adlfs (az, abfs) or plain HTTP (a public blob)
        if azure is not None:
            return azure
    if scheme in ("http", "https"):
        headers = dict(options.get("headers") or {})
        headers.update((options.get("client_kwargs") or {}).get("headers") or {})
        return HttpSource(url, pool, headers)
    if scheme in ("", "file", "local"):
        return LocalSource(url[len("local://") :] if scheme == "local" else url)
    if direct:
        source = cloud_source(url, scheme, options, pool)
        if source is not None:
            return source
    return FsspecSource(url, options)
