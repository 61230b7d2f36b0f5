"""README.md's Python examples run as printed, against servers on 127.0.0.1, so the manual cannot drift.

Each ``python`` block of README.md is either run (``RUN``) or excluded with its reason (``EXCLUDED``); a block
in neither fails ``test_every_block_is_classified``. The blocks run in README order in one namespace, as a
reader's session would (later sections use the Quickstart's ``sst``), top-level statement by statement, and each
statement is one test (``README.md:<line>``), so a failure names the line.

Only placeholders are filled in (``SUBSTITUTIONS``): the URLs (a Range-capable HTTP server and a Hub-compatible
server, both on 127.0.0.1, serving a tiny Llama-like checkpoint: ``model.embed_tokens.weight``,
``model.layers.<i>.*``, ``model.norm.weight``, ``lm_head.weight``), the digest ``9f86...``, the tensor names
``"a", "b", "c"``, and the names a reader defines themselves: ``url``, ``model`` and ``MyModel`` (a torch module
whose parameters have the checkpoint's names). Nothing else is added: no import the block does not make.

Statements on ``s3://``, ``gs://``, ``az://`` and ``abfs://`` are skipped with their reason: their placeholders
are buckets and keys of a real account ("AWS credentials as usual", ``account_key="..."``) or a fixed LocalStack
port, and those paths are covered by tests/integration/test_s3.py, test_gcs.py and test_azure.py against
LocalStack, the GCS emulator and Azurite.
"""

from __future__ import annotations

import ast
import asyncio
import hashlib
import inspect
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

from checkpoints import write
from hub_server import HubServer
from servers import RangeServer
from stream_st import cli

README = Path(__file__).resolve().parent.parent.parent / "README.md"

RUN = ["## Quickstart", "### Where from", "### Integrity"]
EXCLUDED = {
    "### transformers": "from_pretrained(device='cuda'): needs a GPU and transformers' tiny models; the same "
    "path runs in tests/integration/test_transformers*.py and examples/transformers_from_url.py",
    "### vLLM": "needs vLLM (its CPU build runs in tests/integration/test_vllm.py, which covers fetch_model_files, "
    "load_format='stream_st' and llm()) and s3://bucket/llama/ of a real account",
    "### Serverless cold start": "prefetches s3://bucket/llama/ (LocalStack) and builds a transformers model "
    "from ./config; the same path runs in tests/integration/test_prefetch.py",
    "### Local cache": "hf://org/repo and s3://bucket/model/ of real accounts, and a /nvme folder; the same "
    "calls run against local servers in tests/integration/test_cache.py",
    "### Many ranks: tensor, pipeline and data parallel": "needs torch.distributed process groups (rank, "
    "world_size, my_layers come from the launcher) and GPUs; covered by tests/integration/test_distributed.py",
}
SKIPPED_STATEMENTS = {
    "s3://": "s3:// with a real account's bucket or a fixed LocalStack port: see the module docstring",
    "gs://": "gs:// of a real bucket: see the module docstring",
    "az://": "az:// of a real storage account (placeholder key '...'): see the module docstring",
    "abfs://": "abfs:// with a placeholder connection string '...': see the module docstring",
}
HF_TOKEN = "hf_..."  # the README's placeholder token, registered on the Hub-compatible server

# Doc bugs of the current README: (heading, text of the statement's first line) -> reason. Strict xfails.
DOC_BUGS: dict[tuple[str, str], str] = {}


@dataclass(frozen=True)
class Block:
    heading: str
    line: int  # README line of the block's first code line
    code: str


def python_blocks() -> list[Block]:
    blocks, heading, code, start = [], "", None, 0
    for number, line in enumerate(README.read_text().splitlines(), start=1):
        if code is None and line.startswith("#"):
            heading = line.strip()
        elif code is None and line.strip() == "```python":
            code, start = [], number + 1
        elif code is not None and line.strip() == "```":
            blocks.append(Block(heading, start, "\n".join(code)))
            code = None
        elif code is not None:
            code.append(line)
    return blocks


@dataclass(frozen=True)
class Statement:
    block: Block
    line: int  # README line
    source: str


def statements(block: Block) -> list[Statement]:
    tree = ast.parse(block.code)
    return [
        Statement(block, block.line + node.lineno - 1, ast.get_source_segment(block.code, node) or "")
        for node in tree.body
    ]


def _cases() -> list[Any]:
    cases = []
    for block in python_blocks():
        if block.heading not in RUN:
            continue
        for index, statement in enumerate(statements(block)):
            first = statement.source.splitlines()[0]
            reason = DOC_BUGS.get((block.heading, first))
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            cases.append(pytest.param(block.heading, index, marks=marks, id=f"README.md:{statement.line}"))
    return cases


# --- what the placeholders stand for ----------------------------------------------------------------------


class Layer(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.input_layernorm = torch.nn.LayerNorm(width, bias=False)
        self.self_attn = torch.nn.ModuleDict({"q_proj": torch.nn.Linear(width, width, bias=False)})
        self.mlp = torch.nn.ModuleDict({"up_proj": torch.nn.Linear(width, 2 * width, bias=False)})


class MyModel(torch.nn.Module):
    """A tiny Llama-like module: its state_dict names are the served checkpoint's names."""

    def __init__(self, layers: int = 2, width: int = 16, vocab: int = 2048) -> None:
        super().__init__()
        self.model = torch.nn.Module()
        self.model.embed_tokens = torch.nn.Embedding(vocab, width)
        self.model.layers = torch.nn.ModuleList(Layer(width) for _ in range(layers))
        self.model.norm = torch.nn.LayerNorm(width, bias=False)
        self.lm_head = torch.nn.Linear(width, vocab, bias=False)


def llama_state() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {name: torch.randn(p.shape, generator=generator) for name, p in MyModel().state_dict().items()}


@dataclass
class Places:
    folder: Path
    http: RangeServer
    hub: HubServer
    digest: str

    @property
    def url(self) -> str:
        return self.http.url("model.safetensors")


@pytest.fixture(scope="module")
def places(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Places]:
    folder = tmp_path_factory.mktemp("readme")
    folder.chmod(0o755)
    path = write(folder / "model.safetensors", llama_state(), metadata={"format": "pt"})
    # The sidecar "stream-st digest" writes, so Integrity's partial load has its per-tensor digests, as printed.
    assert cli.main(["digest", str(path), "--output-dir", str(folder)]) == 0
    http = RangeServer(folder)
    hub = HubServer(tmp_path_factory.mktemp("readme-hub"), redirect="lfs")
    try:
        hub.add_token(HF_TOKEN)
        hub.commit("org/repo", {"model.safetensors": path})
        hub.commit("meta-llama/Llama-3.2-1B", {"model.safetensors": path})
        yield Places(folder, http, hub, hashlib.sha256(path.read_bytes()).hexdigest())
    finally:
        hub.stop()
        http.stop()


NAMES_FOR_ABC = ["model.norm.weight", "lm_head.weight", "model.layers.1.mlp.up_proj.weight"]


def substitutions(places: Places) -> list[tuple[str, str]]:
    """(text in README.md, what the test puts there): placeholders only."""
    return [
        ('"https://host/model.safetensors"', repr(places.url)),
        ('"https://example.com/model.safetensors"', repr(places.url)),
        ('"/data/model.safetensors"', repr(str(places.folder / "model.safetensors"))),
        ('"sha256:9f86..."', repr(f"sha256:{places.digest}")),
        ('["a", "b", "c"]', repr(NAMES_FOR_ABC)),
    ]


@dataclass
class Outcome:
    statement: Statement
    error: BaseException | None = None
    skipped: str | None = None
    warnings: list[str] | None = None


def _run_block(block: Block, places: Places, namespace: dict[str, Any]) -> list[Outcome]:
    outcomes = []
    for statement in statements(block):
        skip = next((why for prefix, why in SKIPPED_STATEMENTS.items() if prefix in statement.source), None)
        if skip:
            outcomes.append(Outcome(statement, skipped=skip))
            continue
        source = statement.source
        for text, value in substitutions(places):
            source = source.replace(text, value)
        outcome = Outcome(statement)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                code = compile(source, f"README.md:{statement.line}", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
                result = eval(code, namespace)  # noqa: S307 - the README's own example
                if inspect.iscoroutine(result):  # a statement with a top-level ``await``
                    asyncio.run(result)
            except Exception as error:  # noqa: BLE001 - reported per statement
                outcome.error = error
        outcome.warnings = [f"{w.category.__name__}: {w.message}" for w in caught]
        outcomes.append(outcome)
    return outcomes


@dataclass
class Session:
    outcomes: dict[str, list[Outcome]]  # per heading
    namespace: dict[str, Any]


@pytest.fixture(scope="module")
def executed(places: Places) -> Iterator[Session]:
    import huggingface_hub.constants

    namespace: dict[str, Any] = {"__name__": "readme", "url": places.url, "model": MyModel(), "MyModel": MyModel}
    with pytest.MonkeyPatch.context() as monkeypatch:
        for name, value in places.hub.constants_patch().items():  # the Hub's default endpoint -> 127.0.0.1
            monkeypatch.setattr(huggingface_hub.constants, name, value)
        blocks = [block for block in python_blocks() if block.heading in RUN]
        yield Session({block.heading: _run_block(block, places, namespace) for block in blocks}, namespace)


@pytest.mark.parametrize(("heading", "index"), _cases())
def test_statement_runs(executed: Session, heading: str, index: int) -> None:
    outcome = executed.outcomes[heading][index]
    if outcome.skipped:
        pytest.skip(outcome.skipped)
    statement = outcome.statement
    assert outcome.error is None, (
        f"README.md:{statement.line} ({heading}) raised {type(outcome.error).__name__}: {outcome.error}\n"
        f"{statement.source}"
    )
    assert not outcome.warnings, f"README.md:{statement.line} ({heading}) warned: {outcome.warnings}"


def test_quickstart_values_match_safetensors(executed: Session, places: Places) -> None:
    """What the Quickstart's handle returned is what safetensors reads from the same file."""
    namespace = executed.namespace
    expected = safetensors.torch.load_file(str(places.folder / "model.safetensors"))
    embed = expected["model.embed_tokens.weight"]
    assert torch.equal(namespace["emb"], embed)
    assert torch.equal(namespace["rows"], embed[1000:2000])
    assert sorted(namespace["many"]) == sorted(
        ["model.norm.weight", "lm_head.weight", "model.layers.1.mlp.up_proj.weight"]
    )
    for name, tensor in namespace["many"].items():
        assert torch.equal(tensor, expected[name]), name
    assert sorted(namespace["header"].keys()) == sorted(expected)


def test_every_block_is_classified() -> None:
    """A new ``python`` block in README.md must be run here or excluded with a reason."""
    headings = [block.heading for block in python_blocks()]
    unclassified = [h for h in headings if h not in RUN and h not in EXCLUDED]
    assert not unclassified, f"README.md python blocks under {unclassified}: add them to RUN or EXCLUDED"
    stale = [h for h in [*RUN, *EXCLUDED] if h not in headings]
    assert not stale, f"no python block under {stale} any more"
    for block in python_blocks():
        assert re.search(r"\S", block.code), block
