from __future__ import annotations

import pytest

from stream_st.config import Config, resolve
from stream_st.errors import ConfigError


def test_env_then_config_then_keywords(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAM_ST_PART_SIZE", "1024")
    monkeypatch.setenv("STREAM_ST_TIMEOUT", "2.5")
    assert Config.from_env().part_size == 1024
    assert resolve(None, {}).timeout == 2.5
    assert resolve(Config(part_size=4096), {}).part_size == 4096  # an explicit config ignores the env
    assert resolve(Config(part_size=4096), {"part_size": 8192}).part_size == 8192


def test_invalid_values_name_the_option(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="config max_concurrency must be > 0, got 0"):
        Config(max_concurrency=0)
    with pytest.raises(ConfigError, match="unknown option.*part_sise.*valid options: max_concurrency"):
        Config().replace(part_sise=1)
    monkeypatch.setenv("STREAM_ST_RETRIES", "many")
    with pytest.raises(ConfigError, match="STREAM_ST_RETRIES='many' is not a valid int"):
        Config.from_env()
