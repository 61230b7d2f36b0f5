from __future__ import annotations

import re

import pytest

from stream_st.errors import TensorNotFoundError
from stream_st.select import select

NAMES = ["embed", "layers.0.q", "layers.0.k", "layers.1.q", "layers.10.q", "lm_head"]


def test_none_selects_everything_in_order() -> None:
    assert select(NAMES, None, url="u") == NAMES


def test_exact_glob_regex_and_predicate_combine_in_file_order() -> None:
    chosen = select(NAMES, ["lm_head", "layers.1.*", re.compile(r"\.k$"), lambda n: n == "embed"], url="u")
    assert chosen == ["embed", "layers.0.k", "layers.1.q", "lm_head"]


def test_glob_does_not_match_prefixes_of_other_numbers() -> None:
    assert select(NAMES, "layers.1.?", url="u") == ["layers.1.q"]


def test_unknown_name_suggests_close_ones() -> None:
    with pytest.raises(TensorNotFoundError) as caught:
        select(NAMES, ["layers.0.v"], url="https://h/m.safetensors")
    assert str(caught.value) == (
        "https://h/m.safetensors: no tensor named 'layers.0.v' (the file has 6 tensors); "
        "did you mean 'layers.0.q', 'layers.0.k', 'layers.10.q'?"
    )
    assert isinstance(caught.value, KeyError)
    assert caught.value.tensor == "layers.0.v"


def test_pattern_matching_nothing_is_an_error_but_predicate_is_not() -> None:
    with pytest.raises(TensorNotFoundError, match=r"no tensor matches 'decoder\.\*'"):
        select(NAMES, "decoder.*", url="u")
    with pytest.raises(TensorNotFoundError, match="no tensor matches 'xyz'"):
        select(NAMES, re.compile("xyz"), url="u")
    assert select(NAMES, lambda n: False, url="u") == []


def test_bad_selector_type() -> None:
    with pytest.raises(TypeError, match="not int"):
        select(NAMES, [3], url="u")  # type: ignore[list-item]
