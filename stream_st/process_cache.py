"""Objects built once per key and kept for the life of the process (botocore clients, Azure credentials,
pinned slot pools), forgotten in a forked child: clients, credentials and pinned memory do not survive fork."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

T = TypeVar("T")


class ProcessCache(Generic[T]):
    """``get(key, build)``: the object built for ``key`` in this process, built by ``build`` on first use."""

    def __init__(self) -> None:
        self._items: dict[Hashable, T] = {}
        self._lock = threading.Lock()
        os.register_at_fork(after_in_child=self.clear)

    def get(self, key: Hashable, build: Callable[[], T]) -> T:
        with self._lock:
            if key not in self._items:
                self._items[key] = build()
            return self._items[key]

    def values(self) -> list[T]:
        with self._lock:
            return list(self._items.values())

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        self._items, self._lock = {}, threading.Lock()  # a lock held at fork would never be released in the child
