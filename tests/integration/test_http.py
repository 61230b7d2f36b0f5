"""Loads over real HTTP servers on 127.0.0.1 (aiohttp with switchable misbehaviour, and nginx),
bit-exact against safetensors, with the requests and bytes on the wire counted from the server's log."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import safetensors.torch
import torch

import stream_st as sst
from checkpoints import assert_same, assert_tensor_same
from servers import Nginx, RangeServer
from stream_st.config import Config
from stream_st.header import LENGTH_PREFIX


def reference(root: Path, name: str) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(root / name))


@pytest.fixture(params=["aiohttp", pytest.param("nginx", marks=pytest.mark.nginx)])
def server(request: pytest.FixtureRequest) -> RangeServer | Nginx:
    return request.getfixturevalue("http" if request.param == "aiohttp" else "nginx")  # type: ignore[no-any-return]


def log_of(server: RangeServer | Nginx, name: str) -> list[tuple[str | None, int]]:
    rows = (
        server.gets(name) if isinstance(server, RangeServer) else [r for r in server.requests() if r.path == f"/{name}"]
    )
    return [(r.range, r.sent) for r in rows]


def test_all_dtypes_bit_exact_in_one_request(server: RangeServer | Nginx, root: Path) -> None:
    loaded = sst.load_file(server.url("dtypes.safetensors"))
    assert_same(loaded, reference(root, "dtypes.safetensors"))
    # The whole file is smaller than the header prefetch: one GET brings header and data.
    assert log_of(server, "dtypes.safetensors") == [("bytes=0-262143", (root / "dtypes.safetensors").stat().st_size)]


def test_result_is_in_file_order(http: RangeServer, root: Path) -> None:
    loaded = sst.load_file(http.url("dtypes.safetensors"))
    header = sst.read_header(str(root / "dtypes.safetensors"))
    assert list(loaded) == header.offset_keys()


def test_multi_part_load_fetches_every_byte_once(server: RangeServer | Nginx, root: Path) -> None:
    name = "layered.safetensors"
    config = Config(header_prefetch=4096, part_size=64 * 1024, max_concurrency=4)
    loaded = sst.load_file(server.url(name), config=config)
    assert_same(loaded, reference(root, name))
    log = log_of(server, name)
    size = (root / name).stat().st_size
    assert sum(sent for _, sent in log) == size
    assert len(log) == 1 + -(-(size - 4096) // (64 * 1024))  # header GET + ceil(rest / part_size)


def test_partial_load_pulls_only_selected_bytes(server: RangeServer | Nginx, root: Path) -> None:
    name = "layered.safetensors"
    header = sst.read_header(str(root / name))
    selected = [t for t in header if t.name.startswith("model.layers.2.")]
    loaded = sst.load_file(server.url(name), tensors=["model.layers.2.*"], header_prefetch=4096)
    expected = reference(root, name)
    assert_same(loaded, {t.name: expected[t.name] for t in selected})
    log = log_of(server, name)
    first, last = selected[0].start, selected[-1].end
    assert sum(t.nbytes for t in selected) == last - first  # layer 2's tensors are contiguous
    assert log == [("bytes=0-4095", 4096), (f"bytes={first}-{last - 1}", last - first)]


def test_long_header_needs_a_second_get(server: RangeServer | Nginx, root: Path) -> None:
    name = "tiny.safetensors"
    raw = (root / name).read_bytes()
    header_end = LENGTH_PREFIX + int.from_bytes(raw[:8], "little")
    assert header_end > Config().header_prefetch
    assert_same(sst.load_file(server.url(name)), reference(root, name))
    assert log_of(server, name) == [
        ("bytes=0-262143", 262144),
        (f"bytes=262144-{header_end - 1}", header_end - 262144),
        (f"bytes={header_end}-{len(raw) - 1}", len(raw) - header_end),
    ]


def test_read_header_is_one_request(http: RangeServer, root: Path) -> None:
    header = sst.read_header(http.url("layered.safetensors"), header_prefetch=2048)
    assert header.file_size == (root / "layered.safetensors").stat().st_size
    assert header.tensors["lm_head.weight"].shape == (1000, 256)
    assert log_of(http, "layered.safetensors") == [("bytes=0-2047", 2048)]


def test_get_slice_fetches_only_the_rows(server: RangeServer | Nginx, root: Path) -> None:
    name = "layered.safetensors"
    expected = reference(root, name)["model.embed_tokens.weight"]
    with sst.safe_open(server.url(name), header_prefetch=1024) as handle:
        info = sst.read_header(str(root / name)).tensors["model.embed_tokens.weight"]
        rows = handle.get_slice("model.embed_tokens.weight")[100:250]
        one = handle.get_slice("model.embed_tokens.weight")[-1]
        stepped = handle.get_slice("model.embed_tokens.weight")[10:20:3, 5:9]
    assert_tensor_same(rows, expected[100:250])
    assert_tensor_same(one, expected[-1])
    assert_tensor_same(stepped, expected[10:20:3, 5:9].contiguous())
    row = 256 * 2
    assert log_of(server, name)[-3:] == [
        (f"bytes={info.start + 100 * row}-{info.start + 250 * row - 1}", 150 * row),
        (f"bytes={info.start + 999 * row}-{info.end - 1}", row),
        (f"bytes={info.start + 10 * row}-{info.start + 20 * row - 1}", 10 * row),
    ]


def test_server_ignoring_range_still_loads_correctly(
    http: RangeServer, root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    http.quirks.ignore_range = True
    name = "layered.safetensors"
    with pytest.warns(sst.RangeIgnoredWarning, match="ignores Range requests") as caught:
        loaded = sst.load_file(http.url(name), header_prefetch=4096, part_size=65536)
    assert len(caught) == 1  # said once per load
    assert_same(loaded, reference(root, name))
    assert [status for status in (r.status for r in http.gets(name))] == [200, 200]  # probe, then one stream


def test_bytes_a_server_ignoring_range_sends_before_the_wanted_ones_are_counted(http: RangeServer, root: Path) -> None:
    http.quirks.ignore_range = True
    name = "layered.safetensors"
    last = sst.read_header(root / name).tensors["lm_head.weight"]
    stats = sst.Stats()
    with pytest.warns(sst.RangeIgnoredWarning):
        sst.load_file(http.url(name), tensors="lm_head.weight", header_prefetch=4096, stats=stats)
    assert stats.bytes == 4096 + last.end  # the header read, then the stream up to the last wanted byte


def test_missing_object_is_file_not_found(http: RangeServer) -> None:
    url = http.url("nope.safetensors")
    with pytest.raises(FileNotFoundError, match=f"{url}: not found"):
        sst.load_file(url)


def test_short_body_is_resumed_from_the_missing_byte(
    http: RangeServer, root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    name = "layered.safetensors"
    http.quirks.faults, http.quirks.fault_from = 1, 4096
    config = Config(header_prefetch=4096, part_size=1 << 30, backoff_base=0.01)
    with caplog.at_level(logging.WARNING, logger="stream_st"):
        loaded = sst.load_file(http.url(name), config=config)
    assert_same(loaded, reference(root, name))
    size = (root / name).stat().st_size
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "IncompleteRead" in warnings[0] and "retry 1 of 5" in warnings[0]
    resumed = int(warnings[0].rsplit("from byte ", 1)[1])
    assert 4096 < resumed < size
    # Header GET, the data GET cut short, then one GET for exactly the missing bytes.
    log = log_of(http, name)
    assert [r for r, _ in log] == ["bytes=0-4095", f"bytes=4096-{size - 1}", f"bytes={resumed}-{size - 1}"]
    assert log[2][1] == size - resumed


def test_short_probe_is_retried(http: RangeServer, root: Path) -> None:
    http.quirks.faults = 1
    loaded = sst.load_file(http.url("small.safetensors"), backoff_base=0.01)
    assert_same(loaded, reference(root, "small.safetensors"))
    assert len(http.gets("small.safetensors")) == 2


def test_wrong_content_range_is_an_error(http: RangeServer) -> None:
    url = http.url("layered.safetensors")
    http.quirks.wrong_content_range = True
    with pytest.raises(sst.RangeNotSupportedError, match="asked for bytes 0-4095, server sent bytes 1-4095"):
        sst.load_file(url, header_prefetch=4096)


def test_503_with_retry_after_is_retried(http: RangeServer, root: Path) -> None:
    http.quirks.status_once = [503, 429]
    http.quirks.retry_after = "0"
    loaded = sst.load_file(http.url("small.safetensors"), backoff_base=0.01)
    assert_same(loaded, reference(root, "small.safetensors"))
    assert [r.status for r in http.gets("small.safetensors")] == [503, 429, 206]


def test_retries_exhausted_names_url_and_range(http: RangeServer) -> None:
    http.quirks.status_once = [503] * 10
    url = http.url("small.safetensors")
    with pytest.raises(sst.FetchError, match=f"{url}: HTTP 503"):
        sst.load_file(url, backoff_base=0.001, retries=2)


def test_object_replaced_mid_load_is_detected(http: RangeServer, root: Path, tmp_path: Path) -> None:
    path = root / "changing.safetensors"
    safetensors.torch.save_file({"a": torch.zeros(100_000), "b": torch.ones(100_000)}, str(path))
    try:
        with sst.safe_open(http.url(path.name), header_prefetch=1024) as handle:
            safetensors.torch.save_file({"a": torch.ones(100_000), "b": torch.zeros(100_000)}, str(path))
            os.utime(path, ns=(1, 1))  # a new mtime, so a new ETag
            with pytest.raises(sst.ObjectChangedError, match="object changed during the load"):
                handle.get_tensor("b")
    finally:
        path.unlink()


def test_bad_header_fails_after_one_request(http: RangeServer, root: Path) -> None:
    path = root / "bad.safetensors"
    path.write_bytes((21).to_bytes(8, "little") + b'{"a": "not a tensor"}' + b"x" * 1000)
    try:
        with pytest.raises(sst.HeaderError, match="bad.safetensors: tensor 'a' must be a JSON object"):
            sst.load_file(http.url(path.name))
        assert len(http.gets(path.name)) == 1
    finally:
        path.unlink()


@pytest.mark.parametrize(
    ("content", "kind"),
    [
        (b"<!DOCTYPE html><html><head><title>Error</title></head><body>Not found</body></html>", "an HTML page"),
        (b"PK\x03\x04\x14\x00\x00\x08\x08\x00" + bytes(200), "a zip archive (a PyTorch .bin/.pt checkpoint?)"),
    ],
    ids=["html", "zip"],
)
def test_a_file_that_is_not_safetensors_says_what_it_looks_like(
    server: RangeServer | Nginx, root: Path, content: bytes, kind: str
) -> None:
    path = root / f"not-{len(content)}.safetensors"  # e.g. a CDN error page sent with status 200
    path.write_bytes(content)
    try:
        with pytest.raises(sst.HeaderError, match=rf"{path.name}: not a safetensors file: it looks like ") as caught:
            sst.load_file(server.url(path.name))
        assert kind in str(caught.value) and "max_header_size" not in str(caught.value)
    finally:
        path.unlink()


def test_iter_tensors_streams_in_file_order(server: RangeServer | Nginx, root: Path) -> None:
    name = "layered.safetensors"
    expected = reference(root, name)
    seen = []
    for tensor_name, tensor in sst.iter_tensors(server.url(name), max_inflight_bytes=200_000, part_size=65536):
        assert_tensor_same(tensor, expected[tensor_name], tensor_name)
        seen.append(tensor_name)
    assert seen == sst.read_header(str(root / name)).offset_keys()


def test_bench_says_when_its_ratio_is_meaningless(http: RangeServer, capsys: pytest.CaptureFixture[str]) -> None:
    from stream_st.cli import main

    http.quirks.ignore_range = True
    with pytest.warns(sst.RangeIgnoredWarning):
        assert main(["bench", http.url("layered.safetensors"), "--repeats", "1"]) == 0
    assert "the server ignores Range requests: both reads streamed whole objects" in capsys.readouterr().out
