"""safetensors dtype codes, their sizes, and the torch dtypes that hold them."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# Size of one element in bits, for every dtype code of the safetensors format (its Rust `Dtype` enum).
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}

# torch attribute names, looked up lazily so that this module imports without torch.
_TORCH_NAMES: dict[str, str] = {
    "BOOL": "bool",
    "F4": "float4_e2m1fn_x2",  # torch >= 2.8: two F4 values per element, so the last dim is halved
    "U8": "uint8",
    "I8": "int8",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E8M0": "float8_e8m0fnu",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "I16": "int16",
    "U16": "uint16",
    "F16": "float16",
    "BF16": "bfloat16",
    "I32": "int32",
    "U32": "uint32",
    "F32": "float32",
    "C64": "complex64",
    "F64": "float64",
    "I64": "int64",
    "U64": "uint64",
}


def to_torch(code: str) -> torch.dtype | None:
    """The torch dtype for a safetensors dtype code, or None if this torch has none (F6; F4 before 2.8)."""
    import torch

    name = _TORCH_NAMES.get(code)
    return getattr(torch, name, None) if name else None


def torch_shape(code: str, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The shape torch gives a tensor of ``shape`` in the file, as safetensors.torch does: F4 packs two
    values per ``float4_e2m1fn_x2`` element, so its last dim is halved; None if that dim is odd."""
    if code != "F4":
        return shape
    if not shape or shape[-1] % 2:
        return None
    return (*shape[:-1], shape[-1] // 2)


# Names accepted for ``dtype=`` (a cast target) besides torch.dtype objects, and the torch dtype each names:
# floating types only, since casting weights to an integer type destroys them.
CAST_NAMES: dict[str, str] = {
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "f16": "float16",
    "fp16": "float16",
    "float16": "float16",
    "half": "float16",
    "f32": "float32",
    "fp32": "float32",
    "float32": "float32",
    "float": "float32",
    "f64": "float64",
    "fp64": "float64",
    "float64": "float64",
    "double": "float64",
}
