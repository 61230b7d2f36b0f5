"""The fault-injection suite: for each fault, on a single file and on a sharded checkpoint, the load is
bit-exact with safetensors or raises the documented error within a time bound; retries re-fetch only
the missing bytes; secrets never show up in messages or logs."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

import stream_st as sst
from checkpoints import assert_same
from servers import RangeServer

PREFETCH = 4096
TARGETS = {
    "single": ("layered.safetensors", ["layered.safetensors"]),
    "sharded": (
        "sharded/model.safetensors.index.json",
        sorted(
            f"sharded/{p}"
            for p in [
                "model-00001-of-00003.safetensors",
                "model-00002-of-00003.safetensors",
                "model-00003-of-00003.safetensors",
            ]
        ),
    ),
}


def reference(root: Path, files: list[str]) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(safetensors.torch.load_file(str(root / name)))
    return state


def load(http: RangeServer, target: str, **options: object) -> tuple[dict[str, torch.Tensor], float]:
    started = time.monotonic()
    options = {"header_prefetch": PREFETCH, "backoff_base": 0.01, "max_concurrency": 2, **options}
    return sst.load_file(http.url(target), **options), time.monotonic() - started  # type: ignore[arg-type]


def ranged(http: RangeServer) -> list[tuple[int, int, int]]:
    """(first byte, last byte, bytes sent) of every ranged GET of data (not the header prefetch)."""
    rows = []
    for request in http.gets():
        match = re.fullmatch(r"bytes=(\d+)-(\d+)", request.range or "")
        if match and int(match.group(1)) >= PREFETCH:
            rows.append((int(match.group(1)), int(match.group(2)), request.sent))
    return rows


@pytest.mark.parametrize("kind", ["single", "sharded"])
@pytest.mark.parametrize("fault", ["short", "reset", "stall"])
def test_broken_body_is_resumed_bit_exact(http: RangeServer, root: Path, kind: str, fault: str) -> None:
    target, files = TARGETS[kind]
    http.quirks.faults, http.quirks.fault_kind, http.quirks.fault_from = 1, fault, PREFETCH
    http.quirks.stall_seconds = 5.0
    loaded, seconds = load(http, target, stall_timeout=0.5)
    assert_same(loaded, reference(root, files))
    assert seconds < 4.0  # a stall costs stall_timeout, not the server's 5 s pause
    requests = ranged(http)
    broken = [r for r in requests if r[2] < r[1] - r[0] + 1]
    assert len(broken) == 1
    first, last, _ = broken[0]
    retried = [r for r in requests if r[1] == last and r is not broken[0]]
    # One retry, for the same part, from the first byte that had not arrived (a reset may lose them all).
    assert len(retried) == 1 and retried[0][0] >= first
    if fault != "reset":
        assert retried[0][0] > first


@pytest.mark.parametrize("kind", ["single", "sharded"])
def test_503_and_429_bursts_honour_retry_after(
    http: RangeServer, root: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    target, files = TARGETS[kind]
    http.quirks.status_once, http.quirks.retry_after = [503, 503, 429], "0.2"
    with caplog.at_level(logging.WARNING, logger="stream_st"):
        loaded, seconds = load(http, target)
    assert_same(loaded, reference(root, files))
    assert seconds >= 0.6  # three waits of at least Retry-After
    retries = [r for r in caplog.records if "retry" in r.getMessage()]
    assert len(retries) == 3 and all(r.levelno == logging.WARNING for r in retries)


@pytest.mark.parametrize("kind", ["single", "sharded"])
def test_200_to_a_ranged_request_mid_load_is_an_error(http: RangeServer, kind: str) -> None:
    target, _ = TARGETS[kind]
    http.quirks.ranges_before_200 = 1 if kind == "single" else 4  # index and header reads are honoured
    with pytest.raises(sst.RangeNotSupportedError, match=r"but the server sent the whole object \(HTTP 200\)"):
        load(http, target)


@pytest.mark.parametrize("kind", ["single", "sharded"])
def test_wrong_content_range_is_an_error(http: RangeServer, kind: str) -> None:
    target, _ = TARGETS[kind]
    http.quirks.wrong_content_range = True
    with pytest.raises(sst.RangeNotSupportedError, match="server sent bytes 1-"):
        load(http, target)


@pytest.mark.parametrize("kind", ["single", "sharded"])
def test_persistent_failure_gives_up_within_bounds(http: RangeServer, kind: str) -> None:
    target, _ = TARGETS[kind]
    http.quirks.faults, http.quirks.fault_from = 100, PREFETCH
    started = time.monotonic()
    with pytest.raises(sst.IncompleteReadError, match=r"tensor '.+', bytes \d+-\d+: failed after 3 attempts"):
        load(http, target, retries=2)
    assert time.monotonic() - started < 5


def test_object_swapped_between_header_and_body(http: RangeServer, root: Path) -> None:
    path = root / "swapped.safetensors"
    safetensors.torch.save_file({"a": torch.zeros(50_000), "b": torch.ones(50_000)}, str(path))
    try:
        with sst.safe_open(http.url(path.name), header_prefetch=PREFETCH) as handle:
            safetensors.torch.save_file({"a": torch.ones(50_000), "b": torch.zeros(50_000)}, str(path))
            os.utime(path, ns=(1, 1))  # file times tick coarsely: make sure the ETag (from mtime) changes
            with pytest.raises(sst.ObjectChangedError, match="object changed during the load"):
                handle.get_tensors(["a", "b"])
    finally:
        path.unlink()


def test_secrets_stay_out_of_errors_reprs_and_logs(http: RangeServer, caplog: pytest.LogCaptureFixture) -> None:
    secret = "sk-TOPSECRET-0123456789"
    url = http.url("missing.safetensors") + f"?X-Amz-Signature={secret}"
    http.quirks.status_once = [503]
    with caplog.at_level(logging.DEBUG, logger="stream_st"), pytest.raises(FileNotFoundError) as caught:
        sst.load_file(url, storage_options={"headers": {"Authorization": f"Bearer {secret}"}}, backoff_base=0.01)
    assert secret not in str(caught.value) and secret not in repr(caught.value)
    assert secret not in caplog.text
    assert "missing.safetensors" in str(caught.value)

    from stream_st.transport import Endpoint

    assert secret not in repr(Endpoint(url, {"Authorization": secret}))


def _open_sockets() -> int:
    import os

    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
    return count


def test_keyboard_interrupt_in_sync_api_cleans_up(http: RangeServer, root: Path) -> None:
    import signal
    import threading

    from checkpoints import layered_state, write

    big = write(root / "interrupted.safetensors", layered_state(layers=8, width=512))
    url = http.url(big.name)
    sockets_before = _open_sockets()
    main = threading.get_ident()
    timer = threading.Timer(0.05, lambda: signal.pthread_kill(main, signal.SIGINT))
    try:
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            sst.load_file(url, part_size=4096, max_concurrency=2)
        process_wide = ("stream_st-io", "stream_st-cache")  # one per process, idle between loads, by design
        assert not [
            t for t in threading.enumerate() if t.name.startswith("stream_st-") and not t.name.startswith(process_wide)
        ]
        # Every connection of the interrupted load is closed (the in-process server's side of each
        # connection closes when it notices, so give it a moment).
        deadline = time.monotonic() + 3
        while _open_sockets() > sockets_before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _open_sockets() <= sockets_before
        assert_same(sst.load_file(url), safetensors.torch.load_file(str(big)))
    finally:
        timer.cancel()
        big.unlink()


def test_hostile_header_length_fails_fast_over_http(http: RangeServer, root: Path) -> None:
    path = root / "hostile.safetensors"
    path.write_bytes((2**64 - 1).to_bytes(8, "little") + b"{}" * 100)
    try:
        with pytest.raises(sst.HeaderError, match=f"header declares {2**64 - 1} bytes, more than the limit"):
            sst.load_file(http.url(path.name))
        assert len(http.gets(path.name)) == 1
    finally:
        path.unlink()


def test_cancelling_a_load_stuck_on_a_silent_server_is_prompt(http: RangeServer) -> None:
    # The body stalls for 4 s and stall_timeout is 30 s: only aborting the blocked socket ends it sooner.
    http.quirks.faults, http.quirks.fault_kind, http.quirks.fault_from = 1, "stall", PREFETCH
    http.quirks.stall_seconds = 4.0
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="did not finish within timeout=0.5s"):
        load(http, "layered.safetensors", stall_timeout=30.0, timeout=0.5)
    assert time.monotonic() - started < 3.0
