"""stream_st: load safetensors checkpoints straight from URLs into torch tensors, fetching only what is needed.

``import stream_st`` imports neither torch nor any storage backend: each public name is imported on first
use, so a process can start moving a checkpoint's bytes (``prefetch``, or ``load_file`` before torch is
imported) while its heavy imports still run.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

from .config import Config
from .errors import (
    ConfigError,
    CredentialsError,
    FetchError,
    HandleClosedError,
    HeaderError,
    IncompleteReadError,
    IntegrityError,
    IntegrityWarning,
    ModelLoadError,
    NotCachedError,
    ObjectChangedError,
    RangeIgnoredWarning,
    RangeNotSupportedError,
    StreamSTError,
    TensorNotFoundError,
    UnsupportedDtypeError,
)

__version__ = "0.1.0"

# Public names defined in modules that import torch or the network stack, by module: loaded on first use.
_LAZY = {
    "AsyncSafeOpen": "safe_open",
    "Header": "header",
    "Prefetch": "prefetcher",
    "Stats": "fetch",
    "TensorInfo": "header",
    "TensorParallel": "parallel",
    "TensorSlice": "safe_open",
    "iter_tensors": "api",
    "iter_tensors_async": "api",
    "load_file_async": "api",
    "load_model": "api",
    "load_model_async": "api",
    "prefetch": "prefetcher",
    "read_header": "api",
    "read_header_async": "api",
    "safe_open": "safe_open",
    "safe_open_async": "safe_open",
}

if TYPE_CHECKING:
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
    from .fetch import Stats
    from .header import Header, TensorInfo
    from .parallel import TensorParallel
    from .prefetcher import Prefetch, prefetch
    from .safe_open import AsyncSafeOpen, TensorSlice, safe_open, safe_open_async
else:

    def load_file(url, device="cpu", **kwargs):
        """``stream_st.api.load_file`` (see its documentation). Called before torch is imported (a script's
        first load), it starts the transfer first (``prefetch``), then imports torch while the bytes move."""
        from .prefetcher import start_before_torch

        early = start_before_torch(url, device, kwargs)
        from .api import load_file as load

        try:
            return load(url, device, **kwargs)
        finally:
            if early is not None:
                early.finish(kwargs.get("stats"))


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    setattr(sys.modules[__name__], name, value)
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "AsyncSafeOpen",
    "Config",
    "ConfigError",
    "CredentialsError",
    "FetchError",
    "HandleClosedError",
    "Header",
    "HeaderError",
    "IncompleteReadError",
    "IntegrityError",
    "IntegrityWarning",
    "ModelLoadError",
    "NotCachedError",
    "ObjectChangedError",
    "Prefetch",
    "RangeIgnoredWarning",
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
    "prefetch",
    "read_header",
    "read_header_async",
    "safe_open",
    "safe_open_async",
]
