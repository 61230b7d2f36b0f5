from __future__ import annotations

import pytest

from stream_st.config import Config, resolve
from stream_st.errors import ConfigError


def test_env_then_config_then_keywords(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAM_ST_PART_SIZE", "1024")
    monkeypatch.setenv("STREAM_ST_TIMEOUT", "2.5")
    assert Config.from_env().part_size == 1024
    assert resolve(None, {}).timeout == 2.5
    explicit = resolve(Config(part_size=4096), {})
    assert (explicit.part_size, explicit.timeout) == (4096, 2.5)  # config= beats the env field by field
    assert resolve(Config(part_size=4096), {"part_size": 8192}).part_size == 8192
    assert resolve(Config(), {}).part_size == 1024  # a field left at its default is the environment's
    assert resolve(Config(part_size=1 << 24), {}).part_size == 1 << 24  # given, even if equal to the default
    replaced = resolve(Config(retries=2).replace(timeout=None), {})
    assert (replaced.part_size, replaced.retries, replaced.timeout) == (1024, 2, None)


@pytest.mark.parametrize(
    "given",
    [
        {"direct_http": "no"},
        {"part_size": 1.5},
        {"part_size": "16"},
        {"retries": True},
        {"timeout": "3"},
        {"early_start": 1},
        {"cache_dir": 5},
        {"memory_map": None},
    ],
)
def test_a_value_of_the_wrong_type_is_refused_naming_the_option(given: dict[str, object]) -> None:
    (name,) = given
    with pytest.raises(ConfigError, match=f"config {name} must be"):
        Config(**given)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=f"config {name} must be"):
        Config().replace(**given)


def test_numbers_of_other_types_become_the_fields_type() -> None:
    import numpy as np

    config = Config(part_size=np.int64(1 << 20), timeout=3, stall_timeout=np.float32(2.5))
    assert type(config.part_size) is int and type(config.timeout) is float and config.stall_timeout == 2.5


def test_invalid_values_name_the_option(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="config max_concurrency must be > 0, got 0"):
        Config(max_concurrency=0)
    with pytest.raises(ConfigError, match="unknown option.*part_sise.*valid options: max_concurrency"):
        Config().replace(part_sise=1)
    monkeypatch.setenv("STREAM_ST_RETRIES", "many")
    with pytest.raises(ConfigError, match="STREAM_ST_RETRIES='many' is not a valid int"):
        Config.from_env()
