"""Launchers: pure functions that turn a kernel argv into the argv that runs it.

Launchers do no I/O.  They build shell scripts and argument vectors; the
provisioners run them through a transport.
"""

from .container import ContainerSpec, container_prefix
from .wrapper import (
    READY_MARKER,
    EnvironmentSetup,
    Failure,
    build_script,
    launch_error_from_exit,
    wrap_command,
)

__all__ = [
    "READY_MARKER",
    "ContainerSpec",
    "EnvironmentSetup",
    "Failure",
    "build_script",
    "container_prefix",
    "launch_error_from_exit",
    "wrap_command",
]
