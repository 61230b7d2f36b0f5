"""What each contender runs, as a fresh whole process.

Python contenders are ``python -c LOAD`` where ``LOAD`` leaves the loaded state dict in ``sd`` and touches
nothing else. The timed run appends only ``print(len(sd))`` (a sanity count, free); the separate
untimed verification run appends ``VERIFY``, which compares every loaded tensor bit for bit with
``safetensors.torch.load_file`` of the local file, so the check never adds to a timed figure.

argv of every Python child: ``URL LOCAL_PATH``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

PARTIAL = ["model.layers.0.*", "model.layers.1.*"]


@dataclass(frozen=True)
class Contender:
    key: str
    label: str
    load: str | None = None  # Python source leaving the state dict in ``sd``; None: a non-Python command
    command: tuple[str, ...] = ()  # non-Python command; "{url}" is replaced
    partial: bool = False  # loads only PARTIAL (accounting compares against those bytes)
    verifiable: bool = True

    def argv(self, url: str, local: str, verify: bool = False) -> list[str]:
        if self.load is None:
            return [part.replace("{url}", url) for part in self.command]
        tail = VERIFY if verify else "print(len(sd))"
        return [sys.executable, "-c", PREAMBLE + self.load + "\n" + tail, url, local]


PREAMBLE = "import sys\nURL, LOCAL = sys.argv[1], sys.argv[2]\n"

VERIFY = """
import fnmatch, torch, safetensors.torch
ref = safetensors.torch.load_file(LOCAL)
patterns = globals().get("PATTERNS")
if patterns is not None:
    ref = {k: v for k, v in ref.items() if any(fnmatch.fnmatchcase(k, p) for p in patterns)}
missing, extra = sorted(set(ref) - set(sd)), sorted(set(sd) - set(ref))
assert not missing and not extra, f"names differ: missing {missing[:5]}, extra {extra[:5]}"
bad = [k for k in ref if sd[k].dtype != ref[k].dtype or sd[k].shape != ref[k].shape or not torch.equal(sd[k], ref[k])]
assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:5]}"
print(f"verified {len(sd)} tensors")
"""

CONTENDERS = [
    Contender(
        "curl",
        "curl -s -o /dev/null (server ceiling, no Python)",
        command=("curl", "-s", "-o", "/dev/null", "{url}"),
        verifiable=False,
    ),
    Contender(
        "start",
        "python -c 'import torch, safetensors' (start-up only)",
        load="import torch, safetensors\nsd = {}",
        verifiable=False,
    ),
    Contender(
        "stream_st",
        "stream_st.load_file(url)",
        load="import stream_st\nsd = stream_st.load_file(URL)",
    ),
    Contender(
        "stream_st_verify",
        "stream_st.load_file(url, verify=True) (sha256 from a sidecar)",
        load="import stream_st\nsd = stream_st.load_file(URL, verify='strict')",
    ),
    Contender(
        "safetensors_streaming",
        "safetensors_streaming.load_file(url) (Rust)",
        load="import safetensors_streaming\nsd = safetensors_streaming.load_file(URL)",
    ),
    Contender(
        "fsspec",
        "fsspec.open(url).read() + safetensors.torch.load",
        load=(
            "import fsspec, safetensors.torch\n"
            "with fsspec.open(URL, 'rb') as f:\n"
            "    data = f.read()\n"
            "sd = safetensors.torch.load(data)"
        ),
    ),
    Contender(
        "download",
        "urlretrieve to a temp file + safetensors.torch.load_file",
        load=(
            "import os, tempfile, urllib.request, safetensors.torch\n"
            "with tempfile.TemporaryDirectory() as d:\n"
            "    p = os.path.join(d, 'model.safetensors')\n"
            "    urllib.request.urlretrieve(URL, p)\n"
            "    sd = safetensors.torch.load_file(p)"
        ),
    ),
    Contender(
        "partial",
        "stream_st.load_file(url, tensors=[layers 0, 1])",
        load=f"import stream_st\nPATTERNS = {PARTIAL!r}\nsd = stream_st.load_file(URL, tensors=PATTERNS)",
        partial=True,
    ),
]
