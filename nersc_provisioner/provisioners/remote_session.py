"""A kernel process on the remote host, reached through its connection's agent:
is it alive, signal it, forget it, read the end of its log, or abandon it.

The agent verifies the kernel by PID, start time and command line before it
answers or signals, so a reused PID is never mistaken for the kernel.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import SSHConnectError
from ..launchers.remote import (
    PORT_NAMES,
    LaunchReport,
    RemoteLaunch,
    build_launch_script,
    kernel_log_tail_script,
    kill_script,
)
from ..launchers.step import build_step_script
from ..slurm.commands import step_argv
from ..transports.connection import SSHConnection
from .kernel_job import SlurmJob
from .workers import in_thread


@dataclass
class RemoteKernel:
    """The kernel process on the remote host, as the launch script reported it."""

    kernel_id: str
    pid: int
    start_time: str
    node: str
    ports: dict[str, int]
    reported_gone: bool = False
    reported_down: bool = False
    seen_reconnects: int = 0


def launch_connection(
    info: Mapping[str, Any], kernel_name: str, bind_ip: str, ports: Mapping[str, int] | None
) -> dict[str, Any]:
    """The connection file the remote kernel gets, from the manager's ``info``: ports 0
    (it binds its own), or ``ports`` (a direct restart asks for the same ones)."""
    key = info.get("key", b"")
    return {
        **(dict(ports) if ports else dict.fromkeys(PORT_NAMES, 0)),
        "ip": bind_ip,
        "transport": "tcp",
        "signature_scheme": info.get("signature_scheme", "hmac-sha256"),
        "key": key.decode() if isinstance(key, bytes) else str(key),
        "kernel_name": kernel_name,
        **{
            name: str(info[name])
            for name in ("curve_publickey", "curve_secretkey")
            if info.get(name)
        },
    }


def launch_script(launch: RemoteLaunch, job: SlurmJob | None, where: str) -> tuple[str, str]:
    """The script that starts the kernel (as a step of ``job`` if given), and where
    it runs (for messages)."""
    script = build_launch_script(launch)
    if job is None:
        return script, where
    srun = step_argv(job.job_id, job.node, launch.kernel_id)
    script = build_step_script(script, srun_argv=srun, kernel_id=launch.kernel_id)
    return script, f"{job.node} (Slurm job {job.job_id})"


def run_launch(conn: SSHConnection, script: str, timeout: float, report: LaunchReport) -> None:
    """Run the launch script, feeding ``report`` until the kernel has reported its ports
    (or its death); TimeoutError after ``timeout`` seconds in all.  Blocking."""
    deadline = time.monotonic() + timeout

    def feed(line: str) -> bool:
        report.feed(line)  # after NPR_DIED the tail of the kernel's log follows: read it
        if not report.done and time.monotonic() > deadline:
            raise TimeoutError
        return report.done

    conn.run_script(script, timeout=timeout, on_line=feed)


async def log_tail(conn: SSHConnection, kernel_id: str) -> str:
    """The last lines the kernel printed (its log is kept until cleanup), or ""."""
    try:
        _, lines = await in_thread(
            lambda: conn.run_script(kernel_log_tail_script(kernel_id), timeout=10)
        )
    except Exception:  # a diagnostic only
        return ""
    return "\n".join(lines[-10:])


async def abandon(conn: SSHConnection | None, kernel_id: str, log: Any) -> None:
    """After a failed start: end the kernel and remove its directory on the host."""
    if conn is None or not conn.connected:
        return
    try:
        await in_thread(lambda: conn.run_script(kill_script([kernel_id]), timeout=20))
    except Exception as exc:  # report, but keep the original error
        log.warning("could not clean up kernel %s: %s", kernel_id, exc)


async def forget(conn: SSHConnection | None, kernel_id: str, log: Any) -> None:
    """The kernel has ended: the agent stops renewing its lease and removes its files."""
    if conn is None or not kernel_id or not conn.connected:
        return
    try:
        await in_thread(conn.request, "unwatch", kernel_id)
        await in_thread(conn.request, "cleanup", kernel_id)
    except Exception as exc:
        log.warning("cleanup of kernel %s on the remote host: %s", kernel_id, exc)


class RemoteSession:
    """One running remote kernel and the connection that reaches it."""

    def __init__(self, conn: SSHConnection, remote: RemoteKernel, log: Any) -> None:
        self.conn, self.remote, self.log = conn, remote, log

    def lost(self) -> bool:
        """The connection failed for good (e.g. authentication): report it once."""
        if self.conn.fatal is None:
            return False
        if not self.remote.reported_gone:
            self.remote.reported_gone = True
            self.log.error("kernel %s is lost: %s", self.remote.kernel_id, self.conn.fatal)
        return True

    def note_reconnect(self) -> None:
        conn, remote = self.conn, self.remote
        if conn.reconnects != remote.seen_reconnects:
            remote.seen_reconnects = conn.reconnects
            self.log.info(
                "kernel %s: connection to %s re-established", remote.kernel_id, conn.target.label
            )

    def while_disconnected(self, grace: float) -> int | None:
        """The connection is down: alive (None) for ``grace`` seconds, then dead (1)."""
        conn, remote = self.conn, self.remote
        down_for = time.monotonic() - (conn.down_since or time.monotonic())
        if down_for < grace:
            if not remote.reported_down:
                remote.reported_down = True
                self.log.warning(
                    "kernel %s: connection to %s lost; reconnecting (the kernel counts as "
                    "alive for reconnect_grace = %.0f s)",
                    remote.kernel_id,
                    conn.target.label,
                    grace,
                )
            return None
        self.log.error(
            "kernel %s: no connection to %s for %.0f s (reconnect_grace %.0f s); reporting it dead",
            remote.kernel_id,
            conn.target.label,
            down_for,
            grace,
        )
        return 1

    async def alive(self) -> bool | None:
        """Whether the agent finds the kernel; None while the connection is re-established."""
        remote = self.remote
        try:
            answer = await in_thread(
                self.conn.request, "alive", str(remote.pid), remote.start_time, remote.kernel_id
            )
        except (SSHConnectError, TimeoutError):
            return None
        remote.reported_down = False
        return bool(answer == "alive")

    async def report_gone(self) -> None:
        """The kernel ended without us: say so, with the end of its output."""
        remote = self.remote
        last = await log_tail(self.conn, remote.kernel_id)
        self.log.warning(
            "kernel %s (pid %d on %s) is gone, not ended by us (killed, crashed or exited)%s",
            remote.kernel_id,
            remote.pid,
            remote.node,
            f"; the end of its output:\n{last}" if last else "; it printed nothing at the end",
        )

    async def signal(self, name: str) -> None:
        remote = self.remote
        try:
            answer = await in_thread(
                self.conn.request,
                "signal",
                name,
                str(remote.pid),
                remote.start_time,
                remote.kernel_id,
            )
        except (SSHConnectError, TimeoutError) as exc:
            # Shutdown and restart go on to cleanup; the watchdog ends a kernel we lost.
            self.log.warning("could not send %s to kernel %s: %s", name, remote.kernel_id, exc)
            return
        if answer != "ok":
            self.log.info("signal %s: kernel %s is already gone", name, remote.kernel_id)
