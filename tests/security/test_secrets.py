"""No secret (URL user info, a presigned query, a caller's header) in any message, exception attribute,
cause chain, log record at DEBUG, progress bar or CLI line, whichever error a load ends with."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest
import torch
from conftest import PASSWORD, SECRET, TOKEN, assert_no_secret, checkpoint_bytes, log_texts, texts_of
from hostile import Client, HostileServer, answer, files_handler, ranged

import stream_st as sst
from stream_st import cli

DATA = checkpoint_bytes()
FILES = {
    "model.safetensors": DATA,
    "model.safetensors.sha256.json": b'{"sha256": "zz", "size": 1, "tensors": {}}',
    "model-1.safetensors": DATA,
    "bad/model-1.safetensors": DATA,
    "idx/model.safetensors.index.json": json.dumps({"weight_map": {"zz": "../model-1.safetensors"}}).encode(),
    "bad/model.safetensors.index.json": json.dumps({"weight_map": {"zz": "model-1.safetensors"}}).encode(),
}
OPTIONS = {"headers": {"Authorization": TOKEN}}


def _url(server: HostileServer, path: str = "model.safetensors") -> str:
    return server.url(path, userinfo=f"user:{PASSWORD}", query=f"X-Amz-Signature={SECRET}&X-Amz-Date=1")


def _stall_data(client: Client) -> None:
    """The header read is answered; any later range gets its headers and then nothing."""
    if client.request.headers.get("range", "").startswith("bytes=0-"):
        client.send(ranged(DATA, client.request))
    else:
        start, _, end = client.request.headers["range"].removeprefix("bytes=").partition("-")
        length = int(end) - int(start) + 1
        headers = {"Content-Range": f"bytes {start}-{end}/{len(DATA)}", "Content-Length": str(length)}
        client.send(answer("206 Partial Content", headers))
        client.wait_for_close()  # the body never comes


def _echo_status(client: Client) -> None:
    client.send(answer(f"503 {client.request.method} {client.request.target}", {"Content-Length": "0"}))


def _echo_status_line(client: Client) -> None:
    client.send(f"{client.request.method} {client.request.target} HTTP/1.1\r\n\r\n".encode())


def _hub_echo(client: Client) -> None:
    headers = {"X-Error-Code": "EntryNotFound", "X-Error-Message": f"no such file: http://x{client.request.target}"}
    client.send(answer("404 Not Found", {**headers, "Content-Length": "0"}))


def _run(call: Callable[[], object]) -> BaseException:
    try:
        call()
    except BaseException as exc:  # noqa: BLE001 - the test inspects whatever it was
        return exc
    raise AssertionError("expected an error")


def _load(**options: object) -> Callable[[str], object]:
    return lambda url: sst.load_file(url, storage_options=OPTIONS, **options)


def _index(folder: str) -> Callable[[str], object]:
    index = f"{folder}/model.safetensors.index.json?"
    return lambda url: sst.load_file(url.replace("model.safetensors?", index), storage_options=OPTIONS)


RETRY_ONCE = {"retries": 1, "backoff_base": 0.01}
CASES: dict[str, tuple[Callable[[Client], None] | None, Callable[[str], object], type[BaseException]]] = {
    "tensor not found": (None, _load(tensors=["nope"]), sst.TensorNotFoundError),
    "timeout": (_stall_data, _load(timeout=1.0, header_prefetch=16), TimeoutError),
    "sidecar": (None, _load(tensors=["a"], verify=True), sst.IntegrityError),
    "index join": (None, _index("bad"), sst.HeaderError),
    "index outside": (None, _index("idx"), sst.HeaderError),
    "reason phrase": (_echo_status, _load(**RETRY_ONCE), sst.FetchError),
    "status line": (_echo_status_line, _load(**RETRY_ONCE), sst.FetchError),
    "hub message": (_hub_echo, _load(), FileNotFoundError),
}


@pytest.mark.parametrize("case", list(CASES))
def test_no_secret_in_errors_or_logs(case: str, debug_logs: pytest.LogCaptureFixture) -> None:
    handler, call, expected = CASES[case]
    with HostileServer(handler or files_handler(FILES)) as server:
        url = _url(server)
        started = time.monotonic()
        exc = _run(lambda: call(url))
        assert time.monotonic() - started < 10
    assert isinstance(exc, expected), repr(exc)
    if isinstance(exc, sst.StreamSTError):
        assert exc.url and "127.0.0.1" in exc.url  # names the URL, in its display form
    assert_no_secret(texts_of(exc) + log_texts(debug_logs))


def test_closed_handle_and_repr(debug_logs: pytest.LogCaptureFixture) -> None:
    with HostileServer(files_handler(FILES)) as server:
        with sst.safe_open(_url(server), framework="pt", storage_options=OPTIONS) as handle:
            texts = [repr(handle), repr(handle.get_tensor("a"))]
        exc = _run(handle.keys)
    assert isinstance(exc, RuntimeError)
    assert_no_secret(texts + texts_of(exc) + log_texts(debug_logs))


def test_no_secret_in_the_progress_bar(capsys: pytest.CaptureFixture[str]) -> None:
    with HostileServer(files_handler(FILES)) as server:
        state = sst.load_file(_url(server), progress=True, storage_options=OPTIONS)
    assert torch.equal(state["a"], torch.arange(10, dtype=torch.float32))
    out = capsys.readouterr()
    assert "model.safetensors" in out.err  # the bar was drawn, with the file's name
    assert_no_secret([out.out, out.err])


@pytest.mark.parametrize("path", ["model.safetensors", "missing.safetensors", "bad/model.safetensors.index.json"])
@pytest.mark.parametrize("command", ["inspect", "load"])
def test_no_secret_on_the_command_line(path: str, command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with HostileServer(files_handler(FILES)) as server:
        args = [command, _url(server, path), "--storage-options", json.dumps(OPTIONS)]
        code = cli.main([*args, "--select", "nope"] if command == "load" else args)
    out = capsys.readouterr()
    assert code == (1 if path.startswith("missing") or command == "load" else 0)
    assert_no_secret([out.out, out.err])
