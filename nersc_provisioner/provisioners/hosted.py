"""A kernel on a host reached over SSH, perhaps in a Slurm job: the lifecycle that
``nersc-cori``/``nersc-perlmutter`` and ``nersc-local`` with ``slurm`` share.

:class:`HostedKernel` is not a provisioner.  A provisioner owns one and hands it
the jupyter_client contract's calls; it composes the parts (host connections, the
Slurm kernel job, the data path, the encryption policy, the remote kernel session)
and keeps the state between the calls.  Its owner supplies the kernel manager,
the kernel id, the log and the ``connection_info`` that jupyter_client reads.
"""

from __future__ import annotations

import asyncio
import signal
from dataclasses import asdict
from typing import Any

from ..errors import SSHConnectError
from ..launchers.remote import PORT_NAMES
from .hosted_launch import KernelStart
from .hosted_parts import HostedParts
from .hosts import slurm_runner
from .kernel_job import SlurmJob
from .remote_session import RemoteKernel, RemoteSession, abandon, forget
from .workers import in_thread


class HostedKernel(HostedParts):
    """One remote kernel's lifecycle, for the provisioner that owns it."""

    # --- launch ---------------------------------------------------------------------

    async def pre_launch(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        options, km = self.options, self.km
        options.check_direct_encryption()
        start = KernelStart(self)
        start.prepare_keys_and_listeners()
        if km is not None:
            self.connection_info = km.get_connection_info()
        self.kernel_job.new_start()
        try:
            await self.open_connection()
            if options.direct:
                self.bind_ip = await in_thread(start.direct_address)
        except BaseException:
            # A failure, or a cancelled start (the server stopping, a client giving
            # up): no listener, job or connection is left.  (A start cancelled in the
            # queue has already handed the job and the connections to the thread that
            # cancels the job; a login under way when its connection is given back
            # closes itself when it ends.)
            self.close_listeners()
            await self.kernel_job.end()
            await self.hosts.release()
            raise
        kwargs.pop("env", None)  # the local environment is not sent to the remote host
        kwargs.pop("extra_arguments", None)
        kwargs["cmd"] = options.kernel_argv()
        return kwargs

    async def launch_kernel(self, cmd: list[str]) -> dict[str, Any]:
        conn = self.hosts.conn
        if conn is None or self.hosts.target is None:
            raise SSHConnectError("launch_kernel called before pre_launch")
        await KernelStart(self).run(conn, cmd)
        return self.connection_info

    async def abandon(self, kernel_id: str) -> None:
        """After a failed start: no remote directory, no tunnel, no connection left."""
        await abandon(self.hosts.conn, kernel_id, self.log)
        self.remote = None
        await self.cleanup(restart=False)
        cleanup_connection_file = getattr(self.km, "cleanup_connection_file", None)
        if cleanup_connection_file is not None:
            cleanup_connection_file()

    # --- lifecycle --------------------------------------------------------------------

    async def poll(self) -> int | None:
        remote, conn = self.remote, self.hosts.conn
        if self.kernel_job.queued and remote is None:
            return 1 if self.kernel_job.stop_requested() else None
        if remote is None or conn is None:
            return 0
        session = RemoteSession(conn, remote, self.log)
        if session.lost():
            return 1
        session.note_reconnect()
        if not conn.connected:
            if self.options.in_slurm and await self.kernel_job.report_end(remote.kernel_id):
                return 1  # the node went with the job: no reconnect to wait for
            return session.while_disconnected(self.options.reconnect_grace)
        if await session.alive() is not False:
            return None  # alive, or the connection is being re-established
        if not remote.reported_gone:
            remote.reported_gone = True
            await self._report_gone(session)
        return 1

    async def _report_gone(self, session: RemoteSession) -> None:
        kernel_id = session.remote.kernel_id
        in_slurm = self.options.in_slurm
        if in_slurm and not self.stopping and await self.kernel_job.report_end(kernel_id):
            return  # its job ended (said so)
        if self.stopping:  # expected during a shutdown or restart
            self.log.debug("kernel %s (pid %d) is gone", kernel_id, session.remote.pid)
            return
        await session.report_gone()

    async def wait(self) -> int | None:
        while True:
            code = await self.poll()
            if code is not None:
                return code
            await asyncio.sleep(0.05)

    async def send_signal(self, signum: int) -> None:
        remote, conn = self.remote, self.hosts.conn
        name = signal.Signals(signum).name.removeprefix("SIG")
        alloc = self.kernel_job.allocation
        if remote is None and self.kernel_job.queued and alloc is not None:
            stopping = self.stopping or getattr(self.km, "shutting_down", False)
            what = "shut down" if stopping or signum != signal.SIGINT else "interrupted"
            self.log.info(
                "%s: the kernel was %s while Slurm job %s waited in the queue; cancelling it",
                self.name,
                what,
                alloc.job_id or "(not yet submitted)",
            )
            self.kernel_job.stop_while_queued(
                f"the kernel was {what}", shutdown=what == "shut down"
            )
            return
        if remote is None or conn is None:
            return
        if signum in (signal.SIGTERM, signal.SIGKILL):
            self.stopping = True
        await RemoteSession(conn, remote, self.log).signal(name)

    async def shutdown_requested(self, restart: bool = False) -> None:
        self.stopping = True
        if not restart and self.kernel_job.queued and self.kernel_job.allocation is not None:
            self.kernel_job.allocation.request_stop("the kernel was shut down")

    async def cleanup(self, restart: bool = False) -> None:
        await forget(self.hosts.conn, self.kernel_id, self.log)
        self.remote = None
        if not restart:
            # Shut down while the job waits in the queue: the waiting start
            # cancels the job and gives back what it holds.
            if self.kernel_job.stop_while_queued("the kernel was shut down"):
                return
            self.close_listeners()
            self.direct_ports = None
            if self.options.in_slurm:
                await self.kernel_job.end()
            await self.hosts.release()

    def shutdown_wait_time(self, recommended: float) -> float:
        """A remote kernel's shutdown reply crosses SSH (and maybe a Slurm step): 10 s at least."""
        return max(recommended, 10.0)

    # --- reattach ---------------------------------------------------------------------

    def add_info(self, info: dict[str, Any]) -> dict[str, Any]:
        """``info`` (jupyter_client's provisioner info) with what a reattach needs."""
        connection = dict(info.get("connection_info", {}))
        if isinstance(connection.get("key"), bytes):
            connection["key"] = connection["key"].decode()
        info["connection_info"] = connection
        info["remote"] = asdict(self.remote) if self.remote is not None else None
        job = self.kernel_job.job
        info["slurm_job"] = asdict(job) if job is not None else None
        info["plain"] = self.tunnel.plain
        return info

    async def load_info(self, info: dict[str, Any]) -> None:
        """Reattach to the kernel ``info`` (from :meth:`add_info`) describes."""
        remote = info.get("remote")
        if not remote:
            return
        self.remote = RemoteKernel(**remote)
        slurm_job = info.get("slurm_job")
        if slurm_job:
            login = None if self.options.login_is_local else await self.hosts.open_login()
            self.kernel_job.attach(
                SlurmJob(**slurm_job), self.options.slurm_options(), slurm_runner(login)
            )
        conn = await self.open_connection()
        self.remote.seen_reconnects = conn.reconnects
        connection: dict[str, Any] = self.connection_info
        if isinstance(connection.get("key"), str):
            connection["key"] = connection["key"].encode()
        if self.options.direct:  # the kernel's own address and ports, as saved
            self.direct_ports = {name: int(connection[name]) for name in PORT_NAMES}
        else:
            self.tunnel.plain = bool(info.get("plain"))
            self.tunnel.open(self.connection_file())
            connection.update(self.tunnel.endpoints())
        self.connection_info = connection
        await in_thread(conn.request, "watch", self.remote.kernel_id)
