"""One start of a hosted kernel: the CurveZMQ keys and the listeners before the wait,
then the launch script, the checks of what the kernel reported, and the failure
exits (each abandons the start and leaves nothing behind).
"""

from __future__ import annotations

import functools
import time

from ..errors import LaunchTimeout, SSHConnectError
from ..launchers.remote import PORT_NAMES, LaunchReport, RemoteLaunch
from ..transports.connection import SSHConnection
from .direct import bind_address, unreachable_error, wait_reachable
from .encryption import (
    DIED_WITH_KEYS_WARNING,
    UNENCRYPTED_WARNING,
    curve_refusal,
    kernel_encrypts,
    provide_curve_keys,
)
from .hosted_parts import HostedParts
from .remote_session import (
    RemoteKernel,
    abandon,
    launch_connection,
    launch_script,
    log_tail,
    run_launch,
)
from .workers import in_thread


class KernelStart:
    """The steps of starting ``hosted``'s kernel; the state stays on ``hosted``."""

    def __init__(self, hosted: HostedParts) -> None:
        self.hosted = hosted
        self.options = hosted.options

    def prepare_keys_and_listeners(self) -> None:
        """Before any wait: the keys, and the local listeners (tunnel), so that the
        kernel manager can address the kernel while it is pending in a queue.
        (Direct: the kernel's own ports, known once it runs.)"""
        hosted, km, direct = self.hosted, self.hosted.km, self.options.direct
        tunnel = hosted.tunnel
        if km is not None:
            policy = "required" if direct else self.options.transport_encryption
            keys = provide_curve_keys(km, policy, name=hosted.name, log=hosted.log)
            if not keys and not direct:
                tunnel.plain = True  # no 127.0.0.1 ports for plain traffic
        if not direct:
            if not tunnel.is_open:
                tunnel.open(hosted.connection_file())
            tunnel.restore_unlinked()
        if km is not None:
            km.transport = "tcp"
            if not direct:
                tunnel.point_manager(km)
                km.write_connection_file()

    def direct_address(self) -> str:
        """data_path direct: the IPv4 address the kernel binds and Jupyter connects to."""
        hosted = self.hosted
        node_addr = None
        if self.options.in_slurm:
            job = hosted.kernel_job.job
            node_addr = job.node_addr if job is not None else ""
        return bind_address(hosted.hosts.conn, hosted.hosts.target, node_addr)

    def _drop_curve_keys(self) -> None:
        """The kernel does not encrypt: stop the clients from expecting it."""
        hosted, km = self.hosted, self.hosted.km
        if km is None:
            return
        km.curve_publickey = km.curve_secretkey = None
        if not self.options.direct:
            # Plain traffic must not pass through 127.0.0.1 ports: Unix sockets instead.
            hosted.tunnel.make_plain(hosted.connection_file())
            hosted.tunnel.point_manager(km)
        km._connection_file_written = False  # rewrite it without the curve keys
        km.write_connection_file()
        hosted.connection_info = km.get_connection_info()

    def _script(self, cmd: list[str], bind_ip: str, where: str) -> tuple[str, str, bool]:
        """The launch script, where it runs, and whether the kernel is given CurveZMQ keys."""
        hosted, options = self.hosted, self.options
        spec = options.spec()
        connection = launch_connection(
            hosted.connection_info,
            spec.name if spec is not None else "",
            bind_ip,
            hosted.direct_ports if options.direct else None,
        )
        launch = RemoteLaunch(
            kernel_id=hosted.kernel_id,
            argv=tuple(cmd),
            connection=connection,
            setup=options.remote_setup(),
            lease_timeout=options.lease_timeout,
            foreground=options.in_slurm,
        )
        job = hosted.kernel_job.job if options.in_slurm else None
        script, where = launch_script(launch, job, where)
        return script, where, "curve_secretkey" in connection

    async def _launch(
        self, conn: SSHConnection, script: str, where: str, cmd: list[str], *, retry: bool = False
    ) -> LaunchReport | None:
        """Run the launch script until the kernel reports its ports; abandon it on failure.
        With ``retry``, a kernel that died at startup is only removed (None): the caller
        starts it again without CurveZMQ keys."""
        hosted, timeout = self.hosted, self.options.launch_timeout
        report = LaunchReport()
        try:
            await in_thread(run_launch, conn, script, timeout, report)
        except TimeoutError:
            await hosted.abandon(hosted.kernel_id)
            raise LaunchTimeout(
                f"the kernel on {where} did not start within {timeout:g} s",
                hint="raise launch_timeout, or run `python -m nersc_provisioner check NAME`",
                command=cmd,
                stderr="\n".join(report.other),
            ) from None
        except BaseException:
            await hosted.abandon(hosted.kernel_id)
            raise
        if not report.done:
            if retry and report.ready and report.died_code is not None:
                await abandon(conn, hosted.kernel_id, hosted.log)
                return None
            await hosted.abandon(hosted.kernel_id)
            raise report.error(where, cmd)
        return report

    async def _wait_direct_reachable(
        self, conn: SSHConnection, report: LaunchReport, bind_ip: str, where: str, cmd: list[str]
    ) -> None:
        """Direct: the kernel may report its ports (or, at a restart, be given them)
        before it has bound them; wait until its shell port answers, or it has died."""
        hosted = self.hosted
        kernel_id = hosted.kernel_id
        port = report.ports.get("shell_port", 0)
        alive = functools.partial(
            conn.request, "alive", str(report.pid), report.start_time, kernel_id
        )
        try:
            await in_thread(wait_reachable, bind_ip, port, alive, self.options.launch_timeout)
        except (OSError, SSHConnectError, TimeoutError) as exc:
            tail = await log_tail(conn, kernel_id)
            await hosted.abandon(kernel_id)
            raise unreachable_error(exc, where, bind_ip, port, cmd, tail) from None

    async def run(self, conn: SSHConnection, cmd: list[str]) -> None:
        """Start the kernel over ``conn`` and record it on ``hosted``."""
        hosted, options = self.hosted, self.options
        target = hosted.hosts.target
        label = target.label if target is not None else ""
        kernel_id, direct = hosted.kernel_id, options.direct
        bind_ip = hosted.bind_ip if direct else "127.0.0.1"
        script, where, curve = self._script(cmd, bind_ip, label)
        started = time.monotonic()
        auto = curve and not direct and options.transport_encryption == "auto"
        report = await self._launch(conn, script, where, cmd, retry=auto)
        if report is None:  # it died given the keys (ipykernel 6 with jupyter_client 8.9+)
            hosted.log.warning(DIED_WITH_KEYS_WARNING, hosted.name, kernel_id, where)
            self._drop_curve_keys()
            script, where, curve = self._script(cmd, bind_ip, label)
            report = await self._launch(conn, script, where, cmd)
            assert report is not None  # noqa: S101 - without retry it returns or raises
        if direct:
            await self._wait_direct_reachable(conn, report, bind_ip, where, cmd)
        if curve and not await in_thread(
            kernel_encrypts, conn, report, bind_ip, direct, hosted.log
        ):
            if direct or options.transport_encryption == "required":
                await hosted.abandon(kernel_id)
                raise curve_refusal(where, cmd, direct=direct)
            hosted.log.warning(UNENCRYPTED_WARNING, hosted.name, kernel_id, where)
            self._drop_curve_keys()
        if direct:
            ports = {name: report.ports.get(name, 0) for name in PORT_NAMES}
            hosted.direct_ports = ports
            hosted.connection_info = {**hosted.connection_info, **ports, "ip": bind_ip}
        self._record(conn, report)
        await in_thread(conn.request, "watch", kernel_id)
        hosted.log.info(
            "%s: kernel %s started on %s (pid %d) in %.2f s",
            hosted.name,
            kernel_id,
            where if options.in_slurm else (report.node or label),
            report.pid,
            time.monotonic() - started,
        )
        if report.other:
            hosted.log.debug("%s: launch output:\n%s", hosted.name, "\n".join(report.other))

    def _record(self, conn: SSHConnection, report: LaunchReport) -> None:
        """The kernel runs: what poll, signals and the tunnel use from now on."""
        hosted = self.hosted
        hosted.stopping = False
        hosted.remote = RemoteKernel(
            kernel_id=hosted.kernel_id,
            pid=report.pid,
            start_time=report.start_time,
            node=report.node,
            ports=report.ports,
            seen_reconnects=conn.reconnects,
        )
