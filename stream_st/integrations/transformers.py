"""Load a transformers model with its weights streamed from a URL (``s3://``, ``hf://``, ``https://``, ...).

The model skeleton is built by transformers itself on the ``meta`` device (no weight memory, no random
init); stream_st streams the checkpoint straight to ``device`` and hands it over as ``state_dict``, so
tied weights, missing keys and non-persistent buffers are handled exactly as ``from_pretrained`` does.

Example:
    >>> from stream_st.integrations.transformers import from_pretrained
    >>> model = from_pretrained("s3://bucket/llama-3-8b/", device="cuda", dtype=torch.bfloat16)
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

import torch

from .._loop import run_sync
from ..api import Device, load_file
from ..config import Config, resolve
from ..fetch import Engine
from ..remote import read_whole
from ..transport import redact

CONFIG_NAME = "config.json"


def folder_of(url: str) -> str:
    """The folder that holds a checkpoint's ``config.json``: the URL itself unless it names a file."""
    stripped = url.rstrip("/")
    if stripped.endswith((".safetensors", ".json")):
        return stripped.rsplit("/", 1)[0]
    return stripped


async def read_config_async(
    url: str, *, storage_options: Mapping[str, Any] | None = None, config: Config | None = None
) -> dict[str, Any]:
    """The ``config.json`` next to the checkpoint at ``url``, as a dict (through stream_st's sources)."""
    engine = Engine(resolve(config, {}))
    try:
        raw = await read_whole(f"{folder_of(url)}/{CONFIG_NAME}", engine, storage_options)
    finally:
        engine.close()
    try:
        document = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"{redact(folder_of(url))}/{CONFIG_NAME}: not valid JSON ({exc})") from None
    if not isinstance(document, dict):
        raise ValueError(f"{redact(folder_of(url))}/{CONFIG_NAME}: expected a JSON object")
    return document


def from_pretrained(
    url: str,
    model_class: Any = None,
    *,
    device: Device = "cpu",
    dtype: torch.dtype | None = None,
    hf_config: Any = None,
    tensors: Any = None,
    storage_options: Mapping[str, Any] | None = None,
    config: Config | None = None,
    **from_pretrained_kwargs: Any,
) -> Any:
    """A transformers model whose weights stream from ``url`` straight to ``device``.

    Args:
        url: the checkpoint: a folder / prefix / repo (``hf://org/repo``, ``s3://bucket/model/``), an index,
            or one ``.safetensors`` file; ``config.json`` is read from the same folder unless ``hf_config``
            is given.
        model_class: a transformers model class (default ``AutoModelForCausalLM``).
        device: where the weights go.
        dtype: cast floating-point weights (on the device) and build the model in this dtype.
        hf_config: a ``PretrainedConfig`` to use instead of the checkpoint's ``config.json``.
        tensors: load only some tensors (names, globs, regexes, predicate); the rest are initialised by
            transformers as missing weights.
        storage_options, config: as for [`stream_st.load_file`].
        from_pretrained_kwargs: passed on to ``model_class.from_pretrained``.

    Returns:
        The model, in eval mode, as ``from_pretrained`` returns it.
    """
    import transformers

    if model_class is None:
        model_class = transformers.AutoModelForCausalLM
    if hf_config is None:
        document = run_sync(read_config_async(url, storage_options=storage_options, config=config))
        model_type = document.pop("model_type", None)
        if model_type is None:
            raise ValueError(f"{redact(folder_of(url))}/{CONFIG_NAME} has no model_type")
        hf_config = transformers.AutoConfig.for_model(model_type, **document)
    mapping = getattr(model_class, "_model_mapping", None)
    if mapping is not None:  # an Auto class: its from_pretrained needs a name, the concrete class does not
        model_class = mapping[type(hf_config)]
    state = load_file(url, device, tensors=tensors, dtype=dtype, storage_options=storage_options, config=config)
    if dtype is not None:
        from_pretrained_kwargs.setdefault("dtype", dtype)
    return model_class.from_pretrained(None, config=hf_config, state_dict=state, **from_pretrained_kwargs)


async def from_pretrained_async(url: str, model_class: Any = None, **kwargs: Any) -> Any:
    """Async twin of [`from_pretrained`]: the model is built on a worker thread."""
    return await asyncio.to_thread(from_pretrained, url, model_class, **kwargs)
