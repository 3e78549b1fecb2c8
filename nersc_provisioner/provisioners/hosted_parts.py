"""The state of one hosted kernel (see :mod:`.hosted`): its parts, what its owner
supplies, and the connection to where it runs.  The launch (:mod:`.hosted_launch`)
and the lifecycle (:mod:`.hosted`) work on it.
"""

from __future__ import annotations

import functools
from concurrent.futures import Future
from typing import Any, ClassVar, Protocol

from ..transports.connection import SSHConnection
from .hosts import HostConnections, slurm_runner
from .kernel_job import KernelJob, SlurmJob, let_shutdown_finish
from .remote_options import RemoteOptions
from .remote_session import RemoteKernel
from .tunnel import Tunnel


class Owner(Protocol):
    """What a :class:`HostedKernel` reads of (and writes to) the provisioner owning it."""

    provisioner_name: ClassVar[str]
    parent: Any
    kernel_id: Any
    connection_info: Any
    log: Any


class HostedParts:
    """One remote kernel's parts and state, for the provisioner that owns it."""

    def __init__(self, options: RemoteOptions, owner: Owner) -> None:
        self.options = options
        self.owner = owner
        #: The kernel process, once the launch script has reported it.
        self.remote: RemoteKernel | None = None
        #: A shutdown or restart is under way: the kernel's end is expected.
        self.stopping = False
        self.hosts = HostConnections(options)
        self.kernel_job = KernelJob(owner.provisioner_name, owner.log)
        self.tunnel = Tunnel(self._route)
        #: data_path direct: the kernel's ports, asked for again at a restart so that
        #: the clients' connections stay valid.
        self.direct_ports: dict[str, int] | None = None
        self.bind_ip = "127.0.0.1"

    # --- what the owner supplies ---------------------------------------------------

    @property
    def name(self) -> str:
        return self.owner.provisioner_name

    @property
    def km(self) -> Any:
        """The kernel manager (None when a provisioner is used on its own)."""
        return self.owner.parent

    @property
    def kernel_id(self) -> str:
        return str(self.owner.kernel_id) if self.owner.kernel_id else ""

    @property
    def log(self) -> Any:
        return self.owner.log

    @property
    def connection_info(self) -> dict[str, Any]:
        return dict(self.owner.connection_info)

    @connection_info.setter
    def connection_info(self, info: dict[str, Any]) -> None:
        self.owner.connection_info = info

    def connection_file(self) -> str:
        return str(getattr(self.km, "connection_file", "") or "")

    # --- the parts ------------------------------------------------------------------

    @property
    def has_process(self) -> bool:
        # A job waiting in the queue counts, so that an interrupt or a shutdown
        # reaches us (and cancels it) instead of waiting for the start to finish.
        return self.remote is not None or self.kernel_job.queued

    @property
    def connection(self) -> SSHConnection | None:
        """The connection to where the kernel runs, once there is one."""
        return self.hosts.conn

    @property
    def slurm_job(self) -> SlurmJob | None:
        return self.kernel_job.job

    def _route(self) -> tuple[SSHConnection | None, dict[str, int] | None, bool]:
        remote = self.remote
        return self.hosts.conn, (remote.ports if remote is not None else None), self.stopping

    def close_listeners(self) -> None:
        self.tunnel.close()

    def _release_after(self, work: Future[Any]) -> None:
        """Give the connections back once ``work`` (a thread using them) has ended."""
        self.hosts.release_after(work, then=self.close_listeners)

    async def open_connection(self) -> SSHConnection:
        """The connection to where the kernel runs (in Slurm mode, after the allocation)."""
        options = self.options
        if not options.in_slurm:
            return await self.hosts.use_login()
        via = None if options.login_is_local else await self.hosts.open_login()
        job = await self.kernel_job.ensure(
            options.slurm_options(),
            slurm_runner(via),
            options.queue_timeout,
            release_after=self._release_after,
            after_failure=functools.partial(let_shutdown_finish, self.km),
        )
        return await self.hosts.use_node(job.node_addr, via)

    async def abandon(self, kernel_id: str) -> None:
        """After a failed start: no remote directory, no tunnel, no connection left."""
        raise NotImplementedError
