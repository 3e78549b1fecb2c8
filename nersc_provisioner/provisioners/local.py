"""``nersc-local``: a kernel on this machine, through the generated module wrapper."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import zmq
from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.launcher import launch_kernel
from jupyter_client.provisioning.local_provisioner import LocalProvisioner
from jupyter_client.provisioning.provisioner_base import KernelProvisionerBase

from ..errors import KernelCommandError, LaunchTimeout
from ..launchers.wrapper import (
    READY_MARKER,
    EnvironmentSetup,
    build_script,
    launch_error_from_exit,
    wrap_command,
)
from ..transports.local import StatusPipe, reap_session, wait_for_exit
from ..transports.local_sockets import (
    check_private_dir,
    make_private_dir,
    remove_private_dir,
    write_private_json,
)
from .argv import DEFAULT_KERNEL_ARGV, as_jupyter_client_runs_it, local_argv, spec_argv
from .encryption import curve_keys_usable
from .hosted import HostedKernel
from .local_sockets import (
    UNPROTECTED_WARNING,
    WHERE,
    KernelExited,
    Protection,
    SocketsReady,
    connection_for,
    protection_attempts,
    read_connection_file,
    refusal,
    wait_for_sockets,
    writes_back_ports,
)
from .options import LaunchPlan, WrapperOptions, list_trait, str_trait
from .remote_options import LoginNodeSlurmOptions

# How long a wrapper that reported failure may take to exit before it is killed.
_EXIT_GRACE = 5.0


class NERSCLocalProvisioner(WrapperOptions, LocalProvisioner):  # type: ignore[misc,metaclass]
    """Start a kernel on this machine, after ``module load``, setup lines, or in a container.

    Without any of those settings it behaves exactly like jupyter_client's
    ``local-provisioner``.
    """

    provisioner_name = "nersc-local"

    # Used only with `slurm`: the ssh from this (login) node into the job's node.
    identity_file = str_trait("identity_file", node=True)
    known_hosts = list_trait("known_hosts", node=True)
    ssh_config = str_trait("ssh_config", node=True)

    _setup: EnvironmentSetup | None = None
    #: With ``slurm``: the kernel runs in a job step, and these are its parts and
    #: lifecycle (the same as a remote kernel's, with the login node being here).
    hosted: HostedKernel | None = None

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if self.slurm:
            settings = {key: getattr(self, key) for key in self.config_keys()}
            options = LoginNodeSlurmOptions(kernel_spec=kwargs.get("kernel_spec"), **settings)
            self.hosted = HostedKernel(options, self)

    # --- with slurm: every call goes to the hosted kernel --------------------------

    @property
    def has_process(self) -> bool:
        if self.hosted is not None:
            return self.hosted.has_process
        return bool(super().has_process)

    async def poll(self) -> int | None:
        if self.hosted is not None:
            return await self.hosted.poll()
        return await super().poll()

    async def send_signal(self, signum: int) -> None:
        if self.hosted is not None:
            return await self.hosted.send_signal(signum)
        return await super().send_signal(signum)

    async def kill(self, restart: bool = False) -> None:
        if self.hosted is not None:
            return await self.hosted.send_signal(signal.SIGKILL)
        return await super().kill(restart)

    async def terminate(self, restart: bool = False) -> None:
        if self.hosted is not None:
            return await self.hosted.send_signal(signal.SIGTERM)
        return await super().terminate(restart)

    async def shutdown_requested(self, restart: bool = False) -> None:
        if self.hosted is not None:
            return await self.hosted.shutdown_requested(restart)
        return await super().shutdown_requested(restart)

    def get_shutdown_wait_time(self, recommended: float = 5.0) -> float:
        if self.hosted is not None:
            return self.hosted.shutdown_wait_time(recommended)
        return float(super().get_shutdown_wait_time(recommended))

    async def get_provisioner_info(self) -> dict[str, Any]:
        if self.hosted is not None:
            base: dict[str, Any] = await KernelProvisionerBase.get_provisioner_info(self)
            return self.hosted.add_info(base)
        info: dict[str, Any] = await super().get_provisioner_info()
        info["sockets"] = {
            "protection": self._protection.value if self._protection else None,
            "socket_dir": self._socket_dir,
            "tcp_ports": self._tcp_ports,
        }
        return info

    async def load_provisioner_info(self, provisioner_info: dict[str, Any]) -> None:
        if self.hosted is not None:
            await KernelProvisionerBase.load_provisioner_info(self, provisioner_info)
            await self.hosted.load_info(provisioner_info)
            return
        await super().load_provisioner_info(provisioner_info)
        sockets = provisioner_info.get("sockets") or {}
        if sockets.get("protection"):
            self._protection = Protection(sockets["protection"])
        self._socket_dir = sockets.get("socket_dir")
        self._tcp_ports = sockets.get("tcp_ports")

    _session_id: int | None = None
    _launch_cwd: str | None = None

    # How the sockets are protected (local_sockets.py); kept across restarts, so a
    # restarted kernel is found where the clients already look.
    _attempts: list[Protection] = []  # noqa: RUF012 - replaced, never mutated
    _protection: Protection | None = None
    _self_binding = False
    _socket_dir: str | None = None
    _tcp_ports: dict[str, int] | None = None

    def _mounts(self) -> tuple[str, ...]:
        mounts = []
        connection_file = getattr(self.parent, "connection_file", "")
        if connection_file:
            mounts.append(os.path.dirname(os.path.realpath(connection_file)))
        if self.cwd:
            mounts.append(self.cwd)
        if self._socket_dir:
            mounts.append(self._socket_dir)
        return tuple(mounts)

    def launch_plan(self) -> LaunchPlan:
        """The wrapper and command a start would run, without running it (for ``show``)."""
        if self.hosted is not None:
            return self.hosted.options.launch_plan()
        setup = self.environment_setup(mounts=self._mounts())
        argv = spec_argv(self.kernel_spec.argv if self.kernel_spec is not None else None)
        kernel_cmd = local_argv(argv, as_jupyter_client_runs_it(argv), setup.needed)
        if not setup.needed:
            return LaunchPlan(script=None, command=list(kernel_cmd))
        return LaunchPlan(
            script=build_script(setup),
            command=wrap_command(setup, kernel_cmd, "<status-fd>"),
        )

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        if self.hosted is not None:
            return await self.hosted.pre_launch(kwargs)
        if self.kernel_spec is not None and not self.kernel_spec.argv:
            self.kernel_spec.argv = list(DEFAULT_KERNEL_ARGV)
        km = self.parent
        if km is not None:
            # No port cache: the kernel binds ports of its own choosing, or IPC names.
            km.cache_ports = False
        kwargs = await super().pre_launch(**kwargs)
        spec = list(self.kernel_spec.argv) if self.kernel_spec is not None else []
        metadata = dict(self.kernel_spec.metadata or {}) if self.kernel_spec is not None else {}
        self._self_binding = writes_back_ports(kwargs["cmd"], metadata)
        self._attempts = []
        if km is not None:
            self._attempts = protection_attempts(
                self.transport_encryption,
                self_binding=self._self_binding,
                curve_keys=curve_keys_usable(
                    km, self.transport_encryption, name=self.provisioner_name, log=self.log
                ),
                remembered=self._protection,
            )
            if Protection.IPC in self._attempts and self._socket_dir is None:
                parent = os.path.dirname(os.path.abspath(km.connection_file))
                self._socket_dir = await asyncio.to_thread(make_private_dir, (parent,))
        self._setup = self.environment_setup(mounts=self._mounts())
        kwargs["cmd"] = local_argv(spec, kwargs["cmd"], self._setup.needed)
        return kwargs

    def _popen(self, cmd: list[str], **kwargs: Any) -> None:
        # LocalProvisioner.launch_kernel would store the launch cwd in `cwd`,
        # which is a setting of ours; so the process is started here.
        self._launch_cwd = kwargs.get("cwd") or os.getcwd()
        self.process = launch_kernel(cmd, **self._scrub_kwargs(kwargs))
        self.pid = self._session_id = self.process.pid
        try:
            self.pgid = os.getpgid(self.process.pid)
        except OSError:
            self.pgid = None

    def resolve_path(self, path_str: str) -> str | None:
        path = Path(path_str).expanduser()
        if not path.is_absolute():
            path = Path(self.cwd or self._launch_cwd or os.getcwd()) / path
        return path.resolve().as_posix() if path.exists() else None

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        if self.hosted is not None:
            return await self.hosted.launch_kernel(cmd)  # type: ignore[return-value]
        km = self.parent
        if km is None or not self._attempts:
            await self._start_process(cmd, **kwargs)
            return self.connection_info
        reasons: list[str] = []
        written = await asyncio.to_thread(read_connection_file, km.connection_file)
        for protection in self._attempts:
            info = await self._write_attempt(km, protection, written)
            await self._start_process(cmd, **kwargs)
            ready = await self._sockets_of_attempt(protection, info, cmd, reasons)
            if ready is None:
                await self._end_attempt()
                continue
            self._accept(km, protection, info, ready)
            if protection is Protection.PLAIN and self.transport_encryption != "disabled":
                self.log.warning(UNPROTECTED_WARNING, self.kernel_id, "; ".join(reasons))
            return self.connection_info
        await self._abandon_launch()
        raise refusal(reasons, cmd)

    async def _write_attempt(
        self, km: Any, protection: Protection, written: dict[str, Any]
    ) -> dict[str, Any]:
        """Write the connection file for one way of protecting the sockets; its content."""
        curve = None
        if protection is Protection.CURVE:
            if km.curve_publickey is None or km.curve_secretkey is None:
                km.curve_publickey, km.curve_secretkey = zmq.curve_keypair()
            curve = (km.curve_publickey, km.curve_secretkey)
        if protection is Protection.IPC and self._socket_dir is not None:
            await asyncio.to_thread(check_private_dir, self._socket_dir)
        info = connection_for(
            protection,
            written,
            curve_keys=curve,
            socket_dir=self._socket_dir,
            tcp_ports=self._tcp_ports,
            self_binding=self._self_binding,
        )
        await asyncio.to_thread(write_private_json, km.connection_file, info)
        return info

    async def _sockets_of_attempt(
        self, protection: Protection, info: dict[str, Any], cmd: list[str], reasons: list[str]
    ) -> SocketsReady | None:
        """Wait for the kernel's sockets; None (and a reason) if this way did not work."""
        process, connection_file = self.process, str(getattr(self.parent, "connection_file", ""))
        try:
            ready = await wait_for_sockets(process, connection_file, info, self.launch_timeout)
        except KernelExited as exc:  # no IPC, or a crash on the keys: try the next way
            if protection is Protection.IPC or protection is not self._attempts[-1]:
                how = "on IPC sockets" if protection is Protection.IPC else "given the keys"
                reasons.append(f"{how} it exited with code {exc.exit_code}")
                return None
            await self._abandon_launch()
            raise KernelCommandError(
                f"the kernel exited (code {exc.exit_code}) before it opened its sockets",
                hint="see the kernel's own messages above in the Jupyter log; run "
                "`python -m nersc_provisioner show NAME` for the exact command",
                command=cmd,
                exit_code=exc.exit_code,
            ) from None
        except TimeoutError:
            if protection is Protection.IPC:  # a kernel that hangs on IPC sockets
                reasons.append(f"on IPC sockets it did not listen within {self.launch_timeout:g} s")
                return None
            await self._abandon_launch()
            raise LaunchTimeout(
                f"the kernel did not open its sockets within {self.launch_timeout:g} s",
                hint="raise launch_timeout, or run the kernel command by hand to see why it "
                "hangs (`python -m nersc_provisioner show NAME`)",
                command=cmd,
            ) from None
        if protection is Protection.CURVE and ready.mechanism != "CURVE":
            reasons.append(
                f"its sockets announce {ready.mechanism or 'no ZMTP 3 mechanism'}, not CurveZMQ "
                "(an ipykernel older than 7.3)"
            )
            return None
        return ready

    def _accept(
        self, km: Any, protection: Protection, info: dict[str, Any], ready: SocketsReady
    ) -> None:
        """The kernel listens: the manager and its clients get what it bound."""
        if protection is not Protection.CURVE:
            km.curve_publickey = km.curve_secretkey = None
        km.transport = info["transport"]
        km.ip = info["ip"]
        for name, port in ready.ports.items():
            setattr(km, name, port)
        self._protection = protection
        if protection is not Protection.IPC:
            self._tcp_ports = dict(ready.ports)
        self.connection_info = km.get_connection_info()
        self.log.info("nersc-local: kernel %s listens on %s", self.kernel_id, WHERE[protection])

    async def _end_attempt(self) -> None:
        """Stop the kernel's process and its session (one way tried, or a failed start)."""
        if self._session_id is not None:
            await asyncio.to_thread(reap_session, self._session_id)
            self._session_id = None
        if self.process is not None:
            await asyncio.to_thread(self.process.wait)
            self._close_pipes()
            self.process = None

    async def _start_process(self, cmd: list[str], **kwargs: Any) -> None:
        """Start the kernel, through the wrapper if the environment needs one."""
        setup = self._setup
        if setup is None or not setup.needed:
            self._popen(cmd, **kwargs)
            return

        started = time.monotonic()
        status = StatusPipe()
        try:
            self._popen(
                wrap_command(setup, cmd, str(status.write_fd)),
                pass_fds=(status.write_fd,),
                **kwargs,
            )
            status.close_write_end()
            try:
                ready = await status.wait_for(READY_MARKER, self.launch_timeout)
            except asyncio.TimeoutError:
                await self._abandon_launch()
                raise LaunchTimeout(
                    f"the environment setup did not finish within {self.launch_timeout:g} s",
                    hint="raise launch_timeout, or find the slow or hanging module/setup line "
                    "with `python -m nersc_provisioner show NAME`",
                    command=cmd,
                    stderr=status.text,
                ) from None
        finally:
            status.close()

        if not ready:
            exit_code = await self._exit_code_of_failed_wrapper()
            await self._abandon_launch()
            raise launch_error_from_exit(exit_code, status.text, cmd)

        elapsed = time.monotonic() - started
        if status.text:
            self.log.info("nersc-local: environment setup printed:\n%s", status.text)
        self.log.info(
            "nersc-local: environment ready in %.2f s (modules: %s), kernel pid %s",
            elapsed,
            " ".join(setup.modules) or "none",
            self.pid,
        )

    async def wait(self) -> int | None:
        """Wait for the kernel to exit: woken by the exit itself, not a 100 ms poll."""
        if self.hosted is not None:
            return await self.hosted.wait()
        process = self.process
        if process is None:
            return 0
        code = await wait_for_exit(process)
        self._close_pipes()
        self.process = None
        return code

    def _close_pipes(self) -> None:
        process = self.process
        if process is not None:
            for stream in (process.stdin, process.stdout, process.stderr):
                if stream is not None:
                    stream.close()

    async def _exit_code_of_failed_wrapper(self) -> int | None:
        process = self.process
        if process is None:
            return None
        try:
            return await asyncio.to_thread(process.wait, _EXIT_GRACE)
        except Exception:  # the wrapper closed its status pipe but did not exit
            return None

    async def _abandon_launch(self) -> None:
        """After a failed start: leave no process, no cached ports, no connection file."""
        await self._end_attempt()
        await self.cleanup(restart=False)
        cleanup_connection_file = getattr(self.parent, "cleanup_connection_file", None)
        if cleanup_connection_file is not None:
            cleanup_connection_file()

    async def cleanup(self, restart: bool = False) -> None:
        if self.hosted is not None:
            await self.hosted.cleanup(restart)
            return
        await super().cleanup(restart=restart)
        if not restart and self._socket_dir is not None:
            await asyncio.to_thread(remove_private_dir, self._socket_dir)
            self._socket_dir = None
        if self._session_id is not None and self.process is None:
            leftovers = await asyncio.to_thread(reap_session, self._session_id)
            if leftovers:
                self.log.info(
                    "nersc-local: ended %d leftover process(es) of the kernel's session %s",
                    len(leftovers),
                    self._session_id,
                )
            self._session_id = None
