"""Fixtures: checkpoints written by safetensors, and real HTTP servers on 127.0.0.1.

``STREAM_ST_TEST_HTTP_URL`` points the HTTP tests at an already running server that serves the
checkpoint folder (``STREAM_ST_TEST_ROOT``) instead of starting the aiohttp one.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from checkpoints import all_dtypes_state, layered_state, tiny_state, write, write_sharded
from servers import Nginx, RangeServer


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_cuda = pytest.mark.skip(reason="no CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)


@pytest.fixture(scope="session")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of checkpoints, readable by nginx workers."""
    folder = tmp_path_factory.mktemp("checkpoints")
    folder.chmod(0o755)
    write(folder / "dtypes.safetensors", all_dtypes_state(), metadata={"format": "pt", "note": "all dtypes"})
    write(folder / "layered.safetensors", layered_state())
    write(folder / "tiny.safetensors", tiny_state(6000))  # header far longer than the 256 KiB prefix
    write(folder / "small.safetensors", {"x": torch.arange(6, dtype=torch.float32)})
    write_sharded(folder / "sharded", layered_state(layers=6), shards=3)
    return folder


@pytest.fixture(scope="session")
def _range_server(root: Path) -> Iterator[RangeServer]:
    server = RangeServer(root)
    yield server
    server.stop()


@pytest.fixture()
def http(_range_server: RangeServer) -> Iterator[RangeServer]:
    """The aiohttp range server with an empty request log and no quirks."""
    _range_server.reset()
    yield _range_server
    _range_server.reset()


@pytest.fixture(scope="session")
def _nginx(root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        if _require("nginx"):
            pytest.fail("nginx is required (STREAM_ST_REQUIRE_NGINX=1) but not installed")
        pytest.skip("nginx is not installed")
    server = Nginx(root, tmp_path_factory.mktemp("nginx"))
    yield server
    server.stop()


@pytest.fixture()
def nginx(_nginx: Nginx) -> Nginx:
    """nginx on 127.0.0.1 with an empty access log."""
    _nginx.clear_log()
    return _nginx


def _require(kind: str) -> bool:
    """Whether a missing server must fail the run (CI sets STREAM_ST_REQUIRE_<KIND>=1) instead of skipping."""
    return os.environ.get(f"STREAM_ST_REQUIRE_{kind.upper()}") == "1"


@pytest.fixture(scope="session")
def s3(root: Path) -> Iterator[object]:
    """LocalStack on 127.0.0.1 (or STREAM_ST_TEST_S3_ENDPOINT) with the test checkpoints uploaded."""
    from s3_server import S3Server, localstack_available

    available, reason = localstack_available()
    if not available:
        if _require("s3"):
            pytest.fail(f"S3 tests are required (STREAM_ST_REQUIRE_S3=1) but cannot run: {reason}")
        pytest.skip(f"no S3 endpoint: {reason}")
    server = S3Server().start()
    try:
        server.make_layout()
        for path in [*root.glob("*.safetensors"), *(root / "sharded").iterdir()]:
            server.upload(server.bucket, f"checkpoints/{path.relative_to(root)}", path)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def gcs(root: Path) -> Iterator[object]:
    """gcp-storage-emulator on 127.0.0.1 (or STREAM_ST_TEST_GCS_ENDPOINT) with the test checkpoints."""
    from gcs_server import ENDPOINT_ENV, GcsEmulator, find_emulator

    if not os.environ.get(ENDPOINT_ENV) and find_emulator() is None:
        if _require("gcs"):
            pytest.fail("GCS tests are required (STREAM_ST_REQUIRE_GCS=1) but gcp-storage-emulator is not installed")
        pytest.skip("gcp-storage-emulator is not installed")
    emulator = GcsEmulator().start()
    try:
        emulator.make_bucket("stream-st-test")
        for path in [*root.glob("*.safetensors"), *(root / "sharded").iterdir()]:
            emulator.upload("stream-st-test", f"checkpoints/{path.relative_to(root)}", path.read_bytes())
        yield emulator
    finally:
        emulator.stop()


def _azurite(root: Path, https: bool, certs: Path | None = None) -> object:
    from azure_server import Azurite, azurite_available

    available, reason = azurite_available()
    if not available:
        if _require("azure"):
            pytest.fail(f"Azure tests are required (STREAM_ST_REQUIRE_AZURE=1) but Azurite cannot run: {reason}")
        pytest.skip(f"no Azurite: {reason}")
    server = Azurite(https=https, certs=certs).start()
    try:
        server.make_container("stream-st-test")
        for path in [*root.glob("*.safetensors"), *(root / "sharded").iterdir()]:
            server.upload("stream-st-test", f"checkpoints/{path.relative_to(root)}", path.read_bytes())
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="session")
def azure(root: Path) -> Iterator[object]:
    """Azurite (plain http) on 127.0.0.1 with the test checkpoints in container ``stream-st-test``."""
    server = _azurite(root, https=False)
    yield server
    server.stop()  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def azure_https(root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """Azurite over https (self-signed certificate, bearer tokens accepted) with the test checkpoints."""
    server = _azurite(root, https=True, certs=tmp_path_factory.mktemp("azurite-certs"))
    yield server
    server.stop()  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def hub(root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A Hub-compatible endpoint (and its CDN) on 127.0.0.1 serving the test checkpoints as repos."""
    from hub_server import HubServer

    server = HubServer(tmp_path_factory.mktemp("hub"), redirect="lfs")
    try:
        server.commit("org/dtypes", {"model.safetensors": root / "dtypes.safetensors"})
        server.commit("org/layered", {"model.safetensors": root / "layered.safetensors"})
        server.commit("org/layered", {"small.safetensors": root / "small.safetensors"}, lfs=False)
        server.commit("org/sharded", {p.name: p for p in (root / "sharded").iterdir()})
        server.commit("org/data", {"weights/tiny.safetensors": root / "tiny.safetensors"}, repo_type="dataset")
        yield server
    finally:
        server.stop()
