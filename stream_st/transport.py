"""The HTTP data plane: keep-alive connections and blocking ``readinto`` on worker threads.

Measured (docs/ARCHITECTURE.md §5): stdlib ``http.client`` reading straight into the destination buffer on a few
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
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any
from urllib.parse import SplitResult, urljoin, urlsplit

from .errors import FetchError, ObjectChangedError, RangeNotSupportedError, SlowTransferError
from .location import redact, redact_text

logger = logging.getLogger(__name__)

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_CONTENT_RANGE_UNSATISFIED = re.compile(r"bytes \*/(\d+)")
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 5
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
# Headers that may follow a redirect to another origin: the ones every request gets from us. Everything
# else in a request (Authorization, Cookie, a caller's X-Api-Key, a Hub or GCS token) is for the origin only.
_PER_REQUEST_HEADERS = frozenset({"range", "if-match", "user-agent"})
_DEFAULT_PORTS = {"http": 80, "https": 443}
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


__all__ = ["redact"]  # re-exported: the display form lives in location.py


class _Watch:
    """Progress of one connection in use: bytes received, and the window the watchdog last checked."""

    __slots__ = ("tag", "received", "baseline", "since", "cut")

    def __init__(self, tag: object) -> None:
        self.tag = tag
        self.received = 0  # only the thread reading the connection adds to it
        self.baseline = 0  # ``received`` when the current window began; only the watchdog moves it
        self.since = time.monotonic()
        self.cut = False


class ConnectionPool:
    """Idle keep-alive connections per (scheme, host, port), shared by the worker threads of one engine.

    Connections in use are watched: with ``min_speed`` > 0, one that delivers fewer than ``min_speed``
    bytes per second over a window of ``read_timeout`` seconds (its response headers count as nothing, so
    they must come within the first window) is shut down by a watchdog thread, and the read fails with
    SlowTransferError (retried like a stall). The socket timeout alone cannot catch a server that sends
    one byte a second: each byte restarts it."""

    def __init__(self, *, connect_timeout: float, read_timeout: float, min_speed: int = 0) -> None:
        self._idle: dict[tuple[str, str, int], list[http.client.HTTPConnection]] = {}
        self._lock = threading.Lock()
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._min_speed = min_speed
        self._ssl_context: ssl.SSLContext | None = None
        self._busy: dict[http.client.HTTPConnection, _Watch] = {}
        self._local = threading.local()  # the tag of what the current thread's requests serve
        self._stop = threading.Event()
        self._watchdog: threading.Thread | None = None

    @contextlib.contextmanager
    def tagged(self, tag: object) -> Iterator[None]:
        """Connections this thread acquires inside are marked with ``tag``, for ``abort(tag)``."""
        previous = getattr(self._local, "tag", None)
        self._local.tag = tag
        try:
            yield
        finally:
            self._local.tag = previous

    def acquire(self, scheme: str, host: str, port: int) -> http.client.HTTPConnection:
        conn = self._checkout(scheme, host, port)
        with self._lock:
            self._busy[conn] = _Watch(getattr(self._local, "tag", None))
            if self._min_speed and self._watchdog is None and not self._stop.is_set():
                self._watchdog = threading.Thread(target=self._watch, name="stream_st-watchdog", daemon=True)
                self._watchdog.start()
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

    def received(self, conn: http.client.HTTPConnection, nbytes: int) -> bool:
        """Count ``nbytes`` read from ``conn``; False if the watchdog has cut it for being too slow."""
        watch = self._busy.get(conn)
        if watch is None:
            return True
        watch.received += nbytes
        return not watch.cut

    def was_cut(self, conn: http.client.HTTPConnection) -> bool:
        watch = self._busy.get(conn)
        return watch is not None and watch.cut

    def release(self, scheme: str, host: str, port: int, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            self._busy.pop(conn, None)
            self._idle.setdefault((scheme, host, port), []).append(conn)

    def discard(self, conn: http.client.HTTPConnection, response: http.client.HTTPResponse | None = None) -> None:
        """Close a connection that will not be reused (its response, if any, may be unread)."""
        with self._lock:
            self._busy.pop(conn, None)
        if response is not None:
            response.close()  # the response holds the socket open too
        conn.close()

    def abort(self, tag: object = None) -> None:
        """Shut down every connection in use (with ``tag``: those acquired under it), so that threads
        blocked reading them return at once: a cancelled load must not wait up to ``stall_timeout``."""
        with self._lock:
            chosen = [conn for conn, watch in self._busy.items() if tag is None or watch.tag is tag]
        for conn in chosen:
            _shutdown(conn)

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            idle, self._idle = self._idle, {}
            watchdog, self._watchdog = self._watchdog, None
        for conns in idle.values():
            for conn in conns:
                conn.close()
        if watchdog is not None and watchdog is not threading.current_thread():
            watchdog.join(timeout=1.0)  # it wakes at once on ``_stop``

    def read_timeout(self) -> float:
        return self._read_timeout

    def connect_timeout(self) -> float:
        return self._connect_timeout

    def _watch(self) -> None:
        window = self._read_timeout
        floor = self._min_speed * window
        while not self._stop.wait(min(1.0, window / 4)):
            now = time.monotonic()
            with self._lock:
                watched = list(self._busy.items())
            for conn, watch in watched:
                if now - watch.since < window:
                    continue
                if watch.received - watch.baseline < floor:
                    watch.cut = True
                    _shutdown(conn)
                else:
                    watch.baseline, watch.since = watch.received, now


def _shutdown(conn: http.client.HTTPConnection) -> None:
    sock = conn.sock
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


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
        self.skipped = 0  # of those, dropped so far (they crossed the network: counted in Stats.bytes)
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
            got = self._read(memoryview(scratch))
            if not got:
                return 0
            self._skip -= got
            self.skipped += got
        return self._read(buffer)

    def _read(self, buffer: memoryview) -> int:
        try:
            got = self._response.readinto(buffer)
        except (OSError, http.client.HTTPException):
            if self._pool.was_cut(self._conn):
                raise self._too_slow() from None
            raise
        if not self._pool.received(self._conn, got):
            raise self._too_slow()
        return got

    def _too_slow(self) -> SlowTransferError:
        shown = self.endpoint.shown
        return SlowTransferError(f"{shown}: the server sent too slowly (min_speed); connection dropped", url=shown)

    def close(self, *, reusable: bool) -> None:
        """Return the connection to the pool if the body was read to its end, else drop it."""
        if reusable and self._response.isclosed() and not self._response.will_close:
            self._pool.release(*self._key, self._conn)
        else:
            self._pool.discard(self._conn, self._response)


def _split(url: str, shown: str) -> tuple[SplitResult, int]:
    """``url`` split, with its effective port; a URL http.client cannot address is a FetchError."""
    try:
        parts = urlsplit(url)
        port = parts.port or _DEFAULT_PORTS.get(parts.scheme.lower(), 0)
    except ValueError:
        raise FetchError(f"{shown}: not a valid http(s) URL: {redact(url)}", url=shown) from None
    if parts.scheme.lower() not in _DEFAULT_PORTS:
        raise FetchError(f"{shown}: refusing to follow {redact(url)}: only http and https are fetched", url=shown)
    if not parts.hostname:
        raise FetchError(f"{shown}: no host in {redact(url)}", url=shown)
    return parts, port


def _keeps_credentials(old: SplitResult, old_port: int, new: SplitResult, new_port: int) -> bool:
    """May a redirect from ``old`` to ``new`` carry the request's credentials? Only to the same origin
    (scheme, host, effective port), or to https on the same host (same port, or 80 to 443): the rule of
    browsers and httpx. A downgrade to http would send them in clear text; another host is not theirs."""
    if (old.hostname or "").lower() != (new.hostname or "").lower():
        return False
    old_scheme, new_scheme = old.scheme.lower(), new.scheme.lower()
    if old_scheme == new_scheme:
        return old_port == new_port
    return (
        old_scheme == "http"
        and new_scheme == "https"
        and (old_port == new_port or (old_port == 80 and new_port == 443))
    )


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
    parts, port = _split(url, shown)
    for _ in range(MAX_REDIRECTS + 1):
        scheme, host = parts.scheme.lower(), parts.hostname or ""
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        conn = pool.acquire(scheme, host, port)
        try:
            # First contact (the header read, size unknown): a server that accepts and never answers is given
            # connect_timeout, not the patience a long transfer's body gets (stall_timeout).
            first_byte = pool.connect_timeout() if size is None else pool.read_timeout()
            response = _send(conn, target, headers, pool.read_timeout(), shown, first_byte)
        except BaseException as exc:
            cut = pool.was_cut(conn)
            pool.discard(conn)
            if cut and isinstance(exc, OSError | http.client.HTTPException):
                raise SlowTransferError(f"{shown}: no response headers within the first window", url=shown) from None
            raise
        status = response.status
        logger.debug("GET %s bytes=%d-%d -> %d", redact(url), start, end - 1, status)
        if status in _REDIRECTS and response.getheader("Location"):
            redirects.append(response.headers)
            pool.discard(conn, response)  # a redirect's body is of no use
            url, parts, port, headers = _redirect(url, parts, port, headers, response.getheader("Location", ""), shown)
            continue
        try:
            total = _check(response, shown, start, end, size=size, etag=etag, ranged=ranged)
        except BaseException:
            pool.discard(conn, response)
            raise
        skip = start if status == 200 and start else 0
        headers.pop("Range", None)
        headers.pop("If-Match", None)
        final = Endpoint(url, headers, endpoint.name) if url != endpoint.url else endpoint
        return RangeStream(pool, (scheme, host, port), conn, response, skip, final, redirects), total
    raise FetchError(f"{shown}: more than {MAX_REDIRECTS} redirects", url=shown)


def _send(
    conn: http.client.HTTPConnection,
    target: str,
    headers: Mapping[str, str],
    read_timeout: float,
    shown: str,
    first_byte_timeout: float,
) -> http.client.HTTPResponse:
    # The errors below are raised outside their ``except`` so that they carry no context: http.client's
    # messages quote the URL, a header value or what the server sent, any of which may hold a secret.
    try:
        conn.request("GET", target, headers=dict(headers))
        failure = None
    except socket.gaierror:
        failure = FetchError(f"{shown}: cannot resolve the host of the request", url=shown)
    except (http.client.InvalidURL, ValueError):
        failure = FetchError(f"{shown}: the URL or a header holds characters HTTP does not allow", url=shown)
    if failure is not None:
        raise failure
    if conn.sock is not None:
        conn.sock.settimeout(first_byte_timeout)
    try:
        response = conn.getresponse()
    except http.client.HTTPException as exc:  # BadStatusLine, LineTooLong...: retried, as they were
        kind = type(exc).__name__
    else:
        if conn.sock is not None:
            conn.sock.settimeout(read_timeout)  # a stalled body raises socket.timeout instead of hanging
        return response
    raise ConnectionError(f"{shown}: malformed HTTP response ({kind})")


def _redirect(
    url: str, parts: SplitResult, port: int, headers: dict[str, str], location: str, shown: str
) -> tuple[str, SplitResult, int, dict[str, str]]:
    """Where a redirect from ``url`` to ``location`` goes, and the request headers that may go with it."""
    try:
        target = urljoin(url, location)
    except ValueError:
        raise FetchError(f"{shown}: the server redirected to an invalid location", url=shown) from None
    new_parts, new_port = _split(target, shown)
    if not _keeps_credentials(parts, port, new_parts, new_port):
        # Credentials are for the origin; a CDN, a presigned target or plain http must not get them.
        headers = {k: v for k, v in headers.items() if k.lower() in _PER_REQUEST_HEADERS}
    return target, new_parts, new_port, headers


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
    """Raise unless the response carries exactly the bytes asked for; return the object's size. One function
    on purpose: it is the order in which an answer is judged (status, encoding, version, then range), read
    top to bottom."""
    status = response.status
    asked = f"bytes {start}-{end - 1}"
    context: dict[str, Any] = {"url": url, "start": start, "end": end}
    hub_error = response.getheader("X-Error-Code")  # the Hub answers 401 for repos it will not reveal
    if status == 404 or hub_error in _HUB_NOT_FOUND:
        detail = "HTTP 404"
        if hub_error in _HUB_NOT_FOUND:  # the message is the server's text: it may echo the request
            detail = f"{hub_error}: {redact_text(response.getheader('X-Error-Message', ''))}".rstrip(": ")
        raise FileNotFoundError(f"{url}: not found ({detail})")
    if status in (401, 403):
        raise PermissionError(f"{url}: access denied (HTTP {status}); check the credentials")
    if status == 412:
        raise ObjectChangedError(
            f"{url}: object changed during the load (ETag was {etag}, If-Match failed with HTTP 412)", **context
        )
    if status in RETRY_STATUSES:
        raise RetryableStatusError(
            f"{url}: HTTP {_phrase(status)} for {asked}",
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
        became = redact_text(got_etag, 100)
        raise ObjectChangedError(f"{url}: object changed during the load (ETag {etag} became {became})", **context)
    length = _content_length(response, url, context)
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
        if length is not None and length != last - first + 1:
            raise RangeNotSupportedError(
                f"{url}: Content-Length {length} disagrees with Content-Range bytes {first}-{last}", **context
            )
        if size is not None and total != size:
            raise ObjectChangedError(f"{url}: object size changed from {size} to {total} during the load", **context)
        return total
    if status == 200:
        if length is None:
            raise RangeNotSupportedError(f"{url}: 200 answer without Content-Length to {asked}", **context)
        total = length
        whole = start == 0 and size is not None and end == size
        if ranged and not whole and size is not None:
            raise RangeNotSupportedError(
                f"{url}: asked for {asked} but the server sent the whole object (HTTP 200)", **context
            )
        if size is not None and total != size:
            raise ObjectChangedError(f"{url}: object size changed from {size} to {total} during the load", **context)
        return total
    raise FetchError(f"{url}: unexpected HTTP {_phrase(status)} for {asked}", **context)


def _phrase(status: int) -> str:
    """``503 Service Unavailable``: the standard reason phrase, never the server's, which may echo the
    request (its query string, a token)."""
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return str(status)


def _content_length(response: http.client.HTTPResponse, url: str, context: dict[str, Any]) -> int | None:
    """The Content-Length header as a number, None if absent; anything but digits is a FetchError."""
    value = response.getheader("Content-Length")
    if value is None:
        return None
    if not re.fullmatch(r"\d{1,20}", value.strip()):
        raise FetchError(f"{url}: invalid Content-Length {redact_text(value, 40)!r}", **context)
    return int(value)


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
