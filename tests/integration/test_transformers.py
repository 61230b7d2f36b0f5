"""A transformers model built on the meta device, its weights streamed from a URL: same weights, same
outputs and the same tied parameters as transformers' own from_pretrained of the same folder."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from checkpoints import assert_tensor_same
from servers import RangeServer

transformers = pytest.importorskip("transformers")

from stream_st.integrations.transformers import from_pretrained  # noqa: E402


def tiny_config(tied: bool) -> object:
    return transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RangeServer, Path]]:
    """Two tiny Llamas saved by transformers: one file with tied embeddings, and sharded untied."""
    folder = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(tiny_config(tied=True)).save_pretrained(folder / "tied")
    transformers.LlamaForCausalLM(tiny_config(tied=False)).save_pretrained(folder / "sharded", max_shard_size="20KB")
    server = RangeServer(folder)
    yield server, folder
    server.stop()


@pytest.mark.parametrize("name", ["tied", "sharded"])
def test_same_model_as_transformers(saved: tuple[RangeServer, Path], name: str) -> None:
    server, folder = saved
    assert (folder / "sharded" / "model.safetensors.index.json").exists()
    ours = from_pretrained(server.url(name))
    reference = transformers.LlamaForCausalLM.from_pretrained(folder / name)
    tokens = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        assert torch.equal(ours(tokens).logits, reference(tokens).logits)
    for (key, mine), (_, theirs) in zip(ours.state_dict().items(), reference.state_dict().items(), strict=True):
        assert_tensor_same(mine, theirs, key)
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == (name == "tied")
    assert not any(t.is_meta for t in [*ours.parameters(), *ours.buffers()])


def test_dtype_casts_on_load(saved: tuple[RangeServer, Path]) -> None:
    server, folder = saved
    model = from_pretrained(server.url("tied") + "/model.safetensors", dtype=torch.float16)
    assert model.model.embed_tokens.weight.dtype == torch.float16
    reference = transformers.LlamaForCausalLM.from_pretrained(folder / "tied")
    assert torch.equal(model.model.norm.weight, reference.model.norm.weight.to(torch.float16))
