"""The vLLM model loader behind ``load_format="stream_st"`` (imported only where vLLM is installed)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from vllm.config import ModelConfig, VllmConfig
from vllm.config.load import LoadConfig
from vllm.model_executor.model_loader.base_loader import BaseModelLoader
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

from ...api import iter_tensors
from ...errors import ConfigError
from . import _start_early, loader_options


class StreamSTModelLoader(BaseModelLoader):  # type: ignore[misc]  # vLLM is untyped for mypy here
    """Streams the weights from ``model_loader_extra_config["url"]`` into the model's ``load_weights``.

    With tensor parallelism the ranks of a tensor-parallel group split the download and exchange the bytes
    over the group (stream_st's ``process_group=``), so storage serves each byte once per group; every rank
    then hands the whole tensors to ``load_weights``, whose weight loaders keep each rank's slice.
    """

    def __init__(self, load_config: LoadConfig) -> None:
        super().__init__(load_config)
        self.url, self.options = loader_options(load_config.model_loader_extra_config or {})

    def weights_url(self, model_config: ModelConfig) -> str:
        """The extra config's URL; a URL given as the model (as ``reload_weights(weights_path=URL)`` does)
        takes precedence."""
        for candidate in (model_config.model_weights, model_config.model):
            if candidate and "://" in str(candidate):
                return str(candidate)
        if not self.url:
            raise ConfigError(
                'load_format="stream_st" needs the checkpoint URL: model_loader_extra_config={"url": "s3://..."}'
            )
        return self.url

    def download_model(self, model_config: ModelConfig) -> None:
        """Nothing to download ahead: the weights stream during ``load_weights``."""

    def load_model(self, vllm_config: VllmConfig, model_config: ModelConfig, prefix: str = "") -> torch.nn.Module:
        """vLLM's ``load_model``, with the transfer started before the model is built where it can be."""
        early = None
        if _process_group() is None:  # ranks that split the load fetch their part inside the collective
            early = _start_early(self.weights_url(model_config), self.options)
        try:
            model: torch.nn.Module = super().load_model(vllm_config, model_config, prefix)
        finally:
            if early is not None:
                early.cancel()  # frees what the load did not take (weights the model declares unused)
        return model

    def get_all_weights(self, model_config: ModelConfig, model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` in file order, shards in order, memory bounded by ``max_inflight_bytes``."""
        unused: Callable[[str], bool] | None = getattr(model, "is_unused_checkpoint_weight", None)
        selection = None if unused is None else (lambda name: not unused(name))  # unused tensors are not fetched
        yield from iter_tensors(
            self.weights_url(model_config), "cpu", tensors=selection, process_group=_process_group(), **self.options
        )

    def load_weights(self, model: torch.nn.Module, model_config: ModelConfig) -> None:
        vllm_model: Any = model  # vLLM's models define load_weights; nn.Module's typing does not know it
        loaded = vllm_model.load_weights(self.get_all_weights(model_config, model))
        if loaded is not None and model_config.quantization is None:
            # The check vLLM's own safetensors loader runs: every parameter came from the checkpoint.
            DefaultModelLoader.track_weights_loading(self, model, loaded)


def _process_group() -> Any:
    """vLLM's tensor-parallel group (its gloo side) when it has more than one rank, else None."""
    from vllm.distributed import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return None
    group = parallel_state.get_tp_group()
    return group.cpu_group if group.world_size > 1 else None
