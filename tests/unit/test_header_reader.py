"""HeaderReader, the window-by-window parser of a long leading __metadata__: it must end exactly as the
whole-text parser does (same Header, same error message) for every header, whatever the windows."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_st import header as header_module
from stream_st.errors import HeaderError
from stream_st.header import HeaderReader, WholeHeaderNeededError, parse_header

URL = "https://host/m.safetensors"
FILL = "x" * 300_000  # four of them take the metadata past the point where the reader drops what it parsed
W = '"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'
DATA = 4  # bytes of data after the header: the tensor w


def raw(text: str | bytes) -> bytes:
    return text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text


def outcome(parse: object) -> object:
    """A parser's result: the Header, or the type and message of its error."""
    try:
        return parse()  # type: ignore[operator]
    except HeaderError as exc:
        return (type(exc), str(exc), exc.url, exc.tensor)


def whole(header: bytes, data: int = DATA) -> object:
    view = memoryview(header)
    return outcome(lambda: header_module._parse_text(view, url=URL, file_size=8 + len(header) + data))


def streamed(header: bytes, window: int, data: int = DATA) -> tuple[object, str]:
    """What a download read window by window ends with (read again whole where the reader asks), and how."""
    reader = HeaderReader(url=URL, header_size=len(header), file_size=8 + len(header) + data, window=window)

    def parse() -> object:
        while reader.missing:
            space = reader.space()
            space[:] = header[reader.received : reader.received + len(space)]
            reader.landed(len(space))
        return reader.header()

    try:
        result = outcome(parse)
    except WholeHeaderNeededError:
        return whole(header, data), "read again"
    return result, "declined" if reader.declined else "streamed"


def metadata_first(*values: str, rest: str = "," + W + "}", keys: list[str] | None = None) -> str:
    """A header text whose __metadata__ holds FILL four times, then ``values`` (JSON string literals)."""
    names = keys or [f'"v{i}"' for i in range(len(values))]
    pairs = [f'"f{i}":"{FILL}"' for i in range(4)] + [f"{k}:{v}" for k, v in zip(names, values)]
    return '{"__metadata__":{' + ",".join(pairs) + "}" + rest


VALID = [
    pytest.param(metadata_first('"plain"'), id="plain"),
    pytest.param(metadata_first(r'"a\nb"', r'"q\"q"', r'"back\\slash"', r'"\/"', r'"\t\b\f\r"'), id="escapes"),
    pytest.param(metadata_first(r'"ends in an escaped backslash\\"', r'"\""', r'"\\\""', '""'), id="escape-at-end"),
    pytest.param(metadata_first(r'"\u00e9\u65e5"', r'"\ud83d\ude00"', r'"\uD83D\uDE00 upper"'), id="unicode-escapes"),
    pytest.param(metadata_first('"é 日本語 😀"', '"\u2028\u0085"'), id="unicode"),
    pytest.param(metadata_first('"v"', keys=[r'"k\u0041\n"']), id="escaped-key"),
    pytest.param(metadata_first('"' + "y" * 3_000_000 + '"'), id="value-longer-than-windows"),
    pytest.param(metadata_first('"' + "\\n" * 200_000 + '"'), id="long-escaped-value"),
    pytest.param(metadata_first('"' + "y" * 70_000 + '\\"' + "y" * 70_000 + '\\\\"'), id="long-value-escapes-late"),
    pytest.param(metadata_first('"z"', rest="}"), id="no-tensors"),
    pytest.param(metadata_first('"z"', rest="} \n\t"), id="no-tensors-trailing-space"),
    pytest.param(
        ' \n\t{ "__metadata__" :\n{ ' + ", ".join(f'"f{i}" : "{FILL}"' for i in range(4)) + " } ,\n " + W + " }\r\n",
        id="whitespace",
    ),
    pytest.param(
        metadata_first(
            '"v"',
            rest=","
            + ",".join(
                f'"t{i}":{{"dtype":"BF16","shape":[2],"data_offsets":[{4 * i},{4 * i + 4}]}}' for i in range(2000)
            )
            + "}",
        ),
        id="many-tensors-after",
    ),
    pytest.param(metadata_first(*[f'"{i}"' for i in range(5000)]), id="many-short-values"),
]


@pytest.mark.parametrize("text", VALID)
def test_valid_headers_stream_to_what_the_whole_text_parser_builds(text: str) -> None:
    header = raw(text)
    data = 8000 if '"t0"' in text else DATA if '"w"' in text else 0
    expected = whole(header, data)
    assert isinstance(expected, header_module.Header)
    for window in (1000, 4099, 1 << 16, 1 << 20):
        assert streamed(header, window, data) == (expected, "streamed"), window
    assert parse_header(header, url=URL, file_size=8 + len(header) + data) == expected


INVALID = [
    pytest.param(
        metadata_first('"a"', '"b"', keys=['"k"', '"k"']), "__metadata__ has the key 'k' more than once", id="dup"
    ),
    pytest.param(metadata_first('"a"', keys=['"f0"']), "__metadata__ has the key 'f0' more than once", id="dup-fill"),
    pytest.param(metadata_first(r'"\ud800"'), "unpaired surrogate", id="lone-surrogate"),
    pytest.param(metadata_first(r'"\udfff\ud800"'), "unpaired surrogate", id="reversed-pair"),
    pytest.param(metadata_first('"v"', keys=[r'"\ud800"']), "unpaired surrogate", id="lone-surrogate-key"),
    pytest.param(
        metadata_first('"v"', rest=r',"\ud800":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'),
        "tensor name '\\ud800' holds an unpaired surrogate",
        id="lone-surrogate-tensor",
    ),
    pytest.param(metadata_first('"a\x01b"'), "Invalid control character", id="control"),
    pytest.param(metadata_first('"a\nb"'), "Invalid control character", id="raw-newline"),
    pytest.param(metadata_first('"' + "y" * 200_000 + '\x1f"'), "Invalid control character", id="control-long"),
    pytest.param(metadata_first('"a' + chr(0xDC80) + 'b"'), "not valid UTF-8", id="utf8"),
    pytest.param(raw(metadata_first('"ab"'))[:-80] + b"\xff" + raw(W + "}")[-79:], "not valid UTF-8", id="utf8-rest"),
    pytest.param(metadata_first(r'"\x"'), "Invalid \\escape", id="bad-escape"),
    pytest.param(metadata_first(r'"\u12"'), "Invalid \\uXXXX escape", id="short-u-escape"),
    pytest.param(metadata_first("1"), "must map strings to strings", id="number"),
    pytest.param(metadata_first("null"), "must map strings to strings", id="null"),
    pytest.param(metadata_first('{"a":"b"}'), "must map strings to strings", id="object"),
    pytest.param(metadata_first('["a"]'), "must map strings to strings", id="array"),
    pytest.param(metadata_first("[" * 200_000 + "]" * 200_000), "nested too deeply", id="deep"),
    pytest.param(metadata_first('"a"') + "x", "Extra data", id="junk-after"),
    pytest.param(metadata_first('"a"', rest="x," + W + "}"), "Expecting ',' delimiter", id="junk-between"),
    pytest.param(metadata_first('"a"', rest=",}"), "Expecting property name", id="comma-brace"),
    pytest.param(metadata_first('"a"', rest=","), "Expecting property name", id="comma-end"),
    pytest.param(metadata_first('"a"', rest=""), "Expecting ',' delimiter", id="unclosed"),
    pytest.param(metadata_first('"a"')[:-20], "Unterminated string", id="truncated-rest"),
    pytest.param(metadata_first('"a"')[:700_000], "Unterminated string", id="truncated-metadata"),
    pytest.param(metadata_first('"a"').replace(',"v0":', ',"v0"'), "Expecting ':' delimiter", id="no-colon"),
    pytest.param(metadata_first('"a"').replace('"},"w"', '",},"w"'), "Expecting property name", id="trailing-comma"),
    pytest.param(
        metadata_first('"a"', rest=',"__metadata__":{}}'),
        "header has the key '__metadata__' more than once",
        id="metadata-twice",
    ),
    pytest.param(
        metadata_first('"a"', rest=',"w":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}'),
        "tensor 'w' of dtype F32 and shape [2] needs 8 bytes",
        id="tensor-error",
    ),
    pytest.param(
        metadata_first('"a"', rest=',"w":{"dtype":"F32","shape":[NaN],"data_offsets":[0,4]}}'),
        "NaN is not JSON",
        id="nan-in-rest",
    ),
    pytest.param(
        metadata_first('"a"', rest=',"w":{"dtype":"F32","shape":[-0],"data_offsets":[0,0]}}'),
        "shape [-0.0]",
        id="negative-zero-in-rest",
    ),
]


@pytest.mark.parametrize(("text", "message"), INVALID)
def test_invalid_headers_fail_as_the_whole_text_parser_fails(text: str | bytes, message: str) -> None:
    header = raw(text)
    expected = whole(header)
    assert isinstance(expected, tuple) and message in expected[1], expected
    for window in (1000, 4099, 1 << 16, 1 << 20):
        result, how = streamed(header, window)
        assert result == expected, (window, how)
    assert outcome(lambda: parse_header(header, url=URL, file_size=8 + len(header) + DATA)) == expected


def test_an_error_after_dropped_bytes_asks_for_the_header_again() -> None:
    header = raw(metadata_first(r'"\ud800"'))  # the lone surrogate comes after 1.2 MB of parsed metadata
    assert streamed(header, 1 << 16)[1] == "read again"
    header = raw(metadata_first('"a"', rest=""))  # so does a JSON error in the rest, whose message has positions
    assert streamed(header, 1 << 16)[1] == "read again"


OTHER_LAYOUTS = [
    pytest.param('{"' + "w" * 2_000_000 + '":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', id="no-metadata"),
    pytest.param("{" + W + ',"__metadata__":{"k":"' + FILL * 4 + '"}}', id="metadata-last"),
    pytest.param(
        '{"__metadata__":{"format":"pt"},"' + "w" * 2_000_000 + '":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
        id="short-metadata",
    ),
    pytest.param('{"__metadata__":null,' + W + ',"x":"' + FILL * 4 + '"}', id="null-metadata"),
    pytest.param('{"__metadata\\u005f_":{"k":"' + FILL * 4 + '"},' + W + "}", id="escaped-metadata-key"),
]


@pytest.mark.parametrize("text", OTHER_LAYOUTS)
def test_other_headers_are_declined_and_parsed_whole(text: str) -> None:
    header = raw(text)
    expected = whole(header)
    for window in (1000, 1 << 20):
        assert streamed(header, window) == (expected, "declined")


def test_metadata_of_short_entries_is_declined_and_parsed_whole() -> None:
    header = raw('{"__metadata__":{' + ",".join(f'"key{i}":"{"v" * 30}"' for i in range(40_000)) + "}," + W + "}")
    assert len(header) > 1 << 20
    expected = whole(header)
    assert isinstance(expected, header_module.Header)
    assert streamed(header, 1 << 16) == (expected, "declined")


def test_the_opening_must_land_in_the_first_4_kib() -> None:
    header = raw(" " * 5000 + metadata_first('"a"'))
    expected = whole(header)
    assert streamed(header, 1000) == (expected, "declined")  # 4 KiB of spaces and no brace yet
    assert streamed(header, 1 << 20) == (expected, "streamed")


def test_parsed_windows_are_dropped() -> None:
    """The reader holds a window and the entry it cut, not all it has seen: its buffer's pages are reused."""
    header = raw(metadata_first(*['"' + "y" * 100_000 + '"'] * 20))
    reader = HeaderReader(url=URL, header_size=len(header), file_size=8 + len(header) + DATA, window=1 << 16)
    held = []
    while reader.missing:
        space = reader.space()
        space[:] = header[reader.received : reader.received + len(space)]
        reader.landed(len(space))
        held.append(reader._end)  # bytes in its buffer, which starts where the first unparsed entry does
    assert reader._dropping and reader.header() == whole(header)
    assert max(held[20:]) <= (1 << 16) + 100_000 + 100  # a window, and the value it cut (and its key)


# --- random strings, random windows ------------------------------------------------------------------------

GOOD_PARTS = ["a", "é", "日", "😀", " ", '\\"', "\\\\", "\\/", "\\n", "\\u00e9", "\\ud83d\\ude00"]
GOOD_PARTS += ["\\uDBFF\\uDFFF", "\x7f"]
BAD_PARTS = ["\\ud800", "\\udfff", "\\u12", "\\x", "\x00", "\x1f", "\n", "\\", '"', "\udc80"]
GOOD = st.lists(st.sampled_from(GOOD_PARTS), max_size=6).map(lambda parts: '"' + "".join(parts) + '"')
BAD = st.tuples(GOOD, st.sampled_from(BAD_PARTS)).map(lambda pair: pair[0][:-1] + pair[1] + '"')
STRING = st.one_of(*[GOOD] * 9, BAD)  # mostly valid, so that many headers are accepted
VALUE = st.one_of(*[STRING] * 9, st.sampled_from(["1", "null", "{}", '{"a":"b"}', "[]", "true"]))
SPACE = st.sampled_from(["", "", " ", "\n", "\t ", "\r\n"])


@st.composite
def metadata_headers(draw: st.DrawFn) -> bytes:
    """A header opening with __metadata__ whose keys and values are strings of valid and invalid JSON."""
    pairs = draw(st.lists(st.tuples(STRING, VALUE, SPACE, SPACE), max_size=4))
    body = ",".join(f"{a}{key}{b}:{a}{value}{b}" for key, value, a, b in pairs)
    good, bad = ["," + W + "}"] * 3 + ["}"], [",}", "," + W, ',"__metadata__":{}}', "," + W + "}x", "x"]
    rest = draw(st.sampled_from(good) | st.sampled_from(good) | st.sampled_from(bad))
    text = draw(SPACE) + "{" + draw(SPACE) + '"__metadata__"' + draw(SPACE) + ":" + draw(SPACE) + "{" + body + "}"
    return raw(text + draw(SPACE) + rest + draw(SPACE))


@contextmanager
def dropping_after(size: int) -> Iterator[None]:
    """The reader engages on short headers and drops what it parsed after ``size`` bytes of metadata."""
    with mock.patch.object(header_module, "_STREAMED_METADATA", size):
        yield


@settings(max_examples=1000, deadline=None)
@given(metadata_headers(), st.integers(1, 64), st.sampled_from([0, 16, 10**9]))
def test_random_metadata_streams_to_what_the_whole_text_parser_builds(header: bytes, window: int, drop: int) -> None:
    expected = whole(header)
    with dropping_after(drop):
        result, how = streamed(header, window)
        assert result == expected, how
        assert outcome(lambda: parse_header(header, url=URL, file_size=8 + len(header) + DATA)) == expected


def test_random_headers_do_reach_the_reader() -> None:
    """The property above is not vacuous: plain headers of that kind are streamed, not declined."""
    header = raw('{"__metadata__":{"k":"v", "\\u00e9":"\\ud83d\\ude00"},' + W + "}")
    with dropping_after(16):
        result, how = streamed(header, 3)
    assert how == "streamed" and isinstance(result, header_module.Header)
    assert result.metadata == json.loads(header)["__metadata__"]
