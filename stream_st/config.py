"""Tunables of a load: one frozen dataclass; keyword arguments beat ``config=`` beats ``STREAM_ST_*``."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

MiB = 1 << 20
ENV_PREFIX = "STREAM_ST_"


@dataclass(frozen=True)
class Config:
    """How a load fetches bytes. Every field can also come from ``STREAM_ST_<FIELD>`` in the environment.

    Args:
        max_concurrency: ranged requests in flight (and worker threads). Two threads already reached
            curl's speed on a 2-core machine over loopback; object stores want more in flight to hide
            per-request latency, so 8 is the default (Run:ai uses 8–16).
        part_size: largest single ranged request. 16 MiB: pinned host→device copies reach their plateau
            at ≥ 16 MiB (55 GB/s on an H200, DESIGN.md §5), and it keeps per-request overhead < 1%.
        max_gap: neighbouring spans closer than this are fetched in one request and the gap dropped.
            1 MiB, obstore's default: below it a second request costs more than the wasted bytes.
        header_prefetch: bytes asked for by the first ranged GET, hoping they hold the whole header.
            256 KiB holds the header of every checkpoint layout we measured (`benchmarks/header_sizes.py`:
            the largest, a 2,000-expert MoE shard, 234 KiB) and costs ~1 ms more than 8 bytes at 200 MB/s,
            far less than the extra round trip a short prefix would need. Bytes past the header are kept
            and used for the first tensors, so little is wasted.
        max_header_size: reject headers declaring more bytes than this (safetensors' own limit: 100 MB).
        retries: attempts after the first for one part; a retry asks only for the bytes still missing.
        backoff_base / backoff_max: capped exponential backoff with full jitter between attempts, seconds.
        stall_timeout: a connection that delivers no byte for this long is dropped and the part retried.
        connect_timeout: seconds to open a connection.
        timeout: optional deadline for a whole load, seconds.
        max_inflight_bytes: streaming APIs (``iter_tensors``) hold at most about this many fetched bytes
            that the caller has not taken yet.
    """

    max_concurrency: int = 8
    part_size: int = 16 * MiB
    max_gap: int = 1 * MiB
    header_prefetch: int = 256 * 1024
    max_header_size: int = 100_000_000
    retries: int = 5
    backoff_base: float = 0.2
    backoff_max: float = 10.0
    stall_timeout: float = 30.0
    connect_timeout: float = 10.0
    timeout: float | None = None
    max_inflight_bytes: int = 512 * MiB

    def __post_init__(self) -> None:
        positive = ("max_concurrency", "part_size", "stall_timeout", "connect_timeout", "max_inflight_bytes")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f"config {name} must be > 0, got {getattr(self, name)!r}")
        for name in ("max_gap", "retries", "backoff_base", "backoff_max"):
            if getattr(self, name) < 0:
                raise ConfigError(f"config {name} must be >= 0, got {getattr(self, name)!r}")
        if self.header_prefetch < 8:
            raise ConfigError(f"config header_prefetch must be >= 8 bytes, got {self.header_prefetch}")
        if self.max_header_size < 2:
            raise ConfigError(f"config max_header_size must be >= 2, got {self.max_header_size}")
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
            kind = float if f.name in _FLOAT_FIELDS else int
            try:
                values[f.name] = None if raw.lower() == "none" and f.name == "timeout" else kind(raw)
            except ValueError:
                raise ConfigError(f"{ENV_PREFIX}{f.name.upper()}={raw!r} is not a valid {kind.__name__}") from None
        return cls(**values)

    def replace(self, **changes: Any) -> Config:
        """A copy with ``changes`` applied; unknown names raise ConfigError listing the valid ones."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            valid = ", ".join(f.name for f in dataclasses.fields(self))
            raise ConfigError(f"unknown option(s) {', '.join(sorted(unknown))}; valid options: {valid}")
        return dataclasses.replace(self, **changes)


_FLOAT_FIELDS = frozenset({"backoff_base", "backoff_max", "stall_timeout", "connect_timeout", "timeout"})


def resolve(config: Config | None, options: Mapping[str, Any]) -> Config:
    """The config of one call: ``options`` over ``config`` over the environment."""
    base = config if config is not None else Config.from_env()
    return base.replace(**options) if options else base
