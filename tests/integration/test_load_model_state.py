"""load_model on a meta skeleton either gives a complete model or raises ModelLoadError naming what is wrong:
buffers no checkpoint holds, names the checkpoint lacks, tied names stored with different values."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from torch import nn

import stream_st as sst


class WithRotary(nn.Module):
    """A module with a buffer computed at construction and not saved (``persistent=False``)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, 4, 2) / 4)), persistent=False)


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight


def test_non_persistent_buffer_left_on_meta_is_named(tmp_path: Path) -> None:
    path = tmp_path / "rotary.safetensors"
    safetensors.torch.save_model(WithRotary(), str(path))
    with torch.device("meta"):
        model = WithRotary()
    with pytest.raises(sst.ModelLoadError, match=r"the buffers 'inv_freq' of WithRotary are computed when the module"):
        sst.load_model(model, str(path), assign=True)
    real = WithRotary()  # built on a real device, the buffer has its value: nothing to refuse
    assert sst.load_model(real, str(path)) == ([], [])


def test_missing_names_never_stay_on_meta_silently(tmp_path: Path) -> None:
    path = tmp_path / "partial.safetensors"
    safetensors.torch.save_file({"proj.weight": torch.ones(4, 4)}, str(path))
    model = WithRotary()
    assert sst.load_model(model, str(path), strict=False) == (["proj.bias"], [])  # real model: as safetensors
    with torch.device("meta"):
        skeleton = nn.Sequential(nn.Linear(4, 4))
    safetensors.torch.save_file({"0.weight": torch.ones(4, 4)}, str(path))
    with pytest.raises(sst.ModelLoadError, match=r"'0.bias' of Sequential are still on the meta device"):
        sst.load_model(skeleton, str(path), strict=False, assign=True)


def test_tied_names_both_stored(tmp_path: Path) -> None:
    source = Tied()
    same, differ = tmp_path / "same.safetensors", tmp_path / "differ.safetensors"
    weight = source.embed.weight.detach()
    safetensors.torch.save_file({"embed.weight": weight, "head.weight": weight.clone()}, str(same))
    safetensors.torch.save_file({"embed.weight": weight, "head.weight": weight + 1}, str(differ))
    with torch.device("meta"):
        model = Tied()
    assert sst.load_model(model, str(same), assign=True) == ([], [])
    assert model.head.weight is model.embed.weight
    assert torch.equal(model.embed.weight, weight)
    with torch.device("meta"):
        model = Tied()
    # As safetensors: the second stored copy of a tied pair is an unexpected key (strict: an error)...
    with pytest.raises(sst.ModelLoadError, match=r'Unexpected key\(s\) in state_dict: "head.weight"(.|\n)*tied to'):
        sst.load_model(model, str(differ), assign=True)
    with torch.device("meta"):
        model = Tied()
    # ... and with strict=False it is listed, and never silently loaded over the first.
    assert sst.load_model(model, str(differ), strict=False, assign=True) == ([], ["head.weight"])
    assert model.head.weight is model.embed.weight
    assert torch.equal(model.embed.weight, weight)


def test_transformers_model_whose_init_leaves_a_buffer_raises(tmp_path: Path) -> None:
    """transformers' own initialisation recomputes buffers; one it does not compute is an error, not garbage."""
    transformers = pytest.importorskip("transformers")

    class Config(transformers.PretrainedConfig):
        model_type = "stream-st-test"

    class Model(transformers.PreTrainedModel):
        config_class = Config

        def __init__(self, config: Any) -> None:
            super().__init__(config)
            self.proj = nn.Linear(4, 4)
            self.register_buffer("table", torch.arange(3), persistent=False)
            self.post_init()

        def _init_weights(self, module: nn.Module) -> None:
            pass  # knows nothing of `table`

    path = tmp_path / "custom.safetensors"
    safetensors.torch.save_model(Model(Config()), str(path))
    with torch.device("meta"):
        model = Model(Config())
    with pytest.raises(sst.ModelLoadError, match="did not compute the buffers 'table' of Model"):
        sst.load_model(model, str(path), assign=True)
