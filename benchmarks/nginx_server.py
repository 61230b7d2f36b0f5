"""A throw-away nginx on 127.0.0.1 serving one folder, and per-run accounting from its access log.

nginx is the fastest loopback HTTP server available here (sendfile), so it is the server ceiling
(the tests use the same recipe: tests/servers.py). It runs in the foreground (``daemon off``) as our child,
with every path it writes (pid, logs, temp folders) inside its own prefix folder: nothing system-wide is touched.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"

# One line per request: status, the Range header ("-" when none) and the body bytes sent.
LOG_FORMAT = "$status $http_range $body_bytes_sent"

CONF = """\
{user}
daemon off;
worker_processes auto;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    log_format bench '{log_format}';
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


@dataclass(frozen=True)
class Traffic:
    """What the server saw during one run."""

    requests: int
    bytes: int
    statuses: tuple[str, ...]
    ranges: tuple[str, ...]


class Nginx:
    def __init__(self, root: Path, prefix: Path, port: int, process: subprocess.Popen[bytes]) -> None:
        self.root = root
        self.prefix = prefix
        self.port = port
        self.process = process
        self.access_log = prefix / "access.log"

    def url(self, path: Path) -> str:
        return f"http://127.0.0.1:{self.port}/{path.relative_to(self.root).as_posix()}"

    def log_offset(self) -> int:
        return self.access_log.stat().st_size if self.access_log.exists() else 0

    def traffic_since(self, offset: int, settle_s: float = 0.05, max_wait_s: float = 2.0) -> Traffic:
        """Requests logged after ``offset``.

        nginx writes a line once a response is fully handed to the kernel, which can be a moment after
        the client already exited; wait until the log stops growing for ``settle_s``.
        """
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
            lines = f.read().decode().splitlines()
        rows = [line.split(" ") for line in lines if line.strip()]
        return Traffic(
            requests=len(rows),
            bytes=sum(int(r[-1]) for r in rows),
            statuses=tuple(r[0] for r in rows),
            ranges=tuple(" ".join(r[1:-1]) for r in rows),
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serve(root: Path, prefix: Path) -> Iterator[Nginx]:
    """nginx serving ``root`` on a free loopback port; stopped (and waited for) on exit, errors included."""
    if prefix.exists():
        shutil.rmtree(prefix)  # fresh logs for every invocation
    (prefix / "tmp").mkdir(parents=True)
    last_error = ""
    for _ in range(5):  # the free port can be taken between probing and binding: retry
        port = free_port()
        conf = prefix / "nginx.conf"
        conf.write_text(
            CONF.format(
                # As root, workers would otherwise drop to "nobody"; root keeps them able to read any path.
                user="user root;" if os.geteuid() == 0 else "",
                prefix=prefix,
                port=port,
                root=root,
                log_format=LOG_FORMAT,
            )
        )
        process = subprocess.Popen(
            [NGINX, "-p", str(prefix), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        server = Nginx(root, prefix, port, process)
        try:
            if _wait_ready(server):
                break
            last_error = _stop(process)
        except BaseException:
            _stop(process)
            raise
    else:
        raise RuntimeError(f"nginx did not start: {last_error}\n{_tail(prefix / 'error.log')}")
    try:
        yield server
    finally:
        _stop(process)


def _wait_ready(server: Nginx, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/", timeout=1):
                return True
        except urllib.error.HTTPError:
            return True  # 403/404 for the folder index still means it is serving
        except OSError:
            time.sleep(0.05)
    return False


def _stop(process: subprocess.Popen[bytes]) -> str:
    """Graceful stop (SIGQUIT lets workers finish), then kill; returns what nginx printed to stderr."""
    if process.poll() is None:
        process.send_signal(3)  # SIGQUIT: graceful shutdown
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.stderr.read().decode(errors="replace") if process.stderr else ""


def _tail(path: Path, n: int = 20) -> str:
    return "\n".join(path.read_text().splitlines()[-n:]) if path.exists() else ""
