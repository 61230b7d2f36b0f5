"""safetensors' own Python test suite, run against stream_st.

The tests of the safetensors release that is installed are fetched from the package registry at test time
(``upstream.py``: its sdist holds ``bindings/python/tests``; cached under pytest's cache folder, so reruns do
not download again) and run in a separate pytest process with ``st_route.py`` as a plugin, which routes
``safetensors.torch.load_file``, ``safetensors.torch.load_model`` and ``safetensors.safe_open`` to stream_st,
once with local paths (``local``) and once over HTTP from a Range-capable server on 127.0.0.1 (``http``).

Every upstream test that reaches one of those entry points is one test here per mode (``REACHING``); the
others test safetensors' writing or other frameworks and are not judged. An upstream test may fail here only
if it is listed:

* ``KNOWN_DIFFERENCES``: permanent, documented differences, each with the failure it must fail with;
* ``LIBRARY_BUGS``: stream_st bugs to fix (``xfail(strict=True)``: once fixed, the entry must go).

Without network the suite cannot be fetched and these tests skip, unless ``STREAM_ST_REQUIRE_COMPAT=1`` (set by
``.ci/run``), which turns that skip into a failure. ``-m "not compat"`` leaves them out.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import upstream

pytestmark = [pytest.mark.compat, pytest.mark.timeout(600)]

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
MODES = ["local", "http"]

# Upstream tests (safetensors 0.8.0) that call a routed entry point on a machine without accelerators.
REACHING = [
    "test_multithreaded.py::test_multithreaded_roundtripping_torch",
    "test_pread_backend.py::PreadBackendTests::test_data_offset_overflow_is_rejected",
    "test_pread_backend.py::PreadBackendTests::test_default_backend_unchanged",
    "test_pread_backend.py::PreadBackendTests::test_get_slice",
    "test_pread_backend.py::PreadBackendTests::test_get_tensors_round_trip",
    "test_pread_backend.py::PreadBackendTests::test_invalid_backend_string_raises",
    "test_pread_backend.py::PreadBackendTests::test_load_file_round_trip",
    "test_pread_backend.py::PreadBackendTests::test_load_model",
    "test_pread_backend.py::PreadBackendTests::test_safe_open_round_trip",
    "test_pread_backend.py::PreadBackendTests::test_truncated_header_is_rejected",
    "test_pt_comparison.py::LoadTestCase::test_deserialization_safe",
    "test_pt_comparison.py::SliceTestCase::test_deserialization_metadata",
    "test_pt_comparison.py::SliceTestCase::test_deserialization_slice",
    "test_pt_comparison.py::TorchTestCase::test_multiple_zero_sized",
    "test_pt_comparison.py::TorchTestCase::test_odd_dtype",
    "test_pt_comparison.py::TorchTestCase::test_odd_dtype_fp4",
    "test_pt_comparison.py::TorchTestCase::test_odd_dtype_fp8_e4m3fn",
    "test_pt_comparison.py::TorchTestCase::test_odd_dtype_fp8_e5m2",
    "test_pt_comparison.py::TorchTestCase::test_odd_dtype_fp8_e8m0",
    "test_pt_comparison.py::TorchTestCase::test_odd_dtype_fp8_fnuz",
    "test_pt_comparison.py::TorchTestCase::test_zero_sized",
    "test_pt_model.py::TorchModelTestCase::test_difference_torch_odd",
    "test_pt_model.py::TorchModelTestCase::test_difference_with_torch",
    "test_pt_model.py::TorchModelTestCase::test_save",
    "test_pt_model.py::TorchModelTestCase::test_workaround",
    "test_pt_model.py::TorchModelTestCase::test_workaround_copy",
    "test_pt_model.py::TorchModelTestCase::test_workaround_non_contiguous",
    "test_pt_model.py::TorchModelTestCase::test_workaround_works_with_different_on_file_names",
    "test_simple.py::ErrorsTestCase::test_file_not_found",
    "test_simple.py::ReadmeTestCase::test_torch_example",
    "test_simple.py::ReadmeTestCase::test_torch_slice",
    "test_simple.py::TestCase::test_accept_path",
    "test_simple.py::WindowsTestCase::test_get_correctly_dropped",
]
# Upstream tests that reach an entry point only on an accelerator (upstream skips them elsewhere).
REACHING_ON_DEVICE = [
    "test_pt_comparison.py::LoadTestCase::test_deserialization_device",
    "test_pt_comparison.py::LoadTestCase::test_deserialization_safe_device_1",
    "test_pt_comparison.py::LoadTestCase::test_deserialization_safe_gpu",
    "test_pt_comparison.py::LoadTestCase::test_deserialization_safe_gpu_slice",
    "test_pt_comparison.py::TorchTestCase::test_anonymous_accelerator",
    "test_pt_comparison.py::TorchTestCase::test_gpu",
    "test_pt_comparison.py::TorchTestCase::test_gpu_default_device",
    "test_pt_comparison.py::TorchTestCase::test_hpu",
    "test_pt_comparison.py::TorchTestCase::test_mps",
    "test_pt_comparison.py::TorchTestCase::test_mps_fp4",
    "test_pt_comparison.py::TorchTestCase::test_mps_slice",
    "test_pt_comparison.py::TorchTestCase::test_mps_with_device_index",
    "test_pt_comparison.py::TorchTestCase::test_npu",
]

# Permanent differences: (why it is allowed, a text the upstream failure message must contain). A failure
# other than that one is still a failure.
KNOWN_DIFFERENCES: dict[str, tuple[str, str]] = {
    "test_simple.py::ErrorsTestCase::test_file_not_found": (
        "the exception class is FileNotFoundError as in safetensors, but the message is stream_st's own "
        "(it names the URL or path in stream_st's words, which issue #16 allows); only the text differs",
        "!= 'No such file or directory: notafile'",
    ),
}

# Current stream_st bugs, per mode (issue #16). Each is xfail(strict=True): when the fix lands, the test
# passes, the strict xfail fails, and the entry must be removed.
LIBRARY_BUGS: dict[str, str] = {}
LIBRARY_BUGS_LOCAL_ONLY: dict[str, str] = {}


def _bugs(mode: str) -> dict[str, str]:
    return {**LIBRARY_BUGS, **(LIBRARY_BUGS_LOCAL_ONLY if mode == "local" else {})}


def _id(nodeid: str) -> str:
    return nodeid.replace(".py::", ".").replace("::", ".")


def _cases() -> list[Any]:
    cases = []
    for mode in MODES:
        for nodeid in [*REACHING, *REACHING_ON_DEVICE]:
            marks = []
            if nodeid in _bugs(mode):
                marks.append(pytest.mark.xfail(strict=True, reason=_bugs(mode)[nodeid]))
            cases.append(pytest.param(mode, nodeid, marks=marks, id=f"{mode}-{_id(nodeid)}"))
    return cases


class UpstreamRun:
    """Runs the fetched suite once per mode and keeps the per-test results of each."""

    def __init__(self, suite: Path, workdir: Path) -> None:
        self.suite = suite
        self.workdir = workdir
        self.results: dict[str, dict[str, dict[str, Any]]] = {}

    def __call__(self, mode: str) -> dict[str, dict[str, Any]]:
        if mode not in self.results:
            self.results[mode] = self._run(mode)
        return self.results[mode]

    def _run(self, mode: str) -> dict[str, dict[str, Any]]:
        # The upstream tests write files relative to the folder above tests/ (tests/data/...): a fresh copy.
        cwd = self.workdir / mode
        shutil.copytree(self.suite, cwd / "tests")
        report = cwd / "report.json"
        paths = [str(REPO), str(REPO / "tests"), str(HERE)]
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([*paths, os.environ.get("PYTHONPATH", "")]),
            "STREAM_ST_COMPAT_MODE": mode,
            "STREAM_ST_COMPAT_REPORT": str(report),
        }
        command = [sys.executable, "-m", "pytest", "-p", "st_route", "-c", "tests/pytest.ini", "--rootdir", "tests"]
        command += ["-q", "-o", "timeout=60", "tests"]
        done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=400)
        if not report.exists():
            pytest.fail(f"the upstream run ({mode}) wrote no report; exit {done.returncode}:\n{done.stdout[-4000:]}")
        results: dict[str, dict[str, Any]] = json.loads(report.read_text())["tests"]
        return results


@pytest.fixture(scope="session")
def upstream_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> UpstreamRun:
    cache = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
    folder = cache.mkdir("safetensors-suite") if cache is not None else tmp_path_factory.mktemp("st-suite")
    try:
        suite = upstream.suite(Path(folder))
    except upstream.UnavailableError as error:
        if os.environ.get("STREAM_ST_REQUIRE_COMPAT") == "1":
            pytest.fail(f"safetensors' test suite is required (STREAM_ST_REQUIRE_COMPAT=1) but: {error}")
        pytest.skip(f"safetensors' test suite cannot be fetched (offline?): {error}")
    return UpstreamRun(suite, tmp_path_factory.mktemp("st-suite-run"))


@pytest.mark.parametrize(("mode", "nodeid"), _cases())
def test_upstream(upstream_run: UpstreamRun, mode: str, nodeid: str) -> None:
    """One upstream test, with the loading entry points routed to stream_st in ``mode``."""
    result = upstream_run(mode).get(nodeid)
    assert result is not None, f"{nodeid} is not in safetensors {upstream.installed_version()}'s suite any more"
    if result["outcome"] == "skipped":
        pytest.skip(f"skipped upstream: {result['message']}")
    if result["outcome"] == "failed" and nodeid in KNOWN_DIFFERENCES:
        reason, expected = KNOWN_DIFFERENCES[nodeid]
        assert expected in result["message"], f"{nodeid} failed otherwise than allowed: {result['message']}"
        pytest.xfail(f"known difference: {reason}")
    assert result["outcome"] == "passed", f"{nodeid} [{mode}]: {result['message']}"
    assert result["reached"], f"{nodeid} passed without calling stream_st: REACHING is stale"


@pytest.mark.parametrize("mode", MODES)
def test_every_test_reaching_stream_st_is_judged(upstream_run: UpstreamRun, mode: str) -> None:
    """An upstream test that calls stream_st and is in neither list would go unjudged: classify it."""
    results = upstream_run(mode)
    reached = {nodeid for nodeid, result in results.items() if result["reached"]}
    unlisted = sorted(reached - set(REACHING) - set(REACHING_ON_DEVICE))
    assert not unlisted, f"add to REACHING (or REACHING_ON_DEVICE): {unlisted}"
    failing_unlisted = sorted(
        nodeid for nodeid, result in results.items() if result["outcome"] == "failed" and nodeid not in REACHING
    )
    # Tests that never call stream_st test safetensors itself; they must still pass, or the run is broken.
    assert not failing_unlisted, f"upstream tests that do not reach stream_st failed: {failing_unlisted}"
