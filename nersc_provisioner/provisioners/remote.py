"""``nersc-cori`` and ``nersc-perlmutter``: kernels on a login node over SSH.

One SSH connection per host carries everything: one ``exec`` per launch
(the launch script on stdin), the agent on a PTY session (liveness, signals,
leases), and a ``direct-tcpip`` channel per ZeroMQ connection.  The local
ports stay the same across reconnects and restarts.

With a ``slurm`` section the kernel runs as a step of a Slurm job instead:
the login connection submits and watches the job; a second connection, to
the job's node and carried inside the login connection, starts the step and
then does everything the login connection does for a login-node kernel.

With ``data_path: direct`` no ZeroMQ byte goes through SSH: the kernel binds the
address SSH reached (the login node's, or the job node's), with CurveZMQ
required, and Jupyter connects to it; SSH still launches, watches and signals it.
"""

from __future__ import annotations

import signal
from typing import Any

from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.provisioning.provisioner_base import KernelProvisionerBase

from ..systems import SYSTEMS
from ..transports.connection import SSHConnection
from .hosted import HostedKernel
from .hosts import HostConnections
from .kernel_job import KernelJob, SlurmJob
from .remote_options import RemoteOptions
from .remote_session import RemoteKernel
from .tunnel import Tunnel


class NERSCRemoteProvisioner(RemoteOptions, KernelProvisionerBase):  # type: ignore[metaclass]
    """Start a kernel on a remote host over SSH and keep its five ports forwarded.

    A thin adapter: the kernel's parts and lifecycle are a :class:`HostedKernel`."""

    provisioner_name = "nersc-remote"

    _hosted: HostedKernel | None = None

    @property
    def hosted(self) -> HostedKernel:
        """The kernel's parts and lifecycle (connections, Slurm job, data path, session)."""
        if self._hosted is None:
            self._hosted = HostedKernel(self, self)
        return self._hosted

    # The parts, for tools that inspect a running kernel (``check``, tests).

    @property
    def connection(self) -> SSHConnection | None:
        """The connection to where the kernel runs, once there is one."""
        return self.hosted.connection

    @property
    def hosts(self) -> HostConnections:
        """The SSH connections this kernel uses (login node, job node)."""
        return self.hosted.hosts

    @property
    def kernel_job(self) -> KernelJob:
        """The Slurm job the kernel runs in (its phase is NONE without ``slurm``)."""
        return self.hosted.kernel_job

    @property
    def slurm_job(self) -> SlurmJob | None:
        """The running job's id and node, once there is one."""
        return self.hosted.slurm_job

    @property
    def tunnel(self) -> Tunnel:
        """The tunnel data path's listeners (unused with ``data_path: direct``)."""
        return self.hosted.tunnel

    @property
    def remote(self) -> RemoteKernel | None:
        """The kernel process on the remote host, once it has reported itself."""
        return self.hosted.remote

    # --- the jupyter_client contract ------------------------------------------------

    @property
    def has_process(self) -> bool:
        return self.hosted.has_process

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        return await self.hosted.pre_launch(kwargs)

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        return await self.hosted.launch_kernel(cmd)  # type: ignore[return-value]

    async def poll(self) -> int | None:
        return await self.hosted.poll()

    async def wait(self) -> int | None:
        return await self.hosted.wait()

    async def send_signal(self, signum: int) -> None:
        await self.hosted.send_signal(signum)

    async def shutdown_requested(self, restart: bool = False) -> None:
        await self.hosted.shutdown_requested(restart)

    async def terminate(self, restart: bool = False) -> None:
        await self.hosted.send_signal(signal.SIGTERM)

    async def kill(self, restart: bool = False) -> None:
        await self.hosted.send_signal(signal.SIGKILL)

    async def cleanup(self, restart: bool = False) -> None:
        await self.hosted.cleanup(restart)

    def get_shutdown_wait_time(self, recommended: float = 5.0) -> float:
        return self.hosted.shutdown_wait_time(recommended)

    async def get_provisioner_info(self) -> dict[str, Any]:
        return self.hosted.add_info(await super().get_provisioner_info())

    async def load_provisioner_info(self, provisioner_info: dict[str, Any]) -> None:
        await super().load_provisioner_info(provisioner_info)
        await self.hosted.load_info(provisioner_info)


class NERSCCoriProvisioner(NERSCRemoteProvisioner):
    """``nersc-cori``: a kernel on a Cori login node."""

    provisioner_name = "nersc-cori"
    system = SYSTEMS["nersc-cori"]


class NERSCPerlmutterProvisioner(NERSCRemoteProvisioner):
    """``nersc-perlmutter``: a kernel on a Perlmutter login node."""

    provisioner_name = "nersc-perlmutter"
    system = SYSTEMS["nersc-perlmutter"]
