"""A contender: what one fresh process runs, and the same run with the bit-exact check appended.

A Python contender is ``python -c`` of a snippet that leaves the loaded state dict in ``sd``; the benchmark's
values (``URL``, ``LOCAL``, ...) are defined as globals before it. A timed run appends only ``print(len(sd))``
(a sanity count, free); the untimed check run appends ``VERIFY``: every tensor of ``sd`` against
``safetensors.torch.load_file(LOCAL)``, bit for bit (``verify.py``), so the check never adds to a timed figure.
Another program (curl, the raw client) is a ``command``, with ``check_args`` appended for its check run.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from harness import HARNESS

# Imported from this folder (not from the code under test, which may be another revision), after the load.
VERIFY = f"""
import sys
sys.path.insert(0, {str(HARNESS)!r})
from verify import verify
print(verify(sd, LOCAL, globals().get("PATTERNS")))
"""


@dataclass(frozen=True)
class Contender:
    key: str
    label: str
    load: str | None = None  # Python leaving the state dict in ``sd``; None: ``command`` runs instead
    command: tuple[str, ...] = ()  # argv; "{NAME}" is replaced by the value NAME
    check_args: tuple[str, ...] = ()  # appended to ``command`` for the check run
    verifiable: bool = True  # it returns tensors (or bytes) the check compares
    env: tuple[tuple[str, str], ...] = ()  # extra environment of this contender only

    def argv(self, values: Mapping[str, Any], check: bool = False) -> list[str]:
        if self.load is None:
            parts = self.command + (self.check_args if check else ())
            return [part.format(**values) for part in parts]
        preamble = "".join(f"{name} = {value!r}\n" for name, value in values.items())
        tail = VERIFY if check and self.verifiable else "print(len(sd))"
        return [sys.executable, "-c", preamble + self.load + "\n" + tail]


START = Contender(
    "start",
    "python -c 'import torch, safetensors' (start-up only)",
    "import torch, safetensors\nsd = {}",
    verifiable=False,
)
