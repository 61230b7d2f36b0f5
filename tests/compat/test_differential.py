"""Differential test: the same calls on safetensors and on stream_st (a local path, and a URL of a Range-capable
server on 127.0.0.1) over a zoo of files written by safetensors; results must be equal bit for bit, or both
calls must raise.

The zoo: every dtype that safetensors round-trips in this torch (found by trying, not listed by hand), 0-d,
empty and odd shapes, names with brackets, globs, dots, unicode, spaces, newlines, metadata present and absent,
thousands of tiny tensors, and files whose names do not end in ``.safetensors``.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import safetensors
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import stream_st as sst
from checkpoints import random_tensor
from servers import RangeServer

MODES = ["local", "http"]


def round_trip_dtypes() -> list[torch.dtype]:
    """Every torch dtype that safetensors saves and loads back as itself."""
    import tempfile

    found = []
    with tempfile.TemporaryDirectory() as folder:
        path = f"{folder}/probe.safetensors"
        for dtype in sorted({v for v in vars(torch).values() if isinstance(v, torch.dtype)}, key=str):
            try:
                safetensors.torch.save_file({"t": torch.zeros((2, 2), dtype=torch.uint8).view(dtype)}, path)
                ok = safetensors.torch.load_file(path)["t"].dtype == dtype
            except Exception:  # noqa: BLE001 - a dtype safetensors cannot hold is simply not in the zoo
                ok = False
            if ok:
                found.append(dtype)
    return found


DTYPES = round_trip_dtypes()
# Sub-byte F4 (two values per byte) has its own file: today stream_st refuses it (issue #16), and one refused
# tensor would otherwise hide the result of all the others.
PACKED = [d for d in DTYPES if d.itemsize == 1 and "float4" in str(d)]

ODD_NAMES = [
    "w[0]",
    "*",
    "?",
    "[",
    "]",
    "model.layers.*",
    "a.b.c",
    "ünïcødé.权重",
    "with space",
    "",
    "a/b",
    "back\\slash",
    "new\nline",
    "x" * 300,
]
SHAPES: list[tuple[int, ...]] = [(), (0,), (1,), (2, 0, 3), (1, 1, 1), (7, 13, 3), (5, 1, 7), (3, 4, 5, 6), (1001,)]
OTHER_FILE_NAMES = ["noext", "w.bin", "model.st", "x.safetensors.tmp"]


def _write(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    safetensors.torch.save_file(state, str(path), metadata=metadata)
    path.chmod(0o644)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("zoo")
    folder.chmod(0o755)
    dtypes: dict[str, torch.Tensor] = {}
    for index, dtype in enumerate(d for d in DTYPES if d not in PACKED):
        for shape_index, shape in enumerate(SHAPES):
            dtypes[f"{str(dtype).removeprefix('torch.')}.{shape_index}"] = random_tensor(shape, dtype, seed=index)
    _write(folder / "dtypes.safetensors", dtypes, metadata={"format": "pt", "note": "ünï"})
    _write(folder / "packed.safetensors", {str(d): random_tensor((3, 4), d, seed=1) for d in PACKED})
    names = {name: torch.full((2, 3), i, dtype=torch.float32) for i, name in enumerate(ODD_NAMES)}
    _write(folder / "names.safetensors", names)
    shapes = {f"s{i}": random_tensor(shape, torch.float32, seed=i) for i, shape in enumerate(SHAPES)}
    shapes["big"] = random_tensor((40, 6, 5), torch.bfloat16, seed=99)
    _write(folder / "shapes.safetensors", shapes, metadata={})
    _write(folder / "tiny.safetensors", {f"t.{i}": torch.full((i % 3,), i, dtype=torch.int16) for i in range(3000)})
    _write(folder / "empty.safetensors", {})
    for name in OTHER_FILE_NAMES:
        shutil.copyfile(folder / "shapes.safetensors", folder / name)
        (folder / name).chmod(0o644)
    return folder


@pytest.fixture(scope="module")
def server(zoo: Path) -> Iterator[RangeServer]:
    server = RangeServer(zoo)
    yield server
    server.stop()


Where = Callable[[str], str]


@pytest.fixture(scope="module", params=MODES)
def where(request: pytest.FixtureRequest, zoo: Path, server: RangeServer) -> Where:
    """The file name as stream_st is given it in this mode: a local path, or the server's URL."""
    if request.param == "local":
        return lambda name: str(zoo / name)
    return server.url


# --- comparing outcomes -------------------------------------------------------------------------------------


def _outcome(call: Callable[[], Any]) -> tuple[bool, Any]:
    try:
        return True, call()
    except Exception as error:  # noqa: BLE001 - any exception is an outcome to compare
        return False, error


def raw_bytes(tensor: torch.Tensor) -> bytes:
    """The tensor's bytes in row-major order, whatever its strides (a fresh contiguous copy is viewed)."""
    dense = torch.empty(tensor.shape, dtype=tensor.dtype).copy_(tensor.detach().cpu())
    return bytes(dense.reshape(-1).view(torch.uint8).numpy().tobytes()) if dense.numel() else b""


def _same_value(got: Any, expected: Any, what: str) -> None:
    if isinstance(expected, torch.Tensor):
        assert isinstance(got, torch.Tensor), f"{what}: {type(got)}"
        assert got.dtype == expected.dtype, f"{what}: dtype {got.dtype} != {expected.dtype}"
        assert got.shape == expected.shape, f"{what}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
        assert raw_bytes(got) == raw_bytes(expected), f"{what}: different bytes"
    elif isinstance(expected, dict):
        assert isinstance(got, dict), f"{what}: {type(got)}"
        assert sorted(got) == sorted(expected), f"{what}: different names"
        sized = {name for name, tensor in expected.items() if isinstance(tensor, torch.Tensor) and tensor.numel()}
        assert _ordered(got, sized) == _ordered(expected, sized), f"{what}: different order"
        for key in expected:
            _same_value(got[key], expected[key], f"{what}[{key!r}]")
    elif isinstance(expected, (list, tuple)) and expected and isinstance(expected[0], torch.Tensor):
        assert len(got) == len(expected), what
        for index, (a, b) in enumerate(zip(got, expected)):
            _same_value(a, b, f"{what}[{index}]")
    else:
        assert got == expected, f"{what}: {got!r} != {expected!r}"


def _ordered(names: Any, sized: set[str]) -> list[str]:
    """The order of ``names`` without the zero-size tensors: several of them share one offset, and safetensors
    orders those differently from one call to the next (as a hash map iterates), so only the rest is compared."""
    return [name for name in names if name in sized]


def same(expected: Callable[[], Any], got: Callable[[], Any], what: str) -> None:
    """safetensors' ``expected()`` and stream_st's ``got()`` both return equal values, or both raise."""
    expected_ok, expected_value = _outcome(expected)
    got_ok, got_value = _outcome(got)
    if not expected_ok:
        assert not got_ok, f"{what}: safetensors raises {expected_value!r}, stream_st returns a value"
        return
    assert got_ok, f"{what}: stream_st raises {got_value!r}, safetensors returns a value"
    _same_value(got_value, expected_value, what)


# --- whole files ---------------------------------------------------------------------------------------------

FILES = ["dtypes.safetensors", "names.safetensors", "shapes.safetensors", "tiny.safetensors", "empty.safetensors"]
FILE_CASES = [
    *FILES,
    "packed.safetensors",  # F4: float4_e2m1fn_x2, the last dim halved, as safetensors loads it
    *OTHER_FILE_NAMES,  # a file is a file whatever its name
]


@pytest.mark.parametrize("name", FILE_CASES)
def test_load_file(zoo: Path, where: Where, name: str) -> None:
    same(
        lambda: safetensors.torch.load_file(str(zoo / name)),
        lambda: sst.load_file(where(name)),
        f"load_file({name})",
    )


@pytest.mark.parametrize("name", FILE_CASES)
def test_safe_open_handle(zoo: Path, where: Where, name: str) -> None:
    """keys, offset_keys, metadata, every get_tensor, every slice's shape and dtype, get_tensors(names)."""
    with safetensors.safe_open(str(zoo / name), framework="pt") as ref, sst.safe_open(where(name), "pt") as got:
        for method in ("keys", "metadata"):
            same(getattr(ref, method), getattr(got, method), f"{name}: {method}()")
        sized = {key for key in ref.keys() if ref.get_slice(key).get_shape().count(0) == 0}  # noqa: SIM118
        assert sorted(got.offset_keys()) == sorted(ref.offset_keys()), f"{name}: offset_keys() names"
        assert _ordered(got.offset_keys(), sized) == _ordered(ref.offset_keys(), sized), f"{name}: offset_keys()"
        keys = ref.keys()
        for key in keys[:: max(1, len(keys) // 200)]:  # every tensor of small files, 200 of tiny.safetensors
            for call in ("get_tensor", "get_shape", "get_dtype"):
                same(lambda k=key, c=call: _call(ref, c, k), lambda k=key, c=call: _call(got, c, k), f"{call}({key!r})")
        # get_tensors(names) is stream_st's own (safetensors' takes no argument): equal to get_tensor per name.
        names = ref.keys()[::2]
        same(lambda: {k: ref.get_tensor(k) for k in names}, lambda: got.get_tensors(names), f"{name}: get_tensors")


def test_get_tensors_without_names(zoo: Path, where: Where) -> None:
    with safetensors.safe_open(str(zoo / "shapes.safetensors"), "pt") as ref:
        expected = ref.get_tensors()
    with sst.safe_open(where("shapes.safetensors"), "pt") as got:
        _same_value(got.get_tensors(), expected, "get_tensors()")


@pytest.mark.parametrize("name", ODD_NAMES)
def test_select_exact_odd_name(zoo: Path, where: Where, name: str) -> None:
    """``tensors=[name]`` with an exact name selects that tensor, whatever characters it has."""
    expected = {name: safetensors.torch.load_file(str(zoo / "names.safetensors"))[name]}
    _same_value(sst.load_file(where("names.safetensors"), tensors=[name]), expected, f"tensors=[{name!r}]")


def test_path_like_load_file(zoo: Path) -> None:
    path = zoo / "shapes.safetensors"
    same(lambda: safetensors.torch.load_file(path), lambda: sst.load_file(path), "load_file(Path)")


def test_path_like_safe_open(zoo: Path) -> None:
    path = zoo / "shapes.safetensors"
    with safetensors.safe_open(path, "pt") as ref, sst.safe_open(path, "pt") as got:
        _same_value(got.get_tensor("big"), ref.get_tensor("big"), "safe_open(Path).get_tensor")


# --- headers written by hand --------------------------------------------------------------------------------

_X = '"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}'
CRAFTED = {
    "leading_space": "   {" + _X + "}",
    "leading_newline": "\n{" + _X + "}",
    "trailing_space": "{" + _X + "}    ",
    "lone_surrogate_name": '{"\\ud800": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}',
    "metadata_not_str": '{"__metadata__": {"a": 1}, ' + _X + "}",
    "gap_before_first": '{"x": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}',
    "overlap": "{" + _X + ', "y": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}',
    "f6": '{"x": {"dtype": "F6_E2M3", "shape": [4], "data_offsets": [0, 3]}}',
    "duplicate_key": "{" + _X + ", " + _X + "}",
}
CRAFTED_BUGS: dict[str, str] = {}
# Permanent, documented differences (README "How it works": no duplicate keys): stream_st is stricter.
CRAFTED_STRICTER = {"duplicate_key": "safetensors keeps one of two equal keys; stream_st refuses the header"}


def _call(handle: Any, call: str, key: str) -> Any:
    return handle.get_tensor(key) if call == "get_tensor" else getattr(handle.get_slice(key), call)()


def _crafted_cases() -> list[Any]:
    marks = {name: [pytest.mark.xfail(strict=True, reason=reason)] for name, reason in CRAFTED_BUGS.items()}
    return [pytest.param(name, marks=marks.get(name, []), id=name) for name in CRAFTED]


@pytest.mark.parametrize("case", _crafted_cases())
def test_crafted_header(zoo: Path, where: Where, case: str) -> None:
    import struct

    header = CRAFTED[case].encode()
    data = bytes(3 if case == "f6" else 8)
    name = f"crafted_{case}.safetensors"
    (zoo / name).write_bytes(struct.pack("<Q", len(header)) + header + data)
    (zoo / name).chmod(0o644)
    if case in CRAFTED_STRICTER:
        with pytest.raises(sst.HeaderError):
            sst.load_file(where(name))
        return
    same(lambda: safetensors.torch.load_file(str(zoo / name)), lambda: sst.load_file(where(name)), name)


# --- errors: both raise ------------------------------------------------------------------------------------


def test_missing_file_and_tensor(zoo: Path, where: Where) -> None:
    same(
        lambda: safetensors.torch.load_file(str(zoo / "absent.safetensors")),
        lambda: sst.load_file(where("absent.safetensors")),
        "load_file(absent)",
    )
    shapes = str(zoo / "shapes.safetensors")
    with safetensors.safe_open(shapes, "pt") as ref, sst.safe_open(where("shapes.safetensors"), "pt") as got:
        same(lambda: ref.get_tensor("nope"), lambda: got.get_tensor("nope"), "get_tensor(missing)")
        same(lambda: ref.get_slice("nope"), lambda: got.get_slice("nope"), "get_slice(missing)")


def test_missing_file_is_file_not_found(zoo: Path, where: Where) -> None:
    """Same builtin class as safetensors (FileNotFoundError), for a name with and without a suffix."""
    for name in ("absent.safetensors", "notafile"):
        with pytest.raises(FileNotFoundError):
            safetensors.torch.load_file(str(zoo / name))
        with pytest.raises(FileNotFoundError, match="notafile|absent"):
            sst.load_file(where(name))


# --- slices -----------------------------------------------------------------------------------------------

FIXED_INDICES: list[Any] = [
    None,
    (None, 1),
    ...,
    (..., 1),
    (..., None),
    (0, None, ..., None),
    slice(None),
    slice(None, None, 2),
    slice(1, None, 3),
    slice(None, None, -1),
    slice(5, 1),
    slice(-3, None),
    slice(-100, 100),
    -1,
    (-1, -2),
    0,
    39,
    40,
    -41,
    (slice(2, 9, 2), slice(None), 3),
    (slice(2, 9), 1, slice(0, 5, 2)),
    (),
]


@pytest.mark.parametrize("index", [pytest.param(index, id=repr(index)) for index in FIXED_INDICES])
def test_get_slice_fixed(zoo: Path, where: Where, index: Any) -> None:
    shapes = str(zoo / "shapes.safetensors")
    with safetensors.safe_open(shapes, "pt") as ref, sst.safe_open(where("shapes.safetensors"), "pt") as got:
        same(lambda: ref.get_slice("big")[index], lambda: got.get_slice("big")[index], f"big[{index!r}]")


_SLICED = {f"s{i}": shape for i, shape in enumerate(SHAPES)} | {"big": (40, 6, 5)}


@st.composite
def _name_and_index(draw: st.DrawFn) -> tuple[str, Any]:
    name = draw(st.sampled_from(sorted(_SLICED)))
    shape = _SLICED[name]
    index = draw(hnp.basic_indices(shape, min_dims=0, allow_newaxis=True, allow_ellipsis=True))
    return name, index


@pytest.fixture(scope="module")
def handles(zoo: Path, where: Where) -> Iterator[tuple[Any, Any]]:
    shapes = str(zoo / "shapes.safetensors")
    with safetensors.safe_open(shapes, "pt") as ref, sst.safe_open(where("shapes.safetensors"), "pt") as got:
        yield ref, got


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=_name_and_index())
def test_get_slice_any_basic_index(handles: tuple[Any, Any], case: tuple[str, Any]) -> None:
    """Ints (negative too), slices with any start/stop/step, ``None`` and ``...`` on every shape of the zoo."""
    ref, got = handles
    name, index = case
    same(lambda: ref.get_slice(name)[index], lambda: got.get_slice(name)[index], f"{name}[{index!r}]")


# --- load_model ---------------------------------------------------------------------------------------------


class _Net(torch.nn.Module):
    def __init__(self, extra: bool = False) -> None:
        super().__init__()
        self.a = torch.nn.Linear(4, 3)
        self.b = torch.nn.Linear(3, 2, bias=False)
        self.register_buffer("steps", torch.zeros(2, dtype=torch.int64))
        if extra:
            self.c = torch.nn.Linear(2, 2)


@pytest.fixture(scope="module")
def model_files(zoo: Path) -> Path:
    torch.manual_seed(0)
    state = {k: v.clone() for k, v in _Net().state_dict().items()}
    _write(zoo / "net.safetensors", state)
    _write(zoo / "net_extra.safetensors", {**state, "unused": torch.ones(3)})
    _write(zoo / "net_partial.safetensors", {k: v for k, v in state.items() if not k.startswith("b.")})
    return zoo


@pytest.mark.parametrize("file", ["net.safetensors", "net_extra.safetensors", "net_partial.safetensors"])
@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("extra", [False, True])
def test_load_model(model_files: Path, where: Where, file: str, strict: bool, extra: bool) -> None:
    """(missing, unexpected) and the loaded state equal safetensors.torch.load_model's, or both raise."""
    torch.manual_seed(1)
    ref_model = _Net(extra)
    got_model = _Net(extra)
    got_model.load_state_dict(ref_model.state_dict())

    def names(result: tuple[Any, Any]) -> tuple[list[str], list[str]]:
        # safetensors returns ``missing`` as a set (its docstring says a list, as stream_st returns): compare names.
        return sorted(result[0]), sorted(result[1])

    same(
        lambda: names(safetensors.torch.load_model(ref_model, str(model_files / file), strict=strict)),
        lambda: names(sst.load_model(got_model, where(file), strict=strict)),
        f"load_model({file}, strict={strict})",
    )
    _same_value(dict(got_model.state_dict()), dict(ref_model.state_dict()), "state after load_model")
