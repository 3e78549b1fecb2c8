"""``nersc-local``: a kernel on this machine, through the generated module wrapper."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.launcher import launch_kernel
from jupyter_client.provisioning.local_provisioner import LocalProvisioner
from traitlets import List, Unicode

from ..errors import LaunchTimeout
from ..launchers.wrapper import (
    READY_MARKER,
    EnvironmentSetup,
    build_script,
    launch_error_from_exit,
    wrap_command,
)
from ..transports.local import StatusPipe, reap_session, wait_for_exit
from .options import LaunchPlan, WrapperOptions

#: The kernel argv used when kernel.json has none.
DEFAULT_KERNEL_ARGV = ("python", "-m", "ipykernel_launcher", "-f", "{connection_file}")

#: argv[0] values that jupyter_client replaces with its own ``sys.executable``.
PYTHON_NAMES = frozenset(
    {"python", f"python{sys.version_info[0]}", "python{}.{}".format(*sys.version_info[:2])}
)

# How long a wrapper that reported failure may take to exit before it is killed.
_EXIT_GRACE = 5.0


def target_argv(spec_argv: Sequence[str], formatted: Sequence[str], wrapped: bool) -> list[str]:
    """The kernel argv to run.

    jupyter_client swaps a bare ``python`` for its own interpreter.  Through a
    wrapper (modules, setup lines, a container) the user means the ``python``
    that the environment provides, so the swap is undone there.
    """
    argv = list(formatted)
    if wrapped and spec_argv and argv and spec_argv[0] in PYTHON_NAMES:
        argv[0] = spec_argv[0]
    return argv


class NERSCLocalProvisioner(WrapperOptions, LocalProvisioner):  # type: ignore[misc,metaclass]
    """Start a kernel on this machine, after ``module load``, setup lines, or in a container.

    Without any of those settings it behaves exactly like jupyter_client's
    ``local-provisioner``.
    """

    provisioner_name = "nersc-local"

    # Used only with `slurm`: the ssh from this (login) node into the job's node.
    identity_file = Unicode(
        help="With slurm: the key for the ssh into the job's node ('' : ~/.ssh/config, "
        "else ssh's default keys)."
    ).tag(config=True)
    known_hosts = List(
        Unicode(),
        help="With slurm: known_hosts files for the job's nodes (default ~/.ssh/known_hosts; "
        "/etc/ssh/ssh_known_hosts is always read).",
    ).tag(config=True)
    ssh_config = Unicode(
        "~/.ssh/config", help="With slurm: ssh config file to honour for the job's nodes."
    ).tag(config=True)

    _setup: EnvironmentSetup | None = None
    #: With ``slurm``, the kernel runs in a job step; this does the work.
    _in_job: Any = None

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if self.slurm:
            from .remote import NERSCLoginNodeSlurm  # here: remote.py imports this module

            settings = {key: getattr(self, key) for key in self.config_keys()}
            self._in_job = NERSCLoginNodeSlurm(
                kernel_id=kwargs.get("kernel_id"),
                kernel_spec=kwargs.get("kernel_spec"),
                parent=kwargs.get("parent"),
                **settings,
            )

    # --- with slurm: everything goes to the job-step provisioner ---------------------

    @property
    def has_process(self) -> bool:
        if self._in_job is not None:
            return bool(self._in_job.has_process)
        return bool(super().has_process)

    async def poll(self) -> int | None:
        if self._in_job is not None:
            return await self._in_job.poll()  # type: ignore[no-any-return]
        return await super().poll()

    async def send_signal(self, signum: int) -> None:
        if self._in_job is not None:
            return await self._in_job.send_signal(signum)  # type: ignore[no-any-return]
        return await super().send_signal(signum)

    async def kill(self, restart: bool = False) -> None:
        if self._in_job is not None:
            return await self._in_job.kill(restart)  # type: ignore[no-any-return]
        return await super().kill(restart)

    async def terminate(self, restart: bool = False) -> None:
        if self._in_job is not None:
            return await self._in_job.terminate(restart)  # type: ignore[no-any-return]
        return await super().terminate(restart)

    async def shutdown_requested(self, restart: bool = False) -> None:
        if self._in_job is not None:
            return await self._in_job.shutdown_requested(restart)  # type: ignore[no-any-return]
        return await super().shutdown_requested(restart)

    def get_shutdown_wait_time(self, recommended: float = 5.0) -> float:
        if self._in_job is not None:
            return float(self._in_job.get_shutdown_wait_time(recommended))
        return float(super().get_shutdown_wait_time(recommended))

    async def get_provisioner_info(self) -> dict[str, Any]:
        if self._in_job is not None:
            return await self._in_job.get_provisioner_info()  # type: ignore[no-any-return]
        return await super().get_provisioner_info()

    async def load_provisioner_info(self, provisioner_info: dict[str, Any]) -> None:
        if self._in_job is not None:
            await self._in_job.load_provisioner_info(provisioner_info)
            self.connection_info = self._in_job.connection_info
            return
        await super().load_provisioner_info(provisioner_info)

    _session_id: int | None = None
    _launch_cwd: str | None = None

    def _mounts(self) -> tuple[str, ...]:
        mounts = []
        connection_file = getattr(self.parent, "connection_file", "")
        if connection_file:
            mounts.append(os.path.dirname(os.path.realpath(connection_file)))
        if self.cwd:
            mounts.append(self.cwd)
        return tuple(mounts)

    def launch_plan(self) -> LaunchPlan:
        """The wrapper and command a start would run, without running it (for ``show``)."""
        if self._in_job is not None:
            return self._in_job.launch_plan()  # type: ignore[no-any-return]
        setup = self.environment_setup(mounts=self._mounts())
        spec_argv = list(self.kernel_spec.argv) if self.kernel_spec is not None else []
        spec_argv = spec_argv or list(DEFAULT_KERNEL_ARGV)
        formatted = list(spec_argv)
        if formatted[0] in PYTHON_NAMES:
            formatted[0] = sys.executable  # what jupyter_client does before we see the argv
        kernel_cmd = target_argv(spec_argv, formatted, setup.needed)
        if not setup.needed:
            return LaunchPlan(script=None, command=list(kernel_cmd))
        return LaunchPlan(
            script=build_script(setup),
            command=wrap_command(setup, kernel_cmd, "<status-fd>"),
        )

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        if self._in_job is not None:
            kwargs = await self._in_job.pre_launch(**kwargs)
            self.connection_info = self._in_job.connection_info
            return kwargs
        if self.kernel_spec is not None and not self.kernel_spec.argv:
            self.kernel_spec.argv = list(DEFAULT_KERNEL_ARGV)
        kwargs = await super().pre_launch(**kwargs)
        self._setup = self.environment_setup(mounts=self._mounts())
        spec_argv = list(self.kernel_spec.argv) if self.kernel_spec is not None else []
        kwargs["cmd"] = target_argv(spec_argv, kwargs["cmd"], self._setup.needed)
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
        if self._in_job is not None:
            info = await self._in_job.launch_kernel(cmd, **kwargs)
            self.connection_info = info
            return info  # type: ignore[no-any-return]
        setup = self._setup
        if setup is None or not setup.needed:
            self._popen(cmd, **kwargs)
            return self.connection_info

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
        return self.connection_info

    async def wait(self) -> int | None:
        """Wait for the kernel to exit: woken by the exit itself, not a 100 ms poll."""
        if self._in_job is not None:
            return await self._in_job.wait()  # type: ignore[no-any-return]
        process = self.process
        if process is None:
            return 0
        code = await wait_for_exit(process)
        for stream in (process.stdin, process.stdout, process.stderr):
            if stream is not None:
                stream.close()
        self.process = None
        return code

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
        if self._session_id is not None:
            await asyncio.to_thread(reap_session, self._session_id)
            self._session_id = None
        if self.process is not None:
            await asyncio.to_thread(self.process.wait)
            self.process = None
        await self.cleanup(restart=False)
        cleanup_connection_file = getattr(self.parent, "cleanup_connection_file", None)
        if cleanup_connection_file is not None:
            cleanup_connection_file()

    async def cleanup(self, restart: bool = False) -> None:
        if self._in_job is not None:
            await self._in_job.cleanup(restart=restart)
            return
        await super().cleanup(restart=restart)
        if self._session_id is not None and self.process is None:
            leftovers = await asyncio.to_thread(reap_session, self._session_id)
            if leftovers:
                self.log.info(
                    "nersc-local: ended %d leftover process(es) of the kernel's session %s",
                    len(leftovers),
                    self._session_id,
                )
            self._session_id = None
