"""Tunables of a load: one frozen dataclass; keyword arguments beat ``config=`` beats ``STREAM_ST_*``."""

from __future__ import annotations

import dataclasses
import json
import numbers
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

MiB = 1 << 20
MEMORY_MAP_CHOICES = ("cache", "all", "never")
ENV_PREFIX = "STREAM_ST_"


@dataclass(frozen=True)
class Config:
    """How a load fetches bytes. Every field can also come from ``STREAM_ST_<FIELD>`` in the environment.

    Args:
        max_concurrency: ranged requests in flight (and worker threads). Two threads already reached
            curl's speed on a 2-core machine over loopback; object stores want more in flight to hide
            per-request latency, so 8 is the default (Run:ai uses 8–16).
        part_size: largest single ranged request. 16 MiB: pinned host→device copies reach their plateau
            at ≥ 16 MiB (55 GB/s on an H200, docs/ARCHITECTURE.md §5), and it keeps per-request overhead < 1%.
        max_gap: neighbouring spans closer than this are fetched in one request and the gap dropped.
            1 MiB, obstore's default: below it a second request costs more than the wasted bytes.
        header_prefetch: bytes asked for by the first ranged GET, hoping they hold the whole header.
            256 KiB, from ``benchmarks/header_sizes.py``: it holds the header of every shard of usual size
            (Llama-2-7B in one file 34 KB, a DeepSeek-V3 shard as published 73 KB, all of Mixtral-8x7B in
            one file 130 KB); only single files of 2,300+ tensors (300–780 KB) need a second GET. It costs
            ~1 ms more than 8 bytes at 200 MB/s, far less than the extra round trip a short prefix costs.
            Bytes past the header are kept for the first tensors; a partial load that skips them pulls at
            most this many bytes beyond the header.
        max_header_size: reject headers declaring more bytes than this (safetensors' own limit: 100 MB).
        max_small_file_bytes: the largest index.json, digest sidecar or config.json read whole; checked
            against the size the server declares before anything is allocated for it. 64 MiB: the largest
            index we know of, DeepSeek-V3's (~92k tensors at ~100 bytes per ``weight_map`` entry), is about
            9 MB, and a sidecar needs ~100 bytes per tensor; a hostile server cannot make a load allocate
            more than this for a small file.
        retries: attempts after the first for one part; a retry asks only for the bytes still missing.
        backoff_base / backoff_max: capped exponential backoff with full jitter between attempts, seconds.
        stall_timeout: a connection that delivers no byte for this long is dropped and the part retried.
        min_speed: bytes per second a request must average over every ``stall_timeout`` window (its
            response headers within the first); a slower one is dropped (``SlowTransferError``) and retried,
            so a server dribbling a byte a second ends the load after at most ``retries + 1`` windows. 16 KiB/s:
            eight requests at that speed are ~1 Mbit/s, slower than any link a checkpoint is loaded over,
            while a dribbling server stays far below it. 0 turns the rule off.
        connect_timeout: seconds to open a connection, and to wait for the first answer of a file's header
            read (first contact): a host that accepts and never answers is tried twice there, so it fails in
            about 20 s by default instead of ``retries`` × ``stall_timeout`` (3 minutes), while a load under
            way keeps the patience of ``stall_timeout``.
        timeout: optional deadline for a whole load, seconds.
        max_inflight_bytes: streaming APIs (``iter_tensors``) hold at most about this many fetched bytes
            that the caller has not taken yet.
        pinned_pool_bytes: pinned host memory for the device path, shared by all loads of the process and
            allocated on first use (pinning costs ~0.6 s per GiB). 256 MiB holds 16 slots of the 16 MiB
            default part: enough for 8 threads to download while earlier parts are copied to the GPU.
        prefetch_max_bytes: host memory a ``prefetch`` may fill before a load takes its bytes; past it the
            transfer pauses until a load takes some. None: half of the memory available when the prefetch starts.
        early_start: ``load_file`` (and ``stream-st load``) called before torch is imported starts the transfer
            first and imports torch while it runs. None (default): on machines with at least 4 CPUs. On 2 cores
            it measured slower (2.83 s against 2.42 s for 1 GiB over loopback, benchmarks/RESULTS.md §8): the
            loopback transfer and the import both need the two cores. True: always; False: never.
        direct_http: move s3://, gs:// and hf:// bytes on stream_st's threaded HTTP data plane (presigned
            or token-authenticated GETs made by s3fs / gcsfs / huggingface_hub). False reads through the
            filesystem's own ``cat_file`` instead (slower; for stores whose HTTP API differs).
        cache_dir: keep fetched bytes in this folder and read them from there next time (cache.py); None
            (default) stages nothing; ``"default"`` is the platform's user cache folder (~/.cache/stream_st).
        cache_max_bytes: evict least recently used cache entries past this many bytes on disk; None: no cap.
        offline: use only the cache (``cache_dir``, and huggingface_hub's cache for hf://); what is not
            there raises NotCachedError. ``HF_HUB_OFFLINE=1`` does the same for hf:// URLs.
        memory_map: host tensors whose bytes are already in a local file are made over a copy-on-write map
            of that file instead of a copy, as safetensors' default ``backend="mmap"`` does (pages are read
            when first touched; writes stay private). ``"cache"`` (default): complete ranges of a cache entry
            and files of huggingface_hub's cache, which are never rewritten in place. ``"all"``: local paths
            too; as with safetensors, a file truncated while its tensors live then kills the process with
            SIGBUS, and one rewritten in place changes them. ``"never"``: tensors own their memory.
            ``load_file(backend="mmap")`` means ``"all"``, ``backend="pread"`` ``"never"``.
    """

    max_concurrency: int = 8
    part_size: int = 16 * MiB
    max_gap: int = 1 * MiB
    header_prefetch: int = 256 * 1024
    max_header_size: int = 100_000_000
    max_small_file_bytes: int = 64 * MiB
    retries: int = 5
    backoff_base: float = 0.2
    backoff_max: float = 10.0
    stall_timeout: float = 30.0
    min_speed: int = 16 * 1024
    connect_timeout: float = 10.0
    timeout: float | None = None
    max_inflight_bytes: int = 512 * MiB
    pinned_pool_bytes: int = 256 * MiB
    prefetch_max_bytes: int | None = None
    early_start: bool | None = None
    direct_http: bool = True
    cache_dir: str | None = None
    cache_max_bytes: int | None = None
    offline: bool = False
    memory_map: str = "cache"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _typed(f.name, getattr(self, f.name)))
        positive = (
            "max_concurrency",
            "part_size",
            "stall_timeout",
            "connect_timeout",
            "max_inflight_bytes",
            "pinned_pool_bytes",
            "max_small_file_bytes",
        )
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f"config {name} must be > 0, got {getattr(self, name)!r}")
        for name in ("max_gap", "retries", "backoff_base", "backoff_max", "min_speed"):
            if getattr(self, name) < 0:
                raise ConfigError(f"config {name} must be >= 0, got {getattr(self, name)!r}")
        if self.header_prefetch < 8:
            raise ConfigError(f"config header_prefetch must be >= 8 bytes, got {self.header_prefetch}")
        if self.max_header_size < 2:
            raise ConfigError(f"config max_header_size must be >= 2, got {self.max_header_size}")
        if self.prefetch_max_bytes is not None and self.prefetch_max_bytes <= 0:
            raise ConfigError(f"config prefetch_max_bytes must be > 0 or None, got {self.prefetch_max_bytes!r}")
        if self.cache_max_bytes is not None and self.cache_max_bytes <= 0:
            raise ConfigError(f"config cache_max_bytes must be > 0 or None, got {self.cache_max_bytes!r}")
        if self.cache_dir is not None:
            object.__setattr__(self, "cache_dir", os.fspath(self.cache_dir) or None)  # a Path is welcome
        object.__setattr__(self, "_given", frozenset())  # set by __init__ (below): the fields passed explicitly
        if self.memory_map not in MEMORY_MAP_CHOICES:
            raise ConfigError(f"config memory_map must be one of {MEMORY_MAP_CHOICES}, got {self.memory_map!r}")
        if self.timeout is not None and self.timeout <= 0:
            raise ConfigError(f"config timeout must be > 0 or None, got {self.timeout!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Config:
        """Defaults overridden by ``STREAM_ST_<FIELD>`` variables (e.g. ``STREAM_ST_PART_SIZE=8388608``)."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(ENV_PREFIX + f.name.upper())
            if raw is None:
                continue
            kind: Callable[[str], Any] = (
                float if f.name in _FLOAT_FIELDS else _boolean if f.name in _BOOL_FIELDS else _KINDS.get(f.name, int)
            )
            try:
                values[f.name] = None if raw.lower() == "none" and f.name in _OPTIONAL_FIELDS else kind(raw)
            except ValueError:
                raise ConfigError(f"{ENV_PREFIX}{f.name.upper()}={raw!r} is not a valid {kind.__name__}") from None
        return cls(**values)

    def replace(self, **changes: Any) -> Config:
        """A copy with ``changes`` applied; unknown names raise ConfigError listing the valid ones."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            valid = ", ".join(f.name for f in dataclasses.fields(self))
            raise ConfigError(f"unknown option(s) {', '.join(sorted(unknown))}; valid options: {valid}")
        copy = dataclasses.replace(self, **changes)
        object.__setattr__(copy, "_given", self.given() | set(changes))
        return copy

    def given(self) -> frozenset[str]:
        """The fields set explicitly (as arguments, or by ``replace``), which beat the environment."""
        given: frozenset[str] = getattr(self, "_given", frozenset())
        return given


_dataclass_init = Config.__init__


def _init(self: Config, *args: Any, **kwargs: Any) -> None:
    _dataclass_init(self, *args, **kwargs)
    names = [f.name for f in dataclasses.fields(Config)]
    object.__setattr__(self, "_given", frozenset(names[: len(args)]) | frozenset(kwargs))


Config.__init__ = _init  # type: ignore[method-assign]  # remembers which fields were given


def _typed(name: str, value: Any) -> Any:
    """``value`` as the type of field ``name`` (an int for an integer field, also from numpy), else ConfigError:
    ``Config(part_size=1.5)`` or ``Config(direct_http="no")`` would otherwise surface deep inside a load."""
    if value is None and name in _OPTIONAL_FIELDS:
        return value
    if name in _BOOL_FIELDS:
        ok, expected = isinstance(value, bool), "True or False"
    elif name in _FLOAT_FIELDS:
        ok, expected = isinstance(value, numbers.Real) and not isinstance(value, bool), "a number"
        value = float(value) if ok else value
    elif name == "cache_dir":
        ok, expected = isinstance(value, str | os.PathLike), "a path"
    elif name == "memory_map":
        ok, expected = isinstance(value, str), "a string"
    else:
        ok, expected = isinstance(value, numbers.Integral) and not isinstance(value, bool), "an integer"
        value = int(value) if ok else value
    if not ok:
        optional = " or None" if name in _OPTIONAL_FIELDS else ""
        raise ConfigError(f"config {name} must be {expected}{optional}, got {value!r}")
    return value


def _boolean(raw: str) -> bool:
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)


_OPTIONAL_FIELDS = frozenset({"timeout", "prefetch_max_bytes", "early_start", "cache_dir", "cache_max_bytes"})
_BOOL_FIELDS = frozenset({"direct_http", "early_start", "offline"})
_KINDS: dict[str, Callable[[str], Any]] = {"cache_dir": str, "memory_map": str}
_FLOAT_FIELDS = frozenset({"backoff_base", "backoff_max", "stall_timeout", "connect_timeout", "timeout"})


def resolve(config: Config | None, options: Mapping[str, Any]) -> Config:
    """The config of one call, field by field: ``options`` over the fields ``config`` was given over the
    environment (``STREAM_ST_*``) over the defaults."""
    base = Config.from_env()
    if config is not None:
        base = base.replace(**{name: getattr(config, name) for name in config.given()})
    return base.replace(**options) if options else base


def json_object(raw: str | bytes | bytearray, what: str) -> dict[str, Any]:
    """``raw`` parsed as a JSON object (``--storage-options``, a ``config.json``); else a ConfigError
    naming ``what`` (a display form, never a secret)."""
    try:
        document = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ConfigError(f"{what}: not valid JSON ({str(exc)[:200]})") from None
    if not isinstance(document, dict):
        raise ConfigError(f"{what}: expected a JSON object, got {type(document).__name__}")
    return document
