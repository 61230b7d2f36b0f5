"""The servers the benchmarks start, each on 127.0.0.1 on a free port, stopped on exit (errors included).

- ``nginx``: a private nginx (sendfile) serving one folder, the fastest loopback HTTP server here, with
  per-run accounting from its access log (requests, bytes, Range headers);
- ``aiohttp_group``: N aiohttp processes sharing one port (SO_REUSEPORT, ``FileResponse`` = sendfile + Range),
  for a machine with more cores than one nginx worker uses well;
- ``localstack``, ``s3rver``, ``gcs``, ``hub``, ``azurite``: the object stores of tests/ (``S3Server``,
  ``GcsEmulator``, ``HubServer``, ``Azurite``), started as the tests start them.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import REPO
from harness.process import Run, run_process

sys.path.insert(1, str(REPO / "tests"))  # the real-server helpers the tests use

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
S3RVER_VERSION = "3.7.1"

NGINX_CONF = """\
{user}
daemon off;
worker_processes auto;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    log_format bench '$status $http_range $body_bytes_sent';
    access_log {prefix}/access.log bench;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    default_type application/octet-stream;
    # Debian's compiled-in temp paths live under /var/lib/nginx: keep ours private.
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location / {{ }}
    }}
}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Traffic:
    """What nginx logged during one run."""

    requests: int
    bytes: int
    statuses: tuple[str, ...]
    ranges: tuple[str, ...]


class Nginx:
    def __init__(self, root: Path, prefix: Path, port: int, process: subprocess.Popen[bytes]) -> None:
        self.root, self.prefix, self.port, self.process = root, prefix, port, process
        self.access_log = prefix / "access.log"

    def url(self, path: Path) -> str:
        return f"http://127.0.0.1:{self.port}/{path.relative_to(self.root).as_posix()}"

    def log_offset(self) -> int:
        return self.access_log.stat().st_size if self.access_log.exists() else 0

    def traffic_since(self, offset: int, settle_s: float = 0.05, max_wait_s: float = 2.0) -> Traffic:
        """Requests logged after ``offset``. nginx writes a line once a response is handed to the kernel, which
        can be a moment after the client exited: wait until the log stops growing for ``settle_s``."""
        deadline = time.monotonic() + max_wait_s
        size = self.log_offset()
        while time.monotonic() < deadline:
            time.sleep(settle_s)
            now = self.log_offset()
            if now == size:
                break
            size = now
        with open(self.access_log, "rb") as f:
            f.seek(offset)
            rows = [line.split(" ") for line in f.read().decode().splitlines() if line.strip()]
        return Traffic(
            requests=len(rows),
            bytes=sum(int(r[-1]) for r in rows),
            statuses=tuple(r[0] for r in rows),
            ranges=tuple(" ".join(r[1:-1]) for r in rows),
        )

    def run(self, argv: Sequence[str], env: Mapping[str, str], cwd: str | os.PathLike[str]) -> Run:
        """``process.run_process`` with the traffic nginx logged during the run."""
        offset = self.log_offset()
        run = run_process(argv, env, cwd)
        run.traffic = self.traffic_since(offset)
        return run


@contextlib.contextmanager
def nginx(root: Path, prefix: Path) -> Iterator[Nginx]:
    """nginx serving ``root``, its config, pid and logs in ``prefix`` (emptied first)."""
    shutil.rmtree(prefix, ignore_errors=True)
    (prefix / "tmp").mkdir(parents=True)
    last_error = ""
    for _ in range(5):  # the free port can be taken between probing and binding: retry
        port = free_port()
        conf = prefix / "nginx.conf"
        # As root, workers would otherwise drop to "nobody"; root keeps them able to read any path.
        user = "user root;" if os.geteuid() == 0 else ""
        conf.write_text(NGINX_CONF.format(user=user, prefix=prefix, port=port, root=root))
        process = subprocess.Popen(
            [NGINX, "-p", str(prefix), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        try:
            if _nginx_ready(port, process):
                break
            last_error = _stop_nginx(process)
        except BaseException:
            _stop_nginx(process)
            raise
    else:
        log = prefix / "error.log"
        tail = "\n".join(log.read_text().splitlines()[-20:]) if log.exists() else ""
        raise RuntimeError(f"nginx did not start: {last_error}\n{tail}")
    try:
        yield Nginx(root, prefix, port, process)
    finally:
        _stop_nginx(process)


def _nginx_ready(port: int, process: subprocess.Popen[bytes], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1):
                return True
        except urllib.error.HTTPError:
            return True  # 403/404 for the folder index still means it is serving
        except OSError:
            time.sleep(0.05)
    return False


def _stop_nginx(process: subprocess.Popen[bytes]) -> str:
    """Graceful stop (SIGQUIT lets workers finish), then kill; returns what nginx printed to stderr."""
    if process.poll() is None:
        process.send_signal(signal.SIGQUIT)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.stderr.read().decode(errors="replace") if process.stderr else ""


# An aiohttp server process; argv: ROOT PORT. It dies with the benchmark even if that is killed hard.
SERVE = f"""
import asyncio, contextlib, ctypes, signal, sys
from pathlib import Path
from aiohttp import web
with contextlib.suppress(OSError):
    ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
folder, port = Path(sys.argv[1]), int(sys.argv[2])
async def handle(request):
    path = folder / request.match_info["name"]
    if not path.is_file():
        raise web.HTTPNotFound()
    return web.FileResponse(path, chunk_size={1 << 20})
async def main():
    app = web.Application()
    app.router.add_get("/{{name:.+}}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, reuse_port=True, backlog=1024).start()
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


class AiohttpGroup:
    def __init__(self, root: Path, port: int, processes: list[subprocess.Popen[str]]) -> None:
        self.root, self.port, self.processes = root, port, processes

    def url(self, path: Path) -> str:
        return f"http://127.0.0.1:{self.port}/{path.relative_to(self.root).as_posix()}"

    def stop(self) -> None:
        for p in self.processes:
            if p.poll() is None:
                p.terminate()
        for p in self.processes:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@contextlib.contextmanager
def aiohttp_group(root: Path, count: int, env: Mapping[str, str]) -> Iterator[AiohttpGroup]:
    """``count`` aiohttp processes serving ``root`` on one loopback port (SO_REUSEPORT)."""
    for attempt in range(3):
        port = free_port()
        group = AiohttpGroup(root, port, [])
        for _ in range(count):
            group.processes.append(
                subprocess.Popen(
                    [sys.executable, "-c", SERVE, str(root), str(port)],
                    stdout=subprocess.PIPE,
                    text=True,
                    env=dict(env),
                )
            )
        deadline = time.monotonic() + 30
        if all(_said_ready(p, deadline) for p in group.processes):
            break
        group.stop()
        print(f"server start failed (attempt {attempt + 1}), retrying on another port", flush=True)
    else:
        raise RuntimeError("could not start the aiohttp servers")
    try:
        yield group
    finally:
        group.stop()


def _said_ready(p: subprocess.Popen[str], deadline: float) -> bool:
    assert p.stdout is not None
    ready, _, _ = select.select([p.stdout], [], [], max(0.0, deadline - time.monotonic()))
    return bool(ready) and p.stdout.readline().strip() == "ready"


def localstack(bucket_prefix: str = "stream-st-bench") -> Any:
    """Our own LocalStack (never an external endpoint): a tests/s3_server.py ``S3Server``, started by ``with``."""
    import s3_server

    os.environ.pop(s3_server.ENDPOINT_ENV, None)
    ok, why = s3_server.localstack_available()
    if not ok:
        raise RuntimeError(f"LocalStack not available: {why}")
    return _s3_client_side(s3_server.S3Server(bucket_prefix=bucket_prefix), "test")


def _s3_client_side(server: Any, key: str) -> Any:
    server.key = server.secret = key
    server.token = None
    server.region = "us-east-1"
    server.addressing_style = "path"
    return server


def ensure_s3rver(out: Path) -> str:
    """The s3rver script, installed with npm into OUT/s3rver (git-ignored) on first use."""
    prefix = out / "s3rver"
    exe = prefix / "node_modules" / ".bin" / "s3rver"
    if exe.exists():
        return str(exe)
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is not installed (apt-get install nodejs npm)")
    prefix.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [npm, "install", "--no-audit", "--no-fund", "--prefix", str(prefix), f"s3rver@{S3RVER_VERSION}"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0 or not exe.exists():
        raise RuntimeError(f"npm install s3rver@{S3RVER_VERSION} failed ({done.returncode}): {done.stderr[-2000:]}")
    return str(exe)


@contextlib.contextmanager
def s3rver(out: Path, bucket_prefix: str = "stream-st-bench") -> Iterator[Any]:
    """npm's s3rver (on disk, under ``out``) as an ``S3Server``: the same client helpers (storage_options,
    upload, presign), its own life cycle."""
    from s3_server import S3Server

    exe = ensure_s3rver(out)
    data = Path(tempfile.mkdtemp(prefix="s3rver.", dir=out))
    log_path = data / "s3rver.log"
    server = _s3_client_side(S3Server(bucket_prefix=bucket_prefix), "S3RVER")
    port = free_port()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [
                exe,
                "-d",
                str(data / "data"),
                "-a",
                "127.0.0.1",
                "-p",
                str(port),
                "--silent",
                "--allow-mismatched-signatures",
                "--no-vhost-buckets",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"s3rver exited with {process.returncode}: {log_path.read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"s3rver did not listen on port {port} within 30 s") from None
                time.sleep(0.1)
        server.endpoint_url = f"http://127.0.0.1:{port}"
        yield server
    finally:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)  # its own session: only what we started
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
        shutil.rmtree(data, ignore_errors=True)


def gcs() -> Any:
    """gcp-storage-emulator (in memory): a tests/gcs_server.py ``GcsEmulator``, started by ``with``."""
    from gcs_server import ENDPOINT_ENV, GcsEmulator, find_emulator

    os.environ.pop(ENDPOINT_ENV, None)
    if find_emulator() is None:
        raise RuntimeError("gcp-storage-emulator is not installed (pip install gcp-storage-emulator)")
    return GcsEmulator()


def hub(root: Path) -> Any:
    """The Hub-compatible server of tests/hub_server.py (in this process, on its own thread), LFS files
    redirected to its CDN as the real Hub does; repositories under ``root``; stopped by ``with``."""
    from hub_server import HubServer

    return HubServer(root, redirect="lfs")


def azurite() -> Any:
    """Azurite's Blob service (plain http, on disk): a tests/azure_server.py ``Azurite``, started by ``with``."""
    import azure_server

    return azure_server.Azurite()


def azurite_version() -> str:
    package = REPO / "azurite" / "node_modules" / "azurite" / "package.json"
    return str(json.loads(package.read_text()).get("version")) if package.exists() else "?"
