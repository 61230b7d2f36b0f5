"""A module's state around ``load_model``: tied names, buffers computed at construction, tensors left on meta.

``load_model`` matches checkpoint names to ``model.state_dict()`` names literally. What a plain
``load_state_dict`` leaves wrong, and this module sets right or refuses:

- tied names (one tensor object under several names): a checkpoint may store every name, and loading each
  with ``assign=True`` would split the tie into copies; only one is loaded (after checking that the stored
  copies are bitwise equal) and shared by all names;
- non-persistent buffers (rotary ``inv_freq``, ``position_ids``, ``embed_scale``): never in a checkpoint, so a
  model built on the ``meta`` device has no values for them. transformers models recompute them with
  transformers' own initialisation, as its ``from_pretrained`` does; any other module gets an error naming them;
- anything still on ``meta`` after the load (a name the checkpoint lacks under ``strict=False``, a name
  transformers would have converted) is an error, never a model that fails or silently computes garbage later.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from .errors import ModelLoadError
from .location import redact

SHOWN = 8  # names quoted in an error before "and N more"


def tied_groups(model: torch.nn.Module) -> list[list[str]]:
    """Names that refer to one parameter or buffer object (found by identity, so meta models work too), each
    group in the model's own order: the first name is the one ``named_parameters()`` reports."""
    by_object: dict[int, list[str]] = {}
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, tensor in named:
        by_object.setdefault(id(tensor), []).append(name)
    return [names for names in by_object.values() if len(names) > 1]


def get_tensor(model: torch.nn.Module, name: str) -> torch.Tensor:
    module_name, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(module_name), attr)  # type: ignore[no-any-return]


def set_tensor(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(module_name), attr, tensor)


def apply_state(
    model: torch.nn.Module,
    state: dict[str, torch.Tensor],
    in_file: Iterable[str],
    groups: list[list[str]],
    *,
    strict: bool,
    assign: bool,
    device: torch.device,
    url: str,
) -> tuple[list[str], list[str]]:
    """Put ``state`` (the checkpoint's tensors the model has names for) into ``model`` as ``load_model`` promises.

    Returns ``(missing, unexpected)`` like ``safetensors.torch.load_model``.

    Raises:
        ModelLoadError: ``strict`` and names are missing or unexpected (safetensors' message); tied names stored
            with different values; or a parameter or buffer is still on ``meta`` after the load.
    """
    model_keys = set(model.state_dict().keys())
    loaded, differing = _one_per_group(state, groups)
    result = model.load_state_dict(state, strict=False, assign=assign)
    missing = set(result.missing_keys)
    for group, source in loaded.items():
        for name in group:
            if name != source:
                missing.discard(name)
                if assign:
                    set_tensor(model, name, get_tensor(model, source))
    unexpected = [name for name in in_file if name not in model_keys or name in differing]
    if strict and (missing or unexpected):
        error = f"Error(s) in loading state_dict for {model.__class__.__name__}:"
        if missing:
            error += "\n    Missing key(s) in state_dict: " + ", ".join(f'"{k}"' for k in sorted(missing))
        if unexpected:
            error += "\n    Unexpected key(s) in state_dict: " + ", ".join(f'"{k}"' for k in sorted(unexpected))
        if missing and unexpected:
            error += _renamed_hint(model)
        for name, source in differing.items():
            error += (
                f"\n    '{name}' is tied to '{source}' in the model, but the checkpoint stores different values for "
                "them; build the model untied, or use stream_st.integrations.transformers.from_pretrained"
            )
        raise ModelLoadError(error, url=redact(url))
    _recompute_buffers(model, device, url)
    on_meta = [name for name, tensor in _all_tensors(model) if tensor.is_meta]
    if on_meta:
        raise ModelLoadError(
            f"{redact(url)}: after the load, {_names(on_meta)} of {model.__class__.__name__} are still on the meta "
            f"device (missing from the checkpoint: {_names(sorted(missing)) if missing else 'none'}); the model "
            "would fail or compute garbage." + (_renamed_hint(model) if missing and unexpected else ""),
            url=redact(url),
        )
    return sorted(missing), unexpected


def _one_per_group(
    state: dict[str, torch.Tensor], groups: list[list[str]]
) -> tuple[dict[tuple[str, ...], str], dict[str, str]]:
    """For each tied group the checkpoint holds, the one name that is loaded; its other names leave ``state``.
    A copy stored with other values than the loaded one is, as for safetensors, an unexpected key (second
    result: name -> the name it is tied to): it is reported, never loaded over the first."""
    loaded: dict[tuple[str, ...], str] = {}
    differing: dict[str, str] = {}
    for group in groups:
        present = [name for name in group if name in state]
        if not present:
            continue
        source = present[0]
        for name in present[1:]:
            if not _same_bits(state.pop(name), state[source]):
                differing[name] = source
        loaded[tuple(group)] = source
    return loaded, differing


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return bool(torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)))


def _all_tensors(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]


def non_persistent_buffers(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The buffers ``state_dict()`` leaves out (``persistent=False``), which no checkpoint holds."""
    found = []
    for name, buffer in model.named_buffers(remove_duplicate=False):
        module_name, _, attr = name.rpartition(".")
        if attr in model.get_submodule(module_name)._non_persistent_buffers_set:
            found.append((name, buffer))
    return found


def _is_transformers_model(model: torch.nn.Module) -> bool:
    transformers = sys.modules.get("transformers")  # a transformers model means it is imported already
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


def _guarded_init() -> bool:
    """transformers 5 initialises through functions that skip tensors flagged ``_is_hf_initialized``; earlier
    versions' ``_init_weights`` would overwrite the loaded weights."""
    version = sys.modules["transformers"].__version__
    return int(version.split(".")[0]) >= 5


def _recompute_buffers(model: torch.nn.Module, device: torch.device, url: str) -> None:
    """Give the non-persistent buffers still on ``meta`` their values, as transformers' ``from_pretrained`` does,
    or raise naming them. Runs only when every parameter and persistent buffer is loaded: initialising a model
    with holes would hide them behind random values."""
    pending = [(name, buffer) for name, buffer in non_persistent_buffers(model) if buffer.is_meta]
    if not pending:
        return
    names = sorted({name for name, _ in pending})
    if not _is_transformers_model(model):
        raise ModelLoadError(
            f"{redact(url)}: the buffers {_names(names)} of {model.__class__.__name__} are computed when the module "
            "is constructed (non-persistent: no checkpoint stores them), so a model built on the meta device has no "
            "values for them; construct the modules that own them on a real device",
            url=redact(url),
        )
    if not _guarded_init():
        raise ModelLoadError(
            f"{redact(url)}: the buffers {_names(names)} of {model.__class__.__name__} are computed when the module "
            "is constructed, and transformers before 5.0 cannot recompute them without re-initialising loaded "
            "weights; load the model with stream_st.integrations.transformers.from_pretrained",
            url=redact(url),
        )
    if any(tensor.is_meta for name, tensor in _all_tensors(model) if name not in names):
        return  # the final check names what is missing
    _transformers_recompute(model, pending, device, url)


def _transformers_recompute(
    model: Any, pending: list[tuple[str, torch.Tensor]], device: torch.device, url: str
) -> None:
    """transformers' own recipe (``_move_missing_keys_from_meta_to_device`` then ``initialize_weights``): the
    buffers get memory on ``device``, every loaded tensor is flagged ``_is_hf_initialized`` so transformers' init
    functions leave it alone, and ``initialize_weights`` runs each module's ``_init_weights``, which computes the
    buffers. A buffer that comes out untouched (still its fill value) is an error, not garbage."""
    for _, tensor in _all_tensors(model):
        if not tensor.is_meta:
            tensor._is_hf_initialized = True  # type: ignore[attr-defined]
    created: dict[str, torch.Tensor] = {}
    for name, buffer in pending:
        if name in created:
            continue
        value = torch.full_like(buffer, _fill_value(buffer.dtype), device=device)
        set_tensor(model, name, value)
        model.get_submodule(name.rpartition(".")[0])._is_hf_initialized = False
        created[name] = value
    model.initialize_weights()
    untouched = [name for name, _ in pending if _still_filled(get_tensor(model, name))]
    if untouched:
        raise ModelLoadError(
            f"{redact(url)}: transformers' initialisation did not compute the buffers {_names(untouched)} of "
            f"{model.__class__.__name__}; load it with stream_st.integrations.transformers.from_pretrained",
            url=redact(url),
        )


def _fill_value(dtype: torch.dtype) -> float:
    """A value no computed buffer holds everywhere: NaN for floats, the smallest integer otherwise."""
    if dtype.is_floating_point or dtype.is_complex:
        return float("nan")
    if dtype == torch.bool:
        return 0
    return int(torch.iinfo(dtype).min)


def _still_filled(tensor: torch.Tensor) -> bool:
    """Whether ``_init_weights`` left a buffer as ``_fill_value`` made it (booleans cannot tell: not checked)."""
    if tensor.numel() == 0 or tensor.dtype == torch.bool:
        return False
    if tensor.is_floating_point() or tensor.is_complex():
        return bool(tensor.isnan().all())
    return bool((tensor == _fill_value(tensor.dtype)).all())


def _renamed_hint(model: torch.nn.Module) -> str:
    if not _is_transformers_model(model):
        return ""
    name = model.__class__.__name__
    return (
        f"\n{name} is a transformers model: transformers converts some checkpoint names when it loads them "
        "(per-expert MoE weights into fused tensors, renamed attention layers), and load_model matches names "
        f"literally. Load it with stream_st.integrations.transformers.from_pretrained(url, model_class={name})."
    )


def _names(names: list[str] | Mapping[str, Any]) -> str:
    listed = list(names)
    shown = ", ".join(f"'{name}'" for name in listed[:SHOWN])
    return shown + (f" and {len(listed) - SHOWN} more" if len(listed) > SHOWN else "")
