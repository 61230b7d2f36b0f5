"""Hostile servers and files fail cheaply: bounded memory, bounded time, named errors, no blocked thread."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
from conftest import chain, checkpoint_bytes, write
from hostile import Client, HostileServer, answer, files_handler, ranged

import stream_st as sst
from stream_st.errors import SlowTransferError

DATA = checkpoint_bytes()
GiB = 1 << 30
QUICK = {"retries": 1, "backoff_base": 0.01, "progress": False}


def _declaring(files: dict[str, bytes], declared: dict[str, int]) -> HostileServer:
    """Serves ``files``; those in ``declared`` claim that size (their first bytes padded to the prefetch)."""

    def handle(client: Client) -> None:
        path = client.request.target.partition("?")[0].lstrip("/")
        if path in declared:
            client.send(ranged(files[path].ljust(256 << 10), client.request, declared=declared[path]))
        else:
            files_handler(files)(client)

    return HostileServer(handle)


@pytest.mark.parametrize("which", ["index", "sidecar"])
def test_a_small_file_declaring_a_huge_size_is_refused_before_allocating(which: str) -> None:
    index = json.dumps({"weight_map": {"a": "model.safetensors"}}).encode()
    files = {"model.safetensors": DATA, "model.safetensors.index.json": index, "model.safetensors.sha256.json": b"{}"}
    name = "model.safetensors.index.json" if which == "index" else "model.safetensors.sha256.json"
    with _declaring(files, {name: GiB}) as server:
        tracemalloc.start()
        try:
            with pytest.raises(sst.FetchError, match="max_small_file_bytes") as caught:
                sst.load_file(server.url(name if which == "index" else "model.safetensors"), verify=True, **QUICK)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peak < 32 << 20, f"peak {peak} bytes for a {GiB}-byte declaration"
    assert "127.0.0.1" in str(caught.value.url)


def test_max_small_file_bytes_is_an_option() -> None:
    index = json.dumps({"weight_map": {"a": "model.safetensors"}}).encode()
    with HostileServer(files_handler({"model.safetensors": DATA, "i.json": index})) as server:
        with pytest.raises(sst.FetchError, match="max_small_file_bytes=10 "):
            sst.load_file(server.url("i.json"), max_small_file_bytes=10, **QUICK)
        assert sst.load_file(server.url("i.json"), **QUICK).keys() == {"a"}


def test_the_limits_come_from_the_environment_and_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAM_ST_MIN_SPEED", "0")
    monkeypatch.setenv("STREAM_ST_MAX_SMALL_FILE_BYTES", "4096")
    config = sst.Config.from_env()
    assert (config.min_speed, config.max_small_file_bytes) == (0, 4096)
    assert (sst.Config().min_speed, sst.Config().max_small_file_bytes) == (16 << 10, 64 << 20)
    with pytest.raises(sst.ConfigError):
        sst.Config(min_speed=-1)
    with pytest.raises(sst.ConfigError):
        sst.Config(max_small_file_bytes=0)


def test_the_sidecar_of_a_presigned_url_is_its_path_and_a_refused_one_counts_as_absent() -> None:
    files = {"model.safetensors": DATA, "model.safetensors.sha256.json": b"{}"}
    with HostileServer(files_handler(files, required_query="sig=abc")) as server:
        url = server.url("model.safetensors", query="sig=abc")
        with pytest.warns(sst.IntegrityWarning, match="no .sha256.json sidecar"):
            state = sst.load_file(url, tensors=["a"], verify=True, **QUICK)
        assert torch.equal(state["a"], torch.arange(10, dtype=torch.float32))
        with pytest.raises(sst.IntegrityError, match="not verified"):
            sst.load_file(url, tensors=["a"], verify="strict", **QUICK)
        with pytest.raises(sst.IntegrityError, match="no digest"):
            sst.load_file(url, verify=True, **QUICK)
        sidecar_requests = [t for t in server.targets() if "sha256.json" in t]
    assert sidecar_requests and set(sidecar_requests) == {"/model.safetensors.sha256.json"}


def _silent(client: Client) -> None:
    client.wait_for_close()  # reads the request, never answers


def test_timeout_during_the_header_read_shuts_the_socket() -> None:
    with HostileServer(_silent) as server:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            sst.load_file(server.url("model.safetensors"), timeout=0.5, stall_timeout=30.0, **QUICK)
        assert time.monotonic() - started < 3  # not stall_timeout
        assert server.peer_closed[0].wait(2)  # the connection was closed by the client


def test_ctrl_c_during_the_header_read_shuts_the_socket() -> None:
    with HostileServer(_silent) as server:
        timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))  # a real signal, as Ctrl-C sends
        timer.start()
        started = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            sst.load_file(server.url("model.safetensors"), stall_timeout=30.0, **QUICK)
        timer.join()
        assert time.monotonic() - started < 3
        assert server.peer_closed[0].wait(2)


def _content_length(value: str, status: str) -> object:
    def handle(client: Client) -> None:
        headers = {"Content-Length": value, "ETag": '"v"'}
        if status.startswith("206"):
            headers["Content-Range"] = f"bytes 0-{len(DATA) - 1}/{len(DATA)}"
        client.send(answer(status, headers, DATA))

    return handle


@pytest.mark.parametrize("value", ["abc", "-5", "1e3", " 12 34", "99999999999999999999999999"])
@pytest.mark.parametrize("status", ["200 OK", "206 Partial Content"])
def test_a_hostile_content_length_is_a_named_error_and_the_stream_is_closed(value: str, status: str) -> None:
    with HostileServer(_content_length(value, status)) as server:  # type: ignore[arg-type]
        with pytest.raises(sst.FetchError):
            sst.load_file(server.url("model.safetensors"), **QUICK)
        assert all(closed.wait(2) for closed in server.peer_closed)


def _sidecar(digest: str, tensors: dict[str, str]) -> bytes:
    return json.dumps({"sha256": digest, "size": 1, "tensors": tensors}).encode()


@pytest.mark.parametrize(
    ("name", "body", "error"),
    [
        ("model.safetensors.sha256.json", b"[" * 100_000 + b"]" * 100_000, sst.IntegrityError),
        (
            "model.safetensors.sha256.json",
            json.dumps({"sha256": "0" * 64, "size": 1, "tensors": {"a": "xyz"}}).encode(),
            sst.IntegrityError,
        ),
        (
            "model.safetensors.sha256.json",
            json.dumps({"sha256": "g" * 64, "size": 1, "tensors": {}}).encode(),
            sst.IntegrityError,
        ),
        ("model.safetensors.index.json", b'{"weight_map": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", sst.HeaderError),
        ("model.safetensors.index.json", b'{"weight_map": {"a": "x\\u0000.safetensors"}}', sst.HeaderError),
        ("model.safetensors.index.json", b'{"weight_map": {"a": 5}}', sst.HeaderError),
        ("model.safetensors.index.json", b"[]", sst.HeaderError),
    ],
)
def test_hostile_sidecars_and_indexes_are_named_errors(name: str, body: bytes, error: type[Exception]) -> None:
    with HostileServer(files_handler({"model.safetensors": DATA, name: body})) as server:
        url = server.url(name if name.endswith("index.json") else "model.safetensors")
        with pytest.raises(error) as caught:
            sst.load_file(url, tensors=["a"], verify="strict", **QUICK)
    assert "127.0.0.1" in str(caught.value.url)  # type: ignore[attr-defined]


def _dribble(head_too: bool) -> object:
    def handle(client: Client) -> None:
        head = f"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-{len(DATA) - 1}/{len(DATA)}\r\n"
        head += f"Content-Length: {len(DATA)}\r\n\r\n"
        data = head.encode() + DATA if head_too else DATA
        if not head_too:
            client.send(head.encode())
        for byte in data:
            client.send(bytes([byte]))
            time.sleep(0.2)

    return handle


@pytest.mark.parametrize("head_too", [False, True], ids=["body", "headers"])
def test_a_server_sending_a_byte_at_a_time_is_dropped(head_too: bool) -> None:
    with HostileServer(_dribble(head_too)) as server:  # type: ignore[arg-type]
        started = time.monotonic()
        with pytest.raises(sst.FetchError) as caught:
            sst.load_file(server.url("model.safetensors"), stall_timeout=1.0, min_speed=1024, **QUICK)
        elapsed = time.monotonic() - started
    assert any(isinstance(e, SlowTransferError) for e in chain(caught.value)), repr(caught.value)
    assert elapsed < 8, elapsed  # two windows of 1 s, checked every 0.25 s, and a short backoff


def test_fifos_and_devices_are_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    write(tmp_path / "model.safetensors.index.json", json.dumps({"weight_map": {"a": "fifo.safetensors"}}).encode())
    for url in (str(fifo), f"file://{fifo}", str(tmp_path / "model.safetensors.index.json"), "/dev/zero"):
        started = time.monotonic()
        with pytest.raises(sst.FetchError, match="not a regular file"):
            sst.load_file(url, timeout=5, progress=False)
        assert time.monotonic() - started < 2


_MANY_SHARDS = textwrap.dedent(
    """
    import json, os, resource, sys
    import safetensors.torch, torch
    import stream_st as sst

    folder, count, backend = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    weight_map = {}
    for i in range(count):
        name = f"model-{i:05d}.safetensors"
        safetensors.torch.save_file({f"t{i}": torch.full((3,), float(i))}, os.path.join(folder, name))
        weight_map[f"t{i}"] = name
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": weight_map}, f)
    state = sst.load_file(os.path.join(folder, "model.safetensors.index.json"), progress=False, backend=backend)
    assert len(state) == count and all(torch.equal(state[f"t{i}"], torch.full((3,), float(i))) for i in range(count))
    print("ok", len(os.listdir("/proc/self/fd")))
    """
)


@pytest.mark.parametrize("backend", ["pread", "mmap"])  # mapped files must not hold a descriptor each
def test_five_thousand_local_shards_load_under_a_1024_descriptor_limit(tmp_path: Path, backend: str) -> None:
    script = tmp_path / "many.py"
    script.write_text(_MANY_SHARDS)
    folder = tmp_path / "shards"
    folder.mkdir()
    done = subprocess.run(
        [sys.executable, str(script), str(folder), "5000", backend],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("ok")


def test_an_evicted_local_descriptor_is_reopened_only_for_the_same_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stream_st.sources import LocalSource, _OpenFiles

    monkeypatch.setattr(_OpenFiles, "limit", staticmethod(lambda: 16))
    paths = [write(tmp_path / f"m{i}.safetensors", DATA) for i in range(24)]
    sources = [LocalSource(str(p)) for p in paths]
    try:
        for source in sources:
            source.probe(64)
        assert sum(s._fd is not None for s in sources) <= 16  # the first ones were closed
        first, second = sources[0], sources[1]
        assert first._fd is None and second._fd is None
        buffer = bytearray(len(DATA))
        stream = first.open_range(0, len(DATA))  # reopened: same inode, same version
        assert stream.readinto(memoryview(buffer)) == len(DATA) and bytes(buffer) == DATA
        stream.close(reusable=True)
        replacement = write(tmp_path / "new.safetensors", checkpoint_bytes({"a": torch.zeros(10)}))
        os.replace(replacement, paths[1])
        with pytest.raises(sst.ObjectChangedError, match="replaced or modified"):
            second.open_range(0, len(DATA))
    finally:
        for source in sources:
            source.close()
