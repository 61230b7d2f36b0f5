"""Parse and validate a safetensors header: pure functions over bytes, no I/O.

The checks follow the safetensors Rust crate (0.8): size cap, UTF-8 JSON object (leading and trailing JSON
whitespace allowed; NaN, Infinity, unpaired surrogate escapes and nesting past serde_json's 127 levels
refused), known dtypes, non-negative integer shapes and offsets, checked arithmetic, offsets contiguous from
0 with no gaps or overlaps, each span equal to numel × itemsize, last end equal to the data length. Where
stream_st is stricter: no key may appear twice (the crate keeps the last of two tensors of one name), dims,
offsets and sizes must fit torch's int64 (the crate accepts up to 2**64, which torch.empty then refuses),
and the data length implied by the header must equal the object's real size. Nothing is allocated from a
header value before it has been checked against the object's size, and a file that is not safetensors at
all (an HTML page, a zip or pickle checkpoint, ...) is named as what it looks like.
"""

from __future__ import annotations

import enum
import gc
import json
import math
import mmap
import re
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import chain, islice
from json.decoder import scanstring  # type: ignore[attr-defined]
from typing import Any, NamedTuple

from .dtypes import DTYPE_BITS
from .errors import HeaderError

LENGTH_PREFIX = 8  # bytes of the little-endian u64 header length that starts every file
METADATA_KEY = "__metadata__"


class TensorInfo(NamedTuple):
    """One tensor entry: its dtype code, shape, and absolute byte span [start, end) in the object.

    A named tuple: a header may hold a million of them, and it is the cheapest record to make."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Header:
    """A validated header: tensors in file (offset) order, metadata, and the sizes that frame them."""

    url: str
    header_size: int  # N, the JSON length declared by the first 8 bytes
    file_size: int
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] | None = field(default=None)

    @property
    def data_start(self) -> int:
        """Offset of the first data byte: 8 + N."""
        return LENGTH_PREFIX + self.header_size

    @property
    def data_size(self) -> int:
        return self.file_size - self.data_start

    def keys(self) -> list[str]:
        """Tensor names sorted, as ``safetensors.safe_open.keys()`` returns them."""
        return sorted(self.tensors)

    def offset_keys(self) -> list[str]:
        """Tensor names in the order their bytes appear in the file."""
        return list(self.tensors)

    def __iter__(self) -> Iterator[TensorInfo]:
        return iter(self.tensors.values())

    def __len__(self) -> int:
        return len(self.tensors)


def declared_header_size(prefix: bytes, *, url: str, file_size: int, max_header_size: int) -> int:
    """Read and check N from the first 8 bytes, before anything of size N is read or allocated.

    ``prefix`` is the object's first bytes (the more, the better a file that is not safetensors at all,
    such as an HTML error page, is recognised and named)."""
    if file_size < LENGTH_PREFIX:
        raise HeaderError(
            f"{url}: object is {file_size} bytes, too small to be safetensors "
            f"(it must start with an {LENGTH_PREFIX}-byte header length){_looks_like(prefix, ', and it')}",
            url=url,
        )
    if len(prefix) < LENGTH_PREFIX:
        raise HeaderError(f"{url}: got {len(prefix)} bytes of the {LENGTH_PREFIX}-byte header length", url=url)
    (size,) = struct.unpack("<Q", prefix[:LENGTH_PREFIX])
    # A genuine header is JSON: its first byte is "{" or whitespace. Anything else is worth naming.
    json_start = prefix[LENGTH_PREFIX : LENGTH_PREFIX + 1] in (b"", b"{", b" ", b"\t", b"\n", b"\r")
    if size > max_header_size or LENGTH_PREFIX + size > file_size or not json_start:
        kind = _looks_like(prefix, "")
        if kind:
            raise HeaderError(f"{url}: not a safetensors file: it{kind}", url=url)
    if size > max_header_size:
        raise HeaderError(
            f"{url}: header declares {size} bytes, more than the limit of {max_header_size} "
            "(raise max_header_size if the file is genuine)",
            url=url,
        )
    if LENGTH_PREFIX + size > file_size:
        raise HeaderError(
            f"{url}: header declares {size} bytes but the object is only {file_size} bytes long",
            url=url,
        )
    return int(size)


# What a file starts with, for the files most often served or saved in place of a safetensors file.
_SIGNATURES: list[tuple[bytes, str]] = [
    (b"PK\x03\x04", "a zip archive (a PyTorch .bin/.pt checkpoint?)"),
    (b"PK\x05\x06", "an empty zip archive"),
    (b"\x1f\x8b", "a gzip stream (a compressed file, or a body sent with Content-Encoding: gzip?)"),
    (b"\x28\xb5\x2f\xfd", "a zstd stream (a compressed file?)"),
    (b"\xfd7zXZ\x00", "an xz stream (a compressed file?)"),
    (b"BZh", "a bzip2 stream (a compressed file?)"),
    (b"GGUF", "a GGUF model file"),
    (b"\x93NUMPY", "a NumPy .npy array"),
    (b"\x89HDF\r\n\x1a\n", "an HDF5 file (a Keras .h5 checkpoint?)"),
    (b"version https://git-lfs", "a Git LFS pointer file, not the file it points to"),
]
_MARKUP = re.compile(rb"\s*<(!doctype\s+html|html|head|body|title|!--)", re.IGNORECASE)
_XML = re.compile(rb"\s*<\?xml", re.IGNORECASE)


def _looks_like(prefix: bytes, lead: str) -> str:
    """`` looks like <what>`` after ``lead`` when the first bytes are a known non-safetensors format, else ""."""
    head = bytes(prefix[:512])
    if head.startswith(b"\xef\xbb\xbf"):
        head = head[3:]  # a UTF-8 byte order mark starts some text files
    kind = next((what for magic, what in _SIGNATURES if head.startswith(magic)), "")
    if not kind and head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        kind = "a Python pickle (a PyTorch .bin checkpoint in the legacy format?)"
    elif not kind and _MARKUP.match(head):
        kind = "an HTML page (an error or login page served in place of the file?)"
    elif not kind and _XML.match(head):
        kind = "an XML document (an error response from the server?)"
    elif not kind and head.lstrip()[:1] in (b"{", b"["):
        kind = "JSON text (an index or config file, or an error response?)"
    elif not kind and head and _is_text(head):
        kind = "text"
    return f"{lead} looks like {kind}" if kind else ""


def _is_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 3:  # not just a character cut at the end of the prefix
            return False
        text = head[: exc.start].decode("utf-8")
    return all(c.isprintable() or c in "\t\n\r" for c in text)


def _repeated_key(pairs: tuple[tuple[str, object], ...]) -> str:
    """The first key that ``pairs`` holds twice."""
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            return key
        seen.add(key)
    raise AssertionError("no duplicate key")


@contextmanager
def _gc_paused() -> Iterator[None]:
    # A header of a million tensors creates millions of containers, none of them cyclic; the cyclic
    # collector would scan them over and over while they are created (2-3x the parse time).
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


_LEADING_WHITESPACE = re.compile(r"[ \t\n\r]*")  # JSON's whitespace, which the safetensors crate skips
_MAX_INT64 = 2**63 - 1  # torch sizes and offsets are int64


def parse_header(raw: bytes | bytearray | memoryview, *, url: str, file_size: int) -> Header:
    """Validate the JSON header ``raw`` (the N bytes after the length) of an object of ``file_size`` bytes."""
    view = memoryview(raw)
    if view.nbytes > _STREAMED_METADATA:
        # Window by window, as HeaderReader takes a download: a long __metadata__ is decoded value by value
        # (one copy of it, not the decoded text and then the strings json builds from it).
        reader = HeaderReader(url=url, header_size=view.nbytes, file_size=file_size, window=_PARSE_WINDOW)
        flat = view.cast("B") if view.format != "B" or view.ndim != 1 else view
        try:
            while reader.missing and not reader.declined:
                space = reader.space()
                space[:] = flat[reader.received : reader.received + len(space)]
                reader.landed(len(space))
            if not reader.declined:
                return reader.header()
        except WholeHeaderNeededError:
            pass  # something only the whole-text parser names (invalid JSON, most likely): it has the bytes
    return _parse_text(view, url=url, file_size=file_size)


def _parse_text(raw: memoryview, *, url: str, file_size: int) -> Header:
    """``parse_header`` of the header decoded whole and parsed by ``json``: any header, any error."""
    header_size = raw.nbytes
    try:
        text = str(raw, "utf-8")
    except UnicodeDecodeError as exc:
        raise HeaderError(f"{url}: header is not valid UTF-8 ({exc.reason} at byte {exc.start})", url=url) from None
    first = _LEADING_WHITESPACE.match(text).end()  # type: ignore[union-attr]  # it matches the empty string
    if text[first : first + 1] != "{":
        got = text[first : first + 20]
        raise HeaderError(f"{url}: header must be a JSON object starting with '{{', got {got!r}", url=url)
    with _gc_paused():
        doc, escaped_surrogate = _loads(text, url=url, size=header_size)
        del text  # before the tensors are built: the peak is the text or the parsed tree, not both
        try:
            return _header(doc, escaped_surrogate, url=url, header_size=header_size, file_size=file_size)
        finally:
            del doc  # freed while the collector still sleeps, so it never scans the parsed tree


def _loads(text: str, *, url: str, size: int) -> tuple[tuple[tuple[str, object], ...], bool]:
    """The JSON object ``text`` as a tuple of pairs, and whether it may hold an escaped surrogate."""
    # UTF-8 cannot carry a surrogate, so a lone one can only come from a \\uD8xx-\\uDFxx escape.
    # (Searching one character first: a memchr, ten times faster than a substring search over 100 MB.)
    escaped_surrogate = "\\" in text and ("\\ud" in text or "\\uD" in text)
    try:
        # Objects become tuples of pairs (arrays stay lists): parsed in C, duplicates still visible.
        doc = json.loads(text, object_pairs_hook=tuple, parse_constant=_no_constant, parse_int=_int_rule(text))
    except RecursionError:
        raise HeaderError(f"{url}: header JSON is nested too deeply", url=url) from None
    except MemoryError:
        raise HeaderError(f"{url}: header of {size} bytes is too large to parse here", url=url) from None
    except ValueError as exc:
        raise HeaderError(f"{url}: header is not valid JSON ({exc})", url=url) from None
    return doc, escaped_surrogate


def _header(
    doc: tuple[tuple[str, object], ...], escaped_surrogate: bool, *, url: str, header_size: int, file_size: int
) -> Header:
    """The ``Header`` of a parsed document, validated. Called while the collector is paused, by a caller
    that drops ``doc`` before it wakes (else the collector would scan the whole parsed tree)."""
    try:
        if escaped_surrogate:
            _reject_lone_surrogates(doc, url)
        tensors, metadata = _validated(doc, url=url, data_start=LENGTH_PREFIX + header_size, file_size=file_size)
    except HeaderError as exc:
        del doc
        # Its traceback's frames hold the parsed tree and the tensors built so far: dropped here, while
        # the collector still sleeps, they are freed at once instead of scanned when it wakes.
        exc.__traceback__ = None
        raise exc from None
    return Header(url=url, header_size=header_size, file_size=file_size, tensors=tensors, metadata=metadata)


def _validated(
    doc: tuple[tuple[str, object], ...], *, url: str, data_start: int, file_size: int
) -> tuple[dict[str, TensorInfo], dict[str, str] | None]:
    """The tensors and metadata of a parsed header: the fast path if it applies, else the careful one."""
    passed = None
    try:
        return _validate_common(doc, url=url, data_start=data_start, file_size=file_size)
    except _NotCommonError as exc:
        passed = exc.args[0] if exc.args else None
    return _validate(doc, url=url, data_start=data_start, file_size=file_size, passed=passed)


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")  # Python's json reads NaN and Infinity, JSON (and the crate) do not


_NEGATIVE_ZERO = re.compile(r"[\[,:][ \t\n\r]*-0[ \t\n\r]*[,\]}]")


def _int_rule(text: str) -> Callable[[str], object] | None:
    """The crate reads ``-0`` as a float (so no dimension or offset), Python as the int 0; the costly hook
    that keeps it a float is used only when the text may hold one."""
    if "-" in text and "-0" in text and _NEGATIVE_ZERO.search(text):
        return lambda digits: -0.0 if digits == "-0" else int(digits)
    return None


def _reject_lone_surrogates(doc: tuple[tuple[str, object], ...], url: str) -> None:
    """Refuse a string holding half a surrogate pair, as the safetensors crate does (Rust strings are UTF-8)."""
    for name, _ in doc:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise HeaderError(
                f"{url}: tensor name {name!r} holds an unpaired surrogate escape; names must be valid Unicode",
                url=url,
                tensor=name,
            ) from None
    try:
        json.dumps(doc, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise HeaderError(f"{url}: header holds a string with an unpaired surrogate escape", url=url) from None
    except RecursionError:
        raise HeaderError(f"{url}: header JSON is nested too deeply", url=url) from None


class _NotCommonError(Exception):
    """The header is not the common, valid case that ``_validate_common`` accepts; ``args[0]``, where
    given, is what it had checked (``_Passed``)."""


class _Passed(NamedTuple):
    """The first ``entries`` of a header that passed the fast path: in order, contiguous, of the right
    sizes, and the tensors made of them; all that is left to check of them is their dims' types and ranges."""

    entries: int  # of the header, __metadata__ included
    tensor_entries: int
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] | None
    seen_metadata: bool


def _validate_common(
    doc: tuple[tuple[str, object], ...], *, url: str, data_start: int, file_size: int
) -> tuple[dict[str, TensorInfo], dict[str, str] | None]:
    """The result of ``_validate`` for a valid header written as safetensors writes it (entries in offset
    order, fields in the order dtype, shape, data_offsets, no empty tensor); ``_NotCommonError`` otherwise.

    A million entries cost about a microsecond each here: the loop checks little more than the arithmetic
    needs, and the dims of all tensors are checked afterwards in a few C-level passes."""
    metadata: dict[str, str] | None = None
    seen_metadata = False
    tensors: dict[str, TensorInfo] = {}
    new_info, dtypes, prod, index = _new_info, _DTYPE_CODES, math.prod, int.__index__
    expected = 0
    entries = 0
    done = 0  # entries of ``doc`` that passed (the careful validator need not check them again)
    entry: Any  # any JSON value until checked
    try:
        for name, entry in doc:
            if name == METADATA_KEY:
                if seen_metadata:
                    raise _NotCommonError
                try:
                    metadata = _metadata(entry, url)
                except HeaderError:
                    raise _NotCommonError from None  # an earlier entry's error must be named first
                seen_metadata = True
                done += 1
                continue
            (k1, dtype), (k2, shape), (k3, offsets) = entry
            if type(entry) is not tuple or k1 != "dtype" or k2 != "shape" or k3 != "data_offsets":
                raise _NotCommonError  # (a JSON array of three pairs unpacks too, but is no object)
            if type(shape) is not list:
                raise _NotCommonError
            begin, end = offsets
            if type(begin) is not int or type(end) is not int or begin != expected or len(shape) > 4:
                raise _NotCommonError
            code, bits = dtypes[dtype]
            shape = tuple(shape)
            numel = prod(map(index, shape))  # int.__index__ refuses floats and strings before any product
            if numel <= 0 or numel * bits != (end - begin) * 8:
                raise _NotCommonError  # empty tensors (whose other dims must still fit torch) go the careful way
            tensors[name] = new_info(TensorInfo, (name, code, shape, data_start + begin, data_start + end))
            expected = end
            entries += 1
            done += 1
    except (_NotCommonError, ValueError, TypeError, KeyError):  # not pairs, an unhashable dtype, not numbers...
        raise _NotCommonError(_Passed(done, entries, tensors, metadata, seen_metadata)) from None
    if not tensors or entries != len(tensors) or data_start + expected != file_size or expected > _MAX_INT64:
        raise _NotCommonError  # no tensors, a repeated name, a wrong size: let _validate name it
    shapes = [info[2] for info in tensors.values()]
    types = {*map(type, chain.from_iterable(shapes))}
    if types and (
        types != _INT or min(chain.from_iterable(shapes)) < 0 or max(chain.from_iterable(shapes)) > _MAX_INT64
    ):
        raise _NotCommonError  # bools, negative dims (an even number of them makes a positive numel), huge dims
    return tensors, metadata


def _validate(
    doc: tuple[tuple[str, object], ...],
    *,
    url: str,
    data_start: int,
    file_size: int,
    passed: _Passed | None = None,
) -> tuple[dict[str, TensorInfo], dict[str, str] | None]:
    """Check every rule and name the first broken one. What the fast path ``passed`` is taken over once
    its dims are checked in bulk, so a header rejected at its last entry costs one validation, not two.
    One function on purpose: its loops run once per entry of headers of up to a million entries, and a
    helper called per entry would add a Python call to each."""
    # Written for a million entries: one pass checks each entry's types, one its place and size.
    metadata: dict[str, str] | None = None
    seen_metadata = False
    tensors: dict[str, TensorInfo] = {}
    in_order = True
    last_span = (-1, -1)
    trusted = 0
    if passed and passed.tensor_entries == len(passed.tensors) and _plain_dims(doc[: passed.entries]):
        trusted, tensors, metadata, seen_metadata = (
            passed.entries,
            passed.tensors,
            passed.metadata,
            passed.seen_metadata,
        )
        if tensors:
            last = tensors[next(reversed(tensors))]
            last_span = (last.start - data_start, last.end - data_start)
    placed = len(tensors)  # in order, contiguous and of the right sizes already
    for name, value in doc[trusted:]:
        if name == METADATA_KEY:
            if seen_metadata:
                raise HeaderError(f"{url}: header has the key {name!r} more than once", url=url)
            seen_metadata = True
            metadata = _metadata(value, url)
            continue
        if name in tensors:
            raise HeaderError(f"{url}: header has the key {name!r} more than once", url=url)
        if type(value) is not tuple or not value:
            raise _bad(url, name, "must be a JSON object with dtype, shape and data_offsets")
        if len(value) == 3 and value[0][0] == "dtype" and value[1][0] == "shape" and value[2][0] == "data_offsets":
            (_, dtype), (_, shape), (_, offsets) = value  # the order safetensors writes
        else:
            dtype, shape, offsets = _fields(name, value, url)
        if type(dtype) is not str or dtype not in _DTYPES:
            raise _bad(url, name, f"has unknown dtype {_shown(dtype)}")
        if type(shape) is not list or (
            shape and ({*map(type, shape)} != _INT or min(shape) < 0 or max(shape) > _MAX_INT64)
        ):
            raise _bad(url, name, f"has shape {_shown(shape)}; a shape is a list of integers in [0, 2**63)")
        if type(offsets) is not list or len(offsets) != 2:
            raise _bad_offsets(url, name, offsets)
        begin, end = offsets
        if type(begin) is not int or type(end) is not int or not (0 <= begin <= _MAX_INT64 and 0 <= end <= _MAX_INT64):
            raise _bad_offsets(url, name, offsets)
        if (begin, end) < last_span:  # the crate sorts by (begin, end): an empty tensor may come first
            in_order = False
        last_span = (begin, end)
        tensors[name] = _new_info(
            TensorInfo, (name, _DTYPES[dtype], tuple(shape), data_start + begin, data_start + end)
        )
    if not in_order:
        tensors = {info.name: info for info in sorted(tensors.values(), key=lambda info: (info.start, info.end))}
        placed = 0

    expected = data_start
    previous: str | None = None
    if placed:
        previous, _, _, _, expected = (
            tensors[next(reversed(tensors))] if placed == len(tensors) else _nth(tensors, placed - 1)
        )
    for name, dtype, shape, start, end in islice(tensors.values(), placed, None):
        if start != expected:
            begin = start - data_start
            if previous is None:
                what = f"the first tensor must start at 0 but tensor {name!r} starts at {begin}"
            elif start < expected:
                what = (
                    f"tensor {previous!r} ends at {expected - data_start} but tensor {name!r} starts at {begin} "
                    "(overlap)"
                )
            else:
                what = (
                    f"tensor {previous!r} ends at {expected - data_start} but the next tensor {name!r} "
                    f"starts at {begin} (gaps are not allowed)"
                )
            raise HeaderError(f"{url}: {what}", url=url, tensor=name)
        if end < start:
            raise _bad(
                url, name, f"has data_offsets [{start - data_start}, {end - data_start}] that end before they start"
            )
        if len(shape) <= 4 and 0 not in shape:
            bits = math.prod(shape) * DTYPE_BITS[dtype]  # at most 4 dims below 2**63: no big-integer cost
            if bits > _MAX_BITS:
                bits = -1
        else:
            bits = _bits_needed(shape, DTYPE_BITS[dtype])
        if bits < 0 and 0 in shape:
            raise _bad(url, name, f"has shape {_short(shape)}, too large for torch even when empty (2**63 bytes)")
        if bits < 0 or bits % 8 or bits // 8 != end - start:
            needs = "more than 2**63 bytes" if bits < 0 else f"{bits / 8:g} bytes"
            raise _bad(
                url,
                name,
                f"of dtype {dtype} and shape {_short(shape)} needs {needs} but its data_offsets "
                f"[{start - data_start}, {end - data_start}] span {end - start}",
            )
        expected = end
        previous = name
    if expected != file_size:
        raise HeaderError(
            f"{url}: tensors end at data offset {expected - data_start} (byte {expected}) "
            f"but the object is {file_size} bytes long",
            url=url,
        )
    return tensors, metadata


def _nth(tensors: dict[str, TensorInfo], index: int) -> TensorInfo:
    return next(islice(tensors.values(), index, None))


def _plain_dims(pairs: tuple[tuple[str, Any], ...]) -> bool:
    """Whether the dims and ends of entries that passed the fast path are ints in [0, 2**63)."""
    entries = [entry for name, entry in pairs if name != METADATA_KEY]
    dims = [dim for entry in entries for dim in entry[1][1]]
    ends = [entry[2][1][1] for entry in entries]
    return (not dims or ({*map(type, dims)} == _INT and min(dims) >= 0 and max(dims) <= _MAX_INT64)) and (
        not ends or max(ends) <= _MAX_INT64
    )


def _fields(name: str, value: tuple[tuple[str, object], ...], url: str) -> tuple[object, object, object]:
    """dtype, shape and data_offsets of an entry whose fields are not in safetensors' order (or not pairs)."""
    if not all(type(pair) is tuple for pair in value):
        raise _bad(url, name, "must be a JSON object with dtype, shape and data_offsets")
    fields = dict(value)
    if len(fields) != len(value):
        raise _bad(url, name, f"has the field {_repeated_key(value)!r} more than once")
    for required in ("dtype", "shape", "data_offsets"):
        if required not in fields:
            raise _bad(url, name, f"has no {required!r}")
    for key, extra in fields.items():
        if key not in ("dtype", "shape", "data_offsets") and _deeper_than(extra, _MAX_EXTRA_DEPTH):
            raise _bad(url, name, f"has a field {key!r} nested more than {_MAX_EXTRA_DEPTH} deep")
    return fields["dtype"], fields["shape"], fields["data_offsets"]


# serde_json, the crate's parser, refuses JSON nested more than 127 deep: the header object, the entry, and
# 125 levels of a field it otherwise ignores (metadata values and the known fields cannot nest at all).
_MAX_EXTRA_DEPTH = 125


def _deeper_than(value: object, depth: int) -> bool:
    """Whether ``value`` (objects as tuples of pairs) nests more than ``depth`` arrays or objects deep."""
    level: list[object] = [value]
    for _ in range(depth):
        children: list[object] = []
        for item in level:
            if type(item) is list:
                children.extend(item)
            elif type(item) is tuple:
                children.extend(pair[1] for pair in item)
        if not children:
            return False
        level = children
    return any(type(item) in (list, tuple) for item in level)


def _bad_offsets(url: str, name: str, offsets: object) -> HeaderError:
    return _bad(url, name, f"has data_offsets {_shown(offsets)}; expected two integers in [0, 2**63) [begin, end]")


_INT = {int}
_DTYPE_CODES = {code: (code, bits) for code, bits in DTYPE_BITS.items()}
_new_info = tuple.__new__  # TensorInfo(...) without the Python frame of its __new__


def _metadata(value: object, url: str) -> dict[str, str] | None:
    if value is None:
        return None
    if type(value) is tuple:
        metadata = dict(value)
        if len(metadata) != len(value):
            key = _repeated_key(value)
            raise HeaderError(f"{url}: {METADATA_KEY} has the key {key!r} more than once", url=url)
        if all(type(v) is str for v in metadata.values()):
            return metadata
    raise HeaderError(f"{url}: {METADATA_KEY} must map strings to strings", url=url)


def _bad(url: str, name: str, what: str) -> HeaderError:
    return HeaderError(f"{url}: tensor {name!r} {what}", url=url, tensor=name)


def _shown(value: object) -> str:
    """A header value as JSON (objects were parsed to tuples of pairs), cut short."""

    def plain(v: object) -> object:
        if type(v) is tuple:
            return {k: plain(x) for k, x in v}
        if type(v) is list:
            return [plain(x) for x in v]
        return v

    try:
        text = repr(plain(value))
    except RecursionError:
        text = "(nested too deeply)"
    return text if len(text) <= 80 else text[:77] + "..."


# The dtype codes as one shared string each, so a million tensors do not hold a million copies.
_DTYPES = {code: code for code in DTYPE_BITS}
# Element counts and byte sizes must fit torch's int64 (dims of 0 aside: torch multiplies the others).
_MAX_BITS = _MAX_INT64 * 8


def _bits_needed(shape: tuple[int, ...], bits: int) -> int:
    """numel × bits, or -1 if the product of the non-zero dims × bits passes 2**63 bytes (torch.empty
    refuses most such shapes even when a dim is 0); stops early, so many huge dims cost no big-integer time."""
    total = bits
    for dim in shape:
        if dim:
            total *= dim
            if total > _MAX_BITS:
                return -1
    return 0 if 0 in shape else total


def _short(shape: tuple[int, ...]) -> str:
    return str(list(shape)) if len(shape) <= 8 else f"[{', '.join(map(str, shape[:8]))}, ...] ({len(shape)} dims)"


# --- a header read window by window --------------------------------------------------------------------------

_STREAMED_METADATA = 1 << 20  # metadata bytes after which HeaderReader drops what it parsed
_PARSE_WINDOW = 1 << 20  # bytes parse_header hands HeaderReader at a time
_OPENING_WITHIN = 4096  # bytes in which a streamed header must open its __metadata__ object
# The reader's loop costs a few microseconds per entry, json's C parser under one: metadata whose first
# entries average under _LONG_ENTRY bytes is parsed whole (its strings' overhead outweighs its bytes anyway).
_FIRST_ENTRIES, _LONG_ENTRY = 16, 4096
_CHECKED_PIECE = 1 << 16  # characters of a long string checked for control characters at a time
_OPENING = re.compile(rb'[ \t\n\r]*\{[ \t\n\r]*"__metadata__"[ \t\n\r]*:[ \t\n\r]*\{')
_WHITESPACE = re.compile(rb"[ \t\n\r]*")
_QUOTE, _BACKSLASH, _COMMA, _COLON, _CLOSE = b'"'[0], b"\\"[0], b","[0], b":"[0], b"}"[0]


class WholeHeaderNeededError(Exception):
    """``HeaderReader`` dropped bytes it had parsed, then met what only the whole-text parser handles (most
    likely an error it must name exactly): read the header again and give it to ``parse_header``."""


class _More(Exception):  # noqa: N818  (a signal, not an error: the window ends inside the next entry)
    pass


class _Unusual(Exception):  # noqa: N818  (a signal: not the plain case the reader decodes itself)
    pass


class HeaderReader:
    """A header parsed as its bytes arrive in order, window after window, holding little more than what it
    has not parsed yet: a long ``__metadata__`` object at the start (where the safetensors crate writes it)
    is decoded string by string straight from each window, and the next window lands in the same memory.
    So a 99 MB header of metadata peaks near its parsed strings, not at its bytes, their decoded text and
    the strings at once.

    Put up to ``len(space())`` bytes into ``space()``, then call ``landed(count)``, while ``missing``; then
    ``header()``. Any other header (``declined``) is kept whole and parsed as ``parse_header`` does; where
    the reader had dropped bytes already, ``WholeHeaderNeededError`` says to read it again."""

    def __init__(self, *, url: str, header_size: int, file_size: int, window: int) -> None:
        self.url, self.header_size, self.file_size = url, header_size, file_size
        self.received = 0  # header bytes landed so far
        self.declined = False
        # Anonymous memory: a page costs only once written, so the whole header fits, but only what is kept
        # (a window and the entry it cut, or the whole of a declined header) is ever resident.
        self._buffer = mmap.mmap(-1, max(1, header_size))
        self._view = memoryview(self._buffer)
        self._window = max(1, window)
        self._end = 0  # bytes in the buffer: the header's from its start, or once dropping, from _pos's entry
        self._pos = 0  # the next byte to parse
        self._state = _State.OPENING
        # A string the last window cut, as offsets from _pos: (its opening quote, how far it was searched for
        # its closing quote, whether it holds a backslash), so that the next window's search goes on from there.
        self._cut: tuple[int, int, bool] | None = None
        self._pairs: list[tuple[str, str]] = []
        self._dropping = False  # past _STREAMED_METADATA bytes of metadata: parsed bytes are dropped

    @property
    def missing(self) -> int:
        return self.header_size - self.received

    def space(self) -> memoryview:
        """Where the next bytes go: a window while metadata is parsed, then all that is missing."""
        if self._dropping and self._state is _State.METADATA and self._pos:
            kept = self._end - self._pos  # the start of the entry the last window cut
            self._buffer.move(0, self._pos, kept)  # (a window's worth of pages, reused window after window)
            self._end, self._pos = kept, 0
        size = self.missing if self.declined or self._state is _State.REST else min(self._window, self.missing)
        return self._view[self._end : self._end + size]

    def landed(self, count: int) -> None:
        """``count`` bytes were put at the start of ``space()``."""
        self._end += count
        self.received += count
        if not self.declined and self._state is not _State.REST:
            self._parse()

    def header(self) -> Header:
        """The validated header, once every byte has landed."""
        if self.missing:
            raise AssertionError(f"{self.missing} header bytes have not landed")
        if self.declined:
            return _parse_text(self._view[: self._end], url=self.url, file_size=self.file_size)
        if self._state is not _State.REST:
            raise AssertionError(f"header parsed to {self._state}")
        try:
            text = str(self._view[: self._end], "utf-8")
        except UnicodeDecodeError:
            raise WholeHeaderNeededError from None
        metadata = tuple(self._pairs)
        self._pairs.clear()
        with _gc_paused():
            try:
                rest, escaped_surrogate = _loads(text, url=self.url, size=self.header_size)
            except HeaderError:
                raise WholeHeaderNeededError from None  # its message names positions in the whole text
            del text
            doc = ((METADATA_KEY, metadata), *rest)
            del metadata, rest
            try:
                # The metadata strings hold no lone surrogate (checked as they were decoded), so the check
                # of the rest decides as the check of the whole document would.
                return _header(
                    doc, escaped_surrogate, url=self.url, header_size=self.header_size, file_size=self.file_size
                )
            finally:
                del doc

    def _parse(self) -> None:
        """Parse what landed as far as it goes; an entry cut by the end of a window waits for the next."""
        try:
            if self._state is _State.OPENING:
                self._open()
            while self._state is _State.METADATA:
                self._entry()
                if not self._dropping:
                    if len(self._pairs) > _FIRST_ENTRIES and self._pos < len(self._pairs) * _LONG_ENTRY:
                        raise _Unusual  # short entries: json parses them faster, and they hold no more memory
                    self._dropping = self._pos >= _STREAMED_METADATA
            if self._state is _State.AFTER_METADATA:
                self._close()
        except _More:
            if not self.missing:
                self._unusual()  # the header ends inside the metadata: an error the whole parse names
        except (_Unusual, ValueError, MemoryError):  # incl. invalid UTF-8 and JSON (scanstring's errors)
            self._unusual()

    def _unusual(self) -> None:
        if self._dropping:
            raise WholeHeaderNeededError
        self.declined = True  # every byte is still there: the rest lands behind it

    def _open(self) -> None:
        found = _OPENING.match(self._buffer, 0, self._end)
        if found is None:
            if self._end < min(_OPENING_WITHIN, self.header_size):
                raise _More
            raise _Unusual
        self._pos = found.end()
        self._state = _State.METADATA

    def _entry(self) -> None:
        """One ``"key": "value"`` and the comma or brace after it (or the brace of an empty object)."""
        buffer, end = self._buffer, self._end
        at = _WHITESPACE.match(buffer, self._pos, end).end()  # type: ignore[union-attr]  # matches ""
        if at >= end:
            raise _More
        if buffer[at] == _CLOSE and not self._pairs:  # an empty object (after a comma, only a key may follow)
            self._pos, self._state = at + 1, _State.AFTER_METADATA
            return
        key, at = self._string(at)
        at = self._expect(at, _COLON)
        value, at = self._string(_WHITESPACE.match(buffer, at, end).end())  # type: ignore[union-attr]
        at = _WHITESPACE.match(buffer, at, end).end()  # type: ignore[union-attr]
        if at >= end:
            raise _More
        if buffer[at] == _CLOSE:
            self._state = _State.AFTER_METADATA
        elif buffer[at] != _COMMA:
            raise _Unusual
        self._pairs.append((key, value))
        self._pos, self._cut = at + 1, None

    def _expect(self, at: int, byte: int) -> int:
        at = _WHITESPACE.match(self._buffer, at, self._end).end()  # type: ignore[union-attr]
        if at >= self._end:
            raise _More
        if self._buffer[at] != byte:
            raise _Unusual
        return at + 1

    def _string(self, at: int) -> tuple[str, int]:
        """The JSON string whose opening quote is at ``at``, and the index after its closing quote."""
        buffer, view, end = self._buffer, self._view, self._end
        if at >= end:
            raise _More
        if buffer[at] != _QUOTE:
            raise _Unusual
        start = search = at + 1
        escaped = False
        if self._cut is not None and self._cut[0] == at - self._pos:  # a string longer than the last window:
            search, escaped = self._pos + self._cut[1], self._cut[2]  # search on where that window ended
        close = buffer.find(b'"', search, end)
        escaped = escaped or buffer.find(b"\\", search, end if close < 0 else close) >= 0
        while close >= 0 and escaped:  # the closing quote is the first one after an even run of backslashes
            before = close
            while buffer[before - 1] == _BACKSLASH:
                before -= 1
            if (close - before) % 2 == 0:
                break
            close = buffer.find(b'"', close + 1, end)
        if close < 0:
            self._cut = (at - self._pos, end - self._pos, escaped)  # (offsets survive the move to the front)
            raise _More
        if not escaped:
            return _plain_string(view, start, close), close + 1
        text = str(view[at : close + 1], "utf-8")
        value, stop = scanstring(text, 1, True)
        if stop != len(text):
            raise _Unusual
        if "\\u" in text:
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise _Unusual from None  # a lone surrogate: refused, as the whole-text parser names it
        return value, close + 1

    def _close(self) -> None:
        """After the metadata object: a comma and the next key, or the brace that ends the header."""
        buffer, end = self._buffer, self._end
        at = _WHITESPACE.match(buffer, self._pos, end).end()  # type: ignore[union-attr]
        if at >= end:
            raise _More
        if buffer[at] == _COMMA:
            at = _WHITESPACE.match(buffer, at + 1, end).end()  # type: ignore[union-attr]
            if at >= end:
                raise _More
            if buffer[at] != _QUOTE:
                raise _Unusual
        elif buffer[at] != _CLOSE:
            raise _Unusual
        if not self._dropping:
            raise _Unusual  # short metadata: the whole-text parser is as fast, and has every byte
        # The rest (the tensor entries, or the closing brace) is parsed at the end, as an object of its own.
        self._buffer.move(1, at, end - at)
        self._buffer[0] = b"{"[0]
        self._end, self._pos = 1 + end - at, 0
        self._state = _State.REST


class _State(enum.Enum):
    OPENING = enum.auto()  # before the __metadata__ object
    METADATA = enum.auto()  # inside it
    AFTER_METADATA = enum.auto()  # after its closing brace
    REST = enum.auto()  # the tensor entries: kept to be parsed whole


def _plain_string(view: memoryview, start: int, close: int) -> str:
    """The string of the bytes between quotes at ``start - 1`` and ``close``, which hold no backslash; a
    ``ValueError`` if they are not UTF-8 or hold a control character (json's own check, in C)."""
    if close - start <= _CHECKED_PIECE:
        return scanstring(str(view[start : close + 1], "utf-8"), 0, True)[0]  # type: ignore[no-any-return]
    value = str(view[start:close], "utf-8")
    for at in range(0, len(value), _CHECKED_PIECE):
        scanstring(value[at : at + _CHECKED_PIECE] + '"', 0, True)
    return value
