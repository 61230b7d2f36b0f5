"""Run coroutines from synchronous code on one background event loop (fsspec's pattern).

A dedicated IO thread owns the loop, so the sync API also works where the caller already runs a loop
(Jupyter). Calling it from that loop's own thread is refused instead of deadlocking; after ``fork`` the
child starts a fresh loop.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import os
import sys
import threading
import warnings
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
# Warnings for the caller of a public function, held while the call runs (on the IO loop, in worker tasks),
# then issued once, pointing at the caller's line rather than at stream_st's or asyncio's frames.
_held_warnings: contextvars.ContextVar[list[tuple[str, type[Warning]]] | None] = contextvars.ContextVar(
    "stream_st_held_warnings", default=None
)
_loop: asyncio.AbstractEventLoop | None = None
_loop_thread: threading.Thread | None = None


def _reset_after_fork() -> None:
    global _loop, _loop_thread, _lock
    _loop, _loop_thread, _lock = None, None, threading.Lock()


os.register_at_fork(after_in_child=_reset_after_fork)


def get_loop() -> asyncio.AbstractEventLoop:
    """The IO loop, started on first use in a daemon thread."""
    global _loop, _loop_thread
    with _lock:
        if _loop is None:
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="stream_st-io", daemon=True)
            thread.start()
            _loop, _loop_thread = loop, thread
        return _loop


def on_loop_thread() -> bool:
    """Whether the caller runs on the IO loop's own thread (where blocking on the loop would deadlock)."""
    return _loop_thread is not None and threading.current_thread() is _loop_thread


def run_sync(coro: Awaitable[T]) -> T:
    """Run ``coro`` on the IO loop and wait; Ctrl-C cancels it and waits until it has cleaned up."""
    loop = get_loop()
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        if inspect.iscoroutine(coro):
            coro.close()
        raise RuntimeError("stream_st's sync API was called from its own IO loop; use the *_async function")
    finished = threading.Event()
    held: list[tuple[str, type[Warning]]] = []

    async def runner() -> T:
        _held_warnings.set(held)  # this task's context: the call's warnings come back to this thread
        try:
            return await coro
        finally:
            finished.set()

    future = asyncio.run_coroutine_threadsafe(runner(), loop)
    try:
        return future.result()
    except BaseException:
        if not future.done():  # KeyboardInterrupt or similar while waiting: stop the load cleanly
            future.cancel()
            finished.wait()
        raise
    finally:
        _issue(held)


def warn_caller(message: str, category: type[Warning]) -> None:
    """A warning about the current call, for its caller: held until the public function returns (see
    ``issuing_warnings``), repeated messages once."""
    held = _held_warnings.get()
    if held is None:
        warnings.warn(message, category, stacklevel=2)
    elif (message, category) not in held:
        held.append((message, category))


async def issuing_warnings(awaitable: Awaitable[T], issued: set[str] | None = None) -> T:
    """Await a public async function's body; then issue its held warnings, one per category, at the line
    that awaited the function (or hand them to ``run_sync``, which issues them at the sync caller's line).
    ``issued``: messages already issued by earlier steps of the same call (an iterator), not repeated."""
    outer = _held_warnings.get()
    held: list[tuple[str, type[Warning]]] = []
    token = _held_warnings.set(held)
    try:
        return await awaitable
    finally:
        _held_warnings.reset(token)
        if issued is not None:
            held = [(message, category) for message, category in held if message not in issued]
            issued.update(message for message, _ in held)
        if outer is not None:
            outer.extend(warning for warning in held if warning not in outer)
        else:
            _issue(held)


def _issue(held: list[tuple[str, type[Warning]]]) -> None:
    """Issue held warnings, one per category, at the first frame outside stream_st: the caller's line."""
    if not held:
        return
    by_category: dict[type[Warning], list[str]] = {}
    for message, category in held:
        by_category.setdefault(category, []).append(message)
    level, frame = 1, sys._getframe(0)
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    for category, messages in by_category.items():
        warnings.warn("; ".join(messages), category, stacklevel=level)


_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def close_soon(coro: Coroutine[Any, Any, None]) -> None:
    """Run a clean-up coroutine on the IO loop: wait for it, unless we are on that loop's own thread
    (a generator finalized there by the garbage collector), where it can only be scheduled."""
    loop = get_loop()
    if on_loop_thread():
        loop.create_task(coro)
    else:
        run_sync(coro)


async def off_loop(fn: Callable[..., T], *args: Any) -> T:
    """Run blocking ``fn(*args)`` on a worker thread (the loop's default executor): a load's casts, CUDA
    synchronisations, large copies or ``load_state_dict`` must not stall the IO loop, which every load in the
    process shares. A cancel waits for ``fn`` to return before it propagates, so nothing still works on a
    load's tensors after its call has returned."""
    work = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        await asyncio.wait({work})
        if not work.cancelled():
            work.exception()  # consumed: the cancel is what propagates
        raise


async def gather_or_cancel(*awaitables: Awaitable[T]) -> list[T]:
    """Like ``asyncio.gather``, but the first failure cancels the others and waits for them to end (a
    failed shard must not leave its siblings downloading)."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
