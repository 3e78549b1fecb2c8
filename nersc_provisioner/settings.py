"""The one place that reads the process environment.

Settings may come from ``NERSC_PROVISIONER_*`` variables.  They are the
lowest layer above the built-in defaults; Jupyter config files and the
kernel.json ``config`` both override them (see docs/configuration.md).
Which settings have a variable, and how a list is split, is declared in
:mod:`nersc_provisioner.settings_registry`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from environs import Env, EnvError

from .errors import ConfigError
from .settings_registry import SETTINGS, Kind

PREFIX = "NERSC_PROVISIONER_"

#: The environs reader of each kind of setting that a variable can carry.
_READERS: dict[Kind, str] = {
    "str": "str",
    "bool": "bool",
    "int": "int",
    "float": "float",
    "list": "list",
}


def env_var_name(key: str) -> str:
    """The environment variable that carries config ``key``."""
    return PREFIX + key.upper()


def environment_defaults() -> dict[str, Any]:
    """Every setting given through the environment, keyed by config key.

    Variables that are not set are left out, so the caller keeps its default.
    """
    env = Env(expand_vars=False)
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        if not setting.environment:
            continue
        name = env_var_name(setting.name)
        reader: Callable[..., Any] = getattr(env, _READERS[setting.kind])
        extra = {"delimiter": setting.delimiter} if setting.kind == "list" else {}
        try:
            value = reader(name, None, **extra)
        except EnvError as exc:
            raise ConfigError(
                f"environment variable {name} is invalid: {exc}",
                hint=f"fix or unset {name}",
            ) from exc
        if value is None:
            continue
        if setting.kind == "list":
            value = [item.strip() for item in value if item.strip()]
        values[setting.name] = value
    return values


def environment_keys() -> list[str]:
    """The config keys that can come from the environment."""
    return [setting.name for setting in SETTINGS if setting.environment]
