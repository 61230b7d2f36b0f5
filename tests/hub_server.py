"""A Hugging Face Hub-compatible endpoint on 127.0.0.1 for the tests, in-process (aiohttp on its own thread).

Plain helper, no pytest fixtures::

    hub = HubServer(tmp_path / "hub")          # starts the Hub server and its "CDN" server (port 0 each)
    sha = hub.add_file("org/model", "model.safetensors", data)
    hub.commit("org/model", {"a.safetensors": a, "b.safetensors": b}, branch="dev")
    hub.create_tag("org/model", "v1", revision=sha)
    hub.add_file("org/secret", "x.safetensors", data, private=True)
    hub.add_token("hf_good")                     # may read every private repo (or repos={...})
    hub.redirect = "lfs"                         # LFS files: 302 to the CDN server, like the real Hub
    fs = HfFileSystem(**hub.storage_options(token="hf_good"), skip_instance_cache=True)
    fs.cat_file("hf://org/model@dev/a.safetensors", start=0, end=8)
    hf_hub_download("org/model", "model.safetensors", endpoint=hub.endpoint, cache_dir=tmp_path / "c")
    [r for r in hub.log if r.method == "GET"], hub.cdn_log, hub.cdn_auth_seen()
    hub.stop()

Layout under ``root`` (every commit is a full snapshot; unchanged files are hard links to the parent's)::

    root/{model,dataset,space}s/{org}/{name}/repo.json       # private flag, branches, tags, commits + file metadata
    root/{model,dataset,space}s/{org}/{name}/{commit_sha}/{path in repo}

A HubServer opened on an existing root serves what is there (repo.json is the source of truth).

Endpoints (what huggingface_hub 2.4 calls; checked in its source):

* ``GET /api/{models,datasets,spaces}/{org}/{name}[/revision/{rev}]``: id, sha, private, siblings (size, blobId,
  lfs with ``?blobs=true``), lastModified.
* ``GET /api/{type}s/{repo}/tree/{rev}[/{path}]?recursive=&expand=``: entries ``type,path,size,oid`` (+ ``lfs:
  {oid: sha256, size, pointerSize}``; + ``lastCommit``/``securityFileStatus`` with expand); paginated with a
  ``Link: <...&cursor=N>; rel="next"`` header every ``tree_page_size`` entries.
* ``POST /api/{type}s/{repo}/paths-info/{rev}`` (form or JSON ``paths``, ``expand``).
* ``GET /api/{type}s/{repo}/commits/{rev}``, ``GET /api/{type}s/{repo}/refs``.
* ``GET|HEAD /[datasets/|spaces/]{repo}/resolve/{rev}/{path}``: ``X-Repo-Commit``, ``ETag`` (git blob oid, or
  sha256 for LFS), ``X-Linked-Etag``/``X-Linked-Size`` for LFS files, ``Accept-Ranges``, single ``Range`` ->
  206 + ``Content-Range`` (``a-b``, ``a-``, ``-n``), unsatisfiable -> 416, multi-range ignored (200).
  With ``redirect`` set: 302 to the CDN server (signed, expiring URL) carrying the same metadata headers.

Revisions: branch names, tag names, or a full 40-hex commit sha. A revision with ``/`` may come URL-encoded
(``refs%2Fpr%2F1``) or not.

Errors, with the Hub's headers (huggingface_hub maps them to its exception classes):

* repo missing, or private without a token: 401 ``X-Error-Code: RepoNotFound`` (404 when a valid token was
  sent and the repo does not exist) -> RepositoryNotFoundError.
* unknown token (any repo, public too): 401 ``X-Error-Message: Invalid credentials in Authorization header``,
  no error code -> HfHubHTTPError.
* valid token not granted this private repo: 404 ``RepoNotFound`` -> RepositoryNotFoundError; or, for a token
  added with ``fine_grained=True``, 403 -> HfHubHTTPError.
* revision missing: 404 ``X-Error-Code: RevisionNotFound``; file/dir missing: 404 ``X-Error-Code: EntryNotFound``
  (with ``X-Repo-Commit``).

huggingface_hub reads ``HF_ENDPOINT`` (and ``HF_HUB_DISABLE_XET``) once, at import: pass ``endpoint=`` explicitly
(``storage_options()``, ``hf_hub_download(endpoint=...)``), or apply ``environ()`` before it is imported, or
monkeypatch ``huggingface_hub.constants`` with ``constants_patch()``. This server never advertises Xet
(no ``X-Xet-Hash``/``xetHash``), so plain HTTP is used either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlencode

from aiohttp import web

REPO_TYPES = ("model", "dataset", "space")
LFS_SUFFIXES = frozenset(
    {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf", ".npy", ".npz", ".zip"}
)
LFS_THRESHOLD = 10 * 1024 * 1024  # the Hub refuses non-LFS files above 10 MB
_SHA = re.compile(r"[0-9a-f]{40}")
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")
_CHUNK = 1 << 18


@dataclass
class HubRequest:
    server: str  # "hub" or "cdn"
    method: str
    path: str  # decoded path, no query
    query: str
    range: str | None
    status: int
    sent: int  # body bytes written
    auth: bool  # an Authorization header was present
    location: str | None = None  # Location of a redirect


@dataclass
class _RequestState:
    sent: int = 0
    status: int = 0


# Per-request state: each aiohttp request runs in its own task, hence its own context (aiohttp 3.14 warns on
# string keys in ``request[...]``).
_STATE: contextvars.ContextVar[_RequestState] = contextvars.ContextVar("hub_request_state")


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


class _HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}


class HubServer:
    """Hub-compatible endpoint + a "CDN" server for redirected downloads, both on 127.0.0.1, port 0.

    Switches (plain attributes, change them any time):

    * ``redirect``: None (serve every file from the Hub server), ``"lfs"`` (302 LFS files to the CDN, as the real
      Hub does) or ``"all"``.
    * ``cdn_reject_auth``: the CDN answers 400 to a request that carries ``Authorization`` (as S3 does for a
      presigned URL plus a header) instead of only recording it.
    * ``cdn_url_ttl``: seconds a signed CDN URL stays valid (403 after).
    * ``tree_page_size``: entries per tree page before a ``Link: rel="next"`` cursor.
    """

    def __init__(
        self,
        root: Path | str,
        *,
        redirect: str | None = None,
        lfs_suffixes: Iterable[str] = LFS_SUFFIXES,
        lfs_threshold: int = LFS_THRESHOLD,
        tree_page_size: int = 1000,
    ) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.redirect = redirect
        self.lfs_suffixes = frozenset(lfs_suffixes)
        self.lfs_threshold = lfs_threshold
        self.tree_page_size = tree_page_size
        self.cdn_reject_auth = False
        self.cdn_url_ttl = 3600.0
        self.tokens: dict[str, frozenset[str] | None] = {}
        self._fine_grained: set[str] = set()
        self.log: list[HubRequest] = []
        self.cdn_log: list[HubRequest] = []
        self._lock = threading.RLock()
        self._meta: dict[tuple[str, str], dict[str, Any]] = {}
        self._blobs: dict[str, Path] = {}  # CDN key -> file
        self._secret = secrets.token_bytes(16)
        self._counter = 0
        self.port = self.cdn_port = 0
        self._runners: list[web.AppRunner] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, name="hub-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(10) or self._start_error is not None:
            raise RuntimeError(f"hub server did not start: {self._start_error}")
        self.endpoint: str = f"http://127.0.0.1:{self.port}"
        self.cdn_endpoint: str = f"http://127.0.0.1:{self.cdn_port}"

    # --- lifecycle -------------------------------------------------------------------------------------

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            hub = web.Application(client_max_size=64 * 1024 * 1024)
            hub.router.add_route("*", "/{tail:.*}", self._hub_entry)
            cdn = web.Application()
            cdn.router.add_route("*", "/{tail:.*}", self._cdn_entry)
            self._runners = [
                web.AppRunner(hub, access_log=None, shutdown_timeout=1.0),
                web.AppRunner(cdn, access_log=None, shutdown_timeout=1.0),
            ]
            ports = []
            for runner in self._runners:
                self._loop.run_until_complete(runner.setup())
                site = web.TCPSite(runner, "127.0.0.1", 0)
                self._loop.run_until_complete(site.start())
                ports.append(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
            self.port, self.cdn_port = ports
        except BaseException as e:  # reported by __init__
            self._start_error = e
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()

    def stop(self) -> None:
        if self._loop.is_closed():
            return

        async def shutdown() -> None:  # handlers still streaming get shutdown_timeout (1 s), then are cancelled
            await asyncio.gather(*(runner.cleanup() for runner in self._runners))

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> HubServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- client configuration --------------------------------------------------------------------------

    def storage_options(self, token: str | bool | None = False) -> dict[str, Any]:
        """HfFileSystem options. ``token=False`` (default) sends no token at all, not even a locally saved one."""
        return {"endpoint": self.endpoint, "token": token}

    def environ(self) -> dict[str, str]:
        """Environment for huggingface_hub; read by it at import time only (see the module docstring)."""
        return {
            "HF_ENDPOINT": self.endpoint,
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        }

    def constants_patch(self) -> dict[str, Any]:
        """``huggingface_hub.constants`` attributes to monkeypatch.setattr when it was imported before ``environ()``."""
        return {
            "ENDPOINT": self.endpoint,
            "HUGGINGFACE_CO_URL_TEMPLATE": self.endpoint + "/{repo_id}/resolve/{revision}/{filename}",
            "HF_HUB_DISABLE_XET": True,
        }

    # --- logs --------------------------------------------------------------------------------------------

    def reset_log(self) -> None:
        with self._lock:
            self.log.clear()
            self.cdn_log.clear()

    def cdn_auth_seen(self) -> bool:
        """Whether any request that reached the CDN server carried an Authorization header."""
        with self._lock:
            return any(r.auth for r in self.cdn_log)

    def _record(self, server: str, request: web.Request, status: int, sent: int, location: str | None) -> None:
        entry = HubRequest(
            server,
            request.method,
            request.path,
            request.query_string,
            request.headers.get("Range"),
            status,
            sent,
            "Authorization" in request.headers,
            location,
        )
        with self._lock:
            (self.log if server == "hub" else self.cdn_log).append(entry)

    # --- repository content helpers --------------------------------------------------------------------

    def add_token(self, token: str, repos: Iterable[str] | None = None, fine_grained: bool = False) -> None:
        """Make ``token`` valid. ``repos=None``: it may read every private repo; otherwise only those listed, as
        hf paths: ``"org/name"`` for models, ``"datasets/org/name"``, ``"spaces/org/name"``. For a private repo
        not listed, the server answers 404 RepoNotFound (what the Hub tells a user token about someone else's
        private repo), or 403 if ``fine_grained`` (a fine-grained token lacking that permission)."""
        with self._lock:
            self.tokens[token] = None if repos is None else frozenset(repos)
            if fine_grained:
                self._fine_grained.add(token)
            else:
                self._fine_grained.discard(token)

    def add_file(
        self,
        repo_id: str,
        path: str,
        data: bytes | Path,
        revision: str = "main",
        repo_type: str = "model",
        private: bool | None = None,
        lfs: bool | None = None,
    ) -> str:
        """Commit one file on branch ``revision`` (created from main's head if new); returns the commit sha."""
        return self.commit(repo_id, {path: data}, branch=revision, repo_type=repo_type, private=private, lfs=lfs)

    def commit(
        self,
        repo_id: str,
        files: Mapping[str, bytes | Path | None],
        branch: str = "main",
        repo_type: str = "model",
        private: bool | None = None,
        message: str | None = None,
        lfs: bool | None = None,
    ) -> str:
        """One commit on ``branch`` adding/replacing ``files`` (a None value deletes that path); returns its sha.

        Creates the repo if needed (public unless ``private``); a new branch starts from main's head. ``lfs``
        forces LFS on/off for these files; by default a file is LFS if its suffix is in ``lfs_suffixes`` or it is
        at least ``lfs_threshold`` bytes.
        """
        self._check_repo(repo_id, repo_type)
        with self._lock:
            meta = self._load(repo_type, repo_id)
            if meta is None:
                meta = {"private": bool(private), "branches": {}, "tags": {}, "commits": {}}
            elif private is not None:
                meta["private"] = private
            parent = meta["branches"].get(branch) or (meta["branches"].get("main") if branch != "main" else None)
            old = meta["commits"][parent]["files"] if parent else {}
            self._counter += 1
            sha = hashlib.sha1(
                f"{repo_type}/{repo_id}:{branch}:{parent}:{time.time_ns()}:{self._counter}".encode()
            ).hexdigest()
            rdir = self._repo_dir(repo_type, repo_id)
            cdir = rdir / sha
            cdir.mkdir(parents=True)
            new: dict[str, Any] = {}
            for p, fm in old.items():
                if p in files:
                    continue
                dst = cdir / p
                dst.parent.mkdir(parents=True, exist_ok=True)
                src = rdir / parent / p  # type: ignore[operator]
                try:
                    os.link(src, dst)
                except OSError:
                    shutil.copy2(src, dst)
                new[p] = fm
            for p, content in files.items():
                p = self._check_path(p)
                if content is None:
                    continue
                raw = content.read_bytes() if isinstance(content, Path) else bytes(content)
                dst = cdir / p
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_bytes(raw)
                is_lfs = (
                    lfs if lfs is not None else (Path(p).suffix in self.lfs_suffixes or len(raw) >= self.lfs_threshold)
                )
                fm = {"size": len(raw), "lfs": is_lfs, "last_commit": sha}
                if is_lfs:
                    sha256 = hashlib.sha256(raw).hexdigest()
                    pointer = lfs_pointer(sha256, len(raw))
                    fm.update(sha256=sha256, oid=git_blob_oid(pointer), pointer_size=len(pointer))
                else:
                    fm.update(oid=git_blob_oid(raw))
                new[p] = fm
            title = message or f"Update {', '.join(sorted(files))}"[:200]
            meta["commits"][sha] = {"parent": parent, "title": title, "date": _now_iso(), "files": new}
            meta["branches"][branch] = sha
            self._save(repo_type, repo_id, meta)
        return sha

    def commit_folder(self, repo_id: str, folder: Path | str, **kwargs: Any) -> str:
        """Commit every file under ``folder`` (relative paths kept); kwargs as for commit()."""
        folder = Path(folder)
        files: dict[str, bytes | Path | None] = {
            f.relative_to(folder).as_posix(): f for f in sorted(folder.rglob("*")) if f.is_file()
        }
        return self.commit(repo_id, files, **kwargs)

    def create_branch(self, repo_id: str, branch: str, revision: str = "main", repo_type: str = "model") -> str:
        with self._lock:
            meta = self._require(repo_type, repo_id)
            sha = self._resolve_rev(meta, revision)
            if sha is None:
                raise KeyError(revision)
            meta["branches"][branch] = sha
            self._save(repo_type, repo_id, meta)
        return sha

    def create_tag(self, repo_id: str, tag: str, revision: str = "main", repo_type: str = "model") -> str:
        with self._lock:
            meta = self._require(repo_type, repo_id)
            sha = self._resolve_rev(meta, revision)
            if sha is None:
                raise KeyError(revision)
            meta["tags"][tag] = sha
            self._save(repo_type, repo_id, meta)
        return sha

    def set_private(self, repo_id: str, private: bool = True, repo_type: str = "model") -> None:
        with self._lock:
            meta = self._require(repo_type, repo_id)
            meta["private"] = private
            self._save(repo_type, repo_id, meta)

    def head(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> str:
        """Commit sha that ``revision`` (branch, tag or sha) points to."""
        with self._lock:
            sha = self._resolve_rev(self._require(repo_type, repo_id), revision)
        if sha is None:
            raise KeyError(revision)
        return sha

    def file_info(self, repo_id: str, path: str, revision: str = "main", repo_type: str = "model") -> dict[str, Any]:
        """Stored metadata of one file: size, oid (git blob), lfs, sha256 (LFS only), last_commit, local path."""
        with self._lock:
            meta = self._require(repo_type, repo_id)
            sha = self._resolve_rev(meta, revision)
            if sha is None:
                raise KeyError(revision)
            fm = dict(meta["commits"][sha]["files"][path])
        fm["local_path"] = self._repo_dir(repo_type, repo_id) / sha / path
        fm["commit"] = sha
        return fm

    def hf_url(self, repo_id: str, path: str, revision: str | None = None, repo_type: str = "model") -> str:
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        rev = f"@{quote(revision, safe='')}" if revision else ""
        return f"hf://{prefix}{repo_id}{rev}/{path}"

    def resolve_url(self, repo_id: str, path: str, revision: str = "main", repo_type: str = "model") -> str:
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        return f"{self.endpoint}/{prefix}{repo_id}/resolve/{quote(revision, safe='')}/{quote(path)}"

    # --- storage -----------------------------------------------------------------------------------------

    @staticmethod
    def _check_repo(repo_id: str, repo_type: str) -> None:
        if repo_type not in REPO_TYPES:
            raise ValueError(f"repo_type must be one of {REPO_TYPES}")
        parts = repo_id.split("/")
        if len(parts) != 2 or not all(re.fullmatch(r"[\w.-]+", p) and p not in (".", "..") for p in parts):
            raise ValueError(f"repo_id must be 'org/name', got {repo_id!r}")

    @staticmethod
    def _check_path(path: str) -> str:
        parts = path.split("/")
        if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"bad path in repo: {path!r}")
        return path

    def _repo_dir(self, repo_type: str, repo_id: str) -> Path:
        return self.root / f"{repo_type}s" / repo_id

    def _load(self, repo_type: str, repo_id: str) -> dict[str, Any] | None:
        key = (repo_type, repo_id)
        if key not in self._meta:
            f = self._repo_dir(repo_type, repo_id) / "repo.json"
            if not f.is_file():
                return None
            self._meta[key] = json.loads(f.read_text())
        return self._meta[key]

    def _require(self, repo_type: str, repo_id: str) -> dict[str, Any]:
        meta = self._load(repo_type, repo_id)
        if meta is None:
            raise KeyError(f"{repo_type} {repo_id}")
        return meta

    def _save(self, repo_type: str, repo_id: str, meta: dict[str, Any]) -> None:
        self._meta[(repo_type, repo_id)] = meta
        f = self._repo_dir(repo_type, repo_id) / "repo.json"
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, f)

    @staticmethod
    def _resolve_rev(meta: dict[str, Any], rev: str) -> str | None:
        if rev in meta["branches"]:
            return meta["branches"][rev]  # type: ignore[no-any-return]
        if rev in meta["tags"]:
            return meta["tags"][rev]  # type: ignore[no-any-return]
        for prefix, table in (("refs/heads/", "branches"), ("refs/tags/", "tags")):
            if rev.startswith(prefix) and rev[len(prefix) :] in meta[table]:
                return meta[table][rev[len(prefix) :]]  # type: ignore[no-any-return]
        if _SHA.fullmatch(rev) and rev in meta["commits"]:
            return rev
        return None

    # --- Hub server --------------------------------------------------------------------------------------

    async def _hub_entry(self, request: web.Request) -> web.StreamResponse:
        _ctx = _RequestState()
        _STATE.set(_ctx)
        status, location = 500, None
        try:
            try:
                resp = await self._hub_route(request)
            except _HubError as e:
                resp = self._error(request, e)
            status, location = resp.status, resp.headers.get("Location")
            return resp
        finally:
            self._record("hub", request, _ctx.status or status, _ctx.sent, location)

    def _error(self, request: web.Request, e: _HubError) -> web.Response:
        headers = {"X-Error-Message": e.message, **e.headers}
        if e.code:
            headers["X-Error-Code"] = e.code
        return self._json(request, {"error": e.message}, e.status, headers)

    @staticmethod
    def _json(request: web.Request, obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
        body = json.dumps(obj).encode()
        if request.method != "HEAD":
            _STATE.get().sent = len(body)
        return web.Response(body=body, status=status, headers=headers, content_type="application/json")

    def _access(self, request: web.Request, repo_type: str, repo_id: str) -> dict[str, Any]:
        """The repo's metadata if this request may read it, else the Hub's error."""
        auth = request.headers.get("Authorization")
        token: str | None = None
        if auth is not None:
            token = auth[7:].strip() if auth.startswith("Bearer ") else ""
            if token not in self.tokens:
                raise _HubError(401, "Invalid credentials in Authorization header")
        with self._lock:
            meta = self._load(repo_type, repo_id)
        if meta is None:
            if token is None:
                raise _HubError(401, "Invalid username or password.", "RepoNotFound")
            raise _HubError(404, "Repository not found", "RepoNotFound")
        if meta["private"]:
            if token is None:
                raise _HubError(401, "Invalid username or password.", "RepoNotFound")
            allowed = self.tokens[token]
            key = repo_id if repo_type == "model" else f"{repo_type}s/{repo_id}"
            if allowed is not None and key not in allowed:
                if token in self._fine_grained:
                    raise _HubError(403, f"This token does not have access to {key}")
                raise _HubError(404, "Repository not found", "RepoNotFound")
        return meta

    def _split_rev(self, meta: dict[str, Any], parts: list[str]) -> tuple[str, str, list[str]]:
        """(revision as given, commit sha, remaining path parts); the revision may span several parts."""
        if not parts or not parts[0]:
            raise _HubError(404, "Invalid rev id: ", "RevisionNotFound")
        with self._lock:
            for i in range(1, len(parts) + 1):
                rev = "/".join(parts[:i])
                sha = self._resolve_rev(meta, rev)
                if sha is not None:
                    return rev, sha, parts[i:]
        raise _HubError(404, f"Invalid rev id: {parts[0]}", "RevisionNotFound")

    async def _hub_route(self, request: web.Request) -> web.StreamResponse:
        raw = request.rel_url.raw_path
        segs = [unquote(s) for s in raw.strip("/").split("/")]
        method = request.method
        if len(segs) >= 4 and segs[0] == "api" and segs[1] in ("models", "datasets", "spaces"):
            repo_type, repo_id, rest = segs[1][:-1], f"{segs[2]}/{segs[3]}", segs[4:]
            meta = self._access(request, repo_type, repo_id)
            if method in ("GET", "HEAD") and not rest:
                return self._api_info(request, repo_type, repo_id, meta, None)
            if method in ("GET", "HEAD") and rest[0] == "revision" and len(rest) > 1:
                return self._api_info(request, repo_type, repo_id, meta, rest[1:])
            if method in ("GET", "HEAD") and rest[0] == "tree":
                return self._api_tree(request, meta, rest[1:])
            if method == "POST" and rest[0] == "paths-info":
                return await self._api_paths_info(request, meta, rest[1:])
            if method in ("GET", "HEAD") and rest[0] == "commits":
                return self._api_commits(request, meta, rest[1:])
            if method in ("GET", "HEAD") and rest == ["refs"]:
                return self._api_refs(request, meta)
            raise _HubError(404, "Not found")
        repo_type = "model"
        if segs and segs[0] in ("datasets", "spaces"):
            repo_type, segs = segs[0][:-1], segs[1:]
        if len(segs) >= 5 and segs[2] == "resolve" and method in ("GET", "HEAD"):
            repo_id = f"{segs[0]}/{segs[1]}"
            meta = self._access(request, repo_type, repo_id)
            return await self._resolve(request, repo_type, repo_id, meta, segs[3:])
        raise _HubError(404, "Not found")

    @staticmethod
    def _file_entry(path: str, fm: dict[str, Any], commits: dict[str, Any] | None) -> dict[str, Any]:
        entry: dict[str, Any] = {"type": "file", "oid": fm["oid"], "size": fm["size"], "path": path}
        if fm["lfs"]:
            entry["lfs"] = {"oid": fm["sha256"], "size": fm["size"], "pointerSize": fm["pointer_size"]}
        if commits is not None:
            c = commits[fm["last_commit"]]
            entry["lastCommit"] = {"id": fm["last_commit"], "title": c["title"], "date": c["date"]}
            entry["securityFileStatus"] = {
                "status": "safe",
                "avScan": {"virusFound": False, "virusNames": None},
                "pickleImportScan": None,
            }
        return entry

    @staticmethod
    def _dir_entry(path: str, files: dict[str, Any], commits: dict[str, Any] | None) -> dict[str, Any]:
        under = sorted((p, fm["oid"]) for p, fm in files.items() if p.startswith(path + "/"))
        oid = hashlib.sha1(json.dumps(under).encode()).hexdigest()
        entry: dict[str, Any] = {"type": "directory", "oid": oid, "path": path}
        if commits is not None:
            last = max((files[p]["last_commit"] for p, _ in under), key=lambda s: commits[s]["date"] + s, default=None)
            if last is not None:
                entry["lastCommit"] = {"id": last, "title": commits[last]["title"], "date": commits[last]["date"]}
        return entry

    @staticmethod
    def _truthy(value: str | None) -> bool:
        return (value or "").lower() in ("1", "true", "yes")

    def _api_info(
        self, request: web.Request, repo_type: str, repo_id: str, meta: dict[str, Any], rev_parts: list[str] | None
    ) -> web.Response:
        if rev_parts is None:
            rev, sha = "main", meta["branches"].get("main")
            if sha is None:
                raise _HubError(404, "Invalid rev id: main", "RevisionNotFound")
        else:
            rev, sha, extra = self._split_rev(meta, rev_parts)
            if extra:
                raise _HubError(404, f"Invalid rev id: {'/'.join(rev_parts)}", "RevisionNotFound")
        with self._lock:
            commit = meta["commits"][sha]
            files = dict(commit["files"])
            private = meta["private"]
        blobs = self._truthy(request.query.get("blobs"))
        siblings = []
        for p in sorted(files):
            s: dict[str, Any] = {"rfilename": p}
            if blobs:
                fm = files[p]
                s.update(size=fm["size"], blobId=fm["oid"])
                if fm["lfs"]:
                    s["lfs"] = {"sha256": fm["sha256"], "size": fm["size"], "pointerSize": fm["pointer_size"]}
            siblings.append(s)
        org = repo_id.split("/")[0]
        info: dict[str, Any] = {
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
            "id": repo_id,
            "author": org,
            "sha": sha,
            "lastModified": commit["date"],
            "createdAt": commit["date"],
            "private": private,
            "gated": False,
            "disabled": False,
            "tags": [],
            "downloads": 0,
            "likes": 0,
            "siblings": siblings,
            "usedStorage": sum(fm["size"] for fm in files.values()),
        }
        if repo_type == "model":
            info["modelId"] = repo_id
        return self._json(request, info)

    def _api_tree(self, request: web.Request, meta: dict[str, Any], parts: list[str]) -> web.Response:
        rev, sha, path_parts = self._split_rev(meta, parts)
        base = "/".join(p for p in path_parts if p)
        with self._lock:
            files = dict(meta["commits"][sha]["files"])
            commits = meta["commits"]
        recursive = self._truthy(request.query.get("recursive"))
        expand = self._truthy(request.query.get("expand"))
        prefix = base + "/" if base else ""
        if base and not any(p.startswith(prefix) for p in files):
            raise _HubError(404, f'{base} does not exist on "{rev}"', "EntryNotFound", {"X-Repo-Commit": sha})
        dirs: set[str] = set()
        out_files: list[str] = []
        for p in files:
            if not p.startswith(prefix):
                continue
            rel = p[len(prefix) :].split("/")
            if recursive:
                out_files.append(p)
                for i in range(1, len(rel)):
                    dirs.add(prefix + "/".join(rel[:i]))
            elif len(rel) == 1:
                out_files.append(p)
            else:
                dirs.add(prefix + rel[0])
        cm = commits if expand else None
        entries = [self._dir_entry(d, files, cm) for d in sorted(dirs)]
        entries += [self._file_entry(p, files[p], cm) for p in sorted(out_files)]
        cursor = int(request.query.get("cursor", "0") or 0)
        page = max(1, self.tree_page_size)
        headers = {}
        if cursor + page < len(entries):
            q = {k: v for k, v in request.query.items() if k != "cursor"}
            q["cursor"] = str(cursor + page)
            headers["Link"] = f'<{self.endpoint}{request.rel_url.raw_path}?{urlencode(q)}>; rel="next"'
        return self._json(request, entries[cursor : cursor + page], headers=headers)

    async def _api_paths_info(self, request: web.Request, meta: dict[str, Any], parts: list[str]) -> web.Response:
        rev, sha, extra = self._split_rev(meta, parts)
        if extra:
            raise _HubError(404, f"Invalid rev id: {'/'.join(parts)}", "RevisionNotFound")
        if request.content_type == "application/json":
            body = await request.json()
            paths = body.get("paths", [])
            paths = [paths] if isinstance(paths, str) else list(paths)
            expand = bool(body.get("expand"))
        else:
            form = await request.post()
            paths = [str(p) for p in form.getall("paths", [])]
            expand = self._truthy(str(form.get("expand", "")))
        with self._lock:
            files = dict(meta["commits"][sha]["files"])
            commits = meta["commits"]
        cm = commits if expand else None
        out = []
        for p in paths:
            p = p.strip("/")
            if p in files:
                out.append(self._file_entry(p, files[p], cm))
            elif p and any(f.startswith(p + "/") for f in files):
                out.append(self._dir_entry(p, files, cm))
        return self._json(request, out)

    def _api_commits(self, request: web.Request, meta: dict[str, Any], parts: list[str]) -> web.Response:
        _, sha, _ = self._split_rev(meta, parts)
        out = []
        with self._lock:
            cur: str | None = sha
            while cur is not None:
                c = meta["commits"][cur]
                out.append(
                    {"id": cur, "title": c["title"], "message": "", "authors": [{"user": "test"}], "date": c["date"]}
                )
                cur = c["parent"]
        return self._json(request, out)

    def _api_refs(self, request: web.Request, meta: dict[str, Any]) -> web.Response:
        """Branches named ``refs/pr/N`` are listed as pull requests (with ``?include_prs=1``), as on the Hub."""
        with self._lock:
            branches = [
                {"name": b, "ref": f"refs/heads/{b}", "targetCommit": s}
                for b, s in meta["branches"].items()
                if not b.startswith("refs/pr/")
            ]
            prs = [
                {"name": b, "ref": b, "targetCommit": s}
                for b, s in meta["branches"].items()
                if b.startswith("refs/pr/")
            ]
            tags = [{"name": t, "ref": f"refs/tags/{t}", "targetCommit": s} for t, s in meta["tags"].items()]
        out: dict[str, Any] = {"branches": branches, "tags": tags, "converts": []}
        if self._truthy(request.query.get("include_prs")):
            out["pullRequests"] = prs
        return self._json(request, out)

    async def _resolve(
        self, request: web.Request, repo_type: str, repo_id: str, meta: dict[str, Any], parts: list[str]
    ) -> web.StreamResponse:
        rev, sha, path_parts = self._split_rev(meta, parts)
        path = "/".join(path_parts)
        with self._lock:
            fm = meta["commits"][sha]["files"].get(path)
        if fm is None:
            raise _HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": sha})
        local = self._repo_dir(repo_type, repo_id) / sha / path
        headers = {"X-Repo-Commit": sha, "Accept-Ranges": "bytes"}
        if fm["lfs"]:
            headers.update({"X-Linked-Etag": f'"{fm["sha256"]}"', "X-Linked-Size": str(fm["size"])})
        mode = self.redirect
        if mode == "all" or (mode == "lfs" and fm["lfs"]):
            key = f"repos/{fm['sha256'][:2]}/{fm['sha256'][2:4]}/{fm['sha256']}" if fm["lfs"] else f"blobs/{fm['oid']}"
            with self._lock:
                self._blobs[key] = local
            expires = str(int(time.time() + self.cdn_url_ttl))
            query = urlencode(
                {
                    "response-content-disposition": f"inline; filename*=UTF-8''{quote(path.split('/')[-1])};",
                    "Expires": expires,
                    "Signature": self._sign(key, expires),
                    "Key-Pair-Id": "TESTKEYPAIR",
                }
            )
            location = f"{self.cdn_endpoint}/{key}?{query}"
            headers.update({"Location": location, "ETag": f'"{fm["oid"]}"'})
            body = f"Found. Redirecting to {location}".encode()
            if request.method != "HEAD":
                _STATE.get().sent = len(body)
            return web.Response(status=302, body=body, headers=headers, content_type="text/plain")
        headers["ETag"] = f'"{fm["sha256"]}"' if fm["lfs"] else f'"{fm["oid"]}"'
        return await self._send_file(request, local, fm["size"], headers)

    # --- CDN server --------------------------------------------------------------------------------------

    def _sign(self, key: str, expires: str) -> str:
        return hmac.new(self._secret, f"{key}:{expires}".encode(), hashlib.sha256).hexdigest()

    async def _cdn_entry(self, request: web.Request) -> web.StreamResponse:
        _ctx = _RequestState()
        _STATE.set(_ctx)
        status = 500
        try:
            resp = await self._cdn_route(request)
            status = resp.status
            return resp
        finally:
            self._record("cdn", request, _ctx.status or status, _ctx.sent, None)

    def _cdn_text(self, request: web.Request, status: int, text: str) -> web.Response:
        body = text.encode()
        if request.method != "HEAD":
            _STATE.get().sent = len(body)
        return web.Response(status=status, body=body, content_type="application/xml")

    async def _cdn_route(self, request: web.Request) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD"):
            return self._cdn_text(request, 405, "<Error><Code>MethodNotAllowed</Code></Error>")
        key = request.path.lstrip("/")
        expires = request.query.get("Expires", "")
        signature = request.query.get("Signature", "")
        if not expires.isdigit() or not hmac.compare_digest(signature, self._sign(key, expires)):
            return self._cdn_text(request, 403, "<Error><Code>AccessDenied</Code></Error>")
        if int(expires) < time.time():
            return self._cdn_text(request, 403, "<Error><Code>AccessDenied</Code><Message>expired</Message></Error>")
        if self.cdn_reject_auth and "Authorization" in request.headers:
            return self._cdn_text(
                request,
                400,
                "<Error><Code>InvalidArgument</Code><Message>Only one auth mechanism allowed</Message></Error>",
            )
        with self._lock:
            local = self._blobs.get(key)
        if local is None or not local.is_file():
            return self._cdn_text(request, 404, "<Error><Code>NoSuchKey</Code></Error>")
        size = local.stat().st_size
        headers = {"Accept-Ranges": "bytes", "ETag": f'"{key.rsplit("/", 1)[-1]}"'}
        if "response-content-disposition" in request.query:
            headers["Content-Disposition"] = request.query["response-content-disposition"]
        return await self._send_file(request, local, size, headers)

    # --- shared ------------------------------------------------------------------------------------------

    async def _send_file(
        self, request: web.Request, local: Path, size: int, headers: dict[str, str]
    ) -> web.StreamResponse:
        """Whole file (200) or one range (206); 416 if unsatisfiable. Counts body bytes in the request state."""
        start, end, status = 0, size - 1, 200
        m = _RANGE.fullmatch((request.headers.get("Range") or "").strip())
        if m is not None and (m.group(1) or m.group(2)):
            if not m.group(1):
                n = int(m.group(2))
                start, end = max(0, size - n), size - 1
                bad = n == 0 or size == 0
            else:
                start = int(m.group(1))
                end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
                bad = start >= size or (bool(m.group(2)) and int(m.group(2)) < start)
            if bad:
                return web.Response(status=416, headers={"Content-Range": f"bytes */{size}"})
            status = 206
            headers = {**headers, "Content-Range": f"bytes {start}-{end}/{size}"}
        length = max(0, end - start + 1)
        resp = web.StreamResponse(status=status, headers={**headers, "Content-Type": "application/octet-stream"})
        resp.content_length = length
        await resp.prepare(request)
        _STATE.get().status = status  # known even if the client goes away mid-body
        if request.method != "HEAD" and length:
            with open(local, "rb") as f:
                f.seek(start)
                remaining = length
                while remaining:
                    chunk = f.read(min(_CHUNK, remaining))
                    if not chunk:
                        break
                    await resp.write(chunk)
                    _STATE.get().sent += len(chunk)
                    remaining -= len(chunk)
        with contextlib.suppress(ConnectionResetError):
            await resp.write_eof()
        return resp
