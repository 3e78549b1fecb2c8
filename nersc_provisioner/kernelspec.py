"""Kernel specs: build, install, list, inspect and remove them.

The CLI is a thin layer over these functions; other tools import them.
"""

from __future__ import annotations

import errno
import json
import re
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jupyter_client.kernelspec import KernelSpec, KernelSpecManager, NoSuchKernel

from .errors import ConfigError, KernelSpecError, UnsafeValueError
from .launchers.wrapper import build_module_probe, parse_module_probe
from .provisioners import DEFAULT_KERNEL_ARGV, PROVISIONERS, LaunchPlan, WrapperOptions
from .shell import check_env_name
from .transports.local import run_command

_KERNEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")


def check_kernel_name(name: str) -> str:
    """Return ``name`` if jupyter_client accepts it as a kernel directory name."""
    if not isinstance(name, str) or not _KERNEL_NAME.match(name):
        raise UnsafeValueError(
            f"invalid kernel name {name!r}",
            hint="use letters, digits, '.', '_' and '-' only, starting with a letter or digit",
        )
    if name != name.lower():
        raise UnsafeValueError(
            f"invalid kernel name {name!r}: jupyter_client stores kernel names in lower case",
            hint=f"use {name.lower()!r}",
        )
    return name


def provisioner_class(provisioner: str) -> type[WrapperOptions]:
    """The class registered as ``provisioner``."""
    try:
        return PROVISIONERS[provisioner]
    except KeyError:
        raise ConfigError(
            f"unknown provisioner {provisioner!r}",
            hint=f"use one of: {', '.join(sorted(PROVISIONERS))}",
        ) from None


def build_kernel_spec(
    provisioner: str = "nersc-local",
    *,
    config: Mapping[str, Any] | None = None,
    display_name: str | None = None,
    argv: Sequence[str] | None = None,
    env: Mapping[str, str] | None = None,
    language: str = "python",
) -> dict[str, Any]:
    """A kernel.json dict that names ``provisioner`` with ``config``.

    Every config key and value is validated the way the provisioner will
    validate it at launch, so a spec that builds is a spec that loads.
    Settings left empty are left out, so the file reads at a glance.
    """
    cls = provisioner_class(provisioner)
    settings = {key: value for key, value in (config or {}).items() if value not in (None, "", [])}
    cls.check_config_keys(settings)
    cls(**settings)  # raises ConfigError naming a bad value
    kernel_argv = list(argv) if argv else list(DEFAULT_KERNEL_ARGV)
    if not any("{connection_file}" in arg for arg in kernel_argv):
        raise ConfigError(
            f"the kernel argv {kernel_argv} has no {{connection_file}} placeholder",
            hint="add '-f {connection_file}' so the kernel can find its connection file",
        )
    for name in env or {}:
        check_env_name(name)
    spec: dict[str, Any] = {
        "argv": kernel_argv,
        "display_name": display_name or f"Python ({provisioner})",
        "language": language,
    }
    if env:
        spec["env"] = dict(env)
    spec["metadata"] = {"kernel_provisioner": {"provisioner_name": provisioner, "config": settings}}
    return spec


def install_kernel_spec(
    spec: Mapping[str, Any],
    name: str,
    *,
    user: bool = False,
    prefix: str | None = None,
    sys_prefix: bool = False,
) -> str:
    """Write ``spec`` as kernel ``name``; return the directory it was installed in."""
    check_kernel_name(name)
    if user and (prefix or sys_prefix):
        raise KernelSpecError(
            "--user cannot be combined with --prefix or --sys-prefix", hint="choose one"
        )
    if sys_prefix:
        prefix = sys.prefix
    _refuse_to_replace_foreign(name)
    with tempfile.TemporaryDirectory() as staging:
        Path(staging, "kernel.json").write_text(json.dumps(spec, indent=2) + "\n")
        try:
            return str(
                KernelSpecManager().install_kernel_spec(
                    staging, kernel_name=name, user=user, prefix=prefix
                )
            )
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise KernelSpecError(
                    f"permission denied writing kernel spec {name!r}: {exc}",
                    hint="perhaps you want --user (your own kernels directory) "
                    "or --sys-prefix (the current environment)?",
                ) from exc
            raise KernelSpecError(
                f"cannot write kernel spec {name!r}: {exc}",
                hint="check that the --prefix directory exists and is writable",
            ) from exc


def _refuse_to_replace_foreign(name: str) -> None:
    """Installing over a kernel spec that is not ours would destroy someone's kernel."""
    try:
        existing = KernelSpecManager().get_kernel_spec(name)
    except NoSuchKernel:
        return
    stanza = existing.metadata.get("kernel_provisioner", {})
    if stanza.get("provisioner_name") not in PROVISIONERS:
        raise KernelSpecError(
            f"a kernel spec named {name!r} already exists in {existing.resource_dir} "
            "and does not use nersc_provisioner",
            hint="choose another --name, or remove it first with `jupyter kernelspec remove`",
        )


@dataclass(frozen=True)
class InstalledSpec:
    """An installed kernel spec that uses one of our provisioners."""

    name: str
    resource_dir: str
    provisioner: str
    config: dict[str, Any]
    spec: dict[str, Any]


def list_kernel_specs() -> list[InstalledSpec]:
    """Installed kernel specs that name one of our provisioners, sorted by name."""
    found = []
    for name, entry in sorted(KernelSpecManager().get_all_specs().items()):
        spec = entry.get("spec", {})
        stanza = spec.get("metadata", {}).get("kernel_provisioner", {})
        provisioner = stanza.get("provisioner_name")
        if provisioner in PROVISIONERS:
            found.append(
                InstalledSpec(
                    name=name,
                    resource_dir=entry["resource_dir"],
                    provisioner=provisioner,
                    config=dict(stanza.get("config", {})),
                    spec=spec,
                )
            )
    return found


def get_kernel_spec(name: str) -> InstalledSpec:
    """The installed spec ``name``; it must use one of our provisioners."""
    for installed in list_kernel_specs():
        if installed.name == name:
            return installed
    try:
        KernelSpecManager().get_kernel_spec(name)
    except NoSuchKernel:
        raise KernelSpecError(
            f"no kernel spec named {name!r}",
            hint="see installed ones with `python -m nersc_provisioner list`",
        ) from None
    raise KernelSpecError(
        f"kernel spec {name!r} does not use a nersc_provisioner provisioner",
        hint="use `jupyter kernelspec` to manage it",
    )


def remove_kernel_spec(name: str) -> str:
    """Remove the installed spec ``name`` (ours only); return the removed directory."""
    installed = get_kernel_spec(name)
    try:
        return str(KernelSpecManager().remove_kernel_spec(installed.name))
    except OSError as exc:
        raise KernelSpecError(
            f"cannot remove {installed.resource_dir}: {exc}",
            hint="run as the user who installed it, or remove the directory by hand",
        ) from exc


def launch_plan(name: str) -> LaunchPlan:
    """The exact wrapper and command that starting kernel ``name`` would run."""
    installed = get_kernel_spec(name)
    cls = provisioner_class(installed.provisioner)
    kernel_spec = KernelSpec(resource_dir=installed.resource_dir, **installed.spec)
    return cls(kernel_spec=kernel_spec, **installed.config).launch_plan()


def missing_modules(
    modules: Sequence[str], module_init: str = "auto", module_use: Sequence[str] = ()
) -> list[str]:
    """The names in ``modules`` that the local module system does not know.

    Raises :class:`~nersc_provisioner.errors.ModuleSystemError` when no module
    system can be found.
    """
    if not modules:
        return []
    script = build_module_probe(modules, module_init, module_use)
    result = run_command(["bash", "--noprofile", "--norc", "-c", script], check=False)
    return parse_module_probe(modules, result.returncode, result.stdout, result.stderr, module_init)
