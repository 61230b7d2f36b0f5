"""Tiny random transformers models (hidden size 64, 2 layers) of several architecture families, with inputs
for their forward pass, for tests that compare a streamed load with transformers' own ``from_pretrained``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Family:
    name: str
    model_class: Callable[[], Any]  # the transformers class, looked up lazily (transformers is optional)
    config: Callable[[], Any]
    inputs: Callable[[], dict[str, torch.Tensor]]
    converted: bool = False  # transformers renames or fuses this checkpoint's names when it loads them


def _transformers() -> Any:
    import transformers

    return transformers


DECODER = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
ENCODER = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}


def tokens() -> dict[str, torch.Tensor]:
    return {"input_ids": torch.tensor([[1, 5, 9, 2, 77, 3]])}


def pixels() -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.linspace(-1, 1, 3 * 32 * 32).reshape(1, 3, 32, 32)}


def seq2seq() -> dict[str, torch.Tensor]:
    return {**tokens(), "decoder_input_ids": torch.tensor([[0, 4, 8]])}


def text_and_image() -> dict[str, torch.Tensor]:
    return {**tokens(), **pixels()}


def _t(name: str) -> Callable[[], Any]:
    return lambda: getattr(_transformers(), name)


def _config(name: str, **kwargs: Any) -> Callable[[], Any]:
    return lambda: getattr(_transformers(), name)(**kwargs)


FAMILIES = [
    Family("llama-tied", _t("LlamaForCausalLM"), _config("LlamaConfig", **DECODER, tie_word_embeddings=True), tokens),
    Family("llama", _t("LlamaForCausalLM"), _config("LlamaConfig", **DECODER, tie_word_embeddings=False), tokens),
    Family(
        "gpt2",
        _t("GPT2LMHeadModel"),
        _config(
            "GPT2Config", vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
        ),
        tokens,
    ),
    Family("gemma2", _t("Gemma2ForCausalLM"), _config("Gemma2Config", **DECODER, head_dim=16), tokens),
    Family("qwen3", _t("Qwen3ForCausalLM"), _config("Qwen3Config", **DECODER, head_dim=16), tokens),
    Family(
        "mixtral",
        _t("MixtralForCausalLM"),
        _config("MixtralConfig", **DECODER, num_local_experts=4, num_experts_per_tok=2),
        tokens,
        converted=True,
    ),
    Family(
        "t5",
        _t("T5ForConditionalGeneration"),
        _config("T5Config", vocab_size=128, d_model=64, d_ff=128, d_kv=16, num_layers=2, num_heads=4),
        seq2seq,
    ),
    Family(
        "bert",
        _t("BertForMaskedLM"),
        _config("BertConfig", vocab_size=128, max_position_embeddings=64, **ENCODER),
        tokens,
    ),
    Family(
        "clip",
        _t("CLIPModel"),
        lambda: _transformers().CLIPConfig(
            text_config={
                **ENCODER,
                "vocab_size": 128,
                "max_position_embeddings": 32,
                "bos_token_id": 0,
                "eos_token_id": 2,
            },
            vision_config={**ENCODER, "image_size": 32, "patch_size": 8},
            projection_dim=32,
        ),
        text_and_image,
    ),
    Family(
        "vit",
        _t("ViTForImageClassification"),
        _config("ViTConfig", **ENCODER, image_size=32, patch_size=8, num_labels=3),
        pixels,
        converted=True,
    ),
]
