"""A real GCS JSON-API server on 127.0.0.1 for the tests: ``gcp-storage-emulator`` run as a subprocess.

Plain helper, no pytest fixtures::

    emu = GcsEmulator()
    emu.start()                      # or set STREAM_ST_TEST_GCS_ENDPOINT to use one already running
    for k, v in emu.environ().items():
        monkeypatch.setenv(k, v)     # currently nothing: storage_options suffices (see its docstring)
    emu.make_bucket("b")
    emu.upload("b", "model.safetensors", data)
    fs = gcsfs.GCSFileSystem(**emu.storage_options)
    ...
    emu.stop()

What the emulator (gcp-storage-emulator 2026.7.19) does and does not do, checked against it:

* media download (``GET {endpoint}/download/storage/v1/b/B/o/O?alt=media``, ``/storage/v1/b/B/o/O?alt=media``
  and ``/B/O``): ``Range: bytes=S-E`` and ``bytes=S-`` give 206 with ``Content-Range: bytes S-E/TOTAL``; the
  end is clamped to the object. A suffix range (``bytes=-N``) or anything else is ignored: 200 with the whole
  object. A start past the end gives a 206 with an empty body and a malformed Content-Range, not 416.
* ``ifGenerationMatch`` (and the other precondition parameters) are ignored on media GET and metadata GET.
* No ``ETag`` header on downloads, and ``If-Match`` / ``If-None-Match`` are ignored. The object resource
  (``info()``) does carry ``generation``, ``metageneration``, ``md5Hash``, ``crc32c`` and ``etag`` (= md5Hash);
  ``x-goog-hash: crc32c=...,md5=...`` is sent on whole-object (non-Range) downloads only.
* ``generation=<wrong>`` on media GET is ignored too (the current bytes are served).
* Every upload of a name gets a new ``generation``. A missing object gives 404 with an empty body.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

ENDPOINT_ENV = "STREAM_ST_TEST_GCS_ENDPOINT"
_HERE = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_emulator() -> str | None:
    """The ``gcp-storage-emulator`` script: tests/.gcs-venv first, then next to this Python, then PATH."""
    for candidate in (
        _HERE / ".gcs-venv" / "bin" / "gcp-storage-emulator",
        Path(sys.executable).parent / "gcp-storage-emulator",
    ):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which("gcp-storage-emulator")


class GcsEmulator:
    """``gcp-storage-emulator start --host 127.0.0.1 --port PORT --in-memory`` on a free port.

    If ``STREAM_ST_TEST_GCS_ENDPOINT`` is set (``http://host:port``), that server is used and nothing is
    started or stopped.
    """

    def __init__(self, endpoint: str | None = None, startup_timeout: float = 30.0) -> None:
        self.endpoint: str = endpoint or os.environ.get(ENDPOINT_ENV, "")
        self.external = bool(self.endpoint)
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_path: Path | None = None

    # --- lifecycle -------------------------------------------------------------------------------------

    def start(self) -> GcsEmulator:
        if self.external:
            self.endpoint = self.endpoint.rstrip("/")
            self._wait_ready(None)
            return self
        exe = find_emulator()
        if exe is None:
            raise RuntimeError("gcp-storage-emulator not found (pip install gcp-storage-emulator)")
        port = _free_port()
        self.endpoint = f"http://127.0.0.1:{port}"

        fd, log = tempfile.mkstemp(prefix="gcs-emulator-", suffix=".log")
        self._log_path = Path(log)
        env = {k: v for k, v in os.environ.items() if k != "STORAGE_EMULATOR_HOST"}
        with os.fdopen(fd, "wb") as logf:
            self.proc = subprocess.Popen(
                [exe, "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory", "--quiet"],
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        atexit.register(self.stop)  # no orphaned emulator if the test process ends without stop()
        try:
            self._wait_ready(self.proc)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, proc: subprocess.Popen[bytes] | None) -> None:
        deadline = time.monotonic() + self.startup_timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"gcp-storage-emulator exited with {proc.returncode}: {self.log_text()}")
            try:
                with urllib.request.urlopen(self.endpoint + "/", timeout=2) as r:
                    if r.status == 200:
                        return
            except (OSError, urllib.error.URLError) as e:
                last = e
            time.sleep(0.05)
        raise RuntimeError(f"gcp-storage-emulator at {self.endpoint} not ready: {last}; {self.log_text()}")

    def stop(self) -> None:
        atexit.unregister(self.stop)
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)  # its own session: only what we started
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        if self._log_path is not None:
            self._log_path.unlink(missing_ok=True)
            self._log_path = None

    def __enter__(self) -> GcsEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_text(self) -> str:
        if self._log_path is None or not self._log_path.exists():
            return ""
        return self._log_path.read_text(errors="replace")[-4000:]

    # --- client configuration --------------------------------------------------------------------------

    @property
    def storage_options(self) -> dict[str, Any]:
        """gcsfs options for the emulator; no environment variables are needed with these.

        * ``token="anon"``: no credentials (otherwise google.auth.default() looks for ADC / the GCE metadata
          server).
        * ``endpoint_url``: all of gcsfs's JSON-API traffic goes here (STORAGE_EMULATOR_HOST is only the
          fallback when endpoint_url is not given).
        * ``retry_timeout=0``: gcsfs >= 2026.x makes ``gcsfs.GCSFileSystem`` (and fsspec's ``gs://``) the
          ExtendedGcsFileSystem unless GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false was set *before gcsfs was first
          imported*. That class asks the gRPC Storage Control API for the bucket layout before reads (at
          ``endpoint_url``'s host:port, which has no gRPC), retries for 60 s, and does not cache the failure, so
          every ``cat_file``/``open`` would take 60 s. ``retry_timeout`` bounds that retry: with 0 the lookup
          fails in ~1-2 ms and gcsfs falls back to the plain JSON API (logging "Could not determine bucket
          type" at WARNING each time). The plain GCSFileSystem accepts and ignores the option.
        """
        return {"token": "anon", "endpoint_url": self.endpoint, "retry_timeout": 0}

    def environ(self) -> dict[str, str]:
        """Environment variables the fixture should apply with monkeypatch: none are needed (empty dict).

        ``storage_options`` covers everything. Alternatives, for reference only:
        ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`` removes the gRPC lookup altogether but is read once, when
        gcsfs is first imported, so a monkeypatch applied after anything imported gcsfs has no effect;
        ``STORAGE_EMULATOR_HOST=<endpoint>`` would only matter for a GCSFileSystem built without
        ``endpoint_url`` (and that one would still need ``token="anon"``).
        """
        return {}

    # --- data helpers (plain JSON API over urllib; no gcsfs needed) -----------------------------------

    def _request(self, method: str, url: str, data: bytes | None = None, headers: dict[str, str] | None = None) -> Any:
        req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
        with urllib.request.urlopen(req, timeout=30) as r:
            body = r.read()
        if not body or not r.headers.get("Content-Type", "").startswith("application/json"):
            return None
        return json.loads(body)

    def make_bucket(self, name: str) -> dict[str, Any]:
        """Create bucket ``name`` (no error if it exists)."""
        try:
            return self._request(  # type: ignore[no-any-return]
                "POST",
                f"{self.endpoint}/storage/v1/b?project=test",
                json.dumps({"name": name}).encode(),
                {"Content-Type": "application/json"},
            )
        except urllib.error.HTTPError as e:
            if e.code == 409:
                return self._request("GET", f"{self.endpoint}/storage/v1/b/{urllib.parse.quote(name)}")  # type: ignore[no-any-return]
            raise

    def upload(
        self, bucket: str, name: str, data: bytes, content_type: str = "application/octet-stream"
    ) -> dict[str, Any]:
        """Upload ``data`` as ``bucket/name``; returns the object resource (generation, md5Hash, crc32c, ...)."""
        q = urllib.parse.urlencode({"uploadType": "media", "name": name})
        return self._request(  # type: ignore[no-any-return]
            "POST",
            f"{self.endpoint}/upload/storage/v1/b/{urllib.parse.quote(bucket)}/o?{q}",
            data,
            {"Content-Type": content_type},
        )

    def delete(self, bucket: str, name: str) -> None:
        self._request(
            "DELETE", f"{self.endpoint}/storage/v1/b/{urllib.parse.quote(bucket)}/o/{urllib.parse.quote(name, safe='')}"
        )

    def wipe(self) -> None:
        """Drop every bucket and object (the emulator's own ``/wipe``)."""
        self._request("GET", f"{self.endpoint}/wipe")

    def url(self, bucket: str, name: str) -> str:
        return f"gs://{bucket}/{name}"
