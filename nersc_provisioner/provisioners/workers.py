"""Where blocking SSH and Slurm work runs: threads, never the Jupyter event loop."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

#: Blocking SSH work runs here, never on the Jupyter event loop.
SSH_EXECUTOR = ThreadPoolExecutor(max_workers=32, thread_name_prefix="nersc-ssh")


async def in_thread(func: Any, *args: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(SSH_EXECUTOR, func, *args)
