"""One row per validation rule, asserting the exact message; and the header matches safetensors'."""

from __future__ import annotations

import contextlib
import json
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from checkpoints import write
from stream_st.errors import HeaderError
from stream_st.header import declared_header_size, parse_header

URL = "https://host/m.safetensors"


def entry(dtype: str, shape: list[int], begin: int, end: int) -> dict[str, object]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def parse(doc: object, data: int) -> object:
    raw = json.dumps(doc, separators=(",", ":")).encode() if not isinstance(doc, bytes) else doc
    return parse_header(raw, url=URL, file_size=8 + len(raw) + data)


MALFORMED = [
    pytest.param(b"\xff\xfe{}", 0, f"{URL}: header is not valid UTF-8 (invalid start byte at byte 0)", id="utf8"),
    pytest.param(
        b"[1, 2]", 0, f"{URL}: header must be a JSON object starting with '{{', got '[1, 2]'", id="not-object"
    ),
    pytest.param(
        b'{"a": ', 0, f"{URL}: header is not valid JSON (Expecting value: line 1 column 7 (char 6))", id="bad-json"
    ),
    pytest.param(
        b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": 1}',
        4,
        f"{URL}: header has the key 'a' more than once",
        id="duplicate",
    ),
    pytest.param(
        b'{"a":' + b"[" * 100000 + b"]" * 100000 + b"}", 0, f"{URL}: header JSON is nested too deeply", id="deep"
    ),
    pytest.param({"__metadata__": {"k": 1}}, 0, f"{URL}: __metadata__ must map strings to strings", id="metadata"),
    pytest.param(
        {"w": [1]}, 0, f"{URL}: tensor 'w' must be a JSON object with dtype, shape and data_offsets", id="entry-type"
    ),
    pytest.param(
        {"w": {"dtype": "F32", "shape": [1]}}, 4, f"{URL}: tensor 'w' has no 'data_offsets'", id="missing-field"
    ),
    pytest.param({"w": entry("F31", [1], 0, 4)}, 4, f"{URL}: tensor 'w' has unknown dtype 'F31'", id="dtype"),
    pytest.param(
        {"w": entry("F32", [-1], 0, 4)},
        4,
        f"{URL}: tensor 'w' has shape [-1]; a shape is a list of integers in [0, 2**63)",
        id="negative-dim",
    ),
    pytest.param(
        {"w": entry("F32", [1.0], 0, 4)},
        4,  # type: ignore[list-item]
        f"{URL}: tensor 'w' has shape [1.0]; a shape is a list of integers in [0, 2**63)",
        id="float-dim",
    ),
    pytest.param(
        {"w": entry("F32", [True], 0, 4)},
        4,  # type: ignore[list-item]
        f"{URL}: tensor 'w' has shape [True]; a shape is a list of integers in [0, 2**63)",
        id="bool-dim",
    ),
    pytest.param(
        {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0]}},
        4,
        f"{URL}: tensor 'w' has data_offsets [0]; expected two integers in [0, 2**63) [begin, end]",
        id="offsets-arity",
    ),
    pytest.param(
        {"w": entry("F32", [1], 4, 8)},
        8,
        f"{URL}: the first tensor must start at 0 but tensor 'w' starts at 4",
        id="first-not-zero",
    ),
    pytest.param(
        {"a": entry("F32", [1], 0, 4), "b": entry("F32", [1], 8, 12)},
        12,
        f"{URL}: tensor 'a' ends at 4 but the next tensor 'b' starts at 8 (gaps are not allowed)",
        id="gap",
    ),
    pytest.param(
        {"a": entry("F32", [2], 0, 8), "b": entry("F32", [1], 4, 8)},
        8,
        f"{URL}: tensor 'a' ends at 8 but tensor 'b' starts at 4 (overlap)",
        id="overlap",
    ),
    pytest.param(
        {"w": entry("F32", [2], 0, 4)},
        4,
        f"{URL}: tensor 'w' of dtype F32 and shape [2] needs 8 bytes but its data_offsets [0, 4] span 4",
        id="span",
    ),
    pytest.param(
        {"w": entry("F32", [2**62, 2**62, 2**62], 0, 4)},
        4,
        f"{URL}: tensor 'w' of dtype F32 and shape [{2**62}, {2**62}, {2**62}] needs more than "
        "2**63 bytes but its data_offsets [0, 4] span 4",
        id="overflow",
    ),
    pytest.param(
        {"w": entry("F4", [3], 0, 1)},
        1,
        f"{URL}: tensor 'w' of dtype F4 and shape [3] needs 1.5 bytes but its data_offsets [0, 1] span 1",
        id="sub-byte",
    ),
    pytest.param(
        {"w": entry("F32", [1], 0, 4)},
        8,
        f"{URL}: tensors end at data offset 4 (byte 66) but the object is 70 bytes long",
        id="trailing-data",
    ),
]


@pytest.mark.parametrize(("doc", "data", "message"), MALFORMED)
def test_malformed_header_message(doc: object, data: int, message: str) -> None:
    with pytest.raises(HeaderError) as caught:
        parse(doc, data)
    assert str(caught.value) == message
    assert caught.value.url == URL


def test_end_before_start() -> None:
    with pytest.raises(HeaderError, match=r"tensor 'w' has data_offsets \[4, 0\] that end before they start"):
        parse({"a": entry("F32", [1], 0, 4), "w": entry("U8", [0], 4, 0)}, 4)


def test_declared_length_rules() -> None:
    def length(value: int) -> bytes:
        return struct.pack("<Q", value)

    with pytest.raises(HeaderError, match="object is 5 bytes, too small to be safetensors"):
        declared_header_size(b"12345", url=URL, file_size=5, max_header_size=100)
    with pytest.raises(HeaderError, match=f"header declares {2**64 - 1} bytes, more than the limit of 100"):
        declared_header_size(length(2**64 - 1), url=URL, file_size=1000, max_header_size=100)
    with pytest.raises(HeaderError, match="header declares 90 bytes but the object is only 50 bytes long"):
        declared_header_size(length(90), url=URL, file_size=50, max_header_size=100)
    assert declared_header_size(length(42), url=URL, file_size=50, max_header_size=100) == 42


def test_matches_safetensors_for_a_real_file(tmp_path: Path) -> None:
    state = {"b": torch.zeros(3, dtype=torch.float16), "a": torch.ones(2, 2), "e": torch.zeros(0)}
    path = write(tmp_path / "f.safetensors", state, metadata={"k": "v"})
    raw = path.read_bytes()
    size = declared_header_size(raw, url="f", file_size=len(raw), max_header_size=10**6)
    header = parse_header(raw[8 : 8 + size], url="f", file_size=len(raw))
    assert header.metadata == {"k": "v"}
    assert header.keys() == ["a", "b", "e"]
    for name, tensor in state.items():
        info = header.tensors[name]
        assert info.shape == tuple(tensor.shape)
        assert raw[info.start : info.end] == tensor.numpy().tobytes()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_header_error_or_parse(raw: bytes) -> None:
    with contextlib.suppress(HeaderError):  # any other exception fails the test
        parse_header(raw, url=URL, file_size=8 + len(raw))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["a", "b", "__metadata__"]), json_values, max_size=3), st.integers(0, 64))
def test_arbitrary_json_raises_header_error_or_parses_consistently(doc: dict[str, object], data: int) -> None:
    try:
        header = parse(doc, data)
    except HeaderError:
        return
    spans = sorted((t.start, t.end) for t in header)  # type: ignore[attr-defined]
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert end == start
