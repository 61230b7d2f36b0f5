"""stream_st.integrations.transformers.from_pretrained beyond the family matrix: dtype= casting only what
transformers casts, device="meta", the model class, and checkpoints that store both names of a tied pair
(also through load_model on a meta skeleton)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

from checkpoints import assert_tensor_same
from servers import RangeServer
from tiny_transformers import DECODER, FAMILIES, tokens

transformers = pytest.importorskip("transformers")

import stream_st as sst  # noqa: E402
from stream_st.integrations.transformers import from_pretrained  # noqa: E402

T5 = next(f for f in FAMILIES if f.name == "t5")
LLAMA_TIED = next(f for f in FAMILIES if f.name == "llama-tied")


def dots1_config() -> Any:
    """An MoE whose router (``mlp.gate``) transformers keeps in fp32 for fp16 and bf16 alike."""
    return transformers.Dots1Config(
        **DECODER,
        moe_intermediate_size=32,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        first_k_dense_replace=1,
    )


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RangeServer, Path]]:
    folder = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    T5.model_class()(T5.config()).save_pretrained(folder / "t5")
    transformers.Dots1ForCausalLM(dots1_config()).save_pretrained(folder / "dots1")
    llama = LLAMA_TIED.model_class()(LLAMA_TIED.config())
    llama.save_pretrained(folder / "llama-tied")
    # The same model, its file holding both tied names: equal values, then a head that differs.
    state = {name: tensor.contiguous() for name, tensor in llama.state_dict().items()}
    for name, head in [("both-tied", state["model.embed_tokens.weight"].clone()), ("differ", torch.randn(128, 64))]:
        llama.config.save_pretrained(folder / name)
        safetensors.torch.save_file(
            {**state, "lm_head.weight": head}, str(folder / name / "model.safetensors"), metadata={"format": "pt"}
        )
    server = RangeServer(folder)
    yield server, folder
    server.stop()


def same_state(ours: torch.nn.Module, reference: torch.nn.Module) -> None:
    theirs = reference.state_dict()
    for name, tensor in ours.state_dict().items():
        assert_tensor_same(tensor, theirs[name], name)
    assert not any(t.is_meta for t in [*ours.parameters(), *ours.buffers()])


@pytest.mark.parametrize(
    ("name", "dtype", "kept"),
    [
        ("t5", torch.float16, "DenseReluDense.wo.weight"),  # `_keep_in_fp32_modules`: against fp16 only
        ("t5", torch.bfloat16, None),
        ("dots1", torch.bfloat16, "mlp.gate.weight"),  # `_keep_in_fp32_modules_strict`: fp16 and bf16
        ("dots1", torch.float16, "mlp.gate.weight"),
    ],
)
def test_dtype_casts_only_what_transformers_casts(
    served: tuple[RangeServer, Path], name: str, dtype: torch.dtype, kept: str | None
) -> None:
    server, folder = served
    model_class = T5.model_class() if name == "t5" else transformers.Dots1ForCausalLM
    ours = from_pretrained(server.url(name), dtype=dtype)
    assert type(ours) is model_class  # the class config.json's `architectures` names
    reference = model_class.from_pretrained(folder / name, dtype=dtype)
    same_state(ours, reference)  # bit for bit, dtypes included: fp32 weights never rounded through dtype
    fp32 = [n for n, t in ours.state_dict().items() if t.dtype == torch.float32]
    assert (kept is None) == (not fp32)
    if kept is not None:
        assert any(n.endswith(kept) for n in fp32)
        assert all(t.dtype == dtype for n, t in ours.state_dict().items() if n not in fp32 and t.is_floating_point())


def test_device_meta_is_refused_before_any_request(served: tuple[RangeServer, Path]) -> None:
    server, _ = served
    server.reset()
    with pytest.raises(ValueError, match="device='meta' would load no weights"):
        from_pretrained(server.url("t5"), device="meta")
    assert server.gets() == []


def test_wrong_model_class_raises_transformers_error(served: tuple[RangeServer, Path]) -> None:
    server, _ = served
    with pytest.raises(ValueError, match=r"Unrecognized configuration class .*T5Config.* AutoModelForCausalLM"):
        from_pretrained(server.url("t5"), transformers.AutoModelForCausalLM)
    with pytest.raises(ValueError, match="LlamaForCausalLM takes a LlamaConfig, but the config is a T5Config"):
        from_pretrained(server.url("t5"), transformers.LlamaForCausalLM)
    auto = from_pretrained(server.url("t5"), transformers.AutoModelForSeq2SeqLM)
    assert type(auto) is transformers.T5ForConditionalGeneration


def test_tied_names_both_stored_stay_tied(served: tuple[RangeServer, Path]) -> None:
    server, folder = served
    reference = LLAMA_TIED.model_class().from_pretrained(folder / "both-tied")
    assert reference.lm_head.weight is reference.model.embed_tokens.weight
    ours = from_pretrained(server.url("both-tied"))
    with torch.device("meta"):
        skeleton = LLAMA_TIED.model_class()(LLAMA_TIED.config())
    assert sst.load_model(skeleton, server.url("both-tied"), assign=True) == ([], [])
    for model in (ours, skeleton):
        assert model.lm_head.weight is model.model.embed_tokens.weight
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        same_state(model, reference)
        with torch.no_grad():
            assert torch.equal(model(**tokens()).logits, reference(**tokens()).logits)


def test_tied_names_stored_different(served: tuple[RangeServer, Path]) -> None:
    """transformers unties a pair whose stored values differ (with a warning); from_pretrained does the same,
    load_model on a skeleton that ties them reports the second copy as unexpected, as safetensors does."""
    server, folder = served
    reference = LLAMA_TIED.model_class().from_pretrained(folder / "differ")
    assert reference.lm_head.weight is not reference.model.embed_tokens.weight
    same_state(from_pretrained(server.url("differ")), reference)
    with torch.device("meta"):
        skeleton = LLAMA_TIED.model_class()(LLAMA_TIED.config())
    with pytest.raises(sst.ModelLoadError, match="'lm_head.weight' is tied to 'model.embed_tokens.weight'"):
        sst.load_model(skeleton, server.url("differ"), assign=True)


def test_prefetch_then_from_pretrained_takes_the_prefetched_weights(served: tuple[RangeServer, Path]) -> None:
    server, folder = served
    server.reset()
    url = server.url("llama-tied")
    with sst.prefetch(url) as early:
        early.wait(30)
        model = from_pretrained(url)
    same_state(model, transformers.LlamaForCausalLM.from_pretrained(folder / "llama-tied"))
    weights = folder / "llama-tied" / "model.safetensors"
    header = 8 + int.from_bytes(weights.read_bytes()[:8], "little")
    sent = sum(r.sent for r in server.gets("llama-tied/model.safetensors"))
    assert sent == weights.stat().st_size + header  # the weights once; the load re-read only the header


def test_config_json_of_a_presigned_file_url_is_its_sibling_without_the_signature() -> None:
    from stream_st.integrations.transformers import config_location

    signed = config_location("https://host/bucket/model.safetensors?X-Amz-Signature=abc%2Fdef&X-Amz-Expires=60")
    assert signed.url == "https://host/bucket/config.json"
    assert config_location("s3://bucket/llama/").url == "s3://bucket/llama/config.json"
    assert config_location("hf://org/repo").url == "hf://org/repo/config.json"
