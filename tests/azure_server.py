"""A real Azure Blob endpoint for the tests: Azurite, started from ``azurite/`` on 127.0.0.1 on a free port.

A helper module only: the fixtures that use it live in conftest.py. Typical use::

    ok, why = azurite_available()
    with Azurite() as azure:                       # plain http, account key in a connection string
        azure.make_container("stream-st-test")
        azure.upload("stream-st-test", "checkpoints/model.safetensors", data)
        stream_st.load_file("az://stream-st-test/checkpoints/model.safetensors",
                            storage_options=azure.storage_options)
    with Azurite(https=True, certs=folder) as azure:   # https with a self-signed certificate, OAuth on
        azure.account_host                         # for storage_options account_host (adlfs: https only)
        azure.ca_file                              # the certificate to trust (SSL_CERT_FILE)

The account is Azurite's development account ``devstoreaccount1``, whose key Microsoft publishes.

What Azurite 3.37.0 does, checked against it: ``Range`` gives 206 with ``Content-Range`` and the blob's
stored MD5 as ``x-ms-blob-content-md5``; ``If-Match`` with another ETag gives 412 ``ConditionNotMet``; a
missing blob or container gives 404; a SAS or SharedKey signature made with another key gives 403
``AuthorizationFailure``. With ``--oauth basic`` (https only) a bearer token must be a JWT whose audience is
the storage service and whose issuer is Entra ID's, not expired; its signature is not checked.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from servers import free_port

REPO = Path(__file__).resolve().parent.parent
AZURITE_DIR = REPO / "azurite"
INSTALL_SH = AZURITE_DIR / "install.sh"
START_SH = AZURITE_DIR / "start.sh"
STOP_SH = AZURITE_DIR / "stop.sh"
EXE = AZURITE_DIR / "node_modules" / ".bin" / "azurite-blob"

ACCOUNT = "devstoreaccount1"
# Azurite's development account key: public, the same in every Azurite (Microsoft's documentation).
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
# The REST version the tests' own client speaks (azure-storage-blob's default is newer than Azurite knows).
API_VERSION = "2025-01-05"

INSTALL_TIMEOUT_S = 600.0
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0


def azurite_available() -> tuple[bool, str]:
    """Whether Azurite can run here, and why not: cheap, installs nothing."""
    try:
        import azure.storage.blob  # noqa: F401
    except ImportError:
        return False, "azure-storage-blob is not installed in the test environment (pip install 'stream_st[test]')"
    if shutil.which("bash") is None or shutil.which("setsid") is None:
        return False, "bash and setsid (util-linux) are needed to start Azurite"
    if EXE.exists():
        return True, f"Azurite installed in {EXE.parent.parent}"
    if shutil.which("npm") is None or shutil.which("node") is None:
        return False, "Azurite is not installed and node/npm are missing (bash scripts/setup.sh installs them)"
    return True, "Azurite will be installed with npm by azurite/install.sh"


def write_self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost and its key (PEM), made with ``cryptography``."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "azurite-cert.pem", folder / "azurite-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


class Azurite:
    """One Azurite Blob service for a test session; ``start()`` then ``stop()`` (or a context manager)."""

    def __init__(self, *, https: bool = False, certs: Path | None = None) -> None:
        self.https = https
        self.certs = certs  # where the self-signed certificate goes (https only)
        self.ca_file: Path | None = None
        self.port: int | None = None
        self.run_dir: Path | None = None
        self._service: Any = None

    # -- life cycle ----------------------------------------------------------------------------------------

    def start(self) -> Azurite:
        ok, why = azurite_available()
        if not ok:
            raise RuntimeError(f"cannot start Azurite: {why}")
        install = subprocess.run(["bash", str(INSTALL_SH)], capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
        if install.returncode != 0:
            raise RuntimeError(f"azurite/install.sh failed ({install.returncode}):\n{_tail(install)}")
        env = dict(os.environ)
        if self.https:
            folder = self.certs or Path(tempfile.mkdtemp(prefix="stream-st-azurite-certs."))
            self.ca_file, key = write_self_signed(folder)
            env.update(AZURITE_CERT=str(self.ca_file), AZURITE_KEY=str(key))
        last: subprocess.CompletedProcess[str] | None = None
        for _ in range(3):  # another process may take the free port before Azurite binds it
            port = free_port()
            run_dir = Path(tempfile.mkdtemp(prefix=f"stream-st-azurite.{port}."))
            env["AZURITE_RUN_DIR"] = str(run_dir)
            try:
                last = subprocess.run(
                    ["bash", str(START_SH), str(port)], capture_output=True, text=True, env=env, timeout=START_TIMEOUT_S
                )
            except subprocess.TimeoutExpired:
                subprocess.run(["bash", str(STOP_SH), str(run_dir)], capture_output=True, timeout=STOP_TIMEOUT_S)
                shutil.rmtree(run_dir, ignore_errors=True)
                raise
            if last.returncode == 0:
                self.port, self.run_dir = port, run_dir
                atexit.register(self.stop)
                return self
            shutil.rmtree(run_dir, ignore_errors=True)
            if "already in use" not in last.stderr:
                break
        assert last is not None
        raise RuntimeError(f"azurite/start.sh failed ({last.returncode}):\n{_tail(last)}")

    def stop(self) -> None:
        """Stop Azurite (its whole process group) and remove its run directory."""
        self._service = None
        run_dir, self.run_dir = self.run_dir, None
        if run_dir is not None:
            pid_file = run_dir / "pid"
            pid = int(pid_file.read_text()) if pid_file.exists() else None
            subprocess.run(
                ["bash", str(STOP_SH), str(run_dir)],
                capture_output=True,
                timeout=STOP_TIMEOUT_S,
                env=dict(os.environ, AZURITE_STOP_TIMEOUT="5"),
            )
            if pid is not None:  # whatever stop.sh made of it, nothing of this server may outlive the tests
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
            shutil.rmtree(run_dir, ignore_errors=True)
        atexit.unregister(self.stop)

    def __enter__(self) -> Azurite:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what clients are told -----------------------------------------------------------------------------

    @property
    def scheme(self) -> str:
        return "https" if self.https else "http"

    @property
    def account_host(self) -> str:
        """adlfs's ``account_host``: the account URL after ``https://`` (Azurite puts the account in the path)."""
        return f"127.0.0.1:{self._port()}/{ACCOUNT}"

    @property
    def blob_endpoint(self) -> str:
        return f"{self.scheme}://{self.account_host}"

    @property
    def connection_string(self) -> str:
        return (
            f"DefaultEndpointsProtocol={self.scheme};AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
            f"BlobEndpoint={self.blob_endpoint};"
        )

    @property
    def storage_options(self) -> dict[str, Any]:
        """adlfs's storage_options for this server (a connection string: adlfs reaches http only that way)."""
        return {"connection_string": self.connection_string}

    def service(self) -> Any:
        """An azure-storage-blob BlobServiceClient for this server (cached)."""
        if self._service is None:
            from azure.storage.blob import BlobServiceClient

            extra = {"connection_verify": str(self.ca_file)} if self.ca_file else {}
            self._service = BlobServiceClient.from_connection_string(
                self.connection_string, api_version=API_VERSION, **extra
            )
        return self._service

    def make_container(self, name: str) -> None:
        from azure.core.exceptions import ResourceExistsError

        with contextlib.suppress(ResourceExistsError):
            self.service().create_container(name)

    def upload(self, container: str, blob: str, data: bytes, *, blocks: bool = False) -> dict[str, Any]:
        """Upload ``data`` (overwriting) with one Put Blob, for which the service stores the blob's MD5, or
        with ``blocks`` as Put Block + Put Block List, for which it stores none (as for large uploads).
        Returns the service's answer (``etag``, ...)."""
        client = self.service().get_blob_client(container, blob)
        if not blocks:
            answer: dict[str, Any] = client.upload_blob(data, overwrite=True)
            return answer
        from azure.storage.blob import BlobBlock

        half = len(data) // 2
        ids = []
        for number, piece in enumerate((data[:half], data[half:])):
            block_id = f"block-{number:04d}"
            client.stage_block(block_id, piece)
            ids.append(BlobBlock(block_id))
        answer = client.commit_block_list(ids)
        return answer

    def _port(self) -> int:
        if self.port is None:
            raise RuntimeError("Azurite.start() has not been called")
        return self.port


def _tail(result: subprocess.CompletedProcess[str], lines: int = 60) -> str:
    text = (result.stdout or "") + (result.stderr or "")
    return "\n".join(text.splitlines()[-lines:])
