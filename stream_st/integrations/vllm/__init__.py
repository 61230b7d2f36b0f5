"""vLLM loads weights from any stream_st URL: ``load_format="stream_st"``.

Installing ``stream_st[vllm]`` registers the load format through vLLM's ``vllm.general_plugins`` entry point,
which vLLM runs in every process it starts. The weights stream in file order through
[`stream_st.iter_tensors`] into the model's own ``load_weights``, as vLLM's safetensors loader feeds it:

    >>> llm = vllm.LLM(model="/path/with/config-and-tokenizer", load_format="stream_st",
    ...                model_loader_extra_config={"url": "s3://bucket/llama/", "max_concurrency": 16})

vLLM still reads ``config.json`` and the tokenizer from local disk: [`fetch_model_files`] copies those small
files from the URL into a folder, and [`llm`] does both in one call.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import posixpath
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..._loop import gather_or_cancel, run_sync
from ...config import Config, resolve
from ...errors import ConfigError
from ...fetch import Engine
from ...remote import read_whole
from ...transport import redact
from ..transformers import folder_of

logger = logging.getLogger(__name__)

LOAD_FORMAT = "stream_st"

# What a plain HTTP server (which cannot list a folder) is asked for: the files vLLM and transformers read
# besides the weights.
MODEL_FILE_NAMES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
)
# Never copied from a listing: weights (stream_st streams them) and their index.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx", ".npz")
WEIGHT_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# A listed file larger than this is not a config or tokenizer file (the largest tokenizer.json files are
# ~35 MB): it is skipped rather than copied.
MAX_MODEL_FILE_BYTES = 64 << 20

STORAGE_OPTIONS_ENV = "STREAM_ST_VLLM_STORAGE_OPTIONS"


def register() -> None:
    """Register ``load_format="stream_st"`` with vLLM (the ``vllm.general_plugins`` entry point; idempotent)."""
    from vllm.model_executor.model_loader import (
        get_model_loader,  # noqa: F401  (vLLM's registry, loaded first)
        register_model_loader,
    )

    from . import loader

    registry = _registry()
    if registry.get(LOAD_FORMAT) is not loader.StreamSTModelLoader:
        register_model_loader(LOAD_FORMAT)(loader.StreamSTModelLoader)


def _registry() -> dict[str, Any]:
    import vllm.model_executor.model_loader as model_loader

    registry: dict[str, Any] = model_loader._LOAD_FORMAT_TO_MODEL_LOADER
    return registry


def fetch_model_files(
    url: str,
    folder: str | os.PathLike[str] | None = None,
    *,
    storage_options: Mapping[str, Any] | None = None,
    config: Config | None = None,
) -> Path:
    """Copy a checkpoint's small files (config, tokenizer, generation config: everything but the weights)
    from the folder of ``url`` into ``folder``, and return it.

    Object stores, repos and local folders are listed, and every file that is not a weight file (nor an
    index of them) and is at most 64 MiB is copied; a plain HTTP server cannot be listed, so the usual
    names (``MODEL_FILE_NAMES``) are asked for and those it does not have skipped. ``config.json`` must be
    there (``FileNotFoundError`` otherwise). ``folder`` defaults to one per URL under
    ``~/.cache/stream_st/vllm``; files already there are replaced.
    """
    base = folder_of(url)
    target = Path(folder) if folder is not None else _default_folder(base)
    files = run_sync(_read_model_files(base, storage_options, config))
    target.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        destination = target / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=destination.parent, delete=False) as handle:
            handle.write(data)
        os.replace(handle.name, destination)
    return target


def _default_folder(base: str) -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "stream_st" / "vllm" / hashlib.sha256(redact(base).encode()).hexdigest()[:16]


async def _read_model_files(
    base: str, storage_options: Mapping[str, Any] | None, config: Config | None
) -> dict[str, bytes]:
    engine = Engine(resolve(config, {}))
    try:
        scheme = urlsplit(base).scheme if "://" in base else ""
        if scheme in ("http", "https"):
            names, required = list(MODEL_FILE_NAMES), False
        else:
            names, required = await engine.run(_list_model_files, base, dict(storage_options or {})), True
        if "config.json" not in names:
            raise FileNotFoundError(f"{redact(base)}/config.json: no such file")

        async def read(name: str) -> bytes | None:
            try:
                return await read_whole(f"{base}/{name}", engine, storage_options)
            except FileNotFoundError:
                if required or name == "config.json":
                    raise
                return None

        contents = await gather_or_cancel(*(read(name) for name in names))
    finally:
        engine.close()
    return {name: data for name, data in zip(names, contents) if data is not None}


def _list_model_files(base: str, options: dict[str, Any]) -> list[str]:
    """The names of the small files in a folder, prefix or repo (no weights, nothing too large)."""
    if "://" not in base or base.startswith("file://"):
        folder = Path(urlsplit(base).path if base.startswith("file://") else base)
        if not folder.is_dir():
            raise FileNotFoundError(f"{base}: no such folder")
        sizes = {entry.name: entry.stat().st_size for entry in folder.iterdir() if entry.is_file()}
    else:
        import fsspec

        fs, path = fsspec.core.url_to_fs(base, **options)
        sizes = {
            posixpath.basename(entry["name"].rstrip("/")): int(entry.get("size") or 0)
            for entry in fs.ls(path, detail=True)
            if entry.get("type") == "file"
        }
    names = []
    for name, size in sorted(sizes.items()):
        if name.endswith(WEIGHT_SUFFIXES) or name in WEIGHT_NAMES:
            continue
        if size > MAX_MODEL_FILE_BYTES:
            logger.info("%s/%s: %d bytes, not copied as a model file", redact(base), name, size)
            continue
        names.append(name)
    return names


def llm(
    url: str,
    *,
    folder: str | os.PathLike[str] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    loader_options: Mapping[str, Any] | None = None,
    **engine_kwargs: Any,
) -> Any:
    """A ``vllm.LLM`` whose config and tokenizer come from ``url`` and whose weights stream from it.

    Args:
        url: the checkpoint: a folder / prefix / repo, an index, or one ``.safetensors`` file.
        folder: where the small files go (see [`fetch_model_files`]).
        storage_options: as for [`stream_st.load_file`]. They reach vLLM's processes through the
            environment variable ``STREAM_ST_VLLM_STORAGE_OPTIONS``, not through the engine arguments, which
            vLLM logs.
        loader_options: other stream_st options for the load (``max_concurrency``, ``verify``, ...).
        engine_kwargs: passed on to ``vllm.LLM`` (``tensor_parallel_size``, ``dtype``, ...).
    """
    import vllm

    register()
    model_folder = fetch_model_files(url, folder, storage_options=storage_options)
    extra: dict[str, Any] = {"url": url, **(loader_options or {})}
    if storage_options:
        os.environ[STORAGE_OPTIONS_ENV] = json.dumps(dict(storage_options))
        extra["storage_options_env"] = STORAGE_OPTIONS_ENV
    return vllm.LLM(model=str(model_folder), load_format=LOAD_FORMAT, model_loader_extra_config=extra, **engine_kwargs)


# Keys of ``model_loader_extra_config`` that are not stream_st options.
URL_KEY = "url"
STORAGE_OPTIONS_ENV_KEY = "storage_options_env"
# stream_st options of iter_tensors besides Config's fields.
CALL_OPTIONS = frozenset({"storage_options", "verify", "progress"})


def loader_options(extra: Mapping[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """The URL and the stream_st options in ``model_loader_extra_config``; unknown keys raise ConfigError."""
    options = {key: value for key, value in extra.items() if key not in (URL_KEY, STORAGE_OPTIONS_ENV_KEY)}
    known = CALL_OPTIONS | set(Config.__dataclass_fields__)
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(
            f"model_loader_extra_config: unknown stream_st option(s) {', '.join(unknown)}; "
            f"valid: {URL_KEY}, {STORAGE_OPTIONS_ENV_KEY}, {', '.join(sorted(known))}"
        )
    variable = extra.get(STORAGE_OPTIONS_ENV_KEY)
    if variable:
        # Credentials kept out of the engine arguments, which vLLM logs: JSON in an environment variable.
        raw = os.environ.get(str(variable))
        if raw is None:
            raise ConfigError(f"model_loader_extra_config: {STORAGE_OPTIONS_ENV_KEY} names {variable}, which is unset")
        try:
            from_env = json.loads(raw)
        except ValueError:
            raise ConfigError(f"{variable}: not a JSON object of storage options") from None
        if not isinstance(from_env, dict):
            raise ConfigError(f"{variable}: not a JSON object of storage options")
        options["storage_options"] = {**from_env, **(options.get("storage_options") or {})}
    options.setdefault("progress", False)  # vLLM shows its own; a bar per rank would garble the log
    url = extra.get(URL_KEY)
    return (str(url) if url else None), options


def _start_early(url: str, options: Mapping[str, Any]) -> Any:
    """Start moving the weights into host memory now (``stream_st.prefetch``), while vLLM builds the model;
    the load that follows in this process takes those bytes. Returns the prefetch, or None if it could not
    start (the load then reports whatever is wrong)."""
    import stream_st

    fetch_options = {key: value for key, value in options.items() if key in Config.__dataclass_fields__}
    with contextlib.suppress(Exception):  # an early start is an optimisation: the load reports any error
        return stream_st.prefetch(url, storage_options=options.get("storage_options"), **fetch_options)
    return None


__all__ = ["LOAD_FORMAT", "fetch_model_files", "llm", "loader_options", "register"]
