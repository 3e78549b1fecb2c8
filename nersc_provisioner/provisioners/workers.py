"""Where blocking SSH and Slurm work runs: threads, never the Jupyter event loop.

Short requests (an agent call, a launch, a Slurm command) share :data:`SSH_EXECUTOR`.
A long wait (a Slurm queue, which may last hours) gets a thread of its own from
:func:`in_own_thread`, so that however many kernels wait, the short requests of the
others are served at once.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

#: Blocking SSH work runs here, never on the Jupyter event loop.
SSH_EXECUTOR = ThreadPoolExecutor(max_workers=32, thread_name_prefix="nersc-ssh")


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
