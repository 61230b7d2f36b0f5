"""One row per validation rule, asserting the exact message; and the header matches safetensors'."""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import math
import re
import struct
from pathlib import Path

import pytest
import safetensors
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from checkpoints import write
from stream_st import header as header_module
from stream_st.dtypes import DTYPE_BITS
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


# --- hostile headers: a HeaderError naming the URL, never another exception ------------------------------

HOSTILE = [
    pytest.param(entry("F32", [2**63, 0], 0, 0), 0, "shape", id="dim-2**63"),
    pytest.param(entry("F32", [2**64 - 1], 0, 4), 4, "shape", id="dim-2**64-1"),
    pytest.param(entry("F32", [2**40, 2**30, 0], 0, 0), 0, "too large for torch even when empty", id="empty-overflow"),
    pytest.param(entry("F32", [2**31] * 4, 0, 4), 4, "needs more than 2**63 bytes", id="product-overflow"),
    pytest.param(entry("F32", [2**62] * 1000, 0, 4), 4, "needs more than 2**63 bytes", id="many-huge-dims"),
    pytest.param(entry("I16", [2**62], 0, 2**63), 2**63, "data_offsets", id="offset-2**63"),
    pytest.param(entry("F32", [1], 0, 2**64 + 4), 4, "data_offsets", id="offset-2**64"),
]


@pytest.mark.parametrize(("value", "data", "message"), HOSTILE)
def test_values_torch_cannot_take_are_header_errors(value: dict[str, object], data: int, message: str) -> None:
    with pytest.raises(HeaderError, match=re.escape(message)) as caught:
        parse({"w": value}, data)
    assert caught.value.url == URL and str(caught.value).startswith(URL)


def raw_header(text: str | bytes, data: bytes = b"\0" * 4) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return len(raw).to_bytes(8, "little") + raw + data


W = '"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'


def ours(file: bytes) -> object:
    size = declared_header_size(file[:16], url=URL, file_size=len(file), max_header_size=10**8)
    return parse_header(memoryview(file)[8 : 8 + size], url=URL, file_size=len(file))


def crate(file: bytes) -> list[tuple[str, dict[str, object]]] | None:
    try:
        return safetensors.deserialize(file)  # type: ignore[no-any-return]
    except safetensors.SafetensorError:
        return None


AS_THE_CRATE = [
    pytest.param(" \n\t\r{" + W + "}", True, "", id="leading-whitespace"),
    pytest.param("{" + W + "} \n", True, "", id="trailing-whitespace"),
    pytest.param("{" + W + "}x", False, "not valid JSON (Extra data", id="trailing-junk"),
    pytest.param("\u00a0{" + W + "}", False, "must be a JSON object", id="leading-nbsp"),
    pytest.param('{"\\ud800":' + W[4:] + "}", False, "unpaired surrogate", id="lone-surrogate-name"),
    pytest.param('{"\\udc00x":' + W[4:] + "}", False, "unpaired surrogate", id="lone-low-surrogate-name"),
    pytest.param('{"\\ud83d\\ude00":' + W[4:] + "}", True, "", id="surrogate-pair-name"),
    pytest.param('{"__metadata__":{"k":"\\ud800"},' + W + "}", False, "unpaired surrogate", id="surrogate-metadata"),
    pytest.param('{"__metadata__":null,' + W + "}", True, "", id="null-metadata"),
    pytest.param('{"__metadata__":{"k":1},' + W + "}", False, "must map strings to strings", id="int-metadata"),
    pytest.param('{"__metadata__":{"k":["v"]},' + W + "}", False, "must map strings to strings", id="list-metadata"),
    pytest.param('{"__metadata__":{"k":true},' + W + "}", False, "must map strings to strings", id="bool-metadata"),
    pytest.param('{"__metadata__":[],' + W + "}", False, "must map strings to strings", id="array-metadata"),
    pytest.param(
        '{"__metadata__":{"k":' + "[" * 100_000 + "]" * 100_000 + "}," + W + "}",
        False,
        "nested too deeply",
        id="deep-metadata",
    ),
    pytest.param('{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":NaN}}', False, "NaN", id="nan"),
    pytest.param(
        '{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":-Infinity}}', False, "-Infinity is not JSON", id="inf"
    ),
    pytest.param('{"w":{"dtype":"F32","shape":[-0],"data_offsets":[0,0]}}', False, "-0.0", id="negative-zero-dim"),
    pytest.param('{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":-0}}', True, "", id="negative-zero-extra"),
    pytest.param('{"w-0":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', True, "", id="minus-zero-in-a-name"),
    pytest.param('{"w":{"dtype":"F32","shape":[1e0],"data_offsets":[0,4]}}', False, "shape [1.0]", id="exponent-dim"),
    pytest.param(
        '{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":' + "[" * 125 + "]" * 125 + "}}",
        True,
        "",
        id="extra-field-125-deep",
    ),
    pytest.param(
        '{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":' + "[" * 126 + "]" * 126 + "}}",
        False,
        "nested more than 125 deep",
        id="extra-field-126-deep",
    ),
    pytest.param('{"w":{"shape":[1],"data_offsets":[0,4],"dtype":"F32"}}', True, "", id="fields-in-any-order"),
    pytest.param(
        '{"w":[["dtype","F32"],["shape",[1]],["data_offsets",[0,4]]]}', False, "must be a JSON object", id="array-entry"
    ),
    pytest.param(
        '{"w":{"dtype":"F32","dtype":"F32","shape":[1],"data_offsets":[0,4]}}', False, "more than once", id="dup-field"
    ),
]


@pytest.mark.parametrize(("text", "accepted", "message"), AS_THE_CRATE)
def test_accepts_and_refuses_as_safetensors_does(text: str, accepted: bool, message: str) -> None:
    data = b"" if '"data_offsets":[0,0]' in text else b"\0" * 4
    file = raw_header(text, data)
    assert (crate(file) is not None) == accepted
    if accepted:
        assert ours(file).keys() == sorted(name for name, _ in crate(file) or [])  # type: ignore[attr-defined]
    else:
        with pytest.raises(HeaderError, match=re.escape(message)) as caught:
            ours(file)
        assert caught.value.url == URL


# --- not a safetensors file at all ---------------------------------------------------------------------------


def _torch_bytes(**options: object) -> bytes:
    buffer = io.BytesIO()
    torch.save({"w": torch.ones(3)}, buffer, **options)  # type: ignore[arg-type]
    return buffer.getvalue()


NOT_SAFETENSORS = [
    pytest.param(b"<!DOCTYPE html>\n<html><head><title>404</title></head></html>", "an HTML page", id="html"),
    pytest.param(b"\n  <html><body>Access denied</body></html>", "an HTML page", id="html-lowercase"),
    pytest.param(b'<?xml version="1.0"?><Error><Code>NoSuchKey</Code></Error>', "an XML document", id="s3-error"),
    pytest.param(_torch_bytes(), "a zip archive (a PyTorch .bin/.pt checkpoint?)", id="torch-zip"),
    pytest.param(
        _torch_bytes(_use_new_zipfile_serialization=False), "a Python pickle (a PyTorch .bin checkpoint", id="pickle"
    ),
    pytest.param(gzip.compress(b"x" * 100, mtime=0), "a gzip stream", id="gzip"),
    pytest.param(b'{"weight_map": {"w": "model-00001.safetensors"}}', "JSON text", id="index-json"),
    pytest.param(
        b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 12\n", "a Git LFS pointer", id="lfs"
    ),
    pytest.param(b"Service Unavailable, please retry", "looks like text", id="text"),
    pytest.param(b"GGUF\x03\x00\x00\x00" + bytes(32), "a GGUF model file", id="gguf"),
]


@pytest.mark.parametrize(("content", "kind"), NOT_SAFETENSORS)
def test_a_file_that_is_not_safetensors_says_what_it_looks_like(content: bytes, kind: str) -> None:
    with pytest.raises(HeaderError, match=re.escape(kind)) as caught:
        declared_header_size(content[:4096], url=URL, file_size=len(content), max_header_size=10**8)
    message = str(caught.value)
    assert message.startswith(f"{URL}: not a safetensors file: it looks like ") or "too small" in message
    assert "max_header_size" not in message


def test_a_short_text_file_is_named_too() -> None:
    with pytest.raises(HeaderError, match="too small to be safetensors .*, and it looks like text"):
        declared_header_size(b"oops", url=URL, file_size=4, max_header_size=100)


def test_genuine_headers_are_not_mistaken_for_other_formats(tmp_path: Path) -> None:
    # A header length whose bytes spell a signature ("PK\x03\x04" is 67,324,752) is still read as a length.
    size = int.from_bytes(b"PK\x03\x04", "little")
    prefix = size.to_bytes(8, "little") + b"{"
    assert declared_header_size(prefix, url=URL, file_size=size + 100, max_header_size=10**8) == size
    raw = write(tmp_path / "f.safetensors", {"w": torch.ones(2)}).read_bytes()
    assert declared_header_size(raw, url=URL, file_size=len(raw), max_header_size=10**8) > 0


# --- differential fuzzing against the safetensors crate -----------------------------------------------------


class Raw(str):
    """A JSON token written as is (``-0``, ``1.0``, ``NaN``, a huge integer)."""


Obj = list[tuple[str, object]]  # a JSON object as pairs, so that a key can appear twice


def dump(value: object) -> str:
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, list) and value and all(isinstance(p, tuple) for p in value):
        return "{" + ",".join(f"{json.dumps(k)}:{dump(v)}" for k, v in value) + "}"
    if isinstance(value, list):
        return "[" + ",".join(dump(v) for v in value) + "]"
    return json.dumps(value)  # strings escape lone surrogates as \udXXX, as a hostile writer could


ODD_NUMBERS = ["1.0", "-1", "-0", "true", "null", '"1"', "1e0", str(2**63 - 1), str(2**63), str(2**64), "[]", "{}"]
BAD_DTYPES: list[object] = ["F31", "f32", "", 1, None, ["F32"]]
MUTATIONS = [
    "none", "offset", "reverse", "duplicate", "dim", "dtype", "extra", "missing", "field-order", "metadata",
    "whitespace", "junk", "surrogate", "nan", "data", "empty", "array",
]  # fmt: skip


@st.composite
def headers(draw: st.DrawFn) -> tuple[bytes, str]:
    """A file: a consistent header of a few tensors, with at most two mutations applied to it."""
    specs = draw(
        st.lists(
            st.tuples(
                st.sampled_from(["a", "b", "layer.0.w", "ü", "\U0001f600"]),
                st.sampled_from(sorted(DTYPE_BITS)),
                st.lists(st.integers(0, 4) | st.sampled_from([2**62, 2**63 - 1]), max_size=3),
            ),
            max_size=4,
            unique_by=lambda s: s[0],
        )
    )
    entries: list[tuple[str, Obj]] = []
    offset = 0
    for name, dtype, shape in specs:
        nbytes = math.prod(shape) * DTYPE_BITS[dtype] // 8 if 0 not in shape else 0
        if nbytes > 1 << 20 or (0 not in shape and math.prod(shape) * DTYPE_BITS[dtype] % 8):
            shape = [8]  # a whole number of bytes for every dtype, F4 and F6 included
            nbytes = DTYPE_BITS[dtype]
        fields: Obj = [("dtype", dtype), ("shape", list(shape)), ("data_offsets", [offset, offset + nbytes])]
        entries.append((name, fields))
        offset += nbytes
    metadata: object = None
    lead, trail, data = "", "", offset
    applied = draw(st.lists(st.sampled_from(MUTATIONS), max_size=2))
    for mutation in applied:
        target = draw(st.integers(0, max(0, len(entries) - 1)))
        fields = entries[target][1] if entries and not isinstance(entries[target][1], Raw) else []
        keys = [key for key, _ in fields]
        if mutation == "offset" and "data_offsets" in keys:
            at = keys.index("data_offsets")
            step = draw(st.sampled_from([-1, 1]))
            fields[at] = ("data_offsets", [o + step for o in fields[at][1]])  # type: ignore[attr-defined]
        elif mutation == "reverse":
            entries.reverse()
        elif mutation == "duplicate" and entries:
            entries.append(entries[target])
        elif mutation == "dim" and "shape" in keys:
            at = keys.index("shape")
            fields[at] = ("shape", [Raw(draw(st.sampled_from(ODD_NUMBERS)))] + list(fields[at][1]))  # type: ignore[call-overload]
        elif mutation == "dtype" and "dtype" in keys:
            fields[keys.index("dtype")] = ("dtype", draw(st.sampled_from(BAD_DTYPES)))
        elif mutation == "extra" and entries:
            depth = draw(st.sampled_from([1, 125, 126]))
            fields.append(("x", Raw("[" * depth + "]" * depth)))
        elif mutation == "missing" and fields:
            del fields[draw(st.integers(0, len(fields) - 1))]
        elif mutation == "field-order" and entries:
            fields.reverse()
        elif mutation == "metadata":
            metadata = draw(
                st.sampled_from([Raw("null"), [("k", "v")], [("k", 1)], [("k", [("a", "b")])], Raw("[]"), Raw("{}")])
            )
        elif mutation == "whitespace":
            lead, trail = draw(st.sampled_from([" ", "\n\t", ""])), draw(st.sampled_from([" ", "\r\n", ""]))
        elif mutation == "junk":
            trail = draw(st.sampled_from(["x", "\x00", "}", ","]))
        elif mutation == "surrogate" and entries:
            entries[target] = (draw(st.sampled_from(["\ud800", "a\udfff", "\ud83d\ude00"])), fields)
        elif mutation == "nan" and entries:
            fields.append(("x", Raw(draw(st.sampled_from(["NaN", "Infinity", "-0"])))))
        elif mutation == "data":
            data += draw(st.sampled_from([-1, 1]))
        elif mutation == "empty":
            entries = []
        elif mutation == "array" and entries:  # the fields as an array of pairs, not an object
            array = Raw("[" + ",".join(f"[{json.dumps(k)},{dump(v)}]" for k, v in fields) + "]")
            entries[target] = (entries[target][0], array)  # type: ignore[assignment]
    pairs: Obj = ([("__metadata__", metadata)] if metadata is not None else []) + list(entries)
    text = lead + (dump(pairs) if pairs else "{}") + trail
    raw = text.encode("utf-8", "surrogatepass") if "surrogate" not in applied else text.encode()
    return len(raw).to_bytes(8, "little") + raw + b"\0" * max(0, data), ",".join(applied)


# Where stream_st is deliberately stricter than the crate (each is in the module docstring of header.py).
STRICTER = ("more than once", "2**63", "too large for torch")


@settings(max_examples=400, deadline=None)
@given(headers())
def test_accepts_what_the_crate_accepts_and_refuses_what_it_refuses(case: tuple[bytes, str]) -> None:
    file, mutations = case
    expected = crate(file)
    try:
        header = ours(file)
    except HeaderError as exc:
        assert exc.url == URL and str(exc).startswith(URL)
        assert expected is None or any(s in str(exc) for s in STRICTER), (mutations, str(exc))
        return
    assert expected is not None, (mutations, "stream_st accepted what the crate refused")
    got = {info.name: (info.dtype, list(info.shape), file[info.start : info.end]) for info in header}  # type: ignore[attr-defined]
    assert got == {name: (t["dtype"], t["shape"], bytes(t["data"])) for name, t in expected}  # type: ignore[index]


@settings(max_examples=400, deadline=None)
@given(headers())
def test_the_fast_path_agrees_with_the_careful_validator(case: tuple[bytes, str]) -> None:
    file, _ = case
    size = int.from_bytes(file[:8], "little")
    try:
        doc = json.loads(file[8 : 8 + size].decode(), object_pairs_hook=tuple)
    except ValueError:
        return
    if not isinstance(doc, tuple):
        return
    args = {"url": URL, "data_start": 8 + size, "file_size": len(file)}
    try:
        careful: object = header_module._validate(doc, **args)  # type: ignore[arg-type]
    except HeaderError:
        careful = HeaderError
    try:
        fast: object = header_module._validate_common(doc, **args)  # type: ignore[arg-type]
    except header_module._NotCommonError:
        return
    assert fast == careful  # never accepts what the careful validator refuses, nor builds another result


def test_an_empty_tensor_listed_after_its_neighbour_is_put_first_as_the_crate_does() -> None:
    text = (
        '{"a":{"dtype":"BF16","shape":[],"data_offsets":[0,2]},"b":{"dtype":"BF16","shape":[0],"data_offsets":[0,0]}}'
    )
    file = raw_header(text, b"\0\0")
    assert sorted(name for name, _ in crate(file) or []) == ["a", "b"]  # accepted (its order varies run to run)
    assert ours(file).offset_keys() == ["b", "a"]  # type: ignore[attr-defined]  # sorted by (begin, end)


@settings(max_examples=400, deadline=None)
@given(headers())
def test_parse_header_names_the_error_the_careful_validator_names(case: tuple[bytes, str]) -> None:
    """The fast path and the careful validator resuming after it end as the careful validator alone does."""
    file, _ = case
    size = int.from_bytes(file[:8], "little")
    text = file[8 : 8 + size].decode()
    try:
        rules = {"parse_constant": header_module._no_constant, "parse_int": header_module._int_rule(text)}
        doc = json.loads(text, object_pairs_hook=tuple, **rules)  # type: ignore[arg-type]
        if not isinstance(doc, tuple):
            return
        header_module._reject_lone_surrogates(doc, URL)
        alone: object = header_module._validate(doc, url=URL, data_start=8 + size, file_size=len(file))
    except HeaderError as exc:
        alone = str(exc)
    except ValueError:  # not JSON: nothing to validate
        return
    try:
        header = ours(file)
    except HeaderError as exc:
        assert str(exc) == alone
        return
    assert (header.tensors, header.metadata) == alone  # type: ignore[attr-defined]
