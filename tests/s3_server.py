"""A real S3 endpoint for the tests: LocalStack started from ``localstack/`` on 127.0.0.1, or an endpoint
already running elsewhere (``STREAM_ST_TEST_S3_ENDPOINT``: LocalStack, MinIO, AWS).

A helper module only: the fixtures that use it live in conftest.py. Typical use::

    ok, why = localstack_available()
    server = S3Server()
    server.start()
    server.make_bucket(server.bucket)
    server.upload(server.bucket, "model.safetensors", path)
    stream_st.load(server.url(server.bucket, "model.safetensors"), storage_options=server.storage_options)
    server.stop()

Bucket layout (also in localstack/README.md): ``<prefix>`` (plain) and ``<prefix>-versioned`` (versioning on),
``prefix`` being ``STREAM_ST_TEST_S3_BUCKET_PREFIX`` or ``stream-st-test``; objects under ``checkpoints/``.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from servers import free_port

REPO = Path(__file__).resolve().parent.parent
LOCALSTACK_DIR = REPO / "localstack"
INSTALL_SH = LOCALSTACK_DIR / "install.sh"
START_SH = LOCALSTACK_DIR / "start.sh"
STOP_SH = LOCALSTACK_DIR / "stop.sh"
LOCALSTACK_VENV_PYTHON = LOCALSTACK_DIR / ".venv" / "bin" / "python"

ENDPOINT_ENV = "STREAM_ST_TEST_S3_ENDPOINT"
BUCKET_PREFIX_ENV = "STREAM_ST_TEST_S3_BUCKET_PREFIX"
ADDRESSING_STYLE_ENV = "STREAM_ST_TEST_S3_ADDRESSING_STYLE"
DEFAULT_BUCKET_PREFIX = "stream-st-test"
CHECKPOINT_PREFIX = "checkpoints/"

INSTALL_TIMEOUT_S = 900.0
START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 30.0


def _python_at_least_312(python: str) -> bool:
    try:
        result = subprocess.run(
            [python, "-c", "import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)"],
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return result.returncode == 0


def _find_localstack_python() -> str | None:
    """The interpreter install.sh would pick (same order): LOCALSTACK_PYTHON, python3.13/3.12, pyenv's."""
    explicit = os.environ.get("LOCALSTACK_PYTHON")
    if explicit:
        return explicit if _python_at_least_312(explicit) else None
    candidates = [shutil.which(name) for name in ("python3.13", "python3.12")]
    pyenv_root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    for root in dict.fromkeys(["/root/.pyenv", pyenv_root]):
        for minor in ("3.13", "3.12"):
            candidates += sorted(glob.glob(f"{root}/versions/{minor}*/bin/python3"))
    candidates.append(shutil.which("python3"))
    for candidate in candidates:
        if candidate and _python_at_least_312(candidate):
            return candidate
    return None


def localstack_available() -> tuple[bool, str]:
    """Whether an S3 endpoint can be had here, and why not (or which one) — cheap, installs nothing.

    With ``STREAM_ST_TEST_S3_ENDPOINT`` set, only boto3 is needed. Otherwise LocalStack's host mode needs
    bash, the ``localstack/`` scripts and either its installed venv or a Python >= 3.12 to create it
    (the install itself also needs PyPI; that is found out by ``S3Server.start()``)."""
    try:
        import boto3  # noqa: F401
    except ImportError:
        return False, "boto3 is not installed in the test environment (pip install boto3 s3fs)"
    endpoint = os.environ.get(ENDPOINT_ENV)
    if endpoint:
        return True, f"using the S3 endpoint {endpoint} from {ENDPOINT_ENV}"
    if sys.platform == "win32":
        return False, "LocalStack host mode is started by bash scripts; set STREAM_ST_TEST_S3_ENDPOINT instead"
    if shutil.which("bash") is None or shutil.which("setsid") is None:
        return False, "bash and setsid (util-linux) are needed to start LocalStack"
    for script in (INSTALL_SH, START_SH, STOP_SH):
        if not script.is_file():
            return False, f"{script} is missing"
    if LOCALSTACK_VENV_PYTHON.exists():
        return True, f"LocalStack installed in {LOCALSTACK_VENV_PYTHON.parent.parent}"
    python = _find_localstack_python()
    if python is None:
        return (
            False,
            "LocalStack needs Python >= 3.12 (none found; set LOCALSTACK_PYTHON or STREAM_ST_TEST_S3_ENDPOINT)",
        )
    return True, f"LocalStack will be installed with {python} by localstack/install.sh"


class S3Server:
    """An S3 endpoint for one test session; ``start()`` then ``stop()`` (or use it as a context manager)."""

    def __init__(self, bucket_prefix: str | None = None) -> None:
        self.bucket_prefix = bucket_prefix or os.environ.get(BUCKET_PREFIX_ENV) or DEFAULT_BUCKET_PREFIX
        self.bucket = self.bucket_prefix  # the plain bucket of the layout
        self.versioned_bucket = f"{self.bucket_prefix}-versioned"
        self.key = os.environ.get("AWS_ACCESS_KEY_ID") or "test"
        self.secret = os.environ.get("AWS_SECRET_ACCESS_KEY") or "test"
        self.token = os.environ.get("AWS_SESSION_TOKEN") or None
        self.region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        self.addressing_style = os.environ.get(ADDRESSING_STYLE_ENV) or "path"
        self.endpoint_url = ""
        self.external = False  # True when the endpoint came from STREAM_ST_TEST_S3_ENDPOINT
        self.port: int | None = None
        self.run_dir: Path | None = None
        self._client: Any = None
        self._lock = threading.Lock()

    # -- life cycle ----------------------------------------------------------------------------------------

    def start(self) -> S3Server:
        if self.endpoint_url:
            return self
        endpoint = os.environ.get(ENDPOINT_ENV)
        if endpoint:
            self._use_external(endpoint.rstrip("/"))
        else:
            self._start_localstack()
        atexit.register(self.stop)
        return self

    def stop(self) -> None:
        """Stop LocalStack (the whole process group) and remove its run directory; no-op for an external one."""
        with self._lock:
            self._client = None
            run_dir, self.run_dir = self.run_dir, None
        if run_dir is not None:
            pid_file = run_dir / "pid"
            pid = int(pid_file.read_text()) if pid_file.exists() else None
            # A test server holds nothing worth a long graceful shutdown: 3 s, then SIGKILL.
            env = dict(os.environ, LOCALSTACK_STOP_TIMEOUT="3")
            subprocess.run(
                ["bash", str(STOP_SH), str(run_dir)],
                capture_output=True,
                text=True,
                timeout=STOP_TIMEOUT_S + 30,
                env=env,
            )
            if pid is not None:
                _kill_group(pid)  # whatever stop.sh made of it, nothing of this server may outlive the tests
            shutil.rmtree(run_dir, ignore_errors=True)
        atexit.unregister(self.stop)

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _use_external(self, endpoint: str) -> None:
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise RuntimeError(f"{ENDPOINT_ENV}={endpoint!r} is not an http(s) URL")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            socket.create_connection((parts.hostname, port), timeout=5).close()
        except OSError as error:
            raise RuntimeError(f"S3 endpoint {endpoint} from {ENDPOINT_ENV} is not reachable: {error}") from error
        self.endpoint_url = endpoint
        self.external = True

    def _start_localstack(self) -> None:
        ok, why = localstack_available()
        if not ok:
            raise RuntimeError(f"cannot start LocalStack: {why}")
        install = subprocess.run(["bash", str(INSTALL_SH)], capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
        if install.returncode != 0:
            raise RuntimeError(f"localstack/install.sh failed ({install.returncode}):\n{_tail(install)}")
        last: subprocess.CompletedProcess[str] | None = None
        for _ in range(3):  # another process may take the free port before LocalStack binds it
            port = free_port()
            run_dir = Path(tempfile.mkdtemp(prefix=f"stream-st-localstack.{port}."))
            env = dict(os.environ, LOCALSTACK_RUN_DIR=str(run_dir), LOCALSTACK_START_TIMEOUT="60")
            try:
                last = subprocess.run(
                    ["bash", str(START_SH), str(port)], capture_output=True, text=True, env=env, timeout=START_TIMEOUT_S
                )
            except subprocess.TimeoutExpired:
                subprocess.run(["bash", str(STOP_SH), str(run_dir)], capture_output=True, timeout=STOP_TIMEOUT_S + 30)
                shutil.rmtree(run_dir, ignore_errors=True)
                raise
            if last.returncode == 0:
                self.port, self.run_dir = port, run_dir
                self.endpoint_url = f"http://127.0.0.1:{port}"
                return
            shutil.rmtree(run_dir, ignore_errors=True)
            if "already in use" not in last.stderr:
                break
        assert last is not None
        raise RuntimeError(f"localstack/start.sh failed ({last.returncode}):\n{_tail(last)}")

    # -- clients -------------------------------------------------------------------------------------------

    @property
    def storage_options(self) -> dict[str, Any]:
        """Keyword arguments for ``s3fs.S3FileSystem`` (fsspec ``storage_options``)."""
        self._require_started()
        options: dict[str, Any] = {
            "key": self.key,
            "secret": self.secret,
            "client_kwargs": {"endpoint_url": self.endpoint_url, "region_name": self.region},
            "config_kwargs": {"s3": {"addressing_style": self.addressing_style}},
        }
        if self.token:
            options["token"] = self.token
        return options

    def boto3_client(self) -> Any:
        """A (cached, thread-safe) boto3 S3 client for this endpoint."""
        self._require_started()
        with self._lock:
            if self._client is None:
                import boto3
                from botocore.config import Config

                self._client = boto3.session.Session().client(
                    "s3",
                    endpoint_url=self.endpoint_url,
                    aws_access_key_id=self.key,
                    aws_secret_access_key=self.secret,
                    aws_session_token=self.token,
                    region_name=self.region,
                    config=Config(s3={"addressing_style": self.addressing_style}, retries={"max_attempts": 3}),
                )
            return self._client

    # -- helpers -------------------------------------------------------------------------------------------

    def url(self, bucket: str, key: str) -> str:
        return f"s3://{bucket}/{key}"

    def make_bucket(self, name: str, versioned: bool = False) -> str:
        """Create ``name`` if it is not there yet (idempotent) and switch versioning on if asked."""
        client = self.boto3_client()
        try:
            if self.region == "us-east-1":
                client.create_bucket(Bucket=name)
            else:
                client.create_bucket(Bucket=name, CreateBucketConfiguration={"LocationConstraint": self.region})
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        if versioned:
            client.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
        return name

    def make_layout(self) -> None:
        """The buckets of the layout: ``<prefix>`` and ``<prefix>-versioned``."""
        self.make_bucket(self.bucket)
        self.make_bucket(self.versioned_bucket, versioned=True)

    def upload(self, bucket: str, key: str, path_or_bytes: str | os.PathLike[str] | bytes) -> dict[str, Any]:
        """One PutObject (no multipart, so the ETag is the MD5 of the bytes). Returns ``ETag``, ``VersionId``
        (None on an unversioned bucket) and ``size``."""
        client = self.boto3_client()
        if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
            data = bytes(path_or_bytes)
            response = client.put_object(Bucket=bucket, Key=key, Body=data)
            size = len(data)
        else:
            path = Path(path_or_bytes)
            size = path.stat().st_size
            with path.open("rb") as body:
                response = client.put_object(Bucket=bucket, Key=key, Body=body, ContentLength=size)
        return {"ETag": response["ETag"], "VersionId": response.get("VersionId"), "size": size}

    def presign(self, bucket: str, key: str, expires_s: int = 3600, version_id: str | None = None) -> str:
        """A presigned GET URL (it accepts a Range header)."""
        params = {"Bucket": bucket, "Key": key}
        if version_id is not None:
            params["VersionId"] = version_id
        url: str = self.boto3_client().generate_presigned_url("get_object", Params=params, ExpiresIn=expires_s)
        return url

    def _require_started(self) -> None:
        if not self.endpoint_url:
            raise RuntimeError("S3Server.start() has not been called")


def _kill_group(pid: int) -> None:
    """SIGKILL LocalStack's process group (start.sh made it a group leader) if any of it is still alive."""
    for kill in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            kill()


def _tail(result: subprocess.CompletedProcess[str], lines: int = 60) -> str:
    text = (result.stdout or "") + (result.stderr or "")
    return "\n".join(text.splitlines()[-lines:])
