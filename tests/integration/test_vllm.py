"""vLLM with load_format="stream_st", end to end with vLLM itself (its CPU build, in its own venv .venv-vllm).

Each vLLM run is a subprocess of .venv-vllm's Python running tests/vllm_engine/driver.py; the servers (nginx,
LocalStack, the Hub-compatible endpoint, an aiohttp range server) run here and count what they serve. Engines are
shared: one engine loads from nginx, then reloads its weights in place (vLLM's ``reload_weights``, which goes
through the same loader) from every other URL.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tiny_llama import save_tiny_llama

from servers import Nginx, RangeServer, Request

REPO = Path(__file__).resolve().parents[2]
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
DRIVER = REPO / "tests" / "vllm_engine" / "driver.py"
PROMPTS = [[1, 5, 9, 33, 101], [1, 200, 7], [1, 400, 401, 402, 403, 404, 405]]
MAX_TOKENS = 12
SECRET = "Bearer sk-stream-st-test-secret-4f1d"
ENGINE = {"enforce_eager": True, "dtype": "float32", "max_model_len": 256, "seed": 0}

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def vllm_python() -> Path:
    if not VLLM_PYTHON.exists():
        if os.environ.get("STREAM_ST_REQUIRE_VLLM") == "1":
            pytest.fail(f"vLLM tests are required (STREAM_ST_REQUIRE_VLLM=1) but {VLLM_PYTHON} is missing")
        pytest.skip(f"no vLLM venv at {VLLM_PYTHON} (scripts/setup.sh creates it)")
    return VLLM_PYTHON


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny Llamas saved by transformers: ``a`` in one file, the same weights in 8 shards, ``b`` another seed."""
    root = tmp_path_factory.mktemp("vllm-models")
    root.chmod(0o755)
    save_tiny_llama(root / "a")
    save_tiny_llama(root / "a_sharded", max_shard_size="1MB")
    save_tiny_llama(root / "b", seed=1)
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)  # nginx workers read them
    return root


@pytest.fixture(scope="module")
def model_nginx(models: Path, tmp_path_factory: pytest.TempPathFactory, _nginx: Nginx) -> Iterator[Nginx]:
    """nginx serving the tiny Llamas (``_nginx`` first: it fails or skips the test where nginx is missing)."""
    server = Nginx(models, tmp_path_factory.mktemp("vllm-nginx"))
    yield server
    server.stop()


def run_vllm(python: Path, plan: dict[str, Any], workdir: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """One driver run; its result, with the run's whole output (vLLM's logs, all processes) as ``log``."""
    plan_path, result_path = workdir / "plan.json", workdir / "result.json"
    plan_path.write_text(json.dumps({"prompts": PROMPTS, "max_tokens": MAX_TOKENS, **plan}))
    environ = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONPATH": str(REPO), **(env or {})}
    completed = subprocess.run(
        [str(python), str(DRIVER), str(plan_path), str(result_path)],
        env=environ,
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=540,
    )
    assert result_path.exists(), (
        f"the vLLM driver wrote no result (exit {completed.returncode}):\n{completed.stdout[-6000:]}"
    )
    result: dict[str, Any] = json.loads(result_path.read_text())
    result["log"] = completed.stdout
    return result


IN_PROCESS = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}  # one process: engine errors reach the caller as raised
UNI = {"distributed_executor_backend": "uni"}


@pytest.fixture(scope="module")
def reference(vllm_python: Path, models: Path, tmp_path_factory: pytest.TempPathFactory) -> list[list[int]]:
    """Greedy tokens of vLLM's own safetensors loader reading the local folder."""
    plan = {"engine": {"model": str(models / "a"), "load_format": "safetensors", **ENGINE, **UNI}}
    result = run_vllm(vllm_python, plan, tmp_path_factory.mktemp("vllm-reference"), IN_PROCESS)
    assert "error" not in result, result.get("message", "") + result["log"][-6000:]
    tokens: list[list[int]] = result["tokens"]
    return tokens


def served_once(requests: list[Request], path: str, local: Path) -> None:
    """The ranges served for ``path`` cover the file's bytes exactly once, except its header: a load that
    takes a prefetch's bytes re-reads exactly the header to check the object's version."""
    size = local.stat().st_size
    header_end = 8 + int.from_bytes(local.read_bytes()[:8], "little")
    spans = []
    for request in requests:
        if request.path != path:
            continue
        assert request.status == 206 and request.range is not None, request
        start, _, end = request.range.removeprefix("bytes=").partition("-")
        spans.append((int(start), min(int(end) + 1, size), request.sent))
    spans.sort()
    assert spans, f"{path} was not read"
    from_start = [span for span in spans if span[0] == 0]
    if len(from_start) > 1 and from_start[0][1] == header_end:
        spans.remove(from_start[0])  # the version check's header read, besides the prefetch's own first read
    position = 0
    for start, end, sent in spans:
        assert sent == end - start
        assert start == position, f"{path}: bytes {position}-{start} skipped or read twice: {spans}"
        position = end
    assert position == size, f"{path}: {position} of {size} bytes read"


class ChangingServer(RangeServer):
    """Replaces ``model.safetensors`` (same size, other bytes) right after serving its first range."""

    def _record(self, request: Any, status: int, sent: int) -> None:
        super()._record(request, status, sent)
        if request.path == "/model.safetensors" and len(self.gets("model.safetensors")) == 1:
            path = self.root / "model.safetensors"
            data = bytearray(path.read_bytes())
            data[-4096:] = bytes(4096)
            path.write_bytes(bytes(data))
            stat = path.stat()
            os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))


def test_vllm_loads_from_every_store_as_its_safetensors_loader_does(
    vllm_python: Path,
    models: Path,
    model_nginx: Nginx,
    s3: Any,
    hub: Any,
    reference: list[list[int]],
    tmp_path: Path,
) -> None:
    """One engine made by ``llm(url)`` from nginx (config and tokenizer fetched too), then reloaded in place from
    nginx (sharded), LocalStack S3, the Hub, another model, a missing URL and an object changed mid-load."""
    for path in (models / "a_sharded").iterdir():
        s3.upload(s3.bucket, f"vllm/a_sharded/{path.name}", path)
    hub.commit("org/tiny-llama", {p.name: p for p in (models / "a").iterdir()})
    changing_root = tmp_path / "changing"
    changing_root.mkdir()
    (changing_root / "model.safetensors").write_bytes((models / "a" / "model.safetensors").read_bytes())
    changing = ChangingServer(changing_root)
    model_nginx.clear_log()
    hub.reset_log()
    env = {
        **IN_PROCESS,
        **hub.environ(),
        "AWS_ACCESS_KEY_ID": s3.key,
        "AWS_SECRET_ACCESS_KEY": s3.secret,
        "AWS_ENDPOINT_URL": s3.endpoint_url,
        "AWS_DEFAULT_REGION": s3.region,
    }
    reloads = [
        model_nginx.url("a_sharded"),
        s3.url(s3.bucket, "vllm/a_sharded/"),
        "hf://org/tiny-llama",
        model_nginx.url("b/model.safetensors"),
        model_nginx.url("missing/"),
        changing.url("model.safetensors"),
    ]
    plan = {
        "helper": {"url": model_nginx.url("a"), "kwargs": {"folder": str(tmp_path / "model"), **ENGINE, **UNI}},
        "reloads": reloads,
    }
    try:
        result = run_vllm(vllm_python, plan, tmp_path, env)
    finally:
        changing.stop()
    assert "error" not in result, result.get("message", "") + result["log"][-6000:]
    # The small files came from nginx; the weights did not land on disk.
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == sorted(
        p.name for p in (models / "a").iterdir() if p.suffix != ".safetensors"
    )
    assert result["tokens"] == reference
    sharded, from_s3, from_hub, other, missing, changed = result["reloaded"]
    assert sharded == reference
    assert from_s3 == reference
    assert from_hub == reference
    assert other != reference  # a reload really replaces the weights
    assert "FileNotFoundError" in missing["error"] and model_nginx.url("missing/") in missing["message"]
    assert "ObjectChangedError" in changed["error"] and changing.url("model.safetensors") in changed["message"]
    # Every weight byte was served once.
    requests = model_nginx.requests()
    for name in ["a/model.safetensors", "b/model.safetensors"]:
        served_once(requests, f"/{name}", models / name)
    for shard in sorted((models / "a_sharded").glob("*.safetensors")):
        served_once(requests, f"/a_sharded/{shard.name}", shard)
    cdn = [r for r in hub.cdn_log if r.method == "GET"]
    assert sum(r.sent for r in cdn) == (models / "a" / "model.safetensors").stat().st_size


def test_vllm_load_error_is_stream_st_error_without_secret(
    vllm_python: Path, models: Path, model_nginx: Nginx, tmp_path: Path
) -> None:
    """A 404 at engine start raises FileNotFoundError naming the URL, through vllm.LLM; the
    credential given as storage options (kept out of vLLM's logged arguments) is in no log line."""
    url = model_nginx.url("missing/model.safetensors")
    extra = {"url": url, "storage_options_env": "STREAM_ST_VLLM_STORAGE_OPTIONS", "max_concurrency": 2}
    plan = {"engine": {"model": str(models / "a"), "load_format": "stream_st", "model_loader_extra_config": extra}}
    plan["engine"].update(ENGINE, **UNI)
    secret_options = json.dumps({"headers": {"Authorization": SECRET}})
    result = run_vllm(vllm_python, plan, tmp_path, {**IN_PROCESS, "STREAM_ST_VLLM_STORAGE_OPTIONS": secret_options})
    assert result.get("error", [None])[0] == "FileNotFoundError", result.get("message", "") + result["log"][-6000:]
    assert url in result["message"]
    assert SECRET not in result["message"] and SECRET.split()[1] not in result["log"]
    assert model_nginx.requests(), "nginx saw no request"


def test_vllm_tensor_parallel_ranks_split_the_download(
    vllm_python: Path, models: Path, model_nginx: Nginx, reference: list[list[int]], tmp_path: Path
) -> None:
    """tensor_parallel_size=2 (vLLM's own multiprocess engine): the two ranks split the download over vLLM's
    tensor-parallel group, so nginx serves each weight byte once, not once per rank (only the header is read by
    both), and generation matches the reference."""
    model_nginx.clear_log()
    extra = {"url": model_nginx.url("a/model.safetensors"), "header_prefetch": 4096}
    engine = {"model": str(models / "a"), "load_format": "stream_st", "model_loader_extra_config": extra}
    plan = {"engine": {**engine, **ENGINE, "tensor_parallel_size": 2}}
    # vLLM's CPU build binds each rank's threads to cores; its automatic binding wants a NUMA node per rank.
    result = run_vllm(vllm_python, plan, tmp_path, {"VLLM_CPU_OMP_THREADS_BIND": "0|1"})
    assert "error" not in result, result.get("message", "") + result["log"][-6000:]
    assert result["tokens"] == reference
    size = (models / "a" / "model.safetensors").stat().st_size
    served = [r for r in model_nginx.requests() if r.path == "/a/model.safetensors"]
    covered = sorted(
        (int(a), int(b) + 1) for a, b in (r.range.removeprefix("bytes=").split("-") for r in served if r.range)
    )
    position = 0
    for start, end in covered:
        assert start <= position, f"bytes {position}-{start} never served"
        position = max(position, end)
    assert position >= size
    assert sum(r.sent for r in served) <= size + 4096  # one copy of the weights, two of the header prefix


# Without vLLM: the small-file copy and the options (pure stream_st code, run in the main venv).


def _model_file_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.suffix != ".safetensors" and not p.name.endswith(".index.json"))


def test_fetch_model_files_from_every_store(
    models: Path, model_nginx: Nginx, s3: Any, hub: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stream_st.integrations.vllm import fetch_model_files

    for path in (models / "a_sharded").iterdir():
        s3.upload(s3.bucket, f"vllm-files/a_sharded/{path.name}", path)
    hub.commit("org/tiny-llama-files", {p.name: p for p in (models / "a_sharded").iterdir()})
    expected = _model_file_names(models / "a_sharded")
    sources = {
        "http": (model_nginx.url("a_sharded/model.safetensors.index.json"), None),
        "s3": (s3.url(s3.bucket, "vllm-files/a_sharded/"), s3.storage_options),
        "hub": ("hf://org/tiny-llama-files", hub.storage_options()),
        "local": (str(models / "a_sharded"), None),
    }
    for name, (url, options) in sources.items():
        folder = fetch_model_files(url, tmp_path / name, storage_options=options)
        assert sorted(p.name for p in folder.iterdir()) == expected, name
        for file in expected:
            assert (folder / file).read_bytes() == (models / "a_sharded" / file).read_bytes(), (name, file)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    default = fetch_model_files(model_nginx.url("a"))
    assert default.is_relative_to(tmp_path / "cache" / "stream_st" / "vllm")
    with pytest.raises(FileNotFoundError, match="config.json"):
        fetch_model_files(model_nginx.url("missing"), tmp_path / "none")


def test_loader_options(monkeypatch: pytest.MonkeyPatch) -> None:
    from stream_st import ConfigError
    from stream_st.integrations.vllm import loader_options

    url, options = loader_options({"url": "s3://b/m/", "max_concurrency": 4, "verify": True})
    assert url == "s3://b/m/" and options == {"max_concurrency": 4, "verify": True, "progress": False}
    with pytest.raises(ConfigError, match="max_concurency"):
        loader_options({"url": "s3://b/m/", "max_concurency": 4})
    monkeypatch.setenv("CREDS", json.dumps({"key": "k", "secret": "s"}))
    extra = {"url": "s3://b/m/", "storage_options_env": "CREDS", "storage_options": {"anon": False}}
    _, options = loader_options(extra)
    assert options["storage_options"] == {"key": "k", "secret": "s", "anon": False}
    with pytest.raises(ConfigError, match="UNSET_VARIABLE"):
        loader_options({"url": "s3://b/m/", "storage_options_env": "UNSET_VARIABLE"})
