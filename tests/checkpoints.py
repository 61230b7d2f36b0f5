"""Checkpoints for the tests, written with safetensors itself, and the bit-exact comparison."""

from __future__ import annotations

from pathlib import Path

import safetensors.torch
import torch

# Every dtype that both safetensors.torch and this torch know.
ALL_DTYPES: dict[str, torch.dtype] = dict(safetensors.torch._TYPES)


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Arbitrary bit patterns (NaNs and infinities included) of ``dtype``."""
    generator = torch.Generator().manual_seed(seed)
    itemsize = torch.empty((), dtype=dtype).element_size()
    numel = 1
    for dim in shape:
        numel *= dim
    raw = torch.randint(0, 256, (numel * itemsize,), dtype=torch.uint8, generator=generator)
    if dtype == torch.bool:
        raw = raw % 2
    return raw.view(dtype).reshape(shape)


def all_dtypes_state() -> dict[str, torch.Tensor]:
    """Each dtype in several shapes: odd sizes leave later tensors unaligned; 0-d and empty ones."""
    state: dict[str, torch.Tensor] = {}
    for index, (code, dtype) in enumerate(sorted(ALL_DTYPES.items())):
        state[f"{code}.odd"] = random_tensor((3, 7), dtype, seed=index)
        state[f"{code}.scalar"] = random_tensor((), dtype, seed=100 + index)
        state[f"{code}.empty"] = random_tensor((0, 5), dtype, seed=0)
        state[f"{code}.vector"] = random_tensor((1001,), dtype, seed=200 + index)
    return state


def layered_state(layers: int = 4, width: int = 256) -> dict[str, torch.Tensor]:
    """A small Llama-like layout of bf16 weights, several parts long with a small part_size."""
    state = {"model.embed_tokens.weight": random_tensor((1000, width), torch.bfloat16, seed=1)}
    for layer in range(layers):
        prefix = f"model.layers.{layer}"
        state[f"{prefix}.input_layernorm.weight"] = random_tensor((width,), torch.bfloat16, seed=10 + layer)
        state[f"{prefix}.self_attn.q_proj.weight"] = random_tensor((width, width), torch.bfloat16, seed=20 + layer)
        state[f"{prefix}.mlp.up_proj.weight"] = random_tensor((width * 2, width), torch.bfloat16, seed=30 + layer)
    state["lm_head.weight"] = random_tensor((1000, width), torch.bfloat16, seed=2)
    return state


def tiny_state(count: int) -> dict[str, torch.Tensor]:
    """Many tiny tensors: a long header, a short data section."""
    return {f"t.{i:05d}": torch.full((i % 3 + 1,), i, dtype=torch.int16) for i in range(count)}


def write(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    safetensors.torch.save_file(state, str(path), metadata=metadata)
    path.chmod(0o644)
    return path


def raw_bytes(tensor: torch.Tensor) -> bytes:
    tensor = tensor.detach().cpu().contiguous()
    if tensor.numel() == 0:
        return b""
    return bytes(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())


def assert_same(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Same names, dtypes, shapes and bytes."""
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert_tensor_same(got[name], tensor, name)


def assert_tensor_same(got: torch.Tensor, expected: torch.Tensor, name: str = "") -> None:
    assert got.dtype == expected.dtype, name
    assert got.shape == expected.shape, name
    assert raw_bytes(got) == raw_bytes(expected), name


def write_sharded(folder: Path, state: dict[str, torch.Tensor], shards: int) -> dict[str, str]:
    """Split ``state`` into ``shards`` files plus a transformers-style index; returns the weight map."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o755)
    names = list(state)
    weight_map: dict[str, str] = {}
    for index in range(shards):
        file = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        part = {name: state[name] for name in names[index::shards]}
        write(folder / file, part)
        weight_map.update(dict.fromkeys(part, file))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index_doc = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index_doc))
    (folder / "model.safetensors.index.json").chmod(0o644)
    return weight_map


def sharded_reference(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every shard in ``folder``, as safetensors loads them."""
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        state.update(safetensors.torch.load_file(str(shard)))
    return state


def mapping_of(tensor: torch.Tensor) -> str | None:
    """The file whose map holds the tensor's memory (/proc/self/maps), or None for anonymous memory."""
    address = tensor.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        low, high = (int(x, 16) for x in fields[0].split("-"))
        if low <= address < high:
            return fields[5].removesuffix(" (deleted)") if len(fields) == 6 and fields[5].startswith("/") else None
    raise AssertionError(f"{address:#x} is not mapped")
