"""Parse and validate a safetensors header: pure functions over bytes, no I/O.

The checks follow the safetensors Rust crate (size cap, UTF-8 JSON object, known dtypes, non-negative
integer shapes, checked arithmetic, offsets contiguous from 0 with no gaps or overlaps, each span equal to
numel × itemsize, last end equal to the data length) and add two of our own: no duplicate keys, and the
data length implied by the header must equal the object's real size. Nothing is allocated from a header
value before it has been checked against the object's size.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

from .dtypes import DTYPE_BITS
from .errors import HeaderError

LENGTH_PREFIX = 8  # bytes of the little-endian u64 header length that starts every file
METADATA_KEY = "__metadata__"


@dataclass(frozen=True)
class TensorInfo:
    """One tensor entry: its dtype code, shape, and absolute byte span [start, end) in the object."""

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
    """Read and check N from the first 8 bytes, before anything of size N is read or allocated."""
    if file_size < LENGTH_PREFIX:
        raise HeaderError(
            f"{url}: object is {file_size} bytes, too small to be safetensors "
            f"(it must start with an {LENGTH_PREFIX}-byte header length)",
            url=url,
        )
    if len(prefix) < LENGTH_PREFIX:
        raise HeaderError(f"{url}: got {len(prefix)} bytes of the {LENGTH_PREFIX}-byte header length", url=url)
    (size,) = struct.unpack("<Q", prefix[:LENGTH_PREFIX])
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


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    seen: dict[str, object] = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKeyError(key)
        seen[key] = value
    return seen


class _DuplicateKeyError(Exception):
    pass


def _non_negative_int(value: object) -> bool:
    # bool is an int subclass; JSON `true` is not a dimension.
    return type(value) is int and value >= 0


def parse_header(raw: bytes, *, url: str, file_size: int) -> Header:
    """Validate the JSON header ``raw`` (the N bytes after the length) of an object of ``file_size`` bytes."""
    header_size = len(raw)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HeaderError(f"{url}: header is not valid UTF-8 ({exc.reason} at byte {exc.start})", url=url) from None
    if not text.startswith("{"):
        raise HeaderError(f"{url}: header must be a JSON object starting with '{{', got {text[:20]!r}", url=url)
    try:
        doc = json.loads(text, object_pairs_hook=_reject_duplicates)
    except _DuplicateKeyError as exc:
        raise HeaderError(f"{url}: header has the key {exc.args[0]!r} more than once", url=url) from None
    except RecursionError:
        raise HeaderError(f"{url}: header JSON is nested too deeply", url=url) from None
    except ValueError as exc:
        raise HeaderError(f"{url}: header is not valid JSON ({exc})", url=url) from None
    if not isinstance(doc, dict):
        raise HeaderError(f"{url}: header must be a JSON object", url=url)

    metadata = doc.pop(METADATA_KEY, None)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise HeaderError(f"{url}: {METADATA_KEY} must map strings to strings", url=url)

    data_start = LENGTH_PREFIX + header_size
    entries = [_tensor_entry(name, value, url) for name, value in doc.items()]
    entries.sort(key=lambda e: (e[2][0], e[2][1]))
    tensors: dict[str, TensorInfo] = {}
    expected_start = 0
    previous: str | None = None
    for name, (dtype, shape), (begin, end) in entries:
        if begin != expected_start:
            if previous is None:
                what = f"the first tensor must start at 0 but tensor {name!r} starts at {begin}"
            elif begin < expected_start:
                what = f"tensor {previous!r} ends at {expected_start} but tensor {name!r} starts at {begin} (overlap)"
            else:
                what = (
                    f"tensor {previous!r} ends at {expected_start} but the next tensor {name!r} "
                    f"starts at {begin} (gaps are not allowed)"
                )
            raise HeaderError(f"{url}: {what}", url=url, tensor=name)
        if end < begin:
            raise HeaderError(
                f"{url}: tensor {name!r} has data_offsets [{begin}, {end}] that end before they start",
                url=url,
                tensor=name,
            )
        bits = _bits_needed(shape, DTYPE_BITS[dtype], limit=_MAX_BITS)
        if bits is None or bits % 8 or bits // 8 != end - begin:
            needs = "more than 2**64 bytes" if bits is None else f"{bits / 8:g} bytes"
            raise HeaderError(
                f"{url}: tensor {name!r} of dtype {dtype} and shape {_short(shape)} needs "
                f"{needs} but its data_offsets [{begin}, {end}] span {end - begin}",
                url=url,
                tensor=name,
            )
        tensors[name] = TensorInfo(name, dtype, shape, data_start + begin, data_start + end)
        expected_start = end
        previous = name
    if data_start + expected_start != file_size:
        raise HeaderError(
            f"{url}: tensors end at data offset {expected_start} (byte {data_start + expected_start}) "
            f"but the object is {file_size} bytes long",
            url=url,
        )
    return Header(url=url, header_size=header_size, file_size=file_size, tensors=tensors, metadata=metadata)


_MAX_BITS = 8 << 64  # no tensor can hold more than 2**64 bytes


def _bits_needed(shape: tuple[int, ...], bits: int, *, limit: int) -> int | None:
    """numel × bits, or None once it passes ``limit``: the checked arithmetic of the Rust crate, and it
    keeps a hostile shape of many huge dimensions from costing big-integer time."""
    if 0 in shape:
        return 0
    total = bits
    for dim in shape:
        total *= dim
        if total > limit:
            return None
    return total


def _short(shape: tuple[int, ...]) -> str:
    return str(list(shape)) if len(shape) <= 8 else f"[{', '.join(map(str, shape[:8]))}, ...] ({len(shape)} dims)"


def _tensor_entry(name: str, value: object, url: str) -> tuple[str, tuple[str, tuple[int, ...]], tuple[int, int]]:
    def bad(what: str) -> HeaderError:
        return HeaderError(f"{url}: tensor {name!r} {what}", url=url, tensor=name)

    if not isinstance(value, dict):
        raise bad("must be a JSON object with dtype, shape and data_offsets")
    for required in ("dtype", "shape", "data_offsets"):
        if required not in value:
            raise bad(f"has no {required!r}")
    dtype, shape, offsets = value["dtype"], value["shape"], value["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise bad(f"has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_non_negative_int(d) for d in shape):
        raise bad(f"has shape {shape!r}; a shape is a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_non_negative_int(o) for o in offsets)):
        raise bad(f"has data_offsets {offsets!r}; expected two non-negative integers [begin, end]")
    return name, (dtype, tuple(shape)), (offsets[0], offsets[1])
