"""The settings of a remote kernel (``nersc-cori``, ``nersc-perlmutter``, and the
Slurm step of ``nersc-local``), and what they resolve to: the SSH target, the
remote argv and setup, the launch plan ``show`` prints.  No I/O but reading
~/.ssh/config in :meth:`RemoteOptions.target`.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any, ClassVar

from traitlets import TraitError, default, validate

from ..errors import ConfigError
from ..launchers.remote import PORT_NAMES, RemoteLaunch, build_launch_script
from ..launchers.step import build_step_script
from ..launchers.wrapper import EnvironmentSetup
from ..shell import join
from ..slurm.commands import holder_argv, step_argv
from ..systems import System
from ..transports.ssh import SSHTarget, resolve_target
from .argv import remote_argv
from .options import (
    LaunchPlan,
    WrapperOptions,
    choice_trait,
    float_trait,
    int_trait,
    list_trait,
    str_trait,
)

#: A host name, an IPv4 address or an ssh config alias: no user@, :port, %-tokens.
_HOST = re.compile(r"[A-Za-z0-9._-]+\Z")


class RemoteOptions(WrapperOptions):
    """The remote settings, on top of the wrapper's (modules, setup, container, slurm)."""

    system: ClassVar[System] = System(name="remote", host="")
    #: True when Jupyter itself runs on the login node (``nersc-local`` with ``slurm``):
    #: Slurm commands run here, and the job's node is reached by ssh from here.
    login_is_local: ClassVar[bool] = False

    # Declared in settings_registry.py (kind, default, help).
    host = str_trait("host")
    user = str_trait("user")
    port = int_trait("port")
    identity_file = str_trait("identity_file")
    ssh_config = str_trait("ssh_config")
    known_hosts = list_trait("known_hosts")
    remote_python = str_trait("remote_python")
    remote_cwd = str_trait("remote_cwd")
    lease_timeout = int_trait("lease_timeout")
    reconnect_grace = float_trait("reconnect_grace")
    connection_persist = float_trait("connection_persist")
    data_path = choice_trait("data_path")

    @default("host")
    def _default_host(self) -> str:
        return self.system.host

    @validate("host")
    def _check_host(self, proposal: dict[str, Any]) -> str:
        value = str(proposal["value"])
        if not value or value.startswith("-") or not _HOST.match(value):
            raise TraitError(
                f"host must be a host name, an address or an ssh config alias, not {value!r} "
                "(give the user and port as `user` and `port`)"
            )
        return value

    @validate("connection_persist")
    def _check_persist(self, proposal: dict[str, Any]) -> float:
        value = float(proposal["value"])
        if value < 0:
            raise TraitError(f"connection_persist must be 0 or more seconds, not {value:g}")
        return value

    @validate("lease_timeout")
    def _check_lease(self, proposal: dict[str, Any]) -> int:
        value = int(proposal["value"])
        if value < 15:
            raise TraitError(f"lease_timeout must be at least 15 seconds, not {value}")
        return value

    def check_direct_encryption(self) -> None:
        """data_path direct needs CurveZMQ: refuse ``transport_encryption: disabled``."""
        if self.direct and self.transport_encryption == "disabled":
            raise ConfigError(
                "data_path 'direct' puts the kernel's ports on the network, so it needs "
                "CurveZMQ, but transport_encryption is 'disabled'",
                hint="set transport_encryption to auto or required, or data_path to tunnel",
            )

    def spec(self) -> Any:
        """The kernel spec (a trait of the provisioner this is mixed into)."""
        return getattr(self, "kernel_spec", None)

    def target(self) -> SSHTarget:
        """The SSH target these settings resolve to (reads ~/.ssh/config)."""
        return resolve_target(
            self.host,
            user=self.user,
            port=self.port,
            identity_file=self.identity_file,
            ssh_config=self.ssh_config or None,
            known_hosts=self.known_hosts,
            fallback_identity_file=self.system.identity_file,
        )

    @property
    def direct(self) -> bool:
        return str(self.data_path) == "direct"

    @property
    def in_slurm(self) -> bool:
        return bool(self.slurm)

    def kernel_argv(self) -> list[str]:
        """The kernel argv for the remote side: jupyter_client's python swap not applied."""
        spec = self.spec()
        return remote_argv(spec.argv if spec is not None else None, self.remote_python)

    def remote_setup(self) -> EnvironmentSetup:
        spec = self.spec()
        env = dict(spec.env) if spec is not None else {}
        setup = self.environment_setup(env=env)
        if self.remote_cwd:
            setup = replace(setup, cwd=self.remote_cwd)
        return setup

    def launch_plan(self) -> LaunchPlan:
        """The launch script (with a placeholder key) and how it runs (for ``show``)."""
        placeholder = {**dict.fromkeys(PORT_NAMES, 0), "ip": "127.0.0.1", "key": "<key>"}
        script = build_launch_script(
            RemoteLaunch(
                kernel_id="KERNEL_ID",
                argv=tuple(self.kernel_argv()),
                connection=placeholder,
                setup=self.remote_setup(),
                lease_timeout=self.lease_timeout,
                foreground=self.in_slurm,
            )
        )
        if self.in_slurm:
            options = self.slurm_options()
            login = "this machine" if self.login_is_local else self.host
            first = (
                f"# 1. attach to your Slurm job {options.job_id}"
                if options.job_id
                else f"# 1. on {login}: {join(holder_argv(options))}"
            )
            how = (
                "directly from here"
                if self.login_is_local
                else f"through the connection to {self.host}"
            )
            srun = step_argv(options.job_id or "0", "NODE", "KERNEL_ID")
            step = build_step_script(script, srun_argv=srun, kernel_id="KERNEL_ID")
            script = "\n".join(
                [
                    first,
                    "# 2. wait for it to run (queue_timeout), then ssh to its first node NODE",
                    f"#    {how}, and run there (on the stdin of one SSH exec):",
                    step if options.job_id else step.replace("--jobid=0", "--jobid=JOB"),
                ]
            )
            return LaunchPlan(
                script=script,
                command=["ssh NODE", "bash", "--noprofile", "--norc", "-s"],
            )
        return LaunchPlan(
            script=script,
            command=[f"ssh {self.host}", "bash", "--noprofile", "--norc", "-s"],
        )


class LoginNodeSlurmOptions(RemoteOptions):
    """The settings of ``nersc-local`` with ``slurm``, as its hosted kernel reads them:
    Jupyter runs on the login node itself, so ``sbatch``/``squeue``/``scancel`` run
    here and the job's node is reached by ssh from here."""

    provisioner_name = "nersc-local"
    login_is_local = True

    def __init__(self, kernel_spec: Any = None, **kwargs: Any) -> None:
        self._kernel_spec = kernel_spec
        super().__init__(**kwargs)

    @default("host")
    def _default_host(self) -> str:
        return "localhost"  # not contacted: Slurm commands run locally

    def spec(self) -> Any:
        return self._kernel_spec
