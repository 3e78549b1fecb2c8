"""Talking to real kernels (run a cell, interrupt one), and waiting on what has no event."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import threading
import time
from collections.abc import Callable, Iterator
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


async def running_cell(kc: AsyncKernelClient, seconds: int = 60, timeout: float = 30) -> str:
    """Execute a cell that sleeps ``seconds``; return its msg_id once its code runs.

    The event waited for is the cell's own first output on IOPub: only then is the
    kernel inside the user's code, where SIGINT becomes a KeyboardInterrupt of the cell.
    (Its ``busy`` status and ``execute_input`` come before that, while ipykernel still
    ignores SIGINT or is outside the cell: an interrupt sent then is lost.)
    """
    msg_id: str = kc.execute(f"print('running', flush=True); import time; time.sleep({seconds})")
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        left = deadline - asyncio.get_running_loop().time()
        msg = await kc.get_iopub_msg(timeout=max(left, 0.01))
        if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "stream":
            return msg_id


async def shell_reply(kc: AsyncKernelClient, msg_id: str, timeout: float) -> dict[str, Any]:
    """The content of the shell reply to ``msg_id``, within ``timeout`` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        left = deadline - asyncio.get_running_loop().time()
        reply = await kc.get_shell_msg(timeout=max(left, 0.01))
        if reply["parent_header"].get("msg_id") == msg_id:
            content: dict[str, Any] = reply["content"]
            return content


async def interrupt_running_cell(km: AsyncKernelManager, kc: AsyncKernelClient) -> dict[str, Any]:
    """Interrupt a cell that would sleep 60 s, once it runs; the content of its reply.

    The reply must come within 10 s: a cell that ends so long before its 60 s was
    interrupted.  How fast is the benchmark's figure (``interrupt_ms``), not the test's.
    """
    msg_id = await running_cell(kc, seconds=60)
    await km.interrupt_kernel()
    return await shell_reply(kc, msg_id, timeout=10)


async def wait_until(predicate: Callable[[], Any], timeout: float, step: float = 0.2) -> bool:
    """Poll ``predicate()`` until it is true or ``timeout`` seconds pass; its last value.

    For state that offers no event to wait on (a process list, the Slurm queue, a
    flag of the provisioner).  ``predicate`` may return an awaitable.
    """

    async def value() -> bool:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        return bool(result)

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if await value():
            return True
        await asyncio.sleep(step)
    return await value()


def poll_until(predicate: Callable[[], Any], timeout: float, step: float = 0.2) -> bool:
    """:func:`wait_until` for tests without an event loop."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return bool(predicate())


@contextlib.contextmanager
def logged(text: str, logger: str = "nersc_provisioner") -> Iterator[threading.Event]:
    """An event set when a record holding ``text`` is logged to ``logger`` (from any
    thread) while the block runs: ``await asyncio.to_thread(event.wait, timeout)``."""
    seen = threading.Event()

    class Watch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if text in record.getMessage():
                seen.set()

    handler = Watch(level=logging.DEBUG)
    target = logging.getLogger(logger)
    saved = target.level
    target.addHandler(handler)
    if target.getEffectiveLevel() > logging.INFO:
        target.setLevel(logging.INFO)
    try:
        yield seen
    finally:
        target.removeHandler(handler)
        target.setLevel(saved)


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


# Kernel launchers that stand in for an ipykernel without CurveZMQ support (run as
# ``python -c SHIM -f {connection_file}`` on the remote side).

#: Deletes the curve keys from the connection file before ipykernel reads it.
DROPPING_SHIM = (
    "import json, sys; f = sys.argv[sys.argv.index('-f') + 1]; "
    "d = json.load(open(f)); d.pop('curve_publickey', None); d.pop('curve_secretkey', None); "
    "json.dump(d, open(f, 'w')); "
    "from ipykernel import kernelapp; kernelapp.launch_new_instance()"
)

#: *Merges* its ports into the connection file, as ipykernel 6 does
#: (``dict(existing, **ours)``): the curve keys stay in the file although the
#: kernel's sockets do not encrypt.  The kernel runs on a copy of the file without
#: the keys; a thread merges its ports back into the original.
MERGING_SHIM = """
import json, os, sys, threading, time
f = sys.argv[sys.argv.index('-f') + 1]
ports = ('shell_port', 'iopub_port', 'stdin_port', 'control_port', 'hb_port')
original = json.load(open(f))
plain = f + '.plain.json'
with open(os.open(plain, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as out:
    json.dump({k: v for k, v in original.items() if not k.startswith('curve_')}, out)
def merge():
    while True:
        try:
            seen = json.load(open(plain))
        except ValueError:
            seen = {}
        if all(seen.get(p) for p in ports):
            json.dump({**original, **{p: seen[p] for p in ports}}, open(f, 'w'), indent=2)
            return
        time.sleep(0.02)
threading.Thread(target=merge, daemon=True).start()
sys.argv[sys.argv.index('-f') + 1] = plain
from ipykernel import kernelapp
kernelapp.launch_new_instance()
"""
