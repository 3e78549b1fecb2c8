"""``python -m nersc_provisioner check NAME``: diagnose a kernel spec step by step.

Each step is timed.  The first failing step stops the check and reports what
failed and how to fix it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from jupyter_client.manager import AsyncKernelManager

from .errors import NERSCProvisionerError, SSHConnectError
from .kernelspec import get_kernel_spec, provisioner_class
from .launchers.remote import build_probe_script
from .provisioners.local import DEFAULT_KERNEL_ARGV, PYTHON_NAMES
from .provisioners.remote import NERSCRemoteProvisioner, in_thread
from .transports.local import run_command
from .transports.ssh import SSHLogin, SSHTarget, connect, exec_script, fingerprint
from .transports.ssh import usable_identity_files as _identity_files


@dataclass
class Step:
    name: str
    ok: bool
    seconds: float
    detail: str


class CheckFailed(Exception):
    pass


class Checker:
    """Runs the steps for one installed kernel spec and records them."""

    def __init__(self, name: str, report: Callable[[Step], None]) -> None:
        self.name = name
        self.report = report
        self.steps: list[Step] = []
        installed = get_kernel_spec(name)
        self.installed = installed
        self.provisioner = provisioner_class(installed.provisioner)(**installed.config)
        self.login: SSHLogin | None = None
        self.target: SSHTarget | None = None

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

    def _remote(self) -> NERSCRemoteProvisioner:
        if not isinstance(self.provisioner, NERSCRemoteProvisioner):
            raise CheckFailed("not a remote kernel spec")
        return self.provisioner

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

    async def python(self) -> str:
        provisioner = self.provisioner
        argv = list(self.installed.spec.get("argv") or DEFAULT_KERNEL_ARGV)
        python = argv[0]
        if isinstance(provisioner, NERSCRemoteProvisioner):
            python = provisioner.remote_python or python
            setup = provisioner.environment_setup(env=self.installed.spec.get("env") or {})
            script = build_probe_script(setup, python)
            transport = self._transport()
            code, lines = await in_thread(
                lambda: exec_script(transport, script, timeout=provisioner.launch_timeout)
            )
        else:
            import sys

            if python in PYTHON_NAMES and not provisioner.environment_setup().needed:
                python = sys.executable
            script = build_probe_script(provisioner.environment_setup(), python)
            result = await in_thread(
                lambda: run_command(["bash", "--noprofile", "--norc", "-c", script], check=False)
            )
            code, lines = result.returncode, (result.stdout + result.stderr).splitlines()
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
        modules = getattr(provisioner, "modules", [])
        loaded = f"modules {' '.join(modules)} loaded; " if modules else ""
        return f"{loaded}{executable}: Python {version}, ipykernel {ipykernel}"

    async def kernel(self) -> str:
        km = AsyncKernelManager(kernel_name=self.name)
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
        return f"kernel_info after {ready:.2f} s; cell ran in {cell * 1000:.0f} ms on {host_pid}"

    async def run(self) -> bool:
        remote = isinstance(self.provisioner, NERSCRemoteProvisioner)
        try:
            if remote:
                await self.step("resolve ssh config", self.resolve)
                await self.step("check certificate expiry", self.certificate)
                await self.step("connect and verify host key", self.connect)
            await self.step("python, ipykernel and modules", self.python)
            if self.login is not None:
                self.login.close()
                self.login = None
            await self.step("start kernel and run a cell", self.kernel)
        except CheckFailed:
            return False
        finally:
            if self.login is not None:
                self.login.close()
        return True


def check(name: str, report: Callable[[Step], None]) -> bool:
    """Run every step for kernel spec ``name``; True if all passed."""
    return asyncio.run(Checker(name, report).run())
