"""Settings shared by every provisioner of ours, and their layering.

Precedence, highest first:

1. kernel.json ``metadata.kernel_provisioner.config`` (constructor keyword arguments);
2. Jupyter config files (``c.NERSCLocalProvisioner.modules = [...]``);
3. ``NERSC_PROVISIONER_*`` environment variables (:mod:`nersc_provisioner.settings`);
4. the defaults declared here.

traitlets gives 1 over 2 over the ``@default`` handlers; the ``@default``
handlers give 3 over 4.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, ClassVar

from traitlets import Bool, Float, List, TraitError, Unicode, default, validate
from traitlets.config import LoggingConfigurable

from ..errors import ConfigError
from ..launchers.container import RUNTIMES, ContainerSpec
from ..launchers.wrapper import MODULE_INIT_CHOICES, EnvironmentSetup, build_script
from ..settings import environment_defaults

# Constructor arguments that jupyter_client itself passes; not config keys.
_FRAMEWORK_KWARGS = frozenset({"kernel_id", "kernel_spec", "parent", "config", "log"})


def _env_default(key: str, fallback: Any) -> Any:
    return environment_defaults().get(key, fallback)


class WrapperOptions(LoggingConfigurable):
    """The module, setup and container settings of the generated wrapper."""

    provisioner_name: ClassVar[str] = ""

    modules = List(Unicode(), help="Modules to `module load`, in order.").tag(config=True)
    purge = Bool(help="Run `module purge` before loading modules.").tag(config=True)
    module_init = Unicode(
        help="How to make `module` exist: auto (detect Lmod, then Environment Modules), "
        "lmod, environment-modules, none, or the path of an init script to source."
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
    container_runtime = Unicode(help="shifter or podman-hpc.").tag(config=True)
    container_args = List(Unicode(), help="Extra arguments for the container runtime.").tag(
        config=True
    )
    cwd = Unicode(help="Directory the kernel starts in ('' to keep Jupyter's choice).").tag(
        config=True
    )
    launch_timeout = Float(
        help="Seconds allowed for the environment setup (modules, setup lines) to finish."
    ).tag(config=True)

    @default("modules")
    def _default_modules(self) -> list[str]:
        return list(_env_default("modules", []))

    @default("purge")
    def _default_purge(self) -> bool:
        return bool(_env_default("purge", False))

    @default("module_init")
    def _default_module_init(self) -> str:
        return str(_env_default("module_init", "auto"))

    @default("module_use")
    def _default_module_use(self) -> list[str]:
        return list(_env_default("module_use", []))

    @default("setup")
    def _default_setup(self) -> list[str]:
        return list(_env_default("setup", []))

    @default("container")
    def _default_container(self) -> str:
        return str(_env_default("container", ""))

    @default("container_runtime")
    def _default_container_runtime(self) -> str:
        return str(_env_default("container_runtime", "shifter"))

    @default("container_args")
    def _default_container_args(self) -> list[str]:
        return list(_env_default("container_args", []))

    @default("cwd")
    def _default_cwd(self) -> str:
        return str(_env_default("cwd", ""))

    @default("launch_timeout")
    def _default_launch_timeout(self) -> float:
        return float(_env_default("launch_timeout", 60.0))

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
            # Resolve and validate every setting now (defaults from the
            # environment included), so that a bad value from any layer fails
            # here, with its key named, and not in the middle of a launch.
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
