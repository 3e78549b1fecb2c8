"""The one place that reads the process environment.

Settings may come from ``NERSC_PROVISIONER_*`` variables.  They are the
lowest layer above the built-in defaults; Jupyter config files and the
kernel.json ``config`` both override them (see docs/configuration.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from environs import Env, EnvError

from .errors import ConfigError

PREFIX = "NERSC_PROVISIONER_"

# config key -> (how environs reads it, extra keyword arguments)
_READERS: dict[str, tuple[str, dict[str, Any]]] = {
    "modules": ("list", {"delimiter": ","}),
    "purge": ("bool", {}),
    "module_init": ("str", {}),
    "module_use": ("list", {"delimiter": ":"}),
    "setup": ("list", {"delimiter": "\n"}),
    "container": ("str", {}),
    "container_runtime": ("str", {}),
    "container_args": ("list", {"delimiter": " "}),
    "cwd": ("str", {}),
    "launch_timeout": ("float", {}),
    # remote (nersc-cori, nersc-perlmutter)
    "host": ("str", {}),
    "user": ("str", {}),
    "port": ("int", {}),
    "identity_file": ("str", {}),
    "ssh_config": ("str", {}),
    "known_hosts": ("list", {"delimiter": ":"}),
    "remote_python": ("str", {}),
    "remote_cwd": ("str", {}),
    "lease_timeout": ("int", {}),
    "reconnect_grace": ("float", {}),
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
    for key, (kind, extra) in _READERS.items():
        name = env_var_name(key)
        reader: Callable[..., Any] = getattr(env, kind)
        try:
            value = reader(name, None, **extra)
        except EnvError as exc:
            raise ConfigError(
                f"environment variable {name} is invalid: {exc}",
                hint=f"fix or unset {name}",
            ) from exc
        if value is None:
            continue
        if kind == "list":
            value = [item.strip() for item in value if item.strip()]
        values[key] = value
    return values


def environment_keys() -> list[str]:
    """The config keys that can come from the environment."""
    return list(_READERS)
