"""Settings shared by every provisioner of ours, and their layering.

Precedence, highest first:

1. kernel.json ``metadata.kernel_provisioner.config`` (constructor keyword arguments);
2. Jupyter config files (``c.NERSCLocalProvisioner.modules = [...]``);
3. ``NERSC_PROVISIONER_*`` environment variables (:mod:`nersc_provisioner.settings`);
4. the defaults declared here.

traitlets gives 1 over 2; ``__init__`` then fills each key that neither set
from the environment, so 3 beats 4.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from traitlets import Bool, CaselessStrEnum, Dict, Float, List, TraitError, Unicode, validate
from traitlets.config import LoggingConfigurable

from ..errors import ConfigError
from ..launchers.container import RUNTIMES, ContainerSpec
from ..launchers.wrapper import MODULE_INIT_CHOICES, EnvironmentSetup, build_script
from ..settings import environment_defaults
from ..slurm.commands import SLURM_KEYS, SlurmOptions

# Constructor arguments that jupyter_client itself passes; not config keys.
_FRAMEWORK_KWARGS = frozenset({"kernel_id", "kernel_spec", "parent", "config", "log"})


@dataclass(frozen=True)
class LaunchPlan:
    """What a start would run: the script (None if none is needed) and the command."""

    script: str | None
    command: list[str]


class WrapperOptions(LoggingConfigurable):
    """The module, setup and container settings of the generated wrapper."""

    provisioner_name: ClassVar[str] = ""

    modules = List(Unicode(), help="Modules to `module load`, in order.").tag(config=True)
    purge = Bool(help="Run `module purge` before loading modules.").tag(config=True)
    module_init = Unicode(
        "auto",
        help="How to make `module` exist: auto (detect Lmod, then Environment Modules), "
        "lmod, environment-modules, none, or the path of an init script to source.",
    ).tag(config=True)
    module_use = List(
        Unicode(),
        help="Directories to `module use` before loading, e.g. /global/common/software/m1234/"
        "modulefiles (absolute paths: `~` is not expanded).",
    ).tag(config=True)
    setup = List(
        Unicode(),
        help="Extra shell lines run before the kernel, e.g. `conda activate myenv`. "
        "Each line runs on its own; a failing line fails the start.",
    ).tag(config=True)
    container = Unicode(help="Container image to run the kernel in ('' for none).").tag(config=True)
    container_runtime = Unicode("shifter", help="shifter or podman-hpc.").tag(config=True)
    container_args = List(Unicode(), help="Extra arguments for the container runtime.").tag(
        config=True
    )
    cwd = Unicode(help="Directory the kernel starts in ('' to keep Jupyter's choice).").tag(
        config=True
    )
    launch_timeout = Float(
        60.0,
        help="Seconds allowed for the environment setup (modules, setup lines) to finish, "
        "and again for the kernel to open its sockets.",
    ).tag(config=True)

    slurm = Dict(
        help="Run the kernel as a step of a Slurm job on a compute node. Keys: "
        + ", ".join(SLURM_KEYS)
        + ". Empty: no Slurm. See docs/compute-nodes.md."
    ).tag(config=True)
    queue_timeout = Float(
        900.0,
        help="Seconds the Slurm job may wait in the queue before it is cancelled "
        "(separate from launch_timeout).",
    ).tag(config=True)

    transport_encryption = CaselessStrEnum(
        ["auto", "required", "disabled"],
        "auto",
        help="Keep other users of the node out of the kernel's ZeroMQ sockets. Remote: "
        "CurveZMQ; auto (on when the remote ipykernel supports it, else a warning), "
        "required (refuse a kernel without it), disabled. nersc-local: CurveZMQ, else IPC "
        "sockets in a 0700 directory; auto warns and required refuses when neither works.",
    ).tag(config=True)

    @validate("slurm")
    def _check_slurm(self, proposal: dict[str, Any]) -> dict[str, Any]:
        value = proposal["value"]
        try:
            SlurmOptions.from_config(value)
        except ConfigError as exc:
            raise TraitError(exc.message + (f" ({exc.hint})" if exc.hint else "")) from None
        return dict(value)

    @validate("queue_timeout")
    def _check_queue_timeout(self, proposal: dict[str, Any]) -> float:
        value = float(proposal["value"])
        if value <= 0:
            raise TraitError(f"queue_timeout must be a positive number of seconds, not {value}")
        return value

    def slurm_options(self) -> SlurmOptions:
        """The ``slurm`` section, checked (empty: no Slurm)."""
        return SlurmOptions.from_config(self.slurm)

    @validate("module_init")
    def _check_module_init(self, proposal: dict[str, Any]) -> str:
        value = str(proposal["value"])
        if value not in MODULE_INIT_CHOICES and not os.path.isabs(value):
            raise TraitError(
                f"module_init must be one of {', '.join(MODULE_INIT_CHOICES)} or an absolute path, "
                f"not {value!r}"
            )
        return value

    @validate("container_runtime")
    def _check_runtime(self, proposal: dict[str, Any]) -> str:
        value = str(proposal["value"])
        if value not in RUNTIMES:
            raise TraitError(
                f"container_runtime must be one of {', '.join(RUNTIMES)}, not {value!r}"
            )
        return value

    @validate("launch_timeout")
    def _check_timeout(self, proposal: dict[str, Any]) -> float:
        value = float(proposal["value"])
        if value <= 0:
            raise TraitError(f"launch_timeout must be a positive number of seconds, not {value}")
        return value

    def __init__(self, **kwargs: Any) -> None:
        self.check_config_keys(kwargs)
        try:
            super().__init__(**kwargs)
            # The environment layer: a key that neither kernel.json nor a
            # Jupyter config file set takes its NERSC_PROVISIONER_* value.
            explicit = set(kwargs)
            for cls in type(self).mro():
                if cls.__name__ in self.config:
                    explicit |= set(self.config[cls.__name__])
            for key, value in environment_defaults().items():
                if key in self.config_keys() and key not in explicit:
                    setattr(self, key, value)
            # Validate every setting now (defaults included), so that a bad value
            # from any layer fails here, with its key named, not mid-launch.
            for key in self.config_keys():
                setattr(self, key, getattr(self, key))
        except TraitError as exc:
            raise ConfigError(
                f"invalid {self.provisioner_name or type(self).__name__} setting: {exc}",
                hint="fix the value in kernel.json (metadata.kernel_provisioner.config), "
                "your Jupyter config, or the NERSC_PROVISIONER_* environment",
            ) from exc
        # Values that cannot be carried to a shell (NUL bytes, a bad image) fail here too.
        build_script(self.environment_setup())

    @classmethod
    def config_keys(cls) -> list[str]:
        """Every key accepted in kernel.json ``config``."""
        return sorted(cls.class_trait_names(config=True))

    @classmethod
    def check_config_keys(cls, config: Mapping[str, Any]) -> None:
        """Raise :class:`ConfigError` naming any key that is not a setting."""
        unknown = sorted(set(config) - _FRAMEWORK_KWARGS - set(cls.config_keys()))
        if unknown:
            name = cls.provisioner_name or cls.__name__
            raise ConfigError(
                f"unknown key(s) in the {name} config: {', '.join(map(repr, unknown))}",
                hint=f"valid keys are: {', '.join(cls.config_keys())}",
            )

    def launch_plan(self) -> LaunchPlan:
        """What a start would run, without running it (``show``); each provisioner says."""
        raise NotImplementedError

    def environment_setup(
        self, *, env: Mapping[str, str] | None = None, mounts: tuple[str, ...] = ()
    ) -> EnvironmentSetup:
        """The wrapper settings, as the launcher takes them."""
        container = None
        if self.container:
            container = ContainerSpec(
                image=self.container,
                runtime=self.container_runtime,
                args=tuple(self.container_args),
                mounts=mounts,
            )
        return EnvironmentSetup.create(
            modules=self.modules,
            purge=self.purge,
            module_init=self.module_init,
            module_use=self.module_use,
            setup=self.setup,
            cwd=self.cwd,
            env=env,
            container=container,
        )
