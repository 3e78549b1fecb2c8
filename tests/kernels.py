"""Talking to real kernels: run a cell, collect its output."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

from jupyter_client.asynchronous.client import AsyncKernelClient
from jupyter_client.manager import AsyncKernelManager


@dataclass
class CellResult:
    status: str
    stdout: str = ""
    ename: str = ""
    messages: list[dict[str, Any]] = field(default_factory=list)


async def ready_client(km: AsyncKernelManager, timeout: float = 60) -> AsyncKernelClient:
    kc: AsyncKernelClient = km.client()
    kc.start_channels()
    await kc.wait_for_ready(timeout=timeout)
    return kc


async def run_cell(kc: AsyncKernelClient, code: str, timeout: float = 60) -> CellResult:
    """Execute ``code`` and return its status and everything it printed."""
    out: list[str] = []

    def hook(msg: dict[str, Any]) -> None:
        if msg["msg_type"] == "stream":
            out.append(msg["content"]["text"])

    reply = await kc.execute_interactive(code, timeout=timeout, output_hook=hook)
    content = reply["content"]
    return CellResult(status=content["status"], stdout="".join(out), ename=content.get("ename", ""))


#: When this test run began: processes older than that are not this run's to answer for.
TESTS_STARTED = time.time()


async def wait_until(predicate: Any, timeout: float, step: float = 0.2) -> bool:
    """Poll ``predicate()`` until it is true or ``timeout`` seconds pass; its last value."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if predicate():
            return True
        await asyncio.sleep(step)
    return bool(predicate())


async def output_after_reconnect(
    kc: AsyncKernelClient, code: str, expected: str, timeout: float = 20
) -> int:
    """Run ``code`` until it prints ``expected``; returns the number of tries.

    Right after a reconnect, the IOPub subscription travels a new tunnel channel:
    the output of a cell run before it reaches the kernel is not delivered (a
    PUB/SUB "slow joiner"), while its reply is.  A client sees that as a cell
    with no output; this waits it out, within ``timeout``.
    """
    deadline = asyncio.get_running_loop().time() + timeout
    tries = 0
    while True:
        tries += 1
        try:
            result = await run_cell(kc, code, timeout=5)
            printed = result.stdout
        except TimeoutError:  # no "idle" on IOPub: its output went to no subscriber
            printed = "<no output>"
        if printed.strip() == expected:
            return tries
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{code!r} printed {printed!r}, not {expected!r}")


async def shutdown_quietly(km: AsyncKernelManager) -> None:
    with contextlib.suppress(Exception):
        if km.has_kernel:
            await asyncio.wait_for(km.shutdown_kernel(now=False), 30)
    # A manager whose start failed still holds the ZeroMQ context it made; closing it
    # here keeps its ResourceWarning from surfacing in whichever later test collects it.
    if getattr(km, "_created_context", False):
        km.context.destroy(linger=0)
