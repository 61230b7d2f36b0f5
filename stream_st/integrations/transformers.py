"""Load a transformers model with its weights streamed from a URL (``s3://``, ``hf://``, ``https://``, ...).

The model skeleton is built by transformers itself on the ``meta`` device (no weight memory, no random
init); stream_st streams the checkpoint straight to ``device`` and hands it over as ``state_dict``, so name
conversions, tied weights, missing keys and non-persistent buffers are handled exactly as ``from_pretrained``
does, and ``dtype=`` casts only what transformers would cast.

Example:
    >>> from stream_st.integrations.transformers import from_pretrained
    >>> model = from_pretrained("s3://bucket/llama-3-8b/", device="cuda", dtype=torch.bfloat16)
"""

from __future__ import annotations

import asyncio
import copy
import re
from collections.abc import Mapping
from typing import Any

import torch

from .._loop import run_sync
from ..api import load_file
from ..arguments import Device, to_device
from ..config import Config, json_object, resolve
from ..errors import ConfigError
from ..fetch import Engine
from ..location import Location, redact
from ..remote import read_whole

CONFIG_NAME = "config.json"


def folder_of(url: str) -> str:
    """The folder that holds a checkpoint's ``config.json``: the URL itself unless it names a file (whose
    query string, a presigned URL's signature, is for that file alone and is dropped)."""
    where = Location.parse(url)
    if where.path.rstrip("/").endswith((".safetensors", ".json")):
        return where.folder().url
    return url.rstrip("/")


def config_location(url: str) -> Location:
    """Where the ``config.json`` of the checkpoint at ``url`` is."""
    return Location.parse(folder_of(url)).child(CONFIG_NAME)


async def read_config_async(
    url: str, *, storage_options: Mapping[str, Any] | None = None, config: Config | None = None
) -> dict[str, Any]:
    """The ``config.json`` next to the checkpoint at ``url``, as a dict (through stream_st's sources)."""
    engine = Engine(resolve(config, {}))
    try:
        raw = await read_whole(config_location(url).url, engine, storage_options)
    finally:
        engine.close()
    return json_object(raw, config_location(url).shown)


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
        model_class: a transformers model class, concrete or Auto; by default the class the config's
            ``architectures`` names, or ``AutoModelForCausalLM`` when it names none transformers has.
        device: where the weights go (``"meta"`` is refused: it would load nothing).
        dtype: build the model in this dtype; the weights transformers would cast are cast on ``device`` as
            they arrive, the ones it keeps in another dtype (``_keep_in_fp32_modules``) reach it as stored.
        hf_config: a ``PretrainedConfig`` to use instead of the checkpoint's ``config.json``.
        tensors: load only some tensors (names, globs, regexes, predicate); the rest are initialised by
            transformers as missing weights.
        storage_options, config: as for [`stream_st.load_file`].
        from_pretrained_kwargs: passed on to ``model_class.from_pretrained``.

    Returns:
        The model, in eval mode, as ``from_pretrained`` returns it.

    Raises:
        ValueError: ``device="meta"``, or a model class that does not take this config (transformers' message).
    """
    import transformers

    if to_device(device).type == "meta":
        raise ValueError(
            f"{redact(url)}: device='meta' would load no weights; build the skeleton with transformers instead "
            "(with torch.device('meta'): model_class.from_config(config))"
        )
    if hf_config is None:
        document = run_sync(read_config_async(url, storage_options=storage_options, config=config))
        model_type = document.pop("model_type", None)
        if model_type is None:
            raise ConfigError(f"{config_location(url).shown} has no model_type")
        hf_config = transformers.AutoConfig.for_model(model_type, **document)
    model_class, hf_config = concrete_class(model_class, hf_config)
    state = load_file(url, device, tensors=tensors, storage_options=storage_options, config=config)
    if dtype is not None:
        cast = names_transformers_casts(model_class, hf_config, dtype)
        for name, tensor in state.items():
            if name in cast and tensor.is_floating_point():
                state[name] = tensor.to(dtype)
        from_pretrained_kwargs.setdefault("dtype", dtype)
    return model_class.from_pretrained(None, config=hf_config, state_dict=state, **from_pretrained_kwargs)


def concrete_class(model_class: Any, hf_config: Any) -> tuple[Any, Any]:
    """The model class to build for ``hf_config`` (and the config it takes), as transformers' Auto classes choose
    it; a class that does not take this config raises transformers' error instead of failing later."""
    import transformers

    if model_class is None:
        named = [getattr(transformers, arch, None) for arch in getattr(hf_config, "architectures", None) or []]
        model_class = next((cls for cls in named if cls is not None), transformers.AutoModelForCausalLM)
    mapping = getattr(model_class, "_model_mapping", None)
    if mapping is not None:  # an Auto class: its from_pretrained needs a name, the concrete class does not
        if type(hf_config) not in mapping:
            raise ValueError(
                f"Unrecognized configuration class {hf_config.__class__} for this kind of AutoModel: "
                f"{model_class.__name__}.\nModel type should be one of "
                f"{', '.join(c.__name__ for c in mapping)}."
            )
        from transformers.models.auto.auto_factory import _get_model_class

        model_class = _get_model_class(hf_config, mapping)  # type: ignore[no-untyped-call]
        text_config_class = hf_config.sub_configs.get("text_config", None)
        if text_config_class is not None and getattr(model_class, "config_class", None) == text_config_class:
            hf_config = hf_config.get_text_config()  # as the Auto classes do for text-only heads
    expected = getattr(model_class, "config_class", None)
    if expected is not None and not isinstance(hf_config, expected):
        raise ValueError(
            f"{model_class.__name__} takes a {expected.__name__}, but the config is a {type(hf_config).__name__} "
            f"(model_type {getattr(hf_config, 'model_type', None)!r}); pass the model_class for this config"
        )
    return model_class, hf_config


def names_transformers_casts(model_class: Any, hf_config: Any, dtype: torch.dtype) -> set[str]:
    """The checkpoint names that transformers' ``from_pretrained(dtype=dtype)`` casts to ``dtype`` as they are:
    the model's names (on a skeleton built on ``meta``, as transformers builds it) whose parameter has that
    dtype and that its keep-in-fp32 rules leave alone. Names transformers renames or fuses on load are not in
    the set: they reach transformers as stored, and it casts them itself."""
    with torch.device("meta"):
        skeleton = model_class._from_config(copy.deepcopy(hf_config), dtype=dtype)
    # transformers' PreTrainedModel._get_dtype_plan: `_keep_in_fp32_modules` only against fp16,
    # `_keep_in_fp32_modules_strict` against fp16 and bf16; each pattern is searched in the name, `*` as `.*`
    kept = set(skeleton._keep_in_fp32_modules_strict or ()) if dtype in (torch.float16, torch.bfloat16) else set()
    if dtype == torch.float16:
        kept |= set(skeleton._keep_in_fp32_modules or ())
    patterns = [re.compile(pattern.replace("*", ".*")) for pattern in kept]
    return {
        name
        for name, tensor in skeleton.state_dict().items()
        if tensor.dtype == dtype and not any(pattern.search(name) for pattern in patterns)
    }


async def from_pretrained_async(url: str, model_class: Any = None, **kwargs: Any) -> Any:
    """Async twin of [`from_pretrained`]: the model is built on a worker thread."""
    return await asyncio.to_thread(from_pretrained, url, model_class, **kwargs)
