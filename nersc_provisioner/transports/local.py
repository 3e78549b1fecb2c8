"""Running things on this machine: helper commands, status pipes, process sessions."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from typing import Any

import psutil

from ..errors import CommandError


def run_command(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 60.0,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` (no shell) and return its result; raise :class:`CommandError` on failure."""
    try:
        result = subprocess.run(
            list(argv),
            env=dict(env) if env is not None else None,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except FileNotFoundError as exc:
        raise CommandError(argv, None, "", str(exc), hint=f"install {argv[0]}") from exc
    except subprocess.TimeoutExpired as exc:
        raise CommandError(
            argv, None, "", f"timed out after {timeout} s", hint="see why the command hangs"
        ) from exc
    if check and result.returncode != 0:
        raise CommandError(argv, result.returncode, result.stdout, result.stderr)
    return result


class StatusPipe:
    """A pipe whose write end a child inherits, to report its progress to us.

    The child writes lines; :meth:`wait_for` reads them without blocking the
    event loop until a marker line arrives, the child closes the pipe, or the
    timeout passes.
    """

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_inheritable(self.write_fd, True)
        self.lines: list[str] = []

    def close_write_end(self) -> None:
        if self.write_fd >= 0:
            os.close(self.write_fd)
            self.write_fd = -1

    async def wait_for(self, marker: str, timeout: float) -> bool:
        """True once ``marker`` was read; False at end of file.  Raises TimeoutError."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        pipe = os.fdopen(self.read_fd, "rb", buffering=0)
        self.read_fd = -1
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), pipe
        )
        try:
            return await asyncio.wait_for(self._read_lines(reader, marker), timeout)
        finally:
            transport.close()

    async def _read_lines(self, reader: asyncio.StreamReader, marker: str) -> bool:
        while True:
            raw = await reader.readline()
            if not raw:
                return False
            line = raw.decode("utf-8", "replace").rstrip("\n")
            if line == marker:
                return True
            self.lines.append(line)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def close(self) -> None:
        self.close_write_end()
        if self.read_fd >= 0:
            os.close(self.read_fd)
            self.read_fd = -1


def session_processes(session_id: int) -> list[psutil.Process]:
    """Every live process in session ``session_id`` (a kernel started its own session)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and os.getsid(proc.pid) == session_id:
                found.append(proc)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return found


def reap_session(session_id: int, grace: float = 1.0) -> list[int]:
    """Terminate, then kill, whatever is left of session ``session_id``.

    Returns the PIDs that were still there.
    """
    if session_id == os.getsid(0):
        return []  # never our own session
    procs = session_processes(session_id)
    for proc in procs:
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.Error:
            continue
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            continue
    deadline = time.monotonic() + grace
    psutil.wait_procs(alive, timeout=max(0.0, deadline - time.monotonic()))
    return [proc.pid for proc in procs]


async def wait_for_exit(process: subprocess.Popen[Any], poll_interval: float = 0.02) -> int:
    """Wait for ``process`` to exit without blocking the event loop or a thread.

    Uses a pidfd (Linux 5.3+) so the wait ends the moment the process does;
    elsewhere it polls every ``poll_interval`` seconds.
    """
    code = process.poll()
    if code is not None:
        return code
    pidfd_open = getattr(os, "pidfd_open", None)
    if pidfd_open is not None:
        try:
            fd = pidfd_open(process.pid)
        except OSError:
            fd = -1
        if fd >= 0:
            loop = asyncio.get_running_loop()
            exited = asyncio.Event()
            loop.add_reader(fd, exited.set)
            try:
                await exited.wait()
            finally:
                loop.remove_reader(fd)
                os.close(fd)
    while (code := process.poll()) is None:
        await asyncio.sleep(poll_interval)
    return code
