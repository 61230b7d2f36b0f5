"""read_header of a header longer than the first GET, over real servers: a long __metadata__ is read a
window (part_size) at a time and parsed as it lands, with the result and the errors of parse_header."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import safetensors
import torch

import stream_st as sst
from checkpoints import write
from servers import Nginx, RangeServer
from stream_st.header import LENGTH_PREFIX, parse_header

WINDOW = 256 * 1024
OPTIONS = {"header_prefetch": 4096, "part_size": WINDOW}
METADATA = {f"k{i}": "x" * 300_000 for i in range(5)} | {"note": 'é 日本 "quoted"\n\\ \U0001f600'}


@pytest.fixture(params=["aiohttp", pytest.param("nginx", marks=pytest.mark.nginx)])
def server(request: pytest.FixtureRequest) -> RangeServer | Nginx:
    return request.getfixturevalue("http" if request.param == "aiohttp" else "nginx")  # type: ignore[no-any-return]


def ranges(server: RangeServer | Nginx, name: str) -> list[tuple[int, int]]:
    """The byte ranges the server was asked for, [first, last], in order."""
    rows = (
        server.gets(name) if isinstance(server, RangeServer) else [r for r in server.requests() if r.path == f"/{name}"]
    )
    found = [re.fullmatch(r"bytes=(\d+)-(\d+)", r.range or "") for r in rows]
    return [(int(m.group(1)), int(m.group(2))) for m in found if m]


@pytest.fixture()
def placed(root: Path) -> Iterator[list[Path]]:
    """Files written into the servers' folder for one test, removed after it."""
    paths: list[Path] = []
    yield paths
    for path in paths:
        path.unlink()


def test_a_long_metadata_header_is_read_window_by_window(
    server: RangeServer | Nginx, root: Path, placed: list[Path]
) -> None:
    path = write(root / "long-metadata.safetensors", {"a": torch.arange(6.0), "b": torch.ones(2, 3)}, METADATA)
    placed.append(path)
    raw = path.read_bytes()
    end = LENGTH_PREFIX + int.from_bytes(raw[:8], "little")
    header = sst.read_header(server.url(path.name), **OPTIONS)
    with safetensors.safe_open(str(path), "pt") as crate:
        assert header.metadata == crate.metadata() == METADATA
        assert header.keys() == list(crate.keys())
    expected = parse_header(raw[LENGTH_PREFIX:end], url=header.url, file_size=len(raw))
    assert header == expected
    asked = ranges(server, path.name)
    assert asked[0] == (0, 4095)
    assert [first for first, _ in asked] == [0] + [last + 1 for _, last in asked[:-1]]  # in order, each byte once
    assert asked[-1][1] == end - 1  # the header's bytes and no more
    assert len(asked) > 2 and all(last - first + 1 <= WINDOW for first, last in asked[1:])


def test_a_long_invalid_header_is_read_again_and_named_as_parse_header_names_it(
    server: RangeServer | Nginx, root: Path, placed: list[Path]
) -> None:
    text = '{"__metadata__":{' + ",".join(f'"k{i}":"{"x" * 300_000}"' for i in range(5)) + r',"late":"\ud800"},'
    text += '"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    body = text.encode()
    path = root / "late-surrogate.safetensors"
    path.write_bytes(len(body).to_bytes(8, "little") + body + bytes(4))
    path.chmod(0o644)
    placed.append(path)
    url = server.url(path.name)
    with pytest.raises(sst.HeaderError) as caught:
        parse_header(body, url=url, file_size=8 + len(body) + 4)
    with pytest.raises(sst.HeaderError, match="unpaired surrogate") as streamed:
        sst.read_header(url, **OPTIONS)
    assert str(streamed.value) == str(caught.value)
    asked = ranges(server, path.name)
    # The windows up to the bad string (dropped once parsed), then the header again (parts of part_size).
    assert [first for first, _ in asked].count(4096) == 2 and len(asked) > 3
    assert max(last for _, last in asked) == LENGTH_PREFIX + len(body) - 1


def test_a_server_ignoring_ranges_gets_the_header_in_one_read(
    http: RangeServer, root: Path, placed: list[Path]
) -> None:
    path = write(root / "long-metadata-200.safetensors", {"a": torch.arange(6.0)}, METADATA)
    placed.append(path)
    http.quirks.ignore_range = True
    with pytest.warns(sst.RangeIgnoredWarning):
        header = sst.read_header(http.url(path.name), **OPTIONS)
    assert header.metadata == METADATA
    assert [r.status for r in http.gets(path.name)] == [200, 200]  # the probe, then one stream of the header


def test_a_long_metadata_header_of_a_local_file(tmp_path: Path) -> None:
    path = write(tmp_path / "m.safetensors", {"a": torch.arange(6.0)}, METADATA)
    header = sst.read_header(path, **OPTIONS)
    raw = path.read_bytes()
    assert header == parse_header(raw[8 : 8 + int.from_bytes(raw[:8], "little")], url=header.url, file_size=len(raw))
    assert header.metadata == METADATA


@pytest.mark.s3
@pytest.mark.parametrize("direct_http", [True, False], ids=["presigned-data-plane", "s3fs-cat-file"])
def test_a_long_metadata_header_over_s3(s3: Any, tmp_path: Path, direct_http: bool) -> None:
    path = write(tmp_path / "m.safetensors", {"a": torch.arange(6.0)}, METADATA)
    s3.upload(s3.bucket, "checkpoints/long-metadata.safetensors", path)
    url = f"s3://{s3.bucket}/checkpoints/long-metadata.safetensors"
    header = sst.read_header(url, storage_options=s3.storage_options, direct_http=direct_http, **OPTIONS)
    raw = path.read_bytes()
    expected = parse_header(raw[8 : 8 + int.from_bytes(raw[:8], "little")], url=header.url, file_size=len(raw))
    assert header == expected and header.metadata == METADATA
