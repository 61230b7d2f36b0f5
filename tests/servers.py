"""Real HTTP servers on 127.0.0.1 for the tests: an aiohttp range server with switchable misbehaviour,
and nginx started as a local process. Both keep a request log so tests can count GETs and bytes."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import struct
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

_RANGE = re.compile(r"bytes=(\d+)-(\d*)")


@dataclass
class Request:
    path: str
    range: str | None
    status: int
    sent: int


@dataclass
class Quirks:
    """Ways the server can misbehave, switched per test."""

    ignore_range: bool = False  # answer 200 with the whole object
    faults: int = 0  # break this many ranged bodies (then behave), as fault_kind says:
    fault_kind: str = "short"  # "short": close after half; "reset": TCP RST after half; "stall": pause
    fault_from: int = 0  # ...counting only ranges that start at or after this byte
    stall_seconds: float = 0.0
    ranges_before_200: int | None = None  # honour this many Range requests, then answer 200 + whole body
    status_once: list[int] = field(default_factory=list)  # answer these statuses first, in order
    retry_after: str | None = None
    wrong_content_range: bool = False
    no_etag: bool = False


class RangeServer:
    """aiohttp serving files under ``root`` with single-range support (206, Content-Range, ETag)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.log: list[Request] = []
        self.quirks = Quirks()
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        self._ready.wait(10)
        self.base = f"http://127.0.0.1:{self.port}"

    def url(self, name: str) -> str:
        return f"{self.base}/{name}"

    def reset(self) -> None:
        with self._lock:
            self.log.clear()
            self.quirks = Quirks()

    def gets(self, name: str | None = None) -> list[Request]:
        with self._lock:
            return [r for r in self.log if name is None or r.path == f"/{name}"]

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_get("/{name:.+}", self._handle)
        runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._runner = runner
        self._ready.set()
        self._loop.run_forever()

    def stop(self) -> None:
        async def shutdown() -> None:
            await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def _record(self, request: web.Request, status: int, sent: int) -> None:
        with self._lock:
            self.log.append(Request(request.path, request.headers.get("Range"), status, sent))

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = self.root / request.match_info["name"]
        quirks = self.quirks
        if not path.is_file():
            self._record(request, 404, 0)
            return web.Response(status=404)
        if quirks.status_once:
            status = quirks.status_once.pop(0)
            self._record(request, status, 0)
            headers = {"Retry-After": quirks.retry_after} if quirks.retry_after else {}
            return web.Response(status=status, headers=headers)
        stat = path.stat()
        size = stat.st_size  # only the bytes asked for are read: a huge file's small ranges stay cheap
        etag = f'"{stat.st_mtime_ns:x}-{stat.st_size:x}"'
        headers = {} if quirks.no_etag else {"ETag": etag}
        if_match = request.headers.get("If-Match")
        if if_match and not quirks.no_etag and if_match != etag:
            self._record(request, 412, 0)
            return web.Response(status=412)
        match = _RANGE.fullmatch(request.headers.get("Range", ""))
        if quirks.ranges_before_200 is not None and match is not None:
            if quirks.ranges_before_200 == 0:
                match = None
            else:
                quirks.ranges_before_200 -= 1
        if match is None or quirks.ignore_range:
            data = path.read_bytes()
            self._record(request, 200, len(data))
            return web.Response(body=data, headers=headers, content_type="application/octet-stream")
        start = int(match.group(1))
        last = min(int(match.group(2)) if match.group(2) else size - 1, size - 1)
        if start >= size:
            self._record(request, 416, 0)
            return web.Response(status=416, headers={"Content-Range": f"bytes */{size}"})
        with path.open("rb") as file:
            file.seek(start)
            body = file.read(last + 1 - start)
        shown_start = start + 1 if quirks.wrong_content_range else start
        headers["Content-Range"] = f"bytes {shown_start}-{last}/{size}"
        if quirks.faults > 0 and start >= quirks.fault_from:
            quirks.faults -= 1
            return await self._broken(request, quirks, headers, body)
        self._record(request, 206, len(body))
        return web.Response(status=206, body=body, headers=headers, content_type="application/octet-stream")

    async def _broken(
        self, request: web.Request, quirks: Quirks, headers: dict[str, str], body: bytes
    ) -> web.StreamResponse:
        """Promise the full length, send half, then fail as ``fault_kind`` says."""
        response = web.StreamResponse(status=206, headers={**headers, "Content-Length": str(len(body))})
        await response.prepare(request)
        await response.write(body[: len(body) // 2])
        self._record(request, 206, len(body) // 2)
        transport = request.transport
        assert transport is not None
        if quirks.fault_kind == "stall":
            await asyncio.sleep(quirks.stall_seconds)
        elif quirks.fault_kind == "reset":
            sock = transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close sends RST
        transport.close()
        return response


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


_NGINX_CONF = """
worker_processes 2;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 256; }}
http {{
    log_format ranged '$request_uri|$http_range|$status|$body_bytes_sent';
    access_log {dir}/access.log ranged;
    client_body_temp_path {dir}/tmp;
    proxy_temp_path {dir}/tmp;
    fastcgi_temp_path {dir}/tmp;
    uwsgi_temp_path {dir}/tmp;
    scgi_temp_path {dir}/tmp;
    sendfile on;
    server {{
        listen 127.0.0.1:{port};
        root {root};
    }}
}}
"""


class Nginx:
    """nginx serving ``root`` on 127.0.0.1, as a child process with its config and logs in ``workdir``."""

    def __init__(self, root: Path, workdir: Path) -> None:
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        self.port = free_port()
        (workdir / "tmp").mkdir(parents=True, exist_ok=True)
        conf = workdir / "nginx.conf"
        user = "user root;\n" if os.geteuid() == 0 else ""
        conf.write_text(user + _NGINX_CONF.format(dir=workdir, port=self.port, root=root))
        self.access_log = workdir / "access.log"
        stderr = workdir / "stderr.log"
        with stderr.open("wb") as sink:
            self.process = subprocess.Popen([binary, "-p", str(workdir), "-c", str(conf)], stderr=sink)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                break
            except OSError:
                if self.process.poll() is not None:
                    raise RuntimeError(f"nginx exited: {stderr.read_text()}") from None
                time.sleep(0.05)
        self.base = f"http://127.0.0.1:{self.port}"

    def url(self, name: str) -> str:
        return f"{self.base}/{name}"

    def requests(self) -> list[Request]:
        rows = []
        for line in self.access_log.read_text().splitlines():
            uri, rng, status, sent = line.split("|")
            rows.append(Request(uri, None if rng == "-" else rng, int(status), int(sent)))
        return rows

    def clear_log(self) -> None:
        self.access_log.write_text("")  # nginx appends with O_APPEND, so truncation is safe

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)
