"""pytest plugin (``-p st_route``) that runs safetensors' own test suite against stream_st.

Loaded in a separate pytest process over the folder that ``upstream.suite`` extracted. On import it replaces
the loading entry points the upstream tests import (``safetensors.safe_open``, ``safetensors.torch.safe_open``,
``safetensors.torch.load_file``, ``safetensors.torch.load_model``) with functions that call stream_st, before
any test module is imported (the tests bind these names at import). Writing (``save_file``, ``save_model``,
``serialize``) stays safetensors' own, so the files under test are safetensors' output.

Environment:

* ``STREAM_ST_COMPAT_MODE``: ``local`` passes the caller's path as it is; ``http`` serves the file the test
  wrote from a Range-capable server on 127.0.0.1 (tests/servers.py's RangeServer) and passes its URL.
* ``STREAM_ST_COMPAT_REPORT``: where to write the JSON report: per upstream test its outcome, the message of
  its failure, and whether it reached a routed entry point.

Tests of other frameworks (TensorFlow, Flax, Paddle, MLX, numpy) are deselected here, each with its reason
(reported as skipped): stream_st loads into torch only.
"""

from __future__ import annotations

import itertools
import json
import os
import tempfile
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import safetensors
import safetensors.torch

import stream_st

MODE = os.environ.get("STREAM_ST_COMPAT_MODE", "local")
if MODE not in ("local", "http"):
    raise ValueError(f"STREAM_ST_COMPAT_MODE must be 'local' or 'http', not {MODE!r}")

# Whole files that test other frameworks only (the reason is reported for each of their tests).
OTHER_FRAMEWORK_FILES = {
    "test_tf_comparison.py": "TensorFlow: stream_st loads into torch only",
    "test_flax_comparison.py": "Flax/JAX: stream_st loads into torch only",
    "test_paddle_comparison.py": "Paddle: stream_st loads into torch only",
    "test_mlx_comparison.py": "MLX: stream_st loads into torch only",
    "test_handle.py": "numpy only (safetensors.numpy and _safe_open_handle over fsspec file objects)",
    "test_threadable.py": "numpy only (serialize_file releasing the GIL; loads with safetensors.numpy)",
}
# Single tests that use another framework inside a torch-oriented file.
OTHER_FRAMEWORK_TESTS = {
    "test_simple.py::TestCase::test_deserialization": "numpy only (safetensors.numpy.load)",
    "test_simple.py::TestCase::test_deserialization_metadata": "numpy only (safetensors.numpy)",
    "test_simple.py::ReadmeTestCase::test_numpy_example": "numpy only (safetensors.numpy)",
    "test_simple.py::ReadmeTestCase::test_numpy_bool": "numpy only (safetensors.numpy)",
    "test_simple.py::ReadmeTestCase::test_numpy_slice": 'numpy only (safe_open(framework="np"))',
    "test_pread_backend.py::PreadBackendTests::test_numpy_framework": 'numpy only (safe_open(framework="numpy"))',
    "test_multithreaded.py::test_multithreaded_roundtripping_numpy": "numpy only (safetensors.numpy)",
}


class _Http:
    """A RangeServer whose root holds one symlink per served file, named as the file (so the URL ends as the
    path does: the suffix a test chose is what stream_st sees)."""

    def __init__(self) -> None:
        from servers import RangeServer  # tests/ is on PYTHONPATH (see test_safetensors_suite.py)

        self.root = Path(tempfile.mkdtemp(prefix="st-compat-served-"))
        self.server = RangeServer(self.root)
        self.links: dict[str, str] = {}
        self.counter = itertools.count()

    def url(self, filename: Any) -> str:
        path = os.path.abspath(os.fspath(filename))
        if path not in self.links:
            folder = self.root / str(next(self.counter))
            folder.mkdir()
            (folder / os.path.basename(path)).symlink_to(path)  # dangling while the file is missing: 404
            self.links[path] = f"{folder.name}/{urllib.parse.quote(os.path.basename(path))}"
        return self.server.url(self.links[path])

    def stop(self) -> None:
        self.server.stop()


_http: _Http | None = None
_current: str | None = None
_reached: set[str] = set()
_results: dict[str, dict[str, Any]] = {}


def _where(filename: Any) -> Any:
    """What stream_st is given for the caller's ``filename``."""
    global _http
    if _current is not None:
        _reached.add(_current)
    if MODE == "local":
        return filename
    if _http is None:
        _http = _Http()
    return _http.url(filename)


def load_file(filename: Any, *args: Any, **kwargs: Any) -> Any:
    return stream_st.load_file(_where(filename), *args, **kwargs)


def load_model(model: Any, filename: Any, *args: Any, **kwargs: Any) -> Any:
    return stream_st.load_model(model, _where(filename), *args, **kwargs)


def safe_open(filename: Any, *args: Any, **kwargs: Any) -> Any:
    return stream_st.safe_open(_where(filename), *args, **kwargs)


safetensors.safe_open = safe_open  # type: ignore[assignment,misc]
safetensors.torch.safe_open = safe_open  # type: ignore[assignment,misc]
safetensors.torch.load_file = load_file  # type: ignore[assignment]
safetensors.torch.load_model = load_model  # type: ignore[assignment]


def _relative(nodeid: str) -> str:
    return nodeid.rsplit("tests/", 1)[-1] if "tests/" in nodeid else nodeid


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    reason = OTHER_FRAMEWORK_FILES.get(collection_path.name)
    if reason is None:
        return None
    _results[collection_path.name] = {"outcome": "deselected", "message": reason, "reached": False}
    return True


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        reason = OTHER_FRAMEWORK_TESTS.get(_relative(item.nodeid))
        if reason is not None:
            item.add_marker(pytest.mark.skip(reason=f"deselected: {reason}"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    global _current
    _current = _relative(item.nodeid)
    try:
        return (yield)
    finally:
        _current = None


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    nodeid = _relative(report.nodeid)
    entry = _results.setdefault(nodeid, {"outcome": "passed", "message": "", "reached": False})
    entry["reached"] = nodeid in _reached
    if report.failed and entry["outcome"] != "failed":
        entry["outcome"] = "failed"
        crash = getattr(report.longrepr, "reprcrash", None)
        entry["message"] = f"({report.when}) " + (crash.message if crash is not None else str(report.longrepr))
    elif report.skipped and entry["outcome"] == "passed":
        entry["outcome"] = "skipped"
        longrepr = report.longrepr
        entry["message"] = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _http is not None:
        _http.stop()
    target = os.environ.get("STREAM_ST_COMPAT_REPORT")
    if target:
        Path(target).write_text(json.dumps({"mode": MODE, "tests": _results}, indent=1, sort_keys=True))
