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

import gc
import json
import math
import re
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import chain, islice
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
    header_size = memoryview(raw).nbytes
    try:
        text = str(raw, "utf-8")
    except UnicodeDecodeError as exc:
        raise HeaderError(f"{url}: header is not valid UTF-8 ({exc.reason} at byte {exc.start})", url=url) from None
    first = _LEADING_WHITESPACE.match(text).end()  # type: ignore[union-attr]  # it matches the empty string
    if text[first : first + 1] != "{":
        got = text[first : first + 20]
        raise HeaderError(f"{url}: header must be a JSON object starting with '{{', got {got!r}", url=url)
    # UTF-8 cannot carry a surrogate, so a lone one can only come from a \\uD8xx-\\uDFxx escape.
    # (Searching one character first: a memchr, ten times faster than a substring search over 100 MB.)
    escaped_surrogate = "\\" in text and ("\\ud" in text or "\\uD" in text)
    with _gc_paused():
        try:
            # Objects become tuples of pairs (arrays stay lists): parsed in C, duplicates still visible.
            doc = json.loads(text, object_pairs_hook=tuple, parse_constant=_no_constant, parse_int=_int_rule(text))
        except RecursionError:
            raise HeaderError(f"{url}: header JSON is nested too deeply", url=url) from None
        except MemoryError:
            raise HeaderError(f"{url}: header of {header_size} bytes is too large to parse here", url=url) from None
        except ValueError as exc:
            raise HeaderError(f"{url}: header is not valid JSON ({exc})", url=url) from None
        del text  # before the tensors are built: the peak is the text or the parsed tree, not both
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
        del doc  # freed while the collector still sleeps, so it never scans the parsed tree
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
