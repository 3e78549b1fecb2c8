"""Where blocking SSH and Slurm work runs: threads, never the Jupyter event loop.

Short requests (an agent call, a launch, a Slurm command) share :data:`SSH_EXECUTOR`.
A long wait (a Slurm queue, which may last hours) gets a thread of its own from
:func:`in_own_thread`, so that however many kernels wait, the short requests of the
others are served at once.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class ThreadPool(Executor):
    """A thread pool that a forked child replaces with one of its own.

    A child made by ``fork()`` (a ``ProcessPoolExecutor`` worker, a ``multiprocessing``
    process) has none of the parent's threads, but a ``ThreadPoolExecutor`` there still
    counts them as idle: work submitted in the child waits for a thread that does not
    exist, and every kernel start in it hangs.
    """

    def __init__(self, max_workers: int, thread_name_prefix: str) -> None:
        self._max_workers = max_workers
        self._prefix = thread_name_prefix
        self._pool = self._new_pool()
        os.register_at_fork(after_in_child=self._renew)

    def _new_pool(self) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(self._max_workers, thread_name_prefix=self._prefix)

    def _renew(self) -> None:
        self._pool = self._new_pool()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        return self._pool.submit(fn, *args, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._pool.shutdown(wait, cancel_futures=cancel_futures)


#: Blocking SSH work runs here, never on the Jupyter event loop.
SSH_EXECUTOR = ThreadPool(max_workers=32, thread_name_prefix="nersc-ssh")


async def in_thread(func: Any, *args: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(SSH_EXECUTOR, func, *args)


def in_own_thread(func: Callable[..., T], *args: Any, name: str) -> Future[T]:
    """Run ``func(*args)`` in a new daemon thread named ``name``; its future."""
    future: Future[T] = Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(func(*args))
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future
