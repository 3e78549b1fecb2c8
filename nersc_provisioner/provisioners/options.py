"""Settings shared by every provisioner of ours, and their layering.

Precedence, highest first:

1. kernel.json ``metadata.kernel_provisioner.config`` (constructor keyword arguments);
2. Jupyter config files (``c.NERSCLocalProvisioner.modules = [...]``);
3. ``NERSC_PROVISIONER_*`` environment variables (:mod:`nersc_provisioner.settings`);
4. the defaults the registry declares (:mod:`nersc_provisioner.settings_registry`).

traitlets gives 1 over 2; ``__init__`` then fills each key that neither set
from the environment, so 3 beats 4.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from traitlets import Bool, CaselessStrEnum, Dict, Float, Int, List, TraitError, Unicode, validate
from traitlets.config import LoggingConfigurable

from ..errors import ConfigError
from ..launchers.container import RUNTIMES, ContainerSpec
from ..launchers.wrapper import MODULE_INIT_CHOICES, EnvironmentSetup, build_script
from ..settings import environment_defaults
from ..settings_registry import Kind, Setting, setting
from ..slurm.commands import SlurmOptions

# Constructor arguments that jupyter_client itself passes; not config keys.
_FRAMEWORK_KWARGS = frozenset({"kernel_id", "kernel_spec", "parent", "config", "log"})


# The traits of the settings, made from the registry (settings_registry.py), which holds
# each one's kind, default and help. One function per kind, so that mypy knows each
# trait's type; each checks that the registry gives the setting that kind.


def _declared(name: str, kind: Kind) -> Setting:
    declared = setting(name)
    if declared.kind != kind:
        raise TypeError(f"setting {name!r} is a {declared.kind} in the registry, not a {kind}")
    return declared


def _help(declared: Setting, node: bool) -> str:
    """The help; ``node``: as on nersc-local, where the setting is for the job's node."""
    return declared.node_help if node and declared.node_help else declared.help


def str_trait(name: str, *, node: bool = False) -> Unicode[str, str | bytes]:
    declared = _declared(name, "str")
    default = declared.default if isinstance(declared.default, str) else ""
    return Unicode(default, help=_help(declared, node)).tag(config=True)


def list_trait(name: str, *, node: bool = False) -> List[str]:
    declared = _declared(name, "list")
    return List(Unicode(), help=_help(declared, node)).tag(config=True)


def bool_trait(name: str) -> Bool[bool, bool | int]:
    declared = _declared(name, "bool")
    return Bool(declared.default is True, help=declared.help).tag(config=True)


def int_trait(name: str) -> Int[int, int]:
    declared = _declared(name, "int")
    default = declared.default if isinstance(declared.default, int) else 0
    return Int(default, help=declared.help).tag(config=True)


def float_trait(name: str) -> Float[float, int | float]:
    declared = _declared(name, "float")
    default = float(declared.default) if isinstance(declared.default, int | float) else 0.0
    return Float(default, help=declared.help).tag(config=True)


def choice_trait(name: str) -> CaselessStrEnum[Any]:
    declared = _declared(name, "choice")
    default = declared.default if isinstance(declared.default, str) else declared.choices[0]
    return CaselessStrEnum(list(declared.choices), default, help=declared.help).tag(config=True)


def mapping_trait(name: str) -> Dict[str, Any]:
    declared = _declared(name, "mapping")
    return Dict(help=declared.help).tag(config=True)


@dataclass(frozen=True)
class LaunchPlan:
    """What a start would run: the script (None if none is needed) and the command."""

    script: str | None
    command: list[str]


class WrapperOptions(LoggingConfigurable):
    """The module, setup and container settings of the generated wrapper."""

    provisioner_name: ClassVar[str] = ""

    # Declared in settings_registry.py (kind, default, help); the checks with their
    # own messages are the @validate methods below.
    modules = list_trait("modules")
    module_use = list_trait("module_use")
    purge = bool_trait("purge")
    module_init = str_trait("module_init")
    setup = list_trait("setup")
    container = str_trait("container")
    container_runtime = str_trait("container_runtime")
    container_args = list_trait("container_args")
    cwd = str_trait("cwd")
    launch_timeout = float_trait("launch_timeout")
    slurm = mapping_trait("slurm")
    queue_timeout = float_trait("queue_timeout")
    transport_encryption = choice_trait("transport_encryption")

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
