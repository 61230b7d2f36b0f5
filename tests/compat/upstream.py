"""Fetch safetensors' own Python tests from the package registry, for the installed safetensors version.

The tests ship in safetensors' source distribution (``bindings/python/tests``). ``pip download --no-binary``
cannot fetch it offline-from-crates: pip prepares the sdist's metadata, which runs ``maturin``, which runs
``cargo metadata``, which needs crates.io. So the sdist is fetched from the registry's simple index (the one
pip is configured with, PEP 503), checked against the sha256 the index publishes, and only the tests folder is
extracted into a cache folder. Nothing of safetensors' code is kept in this repository.

``STREAM_ST_SAFETENSORS_SDIST=/path/to/safetensors-X.Y.Z.tar.gz`` uses a file already at hand instead.
"""

from __future__ import annotations

import hashlib
import html.parser
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import urllib.parse
import urllib.request
from pathlib import Path

SDIST_ENV = "STREAM_ST_SAFETENSORS_SDIST"
DEFAULT_INDEX = "https://pypi.org/simple"


class UnavailableError(Exception):
    """The suite cannot be fetched here (no registry reachable, no sdist for this version)."""


def installed_version() -> str:
    return importlib.metadata.version("safetensors")


def index_url() -> str:
    """The index pip uses: PIP_INDEX_URL, else pip's configured ``global.index-url``, else PyPI."""
    if os.environ.get("PIP_INDEX_URL"):
        return os.environ["PIP_INDEX_URL"].rstrip("/")
    try:
        configured = subprocess.run(
            [sys.executable, "-m", "pip", "config", "get", "global.index-url"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return DEFAULT_INDEX
    value = configured.stdout.strip()
    return value.rstrip("/") if configured.returncode == 0 and value.startswith("http") else DEFAULT_INDEX


class _Links(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self.hrefs.extend(value for key, value in attrs if key == "href" and value)


def _sdist_link(version: str) -> tuple[str, str]:
    """(download URL, sha256) of ``safetensors-<version>.tar.gz`` on the simple index."""
    page_url = f"{index_url()}/safetensors/"
    try:
        with urllib.request.urlopen(page_url, timeout=30) as response:
            page = response.read().decode()
    except OSError as error:
        raise UnavailableError(f"cannot reach the package index {page_url}: {error}") from error
    parser = _Links()
    parser.feed(page)
    wanted = f"safetensors-{version}.tar.gz"
    for href in parser.hrefs:
        url, _, fragment = urllib.parse.urljoin(page_url, href).partition("#")
        if urllib.parse.unquote(url.rsplit("/", 1)[-1]) == wanted and fragment.startswith("sha256="):
            return url, fragment.removeprefix("sha256=")
    raise UnavailableError(f"{page_url} lists no {wanted} with a sha256")


def _download(version: str, into: Path) -> Path:
    url, sha256 = _sdist_link(version)
    target = into / f"safetensors-{version}.tar.gz"
    partial = target.with_suffix(".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, partial.open("wb") as out:
            shutil.copyfileobj(response, out)
    except OSError as error:
        raise UnavailableError(f"cannot download {url}: {error}") from error
    digest = hashlib.sha256(partial.read_bytes()).hexdigest()
    if digest != sha256:
        partial.unlink()
        raise AssertionError(f"{url}: sha256 {digest}, the index says {sha256}")
    partial.rename(target)
    return target


def suite(cache: Path) -> Path:
    """The folder of safetensors' Python tests for the installed version, fetched into ``cache`` once."""
    version = installed_version()
    tests = cache / f"safetensors-{version}" / "tests"
    if (tests / ".complete").exists():
        return tests
    cache.mkdir(parents=True, exist_ok=True)
    sdist = Path(os.environ[SDIST_ENV]) if os.environ.get(SDIST_ENV) else _download(version, cache)
    prefix = f"safetensors-{version}/bindings/python/tests/"
    shutil.rmtree(tests, ignore_errors=True)
    tests.mkdir(parents=True)
    with tarfile.open(sdist) as archive:
        members = [m for m in archive.getmembers() if m.isfile() and m.name.startswith(prefix)]
        if not members:
            raise AssertionError(f"{sdist} holds no {prefix}: the sdist layout changed")
        for member in members:
            destination = tests / member.name.removeprefix(prefix)
            destination.parent.mkdir(parents=True, exist_ok=True)
            source = archive.extractfile(member)
            assert source is not None
            destination.write_bytes(source.read())
    # Our own config, so the repository's pytest settings (filterwarnings=error, ...) do not apply there.
    (tests / "pytest.ini").write_text("[pytest]\naddopts = -p no:cacheprovider\n")
    (tests / ".complete").write_text(version)
    return tests
