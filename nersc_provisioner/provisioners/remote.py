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

import asyncio
import functools
import re
import signal
import time
from concurrent.futures import Future
from dataclasses import asdict
from typing import Any

from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.provisioning.provisioner_base import KernelProvisionerBase
from traitlets import default

from ..errors import (
    LaunchTimeout,
    SSHConnectError,
)
from ..launchers.remote import (
    PORT_NAMES,
    LaunchReport,
    RemoteLaunch,
)
from ..systems import SYSTEMS
from ..transports.connection import SSHConnection
from .direct import bind_address, unreachable_error, wait_reachable
from .encryption import (
    DIED_WITH_KEYS_WARNING,
    UNENCRYPTED_WARNING,
    curve_refusal,
    kernel_encrypts,
    provide_curve_keys,
)
from .hosts import HostConnections, slurm_runner
from .kernel_job import KernelJob, SlurmJob, let_shutdown_finish
from .remote_options import RemoteOptions
from .remote_session import (
    RemoteKernel,
    RemoteSession,
    abandon,
    forget,
    launch_connection,
    launch_script,
    log_tail,
    run_launch,
)
from .tunnel import Tunnel
from .workers import in_thread

#: A host name, an IPv4 address or an ssh config alias: no user@, :port, %-tokens.
_HOST = re.compile(r"[A-Za-z0-9._-]+\Z")


class NERSCRemoteProvisioner(RemoteOptions, KernelProvisionerBase):  # type: ignore[metaclass]
    """Start a kernel on a remote host over SSH and keep its five ports forwarded."""

    provisioner_name = "nersc-remote"

    # --- state ------------------------------------------------------------------

    remote: RemoteKernel | None = None
    _stopping = False
    _hosts: HostConnections | None = None
    _tunnel: Tunnel | None = None
    #: data_path direct: the kernel's ports, asked for again at a restart so that
    #: the clients' connections stay valid.
    _direct_ports: dict[str, int] | None = None
    _bind_ip = "127.0.0.1"
    _kernel_job: KernelJob | None = None

    @property
    def has_process(self) -> bool:
        # A job waiting in the queue counts, so that an interrupt or a shutdown
        # reaches us (and cancels it) instead of waiting for the start to finish.
        return self.remote is not None or self.kernel_job.queued

    # --- launch -----------------------------------------------------------------

    @property
    def hosts(self) -> HostConnections:
        """The SSH connections this kernel uses (login node, job node)."""
        if self._hosts is None:
            self._hosts = HostConnections(self)
        return self._hosts

    @property
    def connection(self) -> SSHConnection | None:
        """The connection to where the kernel runs, once there is one."""
        return self.hosts.conn

    async def _connection(self) -> SSHConnection:
        """The connection to where the kernel runs (in Slurm mode, after the allocation)."""
        if not self.in_slurm:
            return await self.hosts.use_login()
        via = None if self.login_is_local else await self.hosts.open_login()
        job = await self.kernel_job.ensure(
            self.slurm_options(),
            slurm_runner(via),
            self.queue_timeout,
            release_after=self._release_after,
            after_failure=functools.partial(let_shutdown_finish, self.parent),
        )
        return await self.hosts.use_node(job.node_addr, via)

    def _direct_address(self) -> str:
        """data_path direct: the IPv4 address the kernel binds and Jupyter connects to."""
        node_addr = None
        if self.in_slurm:
            job = self.kernel_job.job
            node_addr = job.node_addr if job is not None else ""
        return bind_address(self.hosts.conn, self.hosts.target, node_addr)

    @property
    def kernel_job(self) -> KernelJob:
        """The Slurm job the kernel runs in (its phase is NONE without ``slurm``)."""
        if self._kernel_job is None:
            self._kernel_job = KernelJob(self.provisioner_name, self.log)
        return self._kernel_job

    @property
    def slurm_job(self) -> SlurmJob | None:
        """The running job's id and node, once there is one."""
        return self.kernel_job.job

    def _release_after(self, work: Future[Any]) -> None:
        """Give the connections back once ``work`` (a thread using them) has ended."""
        self.hosts.release_after(work, then=self._close_listeners)

    @property
    def tunnel(self) -> Tunnel:
        """The tunnel data path's listeners (unused with ``data_path: direct``)."""
        if self._tunnel is None:
            self._tunnel = Tunnel(self._route)
        return self._tunnel

    def _route(self) -> tuple[SSHConnection | None, dict[str, int] | None, bool]:
        remote = self.remote
        return self.hosts.conn, (remote.ports if remote is not None else None), self._stopping

    def _connection_file(self) -> str:
        return str(getattr(self.parent, "connection_file", "") or "")

    def _close_listeners(self) -> None:
        if self._tunnel is not None:
            self._tunnel.close()

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        km = self.parent
        self.check_direct_encryption()
        if km is not None:
            policy = "required" if self.direct else self.transport_encryption
            provide_curve_keys(km, policy, name=self.provisioner_name, log=self.log)
            if km.curve_publickey is None and not self.direct:
                self.tunnel.plain = True  # no 127.0.0.1 ports for plain traffic
        # The local ports exist before any wait (a Slurm queue), so that the kernel
        # manager can address the kernel while it is pending.  (Direct: the kernel's
        # own ports, known once it runs.)
        if not self.direct:
            if not self.tunnel.is_open:
                self.tunnel.open(self._connection_file())
            self.tunnel.restore_unlinked()
        if km is not None:
            km.transport = "tcp"
            if not self.direct:
                self.tunnel.point_manager(km)
                km.write_connection_file()
            self.connection_info = km.get_connection_info()
        self.kernel_job.new_start()
        try:
            await self._connection()
            if self.direct:
                self._bind_ip = await in_thread(self._direct_address)
        except asyncio.CancelledError:
            raise  # what is still in use is given back by the thread that uses it
        except BaseException:
            self._close_listeners()
            await self.kernel_job.end()
            await self.hosts.release()
            raise
        kwargs.pop("env", None)  # the local environment is not sent to the remote host
        kwargs.pop("extra_arguments", None)
        kwargs["cmd"] = self.kernel_argv()
        return kwargs

    def _drop_curve_keys(self) -> None:
        """The kernel does not encrypt: stop the clients from expecting it."""
        km = self.parent
        if km is None:
            return
        km.curve_publickey = km.curve_secretkey = None
        if not self.direct:
            # Plain traffic must not pass through 127.0.0.1 ports: Unix sockets instead.
            self.tunnel.make_plain(self._connection_file())
            self.tunnel.point_manager(km)
        km._connection_file_written = False  # rewrite it without the curve keys
        km.write_connection_file()
        self.connection_info = km.get_connection_info()

    def _launch_script(self, cmd: list[str], bind_ip: str, where: str) -> tuple[str, str, bool]:
        """The launch script, where it runs, and whether the kernel is given CurveZMQ keys."""
        connection = launch_connection(
            self.connection_info,
            self.kernel_spec.name if self.kernel_spec is not None else "",
            bind_ip,
            self._direct_ports if self.direct else None,
        )
        launch = RemoteLaunch(
            kernel_id=str(self.kernel_id),
            argv=tuple(cmd),
            connection=connection,
            setup=self.remote_setup(),
            lease_timeout=self.lease_timeout,
            foreground=self.in_slurm,
        )
        job = self.kernel_job.job if self.in_slurm else None
        script, where = launch_script(launch, job, where)
        return script, where, "curve_secretkey" in connection

    async def _run_launch(
        self, conn: SSHConnection, script: str, where: str, cmd: list[str], *, retry: bool = False
    ) -> LaunchReport | None:
        """Run the launch script until the kernel reports its ports; abandon it on failure.
        With ``retry``, a kernel that died at startup is only removed (None): the caller
        starts it again without CurveZMQ keys."""
        kernel_id = str(self.kernel_id)
        report = LaunchReport()
        try:
            await in_thread(run_launch, conn, script, self.launch_timeout, report)
        except TimeoutError:
            await self._abandon(kernel_id)
            raise LaunchTimeout(
                f"the kernel on {where} did not start within {self.launch_timeout:g} s",
                hint="raise launch_timeout, or run `python -m nersc_provisioner check NAME`",
                command=cmd,
                stderr="\n".join(report.other),
            ) from None
        except BaseException:
            await self._abandon(kernel_id)
            raise
        if not report.done:
            if retry and report.ready and report.died_code is not None:
                await abandon(conn, kernel_id, self.log)
                return None
            await self._abandon(kernel_id)
            raise report.error(where, cmd)
        return report

    async def _wait_direct_reachable(
        self, conn: SSHConnection, report: LaunchReport, bind_ip: str, where: str, cmd: list[str]
    ) -> None:
        """Direct: the kernel may report its ports (or, at a restart, be given them)
        before it has bound them; wait until its shell port answers, or it has died."""
        kernel_id = str(self.kernel_id)
        port = report.ports.get("shell_port", 0)
        alive = functools.partial(
            conn.request, "alive", str(report.pid), report.start_time, kernel_id
        )
        try:
            await in_thread(wait_reachable, bind_ip, port, alive, self.launch_timeout)
        except (OSError, SSHConnectError, TimeoutError) as exc:
            tail = await log_tail(conn, kernel_id)
            await self._abandon(kernel_id)
            raise unreachable_error(exc, where, bind_ip, port, cmd, tail) from None

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        conn, target = self.hosts.conn, self.hosts.target
        if conn is None or target is None:
            raise SSHConnectError("launch_kernel called before pre_launch")
        kernel_id = str(self.kernel_id)
        bind_ip = self._bind_ip if self.direct else "127.0.0.1"
        script, where, curve = self._launch_script(cmd, bind_ip, target.label)
        started = time.monotonic()
        auto = curve and not self.direct and self.transport_encryption == "auto"
        report = await self._run_launch(conn, script, where, cmd, retry=auto)
        if report is None:  # it died given the keys (ipykernel 6 with jupyter_client 8.9+)
            self.log.warning(DIED_WITH_KEYS_WARNING, self.provisioner_name, kernel_id, where)
            self._drop_curve_keys()
            script, where, curve = self._launch_script(cmd, bind_ip, target.label)
            report = await self._run_launch(conn, script, where, cmd)
            assert report is not None  # noqa: S101 - without retry it returns or raises
        if self.direct:
            await self._wait_direct_reachable(conn, report, bind_ip, where, cmd)
        if curve and not await in_thread(
            kernel_encrypts, conn, report, bind_ip, self.direct, self.log
        ):
            if self.direct or self.transport_encryption == "required":
                await self._abandon(kernel_id)
                raise curve_refusal(where, cmd, direct=self.direct)
            self.log.warning(UNENCRYPTED_WARNING, self.provisioner_name, kernel_id, where)
            self._drop_curve_keys()
        if self.direct:
            ports = {name: report.ports.get(name, 0) for name in PORT_NAMES}
            self._direct_ports = ports
            info: dict[str, Any] = {**self.connection_info, **ports, "ip": bind_ip}
            self.connection_info = info  # type: ignore[assignment]
        self._stopping = False
        self.remote = RemoteKernel(
            kernel_id=kernel_id,
            pid=report.pid,
            start_time=report.start_time,
            node=report.node,
            ports=report.ports,
            seen_reconnects=conn.reconnects,
        )
        await in_thread(conn.request, "watch", kernel_id)
        self.log.info(
            "%s: kernel %s started on %s (pid %d) in %.2f s",
            self.provisioner_name,
            kernel_id,
            where if self.in_slurm else (report.node or target.label),
            report.pid,
            time.monotonic() - started,
        )
        if report.other:
            self.log.debug("%s: launch output:\n%s", self.provisioner_name, "\n".join(report.other))
        return self.connection_info

    async def _abandon(self, kernel_id: str) -> None:
        """After a failed start: no remote directory, no tunnel, no connection left."""
        await abandon(self.hosts.conn, kernel_id, self.log)
        self.remote = None
        await self.cleanup(restart=False)
        cleanup_connection_file = getattr(self.parent, "cleanup_connection_file", None)
        if cleanup_connection_file is not None:
            cleanup_connection_file()

    # --- lifecycle --------------------------------------------------------------

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
            if self.in_slurm and await self.kernel_job.report_end(remote.kernel_id):
                return 1  # the node went with the job: no reconnect to wait for
            return session.while_disconnected(self.reconnect_grace)
        if await session.alive() is not False:
            return None  # alive, or the connection is being re-established
        if not remote.reported_gone:
            remote.reported_gone = True
            await self._report_gone(session)
        return 1

    async def _report_gone(self, session: RemoteSession) -> None:
        kernel_id = session.remote.kernel_id
        if self.in_slurm and not self._stopping and await self.kernel_job.report_end(kernel_id):
            return  # its job ended (said so)
        if self._stopping:  # expected during a shutdown or restart
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
            stopping = self._stopping or getattr(self.parent, "shutting_down", False)
            what = "shut down" if stopping or signum != signal.SIGINT else "interrupted"
            self.log.info(
                "%s: the kernel was %s while Slurm job %s waited in the queue; cancelling it",
                self.provisioner_name,
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
            self._stopping = True
        await RemoteSession(conn, remote, self.log).signal(name)

    async def shutdown_requested(self, restart: bool = False) -> None:
        self._stopping = True
        if not restart and self.kernel_job.queued and self.kernel_job.allocation is not None:
            self.kernel_job.allocation.request_stop("the kernel was shut down")

    async def terminate(self, restart: bool = False) -> None:
        await self.send_signal(signal.SIGTERM)

    async def kill(self, restart: bool = False) -> None:
        await self.send_signal(signal.SIGKILL)

    async def cleanup(self, restart: bool = False) -> None:
        await forget(self.hosts.conn, str(self.kernel_id) if self.kernel_id else "", self.log)
        self.remote = None
        if not restart:
            # Shut down while the job waits in the queue: the waiting start
            # cancels the job and gives back what it holds.
            if self.kernel_job.stop_while_queued("the kernel was shut down"):
                return
            self._close_listeners()
            self._direct_ports = None
            if self.in_slurm:
                await self.kernel_job.end()
            await self.hosts.release()

    def get_shutdown_wait_time(self, recommended: float = 5.0) -> float:
        return max(recommended, 10.0)

    # --- reattach ---------------------------------------------------------------

    async def get_provisioner_info(self) -> dict[str, Any]:
        info = await super().get_provisioner_info()
        connection = dict(info.get("connection_info", {}))
        if isinstance(connection.get("key"), bytes):
            connection["key"] = connection["key"].decode()
        info["connection_info"] = connection
        info["remote"] = asdict(self.remote) if self.remote is not None else None
        job = self.kernel_job.job
        info["slurm_job"] = asdict(job) if job is not None else None
        info["plain"] = self._tunnel is not None and self._tunnel.plain
        return info

    async def load_provisioner_info(self, provisioner_info: dict[str, Any]) -> None:
        await super().load_provisioner_info(provisioner_info)
        remote = provisioner_info.get("remote")
        if not remote:
            return
        self.remote = RemoteKernel(**remote)
        slurm_job = provisioner_info.get("slurm_job")
        if slurm_job:
            login = None if self.login_is_local else await self.hosts.open_login()
            self.kernel_job.attach(SlurmJob(**slurm_job), self.slurm_options(), slurm_runner(login))
        conn = await self._connection()
        self.remote.seen_reconnects = conn.reconnects
        connection: dict[str, Any] = dict(self.connection_info)
        if isinstance(connection.get("key"), str):
            connection["key"] = connection["key"].encode()
        if self.direct:  # the kernel's own address and ports, as saved
            self._direct_ports = {name: int(connection[name]) for name in PORT_NAMES}
        else:
            self.tunnel.plain = bool(provisioner_info.get("plain"))
            self.tunnel.open(self._connection_file())
            connection.update(self.tunnel.endpoints())
        self.connection_info = connection  # type: ignore[assignment]
        await in_thread(conn.request, "watch", self.remote.kernel_id)


class NERSCLoginNodeSlurm(NERSCRemoteProvisioner):
    """``nersc-local`` with ``slurm``: Jupyter runs on the login node itself.

    :class:`~.local.NERSCLocalProvisioner` hands a kernel with a ``slurm`` section to
    this: ``sbatch``/``squeue``/``scancel`` run here, and the job's node is reached
    by ssh from here, as for ``nersc-cori`` from its login node.
    """

    provisioner_name = "nersc-local"
    login_is_local = True

    @default("host")
    def _default_host(self) -> str:
        return "localhost"  # not contacted: Slurm commands run locally


class NERSCCoriProvisioner(NERSCRemoteProvisioner):
    """``nersc-cori``: a kernel on a Cori login node."""

    provisioner_name = "nersc-cori"
    system = SYSTEMS["nersc-cori"]


class NERSCPerlmutterProvisioner(NERSCRemoteProvisioner):
    """``nersc-perlmutter``: a kernel on a Perlmutter login node."""

    provisioner_name = "nersc-perlmutter"
    system = SYSTEMS["nersc-perlmutter"]
