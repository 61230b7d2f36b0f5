"""Progress of a load: bytes landed in output tensors, reported to a callback or a terminal bar."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from .location import redact

ProgressCallback = Callable[[int, int], None]
ProgressOption = bool | ProgressCallback | None

_INTERVAL_S = 0.1  # at most ten callbacks a second: a 16 MiB part lands in many chunks


class Progress:
    """Counts landed bytes (from worker threads) and reports at most every 0.1 s, plus once at the end."""

    def __init__(self, total: int, report: ProgressCallback, close: Callable[[], None] | None = None) -> None:
        self.total, self._report, self._close = total, report, close
        self.done = 0
        self._lock = threading.Lock()
        self._last = 0.0

    def advance(self, nbytes: int) -> None:
        with self._lock:
            self.done += nbytes
            now = time.monotonic()
            if now - self._last < _INTERVAL_S and self.done < self.total:
                return
            self._last = now
            done = self.done
        self._report(done, self.total)

    def close(self) -> None:
        if self._close is not None:
            self._close()


def make_progress(option: ProgressOption, total: int, description: str) -> Progress | None:
    """None: a bar on a terminal for loads that last more than a second; True: always a bar; False: none;
    a callable: called as ``callback(bytes_done, bytes_total)`` from worker threads."""
    if option is False or total == 0:
        return None
    description = redact(description.partition("?")[0])  # a label is output too: no query, no user info
    if callable(option):
        return Progress(total, option)
    if option is None and not sys.stderr.isatty():
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    bar: Any = tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=description,
        delay=0 if option else 1.0,
        leave=False,
        dynamic_ncols=True,
    )

    def report(done: int, _: int) -> None:
        bar.update(done - bar.n)

    return Progress(total, report, bar.close)
