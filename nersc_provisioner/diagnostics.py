"""``python -m nersc_provisioner check NAME``: diagnose a kernel spec step by step.

Each step is timed.  The first failing step stops the check and reports what
failed and how to fix it.

For a spec with a ``slurm`` section, the login is followed by: submit the job
(or attach to ``job_id``), wait for it in the queue (``queue_timeout``), ssh
into its node through the login connection, probe the Python in an ``srun``
step, and start the kernel in that job.  A job the check submitted is always
cancelled at the end, whatever happened; the user's own ``job_id`` never is.

For ``nersc-local`` with ``slurm`` (Jupyter on the login node itself) there is
no login: the Slurm commands run here and the node is reached by ssh from here,
with the settings of the provisioner's hosted kernel (``hosted.options``) doing the
resolving.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from jupyter_client.manager import AsyncKernelManager

from .errors import NERSCProvisionerError, SSHConnectError, tail
from .kernelspec import get_kernel_spec, provisioner_class
from .launchers.remote import build_probe_script
from .provisioners.argv import local_python, spec_argv
from .provisioners.hosts import node_target, slurm_runner
from .provisioners.local import NERSCLocalProvisioner
from .provisioners.remote import NERSCRemoteProvisioner
from .provisioners.remote_options import RemoteOptions
from .provisioners.workers import SSH_EXECUTOR, in_thread
from .shell import join, quote
from .slurm.allocation import (
    AllocationError,
    JobStatus,
    Runner,
    SlurmAllocation,
    script_runner,
)
from .slurm.commands import step_argv
from .transports.local import run_command
from .transports.ssh import (
    SSHLogin,
    SSHTarget,
    connect,
    connect_through,
    exec_script,
    fingerprint,
)
from .transports.ssh import usable_identity_files as _identity_files

T = TypeVar("T")

#: Seconds to let a Slurm command already under way (sbatch: 60 s) finish before cancelling.
SLURM_CALL_GRACE = 75.0


@dataclass
class Step:
    name: str
    ok: bool
    seconds: float
    detail: str


class CheckFailed(Exception):
    pass


class _Progress(logging.LoggerAdapter):  # type: ignore[type-arg]
    """The Slurm allocation's log, as progress lines: its warnings, and the queue wait."""

    def __init__(self, say: Callable[[str], None]) -> None:
        super().__init__(logging.getLogger("nersc_provisioner.check"), {})
        self.say = say
        self.waiting = False

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        text = str(msg) % args if args else str(msg)
        if level >= logging.WARNING or (self.waiting and "waited" in text):
            self.say(text)


class Checker:
    """Runs the steps for one installed kernel spec and records them."""

    def __init__(
        self,
        name: str,
        report: Callable[[Step], None],
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.name = name
        self.report = report
        self.steps: list[Step] = []
        installed = get_kernel_spec(name)
        self.installed = installed
        self.provisioner = provisioner_class(installed.provisioner)(**installed.config)
        self.login: SSHLogin | None = None
        self.target: SSHTarget | None = None
        # Slurm mode
        self.progress = _Progress(progress or (lambda text: None))
        self.allocation: SlurmAllocation | None = None
        self._slurm_call: concurrent.futures.Future[Any] | None = None
        self.job: JobStatus | None = None
        self.node = ""
        self.node_addr = ""
        self.node_login: SSHLogin | None = None
        self.job_ended = False

    async def step(self, name: str, action: Callable[[], Awaitable[str]]) -> None:
        started = time.monotonic()
        try:
            detail = await action()
        except NERSCProvisionerError as exc:
            self._record(Step(name, False, time.monotonic() - started, str(exc)))
            raise CheckFailed from exc
        except Exception as exc:
            self._record(
                Step(name, False, time.monotonic() - started, f"{type(exc).__name__}: {exc}")
            )
            raise CheckFailed from exc
        self._record(Step(name, True, time.monotonic() - started, detail))

    def _record(self, step: Step) -> None:
        self.steps.append(step)
        self.report(step)

    # --- the steps ----------------------------------------------------------------

    def _remote(self) -> RemoteOptions:
        """The settings the ssh and Slurm work follows (nersc-local's: its hosted kernel's)."""
        provisioner = self.provisioner
        if isinstance(provisioner, NERSCLocalProvisioner) and provisioner.hosted is not None:
            return provisioner.hosted.options
        if not isinstance(provisioner, NERSCRemoteProvisioner):
            raise CheckFailed("not a remote kernel spec")
        return provisioner

    @property
    def login_is_local(self) -> bool:
        """Slurm commands run here and the node is reached from here (nersc-local)."""
        return isinstance(self.provisioner, NERSCLocalProvisioner) and self.in_slurm

    @property
    def in_slurm(self) -> bool:
        provisioner = self.provisioner
        if isinstance(provisioner, NERSCLocalProvisioner):
            return provisioner.hosted is not None
        return isinstance(provisioner, NERSCRemoteProvisioner) and provisioner.in_slurm

    def _target(self) -> SSHTarget:
        if self.target is None:
            raise CheckFailed("the ssh config was not resolved")
        return self.target

    def _transport(self) -> Any:
        transport = self.login.client.get_transport() if self.login is not None else None
        if transport is None:
            raise SSHConnectError("not connected")
        return transport

    async def resolve(self) -> str:
        self.target = await in_thread(self._remote().target)
        jumps = " -> ".join(j.label for j in self.target.jumps)
        keys = ", ".join(self.target.identity_files) or "agent / default keys"
        return f"{self.target.label}" + (f" via {jumps}" if jumps else "") + f"; keys: {keys}"

    async def certificate(self) -> str:
        found = await in_thread(_identity_files, self._target().identity_files)
        return "certificates valid (or none used); keys found: " + (", ".join(found) or "none")

    async def connect(self) -> str:
        self.login = await in_thread(connect, self._target())
        key = self._transport().get_remote_server_key()
        return f"logged in; host key {key.get_name()} {fingerprint(key)} matches known_hosts"

    def _remote_probe(self) -> tuple[str, str]:
        """The Python the remote side runs, and the script that probes it there."""
        provisioner = self._remote()
        python = provisioner.remote_python or spec_argv(self.installed.spec.get("argv"))[0]
        setup = provisioner.environment_setup(env=self.installed.spec.get("env") or {})
        return python, build_probe_script(setup, python)

    async def python(self) -> str:
        provisioner = self.provisioner
        python = spec_argv(self.installed.spec.get("argv"))[0]
        if isinstance(provisioner, NERSCRemoteProvisioner):
            python, script = self._remote_probe()
            transport = self._transport()
            code, lines = await in_thread(
                lambda: exec_script(transport, script, timeout=provisioner.launch_timeout)
            )
        else:
            python = local_python(
                self.installed.spec.get("argv"), provisioner.environment_setup().needed
            )
            script = build_probe_script(provisioner.environment_setup(), python)
            result = await in_thread(
                lambda: run_command(["bash", "--noprofile", "--norc", "-c", script], check=False)
            )
            code, lines = result.returncode, (result.stdout + result.stderr).splitlines()
        return self._probe_result(code, lines, python)

    def _probe_result(self, code: int | None, lines: Sequence[str], python: str) -> str:
        """The probe's report, or the error that names why it failed."""
        found = [line for line in lines if line.startswith("NPR_PYTHON ")]
        if code != 0 or not found:
            from .launchers.wrapper import launch_error_from_exit

            others = [line for line in lines if not line.startswith("NERSC_PROVISIONER_READY")]
            error = launch_error_from_exit(code, "\n".join(others), [python])
            if code == 1:
                error.message = f"{python} cannot import ipykernel"
                error.hint = "install it: `python -m pip install ipykernel` in that environment"
            raise error
        _, executable, version, ipykernel = found[-1].split()
        modules = getattr(self.provisioner, "modules", [])
        loaded = f"modules {' '.join(modules)} loaded; " if modules else ""
        return f"{loaded}{executable}: Python {version}, ipykernel {ipykernel}"

    # --- Slurm ----------------------------------------------------------------------

    def _allocation(self) -> SlurmAllocation:
        if self.allocation is None:
            raise CheckFailed("no Slurm job")
        return self.allocation

    async def _slurm(self, func: Callable[[], T]) -> T:
        """Run a blocking Slurm call; remember it, so that the end can wait for it."""
        future = SSH_EXECUTOR.submit(func)
        self._slurm_call = future
        result: T = await asyncio.wrap_future(future)
        return result

    def _slurm_runner(self) -> Runner:
        """Slurm commands: here (nersc-local), or on the login node over the check's login."""
        if self.login_is_local:
            return slurm_runner(None)
        transport = self._transport()

        def run(script: str, timeout: float) -> tuple[int | None, list[str]]:
            return exec_script(transport, script, timeout=timeout)

        return script_runner(run)

    async def submit(self) -> str:
        options = self._remote().slurm_options()
        alloc = SlurmAllocation(options, runner=self._slurm_runner(), logger=self.progress)
        self.allocation = alloc
        job_id = await self._slurm(alloc.submit)
        if not alloc.owned:
            status = await self._slurm(alloc.status)
            return (
                f"attached to your job {job_id} ({status.state.value}); "
                "the check leaves it as it is"
            )
        return f"job {job_id} submitted: sbatch {join(options.flags())}"

    async def queue_wait(self) -> str:
        alloc = self._allocation()
        timeout = self._remote().queue_timeout
        started = time.monotonic()
        self.progress.waiting = True
        try:
            # A job the check submitted is cancelled on a timeout or a stop; the user's own
            # job_id is left as it is.
            status = await self._slurm(lambda: alloc.wait_running(timeout))
        finally:
            self.progress.waiting = False
        waited = time.monotonic() - started
        self.job = status
        self.node, self.node_addr = await self._slurm(lambda: alloc.first_node(status.nodes))
        return (
            f"job {alloc.job_id} running on {status.nodes} after {waited:.1f} s in the queue "
            f"(limit queue_timeout = {timeout:g} s)"
        )

    async def node_ssh(self) -> str:
        remote = self._remote()
        if self.login_is_local:
            # As the kernel reaches it: directly from here, with identity_file, known_hosts
            # and ssh_config (plus the system's known_hosts).
            target = await in_thread(node_target, remote, self.node_addr, None)
            self.node_login = await in_thread(connect, target)
            how = f"directly from here; keys: {', '.join(target.identity_files) or 'default'}"
        else:
            # The login node's user, keys and known_hosts (plus the system's), through the
            # login connection.
            target = node_target(remote, self.node_addr, self._target())
            if self.login is None:
                raise SSHConnectError("not connected to the login node")
            via = self.login.client
            self.node_login = await in_thread(lambda: connect_through(target, via))
            how = "through the login node"
        transport = self.node_login.client.get_transport()
        if transport is None:
            raise SSHConnectError(f"the connection to {target.label} closed at once")
        key = transport.get_remote_server_key()
        return (
            f"{self.node} ({self.node_addr}) as {target.user}, {how}; "
            f"host key {key.get_name()} {fingerprint(key)} matches known_hosts"
        )

    async def probe_in_step(self) -> str:
        remote = self._remote()
        alloc = self._allocation()
        transport = self.node_login.client.get_transport() if self.node_login else None
        if transport is None:
            raise SSHConnectError(f"not connected to {self.node}")
        python, probe = self._remote_probe()
        srun = step_argv(alloc.job_id, self.node, "check")
        # The probe goes to the step's task on srun's stdin, as a kernel's launch script does.
        script = f"printf '%s' {quote(probe)} | {join(srun)}\n"
        code, lines = await in_thread(
            lambda: exec_script(transport, script, timeout=remote.launch_timeout)
        )
        if not any(line.startswith("NPR_PYTHON ") for line in lines) and any(
            line.startswith("srun:") for line in lines
        ):
            raise AllocationError(
                f"srun could not run a step in Slurm job {alloc.job_id} on {self.node} "
                f"(exit code {code}):\n{tail(chr(10).join(lines), 5)}",
                hint="see `squeue --steps --job " + alloc.job_id + "`; the job may have ended",
            )
        detail = self._probe_result(code, lines, python)
        return f"{detail} (srun step of job {alloc.job_id} on {self.node})"

    async def end_job(self) -> str:
        alloc = self._allocation()
        self.job_ended = True
        if not await in_thread(lambda: alloc.cancel(force=True)):
            status: JobStatus = await in_thread(alloc.status)
            if status.state.terminal:  # e.g. cancelled by the queue wait's timeout
                return (
                    f"job {alloc.job_id}, submitted by this check, has ended ({status.state.value})"
                )
            raise AllocationError(
                f"could not cancel Slurm job {alloc.job_id}",
                hint=f"cancel it yourself: `scancel {alloc.job_id}`"
                + ("" if self.login_is_local else " on the login node"),
            )
        return f"job {alloc.job_id}, submitted by this check, cancelled"

    async def _finish_slurm(self) -> bool:
        """Cancel the job the check submitted, whatever happened; False if that failed."""
        alloc = self.allocation
        if alloc is None or self.job_ended:
            return True
        alloc.request_stop("the check ended")  # a wait in the queue stops (and cancels)
        call = self._slurm_call
        if call is not None and not call.done():
            # An sbatch under way: let it return its job id, so that the job is cancelled.
            await in_thread(lambda: concurrent.futures.wait([call], timeout=SLURM_CALL_GRACE))
        if not alloc.owned:
            return True
        try:
            await self.step("cancel the Slurm job", self.end_job)
        except CheckFailed:
            return False
        return True

    def finish_now(self) -> None:
        """The last resort after an interrupt: cancel our job, close the connections."""
        alloc = self.allocation
        reachable = self.login is not None or self.login_is_local  # where scancel runs
        if alloc is not None and alloc.owned and not self.job_ended and reachable:
            self.job_ended = True
            alloc.cancel(force=True)
        self._close()

    def _close(self) -> None:
        for login in (self.node_login, self.login):
            if login is not None:
                login.close()
        self.node_login = self.login = None

    async def kernel(self) -> str:
        km = AsyncKernelManager(kernel_name=self.name)
        alloc = self.allocation
        where = ""
        if alloc is not None and alloc.job_id and km.kernel_spec is not None:
            # In the job the check holds: no second queue wait; the kernel's provisioner
            # treats it as the user's own job (job_id), so it leaves the cancelling to us.
            config = km.kernel_spec.metadata["kernel_provisioner"].setdefault("config", {})
            config["slurm"] = {**config.get("slurm", {}), "job_id": alloc.job_id}
            where = f" (in Slurm job {alloc.job_id})"
        started = time.monotonic()
        await km.start_kernel()
        kc = km.client()
        kc.start_channels()
        try:
            await kc.wait_for_ready(timeout=60)
            ready = time.monotonic() - started
            t0 = time.monotonic()
            out: list[str] = []
            reply: dict[str, Any] = await kc.execute_interactive(
                "import os, socket; print(socket.gethostname(), os.getpid())",
                timeout=30,
                output_hook=lambda m: out.append(m["content"].get("text", "")),
            )
            cell = time.monotonic() - t0
        finally:
            kc.stop_channels()
            await km.shutdown_kernel()
        if reply["content"]["status"] != "ok":
            raise RuntimeError(f"the cell failed: {reply['content'].get('evalue')}")
        host_pid = "".join(out).strip()
        return (
            f"kernel_info after {ready:.2f} s; cell ran in {cell * 1000:.0f} ms on {host_pid}"
            + where
        )

    async def _steps(self) -> None:
        if isinstance(self.provisioner, NERSCRemoteProvisioner):
            await self.step("resolve ssh config", self.resolve)
            await self.step("check certificate expiry", self.certificate)
            await self.step("connect and verify host key", self.connect)
        if self.in_slurm:
            await self.step("submit", self.submit)
            await self.step("queue wait", self.queue_wait)
            await self.step("node ssh", self.node_ssh)
            await self.step("probe in a step", self.probe_in_step)
            if self.node_login is not None:
                self.node_login.close()
                self.node_login = None
            # A remote spec keeps its login connection: the job is cancelled through it.
        else:
            await self.step("python, ipykernel and modules", self.python)
            self._close()
        await self.step("start kernel and run a cell", self.kernel)

    async def run(self) -> bool:
        ok = False
        try:
            await self._steps()
            ok = True
        except CheckFailed:
            pass
        finally:
            # Also after an error or a cancellation (Ctrl-C): the job must not stay.
            if not await self._finish_slurm():
                ok = False
            self._close()
        return ok


def check(
    name: str, report: Callable[[Step], None], progress: Callable[[str], None] | None = None
) -> bool:
    """Run every step for kernel spec ``name``; True if all passed.

    ``progress`` receives lines while a step is under way (a Slurm job's queue wait).
    """
    checker = Checker(name, report, progress)
    try:
        return asyncio.run(checker.run())
    finally:
        checker.finish_now()
