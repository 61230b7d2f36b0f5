"""Where an object lives: the parsed URL, its one printable form, and the files beside it.

A URL may carry secrets: user info (``https://user:pass@host/``) and a presigned query string
(``?X-Amz-Signature=...``, ``?sig=...``). ``Location.shown`` (also ``str()`` and ``repr()``) drops both and is
the only form of a URL that may reach a message, a log record, an exception attribute or a progress label.

Files next to a checkpoint (index shards, digest sidecars, a folder's listing) are addressed with
``child`` and ``sibling``, which go through one check, ``inside``: a name is normalised first (percent-
decoded as often as any server or proxy might decode it, ``..`` resolved) and only then accepted, so no
encoding of ``..`` can name a file outside the checkpoint's folder.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from urllib.parse import quote, unquote

# Schemes whose URL path is percent-encoded: a file name put into it is quoted. Elsewhere (s3, gs, hf,
# memory, a local path) a key is literal, as s3fs, gcsfs and huggingface_hub take it.
_ENCODED = frozenset({"http", "https", "file"})
# Schemes whose user-info slot names a container (abfs://container@account/...), not a person: a user
# name there is kept in the display form; a password never is.
_CONTAINER_USER = frozenset({"abfs", "abfss", "az", "wasb", "wasbs", "adl"})
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f]")
_MAX_DECODINGS = 8  # more layers of percent-encoding than any server decodes: refused


@dataclass(frozen=True, repr=False)
class Location:
    """A parsed URL (or local path). ``url`` is the text as given and may hold credentials: it is for
    making requests only, never for printing; print ``shown``."""

    url: str
    scheme: str  # lowercase; "" for a local path
    userinfo: str  # "user:password" before the "@", or ""
    netloc: str  # host[:port], bucket, Hub owner, ... without the user info
    path: str  # as given: percent-encoded for http(s) and file://, literal elsewhere
    query: str  # after "?", without it
    fragment: str

    @classmethod
    def parse(cls, url: str | Location) -> Location:
        """Split ``url`` without ever raising: a hostile URL still gets a safe display form."""
        if isinstance(url, Location):
            return url
        match = _SCHEME.match(url)
        if match is None:
            return cls(url, "", "", "", url, "", "")
        rest = url[match.end() :]
        rest, _, fragment = rest.partition("#")
        rest, _, query = rest.partition("?")
        slash = rest.find("/")
        authority, path = (rest, "") if slash < 0 else (rest[:slash], rest[slash:])
        userinfo, at, host = authority.rpartition("@")
        return cls(url, match.group(1).lower(), userinfo if at else "", host, path, query, fragment)

    @property
    def shown(self) -> str:
        """The display form: no password, no query string, no fragment, no control characters."""
        if not self.scheme:
            text = self.url
        else:
            user = self.userinfo if self.scheme in _CONTAINER_USER and ":" not in self.userinfo else ""
            text = f"{self.scheme}://{user + '@' if user else ''}{self.netloc}{self.path}"
        return _UNPRINTABLE.sub(lambda m: f"%{ord(m.group()):02X}", text)

    def __str__(self) -> str:
        return self.shown

    def __repr__(self) -> str:
        return f"Location({self.shown!r})"

    @property
    def encoded(self) -> bool:
        return self.scheme in _ENCODED

    @property
    def local_path(self) -> str | None:
        """The file system path of a local path or file:// URL (percent-decoded), else None."""
        if not self.scheme:
            return self.url
        if self.scheme == "file":
            return unquote(self.path)
        if self.scheme == "local":
            return self.url[len("local://") :]
        return None

    @property
    def name(self) -> str:
        """The last path segment, decoded (a file name as it is stored)."""
        last = self.path.rstrip("/").rsplit("/", 1)[-1]
        return unquote(last) if self.encoded else last

    @property
    def revision(self) -> str | None:
        """The ``@revision`` of an ``hf://[type/]org/repo@revision/...`` URL, else None."""
        if self.scheme != "hf":
            return None
        head = f"{self.netloc}{self.path}".split("/")
        for segment in head[:3]:
            if "@" in segment:
                return segment.partition("@")[2] or None
        return None

    def _with_path(self, path: str) -> Location:
        """This location with another path, and no query or fragment (a presigned query signs one path)."""
        if not self.scheme:
            return Location.parse(path)
        authority = f"{self.userinfo}@{self.netloc}" if self.userinfo else self.netloc
        return Location.parse(f"{self.url[: self.url.index('://')]}://{authority}{path}")

    def folder(self) -> Location:
        """The folder holding this file (the location itself when it names a folder: ``child`` of it
        joins under it)."""
        path = self.path.rstrip("/")
        head = path.rsplit("/", 1)[0] if "/" in path else ("." if not self.scheme else "")
        return self._with_path(head)

    def child(self, name: str) -> Location:
        """``name`` (a relative file name, as an index or a listing gives it) inside this folder; raises
        HeaderError when it would be outside (see ``inside``)."""
        relative = inside(self, name)
        if self.encoded:
            relative = quote(relative, safe="/")
        base = self.path.rstrip("/")
        return self._with_path(f"{base}/{relative}" if base or self.scheme else relative)

    def sibling(self, name: str) -> Location:
        """The file ``name`` in the same folder as this one, without this one's query string."""
        return self.folder().child(name)


def redact(url: str | Location) -> str:
    """The display form of ``url`` (see ``Location.shown``)."""
    return Location.parse(url).shown


def inside(folder: Location, name: str) -> str:
    """``name`` as a normalised path relative to ``folder``, or HeaderError if it would leave it.

    The one check every source uses for names it did not choose (index shards, listed files, sidecars):
    the name is decoded as many times as percent-encoding could be undone on the way (a proxy, nginx and
    a file:// open each decode once), then must hold no NUL or control character, no backslash, no scheme,
    no absolute path, and no ``..`` that climbs out after normalisation. What is joined is the literal
    name, normalised, so a server that decodes it gets the very file that was checked."""
    from .errors import HeaderError  # here: errors.py imports this module

    shown = folder.shown
    if not isinstance(name, str) or not name:
        raise HeaderError(f"{shown}: a file name must be a non-empty string, got {name!r}", url=shown)
    decoded = name
    for _ in range(_MAX_DECODINGS):
        once = unquote(decoded)
        if once == decoded:
            break
        decoded = once
    else:
        raise HeaderError(f"{shown}: file name {_printable(name)} is percent-encoded too many times", url=shown)
    why = _outside(decoded) or _outside(name)
    if not why and folder.scheme and not folder.encoded and ("?" in name or "#" in name):
        why = "'?' and '#' would be read as a query or fragment in this URL scheme"  # keys are literal here
    if why:
        raise HeaderError(f"{shown}: refusing file name {_printable(name)}: {why}", url=shown)
    return posixpath.normpath(name)


def _outside(name: str) -> str | None:
    """Why ``name`` (decoded) is not a plain relative path that stays inside its folder, or None."""
    if _UNPRINTABLE.search(name):
        return "it holds a NUL or control character"
    if "\\" in name:
        return "it holds a backslash"
    if "://" in name or re.match(r"[A-Za-z]:", name):
        return "it names another location"
    if name.startswith("/"):
        return "it is an absolute path"
    normal = posixpath.normpath(name)
    if normal == "." or normal == ".." or normal.startswith("../"):
        return "it is outside the checkpoint's folder"
    return None


def _printable(text: str, limit: int = 200) -> str:
    shown = repr(text[:limit])
    return shown + ("..." if len(text) > limit else "")


_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
_QUERY_IN_TEXT = re.compile(r"\?[^\s'\"<>]*")


def redact_text(text: str, limit: int = 300) -> str:
    """Text a server sent (an error message) made printable: every URL in it in its display form, any
    other query string dropped, control characters escaped, at most ``limit`` characters."""
    text = _URL_IN_TEXT.sub(lambda m: redact(m.group()), text)
    text = _QUERY_IN_TEXT.sub("", text)
    text = _UNPRINTABLE.sub(" ", text)
    return text[:limit] + ("..." if len(text) > limit else "")


def scrub(text: str, url: str) -> str:
    """``text`` with every secret part of ``url`` (the whole URL, its user info, its query string)
    replaced: a last line of defence where text from elsewhere (a third-party error) meets a URL."""
    where = Location.parse(url)
    if url:
        text = text.replace(url, where.shown)
    secrets = [where.query, where.userinfo, where.userinfo.partition(":")[2], where.fragment]
    values = [pair.partition("=")[2] for pair in where.query.split("&")]
    secrets += values + [unquote(value) for value in values]
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) >= 4:
            text = text.replace(secret, "<redacted>")
    return text
