"""The safetensors-like API over local files, file:// and memory:// (fsspec), plus load_model, async
twins, cancellation and clean-up."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import fsspec
import pytest
import safetensors.torch
import torch
from torch import nn

import stream_st as sst
from checkpoints import assert_same, assert_tensor_same, layered_state, write
from servers import RangeServer


def reference(root: Path, name: str) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(root / name))


@pytest.mark.parametrize("form", ["path", "file-url"])
@pytest.mark.parametrize("name", ["dtypes.safetensors", "layered.safetensors", "tiny.safetensors"])
def test_local_files_bit_exact(root: Path, name: str, form: str) -> None:
    url = str(root / name) if form == "path" else (root / name).as_uri()
    assert_same(sst.load_file(url, part_size=65536), reference(root, name))


def test_memory_filesystem_through_fsspec(root: Path) -> None:
    fs = fsspec.filesystem("memory")
    fs.pipe("/ckpt/layered.safetensors", (root / "layered.safetensors").read_bytes())
    try:
        loaded = sst.load_file("memory://ckpt/layered.safetensors", header_prefetch=1024, part_size=100_000)
        assert_same(loaded, reference(root, "layered.safetensors"))
        with sst.safe_open("memory://ckpt/layered.safetensors") as handle:
            assert_tensor_same(
                handle.get_slice("lm_head.weight")[3:7], reference(root, "layered.safetensors")["lm_head.weight"][3:7]
            )
    finally:
        fs.rm("/ckpt", recursive=True)


def test_missing_local_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        sst.load_file(str(tmp_path / "absent.safetensors"))


def test_safe_open_mirrors_safetensors(http: RangeServer, root: Path) -> None:
    from safetensors import safe_open as reference_open

    path = root / "dtypes.safetensors"
    with sst.safe_open(http.url(path.name), framework="pt") as ours, reference_open(str(path), "pt") as theirs:
        assert ours.keys() == theirs.keys()
        assert ours.offset_keys() == theirs.offset_keys()
        assert ours.metadata() == theirs.metadata()
        for name in ["F32.odd", "BOOL.scalar", "BF16.empty"]:
            assert_tensor_same(ours.get_tensor(name), theirs.get_tensor(name), name)
            assert ours.get_slice(name).get_shape() == theirs.get_slice(name).get_shape()
            assert ours.get_slice(name).get_dtype() == theirs.get_slice(name).get_dtype()
        both = ours.get_tensors(["I64.vector", "F16.odd"])
        assert_tensor_same(both["F16.odd"], theirs.get_tensor("F16.odd"))
        assert_tensor_same(ours.get_slice("F64.odd")[1:, ::2], theirs.get_slice("F64.odd")[1:, ::2])
        with pytest.raises(sst.TensorNotFoundError, match="no tensor named 'F32.od'.*did you mean 'F32.odd'"):
            ours.get_tensor("F32.od")
    with pytest.raises(RuntimeError, match="the handle is closed"):
        ours.get_tensor("F32.odd")


def test_dtype_cast_only_touches_floating_tensors(root: Path) -> None:
    loaded = sst.load_file(str(root / "dtypes.safetensors"), tensors=["F32.odd", "I32.odd"], dtype=torch.float16)
    expected = reference(root, "dtypes.safetensors")
    assert loaded["F32.odd"].dtype == torch.float16
    assert torch.equal(loaded["F32.odd"], expected["F32.odd"].to(torch.float16))
    assert_tensor_same(loaded["I32.odd"], expected["I32.odd"])


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight  # tied, as in many language models
        self.register_buffer("scale", torch.tensor([2.0]))


def test_load_model_matches_safetensors_with_tied_weights(tmp_path: Path) -> None:
    source = Tiny()
    path = tmp_path / "tiny.safetensors"
    safetensors.torch.save_model(source, str(path))
    ours, theirs = Tiny(), Tiny()
    assert sst.load_model(ours, str(path)) == ([], [])
    safetensors.torch.load_model(theirs, str(path))
    for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert_tensor_same(a, b, name)
    assert ours.head.weight is ours.embed.weight


def test_load_model_on_meta_device_with_assign(tmp_path: Path) -> None:
    source = Tiny()
    path = tmp_path / "tiny.safetensors"
    safetensors.torch.save_model(source, str(path))
    with torch.device("meta"):
        model = Tiny()
    missing, unexpected = sst.load_model(model, str(path), assign=True)
    assert (missing, unexpected) == ([], [])
    assert not any(p.is_meta for p in model.parameters())
    assert model.head.weight is model.embed.weight
    assert torch.equal(model.embed.weight, source.embed.weight)
    assert torch.equal(model.scale, source.scale)


def test_load_model_strict_reports_like_safetensors(tmp_path: Path) -> None:
    path = write(tmp_path / "other.safetensors", {"embed.weight": torch.zeros(10, 4), "extra": torch.zeros(1)})
    with pytest.raises(RuntimeError) as ours:
        sst.load_model(Tiny(), str(path))
    with pytest.raises(RuntimeError) as theirs:
        safetensors.torch.load_model(Tiny(), str(path))
    assert str(ours.value) == str(theirs.value)
    missing, unexpected = sst.load_model(Tiny(), str(path), strict=False)
    assert (sorted(missing), sorted(unexpected)) == (["body.bias", "body.weight", "scale"], ["extra"])


def test_async_twins(http: RangeServer, root: Path) -> None:
    url = http.url("layered.safetensors")
    expected = reference(root, "layered.safetensors")

    async def main() -> None:
        assert_same(await sst.load_file_async(url, part_size=65536), expected)
        header = await sst.read_header_async(url)
        assert header.offset_keys() == list(sst.read_header(str(root / "layered.safetensors")).tensors)
        async with sst.safe_open_async(url) as handle:
            assert_tensor_same(await handle.get_tensor("lm_head.weight"), expected["lm_head.weight"])
            assert_tensor_same(
                await (await handle.get_slice("lm_head.weight")).read(slice(5, 9)), expected["lm_head.weight"][5:9]
            )
        names = [name async for name, _ in sst.iter_tensors_async(url, max_inflight_bytes=100_000)]
        assert names == header.offset_keys()
        # The sync API works from inside a running loop (it runs on its own IO thread).
        assert_same(sst.load_file(url, tensors="lm_head.*"), {"lm_head.weight": expected["lm_head.weight"]})

    asyncio.run(main())


def test_cancelled_load_leaves_no_threads_and_next_load_works(http: RangeServer, root: Path, tmp_path: Path) -> None:
    big = write(root / "big.safetensors", layered_state(layers=8, width=512))
    url = http.url(big.name)
    before = {t.name for t in threading.enumerate()}

    async def cancel_midway() -> None:
        task = asyncio.ensure_future(sst.load_file_async(url, part_size=8192, max_concurrency=2))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    try:
        asyncio.run(cancel_midway())
        leftover = {t.name for t in threading.enumerate()} - before
        assert not [name for name in leftover if name.startswith("stream_st-")]
        assert_same(sst.load_file(url), reference(root, big.name))
    finally:
        big.unlink()


def test_timeout_bounds_a_stalled_load(http: RangeServer) -> None:
    http.quirks.status_once = [503] * 50
    http.quirks.retry_after = "5"
    url = http.url("small.safetensors")
    with pytest.raises(TimeoutError, match=f"{url}: load did not finish within timeout=0.5s"):
        sst.load_file(url, timeout=0.5, retries=50)


def test_iter_tensors_closed_early_cancels(http: RangeServer) -> None:
    iterator = sst.iter_tensors(http.url("layered.safetensors"), max_inflight_bytes=10_000)
    first = next(iterator)
    assert first[0] == sst.read_header(http.url("layered.safetensors")).offset_keys()[0]
    iterator.close()  # type: ignore[attr-defined]


def test_progress_callback_reaches_the_total(http: RangeServer, root: Path) -> None:
    calls: list[tuple[int, int]] = []
    name = "layered.safetensors"
    sst.load_file(http.url(name), part_size=65536, progress=lambda done, total: calls.append((done, total)))
    total = sum(t.nbytes for t in sst.read_header(str(root / name)))
    assert calls[-1] == (total, total)
    assert all(b[0] >= a[0] for a, b in zip(calls, calls[1:]))
    selected: list[tuple[int, int]] = []
    sst.load_file(http.url(name), tensors="lm_head.*", progress=lambda d, t: selected.append((d, t)))
    assert selected[-1] == (1000 * 256 * 2, 1000 * 256 * 2)


def test_no_progress_bar_when_not_a_terminal(http: RangeServer, capsys: pytest.CaptureFixture[str]) -> None:
    sst.load_file(http.url("layered.safetensors"))
    sst.load_file(http.url("layered.safetensors"), progress=False)
    assert capsys.readouterr().err == ""


def _raw_file(path: Path, entries: dict[str, tuple[str, list[int], bytes]]) -> Path:
    """A safetensors file written by hand, for dtypes safetensors.torch cannot write or read."""
    import json as _json

    header: dict[str, object] = {}
    data = b""
    for name, (dtype, shape, payload) in entries.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(payload)]}
        data += payload
    raw = _json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return path


def test_float8_e8m0_beyond_safetensors_torch(tmp_path: Path) -> None:
    if not hasattr(torch, "float8_e8m0fnu"):
        pytest.skip("this torch has no float8_e8m0fnu")
    payload = bytes(range(0, 256, 7))
    path = _raw_file(tmp_path / "e8m0.safetensors", {"scales": ("F8_E8M0", [len(payload)], payload)})
    loaded = sst.load_file(str(path))["scales"]
    assert loaded.dtype == torch.float8_e8m0fnu
    assert loaded.view(torch.uint8).numpy().tobytes() == payload


def test_f4_loads_as_safetensors_loads_it(tmp_path: Path) -> None:
    if not hasattr(torch, "float4_e2m1fn_x2"):
        pytest.skip("this torch has no float4_e2m1fn_x2 (torch < 2.8)")
    entries = {
        "w": ("F4", [2, 4], b"\x12\x34\x56\x78"),  # two values per byte: torch sees shape [2, 2]
        "v": ("F4", [6], b"\x9a\xbc\xde"),
        "e": ("F4", [2, 0, 4], b""),
        "ok": ("U8", [2], b"\x01\x02"),
    }
    path = _raw_file(tmp_path / "f4.safetensors", entries)
    expected = safetensors.torch.load_file(str(path))
    loaded = sst.load_file(str(path))
    for name, tensor in expected.items():
        assert loaded[name].dtype == tensor.dtype and loaded[name].shape == tensor.shape, name
        assert loaded[name].view(torch.uint8).numpy().tobytes() == tensor.view(torch.uint8).numpy().tobytes()
    assert loaded["w"].shape == (2, 2) and loaded["w"].dtype == torch.float4_e2m1fn_x2
    with sst.safe_open(str(path), framework="pt") as f:
        assert f.get_slice("w").get_shape() == [2, 4]  # the header's shape, as safetensors reports it
        rows = f.get_slice("w")[1:2]
    assert rows.view(torch.uint8).tolist() == [[0x56, 0x78]]
    cast = sst.load_file(str(path), dtype=torch.float16)  # packed F4 keeps its dtype, as integers do
    assert cast["w"].dtype == torch.float4_e2m1fn_x2 and cast["ok"].dtype == torch.uint8


def test_f4_with_an_odd_last_dim_and_f6_are_clear_errors(tmp_path: Path) -> None:
    odd = _raw_file(tmp_path / "odd.safetensors", {"w": ("F4", [2, 3], b"\x12\x34\x56")})
    with pytest.raises(safetensors.SafetensorError, match="last dim be divisible by 2"):
        safetensors.torch.load_file(str(odd))
    with pytest.raises(
        sst.UnsupportedDtypeError, match=r"tensor 'w' has dtype F4 and shape \[2, 3\]; .* last dim must be even"
    ):
        sst.load_file(str(odd))
    f6 = _raw_file(
        tmp_path / "f6.safetensors", {"w": ("F6_E2M3", [4], b"\x12\x34\x56"), "ok": ("U8", [2], b"\x01\x02")}
    )
    assert sst.load_file(str(f6), tensors="ok")["ok"].tolist() == [1, 2]
    with pytest.raises(sst.UnsupportedDtypeError, match="tensor 'w' has dtype F6_E2M3, which this torch"):
        sst.load_file(str(f6))


def test_iter_tensors_first_batch_is_one_part(http: RangeServer) -> None:
    import asyncio

    from stream_st.api import _batches, open_files
    from stream_st.config import Config

    async def batches() -> list[list[int]]:
        async with open_files(http.url("layered.safetensors"), Config(), None) as checkpoint:
            located = await checkpoint.locate(None)
            groups = _batches(located, budget=1 << 30, first_budget=65536)
            return [[file.info(n).nbytes for n in names] for group in groups for file, names in group.items()]

    sizes = asyncio.run(batches())
    assert len(sizes) == 2  # the first tensor alone (larger than one part), then everything else
    assert len(sizes[0]) == 1 and sizes[0][0] > 65536


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without CUDA gives")
def test_cuda_device_without_cuda_is_a_clear_error(root: Path) -> None:
    with pytest.raises(ValueError, match="device='cuda', but CUDA is not available to this torch"):
        sst.load_file(str(root / "small.safetensors"), device="cuda")


def test_progress_bar_when_asked(http: RangeServer, capsys: pytest.CaptureFixture[str]) -> None:
    sst.load_file(http.url("layered.safetensors"), progress=True, part_size=65536)
    err = capsys.readouterr().err
    assert "layered.safetensors" in err and "B/s" in err  # tqdm's bar: file name, rate
