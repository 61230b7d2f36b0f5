"""stream_st: load safetensors checkpoints straight from URLs into torch tensors, fetching only what is needed."""

from __future__ import annotations

from .api import (
    iter_tensors,
    iter_tensors_async,
    load_file,
    load_file_async,
    load_model,
    load_model_async,
    read_header,
    read_header_async,
)
from .config import Config
from .errors import (
    ConfigError,
    FetchError,
    HeaderError,
    IncompleteReadError,
    IntegrityError,
    IntegrityWarning,
    ModelLoadError,
    ObjectChangedError,
    RangeNotSupportedError,
    StreamSTError,
    TensorNotFoundError,
    UnsupportedDtypeError,
)
from .fetch import Stats
from .header import Header, TensorInfo
from .parallel import TensorParallel
from .safe_open import AsyncSafeOpen, TensorSlice, safe_open, safe_open_async

__version__ = "0.1.0"

__all__ = [
    "AsyncSafeOpen",
    "Config",
    "ConfigError",
    "FetchError",
    "IntegrityError",
    "IntegrityWarning",
    "Header",
    "HeaderError",
    "IncompleteReadError",
    "ModelLoadError",
    "ObjectChangedError",
    "RangeNotSupportedError",
    "Stats",
    "StreamSTError",
    "TensorInfo",
    "TensorNotFoundError",
    "TensorParallel",
    "TensorSlice",
    "UnsupportedDtypeError",
    "__version__",
    "iter_tensors",
    "iter_tensors_async",
    "load_file",
    "load_file_async",
    "load_model",
    "load_model_async",
    "read_header",
    "read_header_async",
    "safe_open",
    "safe_open_async",
]
