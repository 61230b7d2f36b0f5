"""The HTTP data plane: keep-alive connections and blocking ``readinto`` on worker threads.

Measured (DESIGN.md §5): stdlib ``http.client`` reading straight into the destination buffer on a few
threads reaches the server's ceiling (2.4–2.7 GB/s on 2 cores, ~20 GB/s on 16), where an asyncio client
tops out near 2 GB/s because every chunk becomes a ``bytes`` object that is then copied. The GIL is
released inside ``recv_into``, so threads scale.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import re
import socket
import ssl
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

from .errors import FetchError, ObjectChangedError, RangeNotSupportedError

logger = logging.getLogger(__name__)

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_CONTENT_RANGE_UNSATISFIED = re.compile(r"bytes \*/(\d+)")
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 5
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_CREDENTIAL_HEADERS = frozenset({"authorization", "cookie", "proxy-authorization"})
_HUB_NOT_FOUND = frozenset({"RepoNotFound", "RevisionNotFound", "EntryNotFound"})


class RetryableStatusError(FetchError):
    """A status that says "try again" (429, 5xx); ``retry_after`` is the server's hint in seconds."""

    def __init__(self, message: str, *, retry_after: float | None = None, **context: Any) -> None:
        super().__init__(message, **context)
        self.retry_after = retry_after


@dataclass(frozen=True)
class Endpoint:
    """Where a request goes. ``url`` and ``headers`` may hold credentials (a presigned query string, a
    bearer token): messages use ``name``, the URL the user gave, and never these."""

    url: str
    headers: Mapping[str, str]
    name: str = ""

    @property
    def shown(self) -> str:
        return self.name or redact(self.url)

    def __repr__(self) -> str:
        return f"Endpoint({self.shown!r}, headers=<{len(self.headers)} hidden>)"


def redact(url: str) -> str:
    """The URL without its query string and user info, which may hold signatures or passwords."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return f"{parts.scheme}://{host}{parts.path}" if parts.scheme else url


class ConnectionPool:
    """Idle keep-alive connections per (scheme, host, port), shared by the worker threads of one engine."""

    def __init__(self, *, connect_timeout: float, read_timeout: float) -> None:
        self._idle: dict[tuple[str, str, int], list[http.client.HTTPConnection]] = {}
        self._lock = threading.Lock()
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._ssl_context: ssl.SSLContext | None = None
        self._busy: set[http.client.HTTPConnection] = set()

    def acquire(self, scheme: str, host: str, port: int) -> http.client.HTTPConnection:
        conn = self._checkout(scheme, host, port)
        with self._lock:
            self._busy.add(conn)
        return conn

    def _checkout(self, scheme: str, host: str, port: int) -> http.client.HTTPConnection:
        with self._lock:
            idle = self._idle.get((scheme, host, port))
            if idle:
                return idle.pop()
        if scheme == "https":
            if self._ssl_context is None:
                self._ssl_context = ssl.create_default_context()  # verification stays on
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                host, port, timeout=self._connect_timeout, context=self._ssl_context
            )
        else:
            conn = http.client.HTTPConnection(host, port, timeout=self._connect_timeout)
        return conn

    def release(self, scheme: str, host: str, port: int, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            self._busy.discard(conn)
            self._idle.setdefault((scheme, host, port), []).append(conn)

    def abort(self) -> None:
        """Shut down every connection in use, so that threads blocked reading it return at once (a
        cancelled load must not wait up to ``stall_timeout`` for a silent server)."""
        with self._lock:
            busy, self._busy = self._busy, set()
        for conn in busy:
            sock = conn.sock
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()

    def read_timeout(self) -> float:
        return self._read_timeout


class RangeStream:
    """The body of one ranged GET; ``readinto`` fills caller memory, ``close`` recycles the connection."""

    def __init__(
        self,
        pool: ConnectionPool,
        key: tuple[str, str, int],
        conn: http.client.HTTPConnection,
        response: http.client.HTTPResponse,
        skip: int,
        endpoint: Endpoint,
        redirects: Sequence[http.client.HTTPMessage] = (),
    ) -> None:
        self._pool, self._key, self._conn, self._response = pool, key, conn, response
        self.endpoint = endpoint  # where the answer came from, after redirects
        self._skip = skip  # leading bytes to drop when a server without Range support sent from byte 0
        self._redirects = redirects  # the headers of the redirects on the way, first first
        self.etag = response.getheader("ETag")
        self.partial = response.status == 206  # False: the server sent the whole object

    def header(self, name: str) -> str | None:
        """A header of the answer (X-Repo-Commit, x-goog-generation), else of the first redirect that had it:
        the Hub puts a file's commit and LFS sha256 on its redirect to the CDN."""
        value = self._response.getheader(name)
        for headers in self._redirects:
            value = value or headers.get(name)
        return value

    def readinto(self, buffer: memoryview) -> int:
        while self._skip:
            scratch = bytearray(min(self._skip, 1 << 20))
            got = self._response.readinto(scratch)
            if not got:
                return 0
            self._skip -= got
        return self._response.readinto(buffer)

    def close(self, *, reusable: bool) -> None:
        """Return the connection to the pool if the body was read to its end, else drop it."""
        if reusable and self._response.isclosed() and not self._response.will_close:
            self._pool.release(*self._key, self._conn)
        else:
            _drop(self._conn, self._response)


def open_range(
    pool: ConnectionPool,
    endpoint: Endpoint,
    start: int,
    end: int,
    *,
    size: int | None,
    etag: str | None,
    ranged: bool = True,
) -> tuple[RangeStream, int]:
    """Send ``GET`` for bytes [start, end) and check the answer; returns the body stream and object size.

    ``size`` None means "unknown yet" (the header probe): then ``end`` may pass the object's end and the
    answer may be shorter. ``ranged=False`` asks for the whole object (for servers without Range support)
    and drops the first ``start`` bytes. ``etag`` pins the object version with ``If-Match``.
    """
    url = endpoint.url
    headers = dict(endpoint.headers)
    if ranged:
        headers["Range"] = f"bytes={start}-{end - 1}"
    if etag:
        headers["If-Match"] = etag
    shown = endpoint.shown
    redirects: list[http.client.HTTPMessage] = []
    for _ in range(MAX_REDIRECTS + 1):
        parts = urlsplit(url)
        scheme = parts.scheme
        host = parts.hostname or ""
        port = parts.port or (443 if scheme == "https" else 80)
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        conn = pool.acquire(scheme, host, port)
        try:
            response = _send(conn, target, headers, pool.read_timeout())
        except BaseException:
            conn.close()
            raise
        status = response.status
        logger.debug("GET %s bytes=%d-%d -> %d", redact(url), start, end - 1, status)
        if status in _REDIRECTS and response.getheader("Location"):
            location = urljoin(url, response.getheader("Location", ""))
            redirects.append(response.headers)
            _drop(conn, response)  # a redirect's body is of no use
            if urlsplit(location).netloc != parts.netloc:
                # Credentials are for the origin; a CDN or presigned target must not receive them.
                headers = {k: v for k, v in headers.items() if k.lower() not in _CREDENTIAL_HEADERS}
            url = location
            continue
        try:
            total = _check(response, shown, start, end, size=size, etag=etag, ranged=ranged)
        except BaseException:
            _drop(conn, response)
            raise
        skip = start if status == 200 and start else 0
        headers.pop("Range", None)
        headers.pop("If-Match", None)
        final = Endpoint(url, headers, endpoint.name) if url != endpoint.url else endpoint
        return RangeStream(pool, (scheme, host, port), conn, response, skip, final, redirects), total
    raise FetchError(f"{shown}: more than {MAX_REDIRECTS} redirects", url=shown)


def _send(
    conn: http.client.HTTPConnection, target: str, headers: Mapping[str, str], read_timeout: float
) -> http.client.HTTPResponse:
    conn.request("GET", target, headers=dict(headers))
    if conn.sock is not None:
        conn.sock.settimeout(read_timeout)  # a stalled body raises socket.timeout instead of hanging
    return conn.getresponse()


def _drop(conn: http.client.HTTPConnection, response: http.client.HTTPResponse) -> None:
    """Close a connection whose response may be unread: the response holds the socket open too."""
    response.close()
    conn.close()


def _check(
    response: http.client.HTTPResponse,
    url: str,
    start: int,
    end: int,
    *,
    size: int | None,
    etag: str | None,
    ranged: bool,
) -> int:
    """Raise unless the response carries exactly the bytes asked for; return the object's size."""
    status = response.status
    asked = f"bytes {start}-{end - 1}"
    context: dict[str, Any] = {"url": url, "start": start, "end": end}
    hub_error = response.getheader("X-Error-Code")  # the Hub answers 401 for repos it will not reveal
    if status == 404 or hub_error in _HUB_NOT_FOUND:
        detail = f"{hub_error}: {response.getheader('X-Error-Message', '')}".rstrip(": ") if hub_error else "HTTP 404"
        raise FileNotFoundError(f"{url}: not found ({detail})")
    if status in (401, 403):
        raise PermissionError(f"{url}: access denied (HTTP {status}); check the credentials")
    if status == 412:
        raise ObjectChangedError(
            f"{url}: object changed during the load (ETag was {etag}, If-Match failed with HTTP 412)", **context
        )
    if status in RETRY_STATUSES:
        raise RetryableStatusError(
            f"{url}: HTTP {status} {response.reason} for {asked}",
            retry_after=_retry_after(response.getheader("Retry-After")),
            **context,
        )
    if status == 416:
        unsatisfied = _CONTENT_RANGE_UNSATISFIED.fullmatch(response.getheader("Content-Range", ""))
        if unsatisfied and size is None:
            return int(unsatisfied.group(1))  # an empty object answers the probe with 416
        raise RangeNotSupportedError(f"{url}: HTTP 416, range not satisfiable for {asked}", **context)
    encoding = response.getheader("Content-Encoding", "identity").lower()
    if encoding != "identity":
        raise RangeNotSupportedError(
            f"{url}: server sent Content-Encoding {encoding!r}; byte ranges need the raw bytes", **context
        )
    got_etag = response.getheader("ETag")
    if etag and got_etag and got_etag != etag:
        raise ObjectChangedError(f"{url}: object changed during the load (ETag {etag} became {got_etag})", **context)
    length = response.getheader("Content-Length")
    if status == 206:
        match = _CONTENT_RANGE.fullmatch(response.getheader("Content-Range", ""))
        if not match or match.group(3) == "*":
            raise RangeNotSupportedError(
                f"{url}: 206 answer to {asked} has Content-Range {response.getheader('Content-Range')!r}", **context
            )
        first, last, total = int(match.group(1)), int(match.group(2)), int(match.group(3))
        expected_last = end - 1 if size is not None else min(end, total) - 1
        if first != start or last != expected_last:
            raise RangeNotSupportedError(f"{url}: asked for {asked}, server sent bytes {first}-{last}", **context)
        if length is not None and int(length) != last - first + 1:
            raise RangeNotSupportedError(
                f"{url}: Content-Length {length} disagrees with Content-Range bytes {first}-{last}", **context
            )
        if size is not None and total != size:
            raise ObjectChangedError(f"{url}: object size changed from {size} to {total} during the load", **context)
        return total
    if status == 200:
        if length is None:
            raise RangeNotSupportedError(f"{url}: 200 answer without Content-Length to {asked}", **context)
        total = int(length)
        whole = start == 0 and size is not None and end == size
        if ranged and not whole and size is not None:
            raise RangeNotSupportedError(
                f"{url}: asked for {asked} but the server sent the whole object (HTTP 200)", **context
            )
        if size is not None and total != size:
            raise ObjectChangedError(f"{url}: object size changed from {size} to {total} during the load", **context)
        return total
    raise FetchError(f"{url}: unexpected HTTP {status} {response.reason} for {asked}", **context)


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: rare for range GETs; fall back to our own backoff


# Errors after which a fresh request for the missing bytes may succeed.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    ConnectionError,
    socket.timeout,
    TimeoutError,
    http.client.IncompleteRead,
    http.client.RemoteDisconnected,
    http.client.BadStatusLine,
    RetryableStatusError,
)
