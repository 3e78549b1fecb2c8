"""Jupyter kernel provisioners for HPC: module wrappers, containers, login nodes, Slurm.

The public API:

* :class:`NERSCLocalProvisioner` (``nersc-local``);
* :func:`build_kernel_spec`, :func:`install_kernel_spec`, :func:`list_kernel_specs`,
  :func:`remove_kernel_spec`, :func:`launch_plan`;
* the error tree under :class:`NERSCProvisionerError`.
"""

from .errors import (
    ConfigError,
    KernelCommandError,
    KernelNotFoundError,
    KernelSpecError,
    LaunchError,
    LaunchTimeout,
    ModuleLoadError,
    ModuleSystemError,
    NERSCProvisionerError,
    SetupError,
    UnsafeValueError,
)
from .kernelspec import (
    InstalledSpec,
    build_kernel_spec,
    get_kernel_spec,
    install_kernel_spec,
    launch_plan,
    list_kernel_specs,
    missing_modules,
    remove_kernel_spec,
)
from .provisioners import PROVISIONERS, NERSCLocalProvisioner

__version__ = "0.1.0"

__all__ = [
    "PROVISIONERS",
    "ConfigError",
    "InstalledSpec",
    "KernelCommandError",
    "KernelNotFoundError",
    "KernelSpecError",
    "LaunchError",
    "LaunchTimeout",
    "ModuleLoadError",
    "ModuleSystemError",
    "NERSCLocalProvisioner",
    "NERSCProvisionerError",
    "SetupError",
    "UnsafeValueError",
    "__version__",
    "build_kernel_spec",
    "get_kernel_spec",
    "install_kernel_spec",
    "launch_plan",
    "list_kernel_specs",
    "missing_modules",
    "remove_kernel_spec",
]
