"""The kernel argv: the default one, and the one rule about a bare ``python``.

jupyter_client swaps an argv[0] of ``python`` (or ``python3``, ``python3.X``) for
its own ``sys.executable``.  That is right for a kernel started as it is here; but
through a wrapper (modules, setup lines, a container) or on a remote host, the user
means the ``python`` that the environment there provides, so the swap is undone or
replaced (``remote_python``).  Every place that decides which Python runs asks here.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

#: The kernel argv used when kernel.json has none.
DEFAULT_KERNEL_ARGV = ("python", "-m", "ipykernel_launcher", "-f", "{connection_file}")

#: argv[0] values that jupyter_client replaces with its own ``sys.executable``.
PYTHON_NAMES = frozenset(
    {"python", f"python{sys.version_info[0]}", "python{}.{}".format(*sys.version_info[:2])}
)


def spec_argv(argv: Sequence[str] | None) -> list[str]:
    """kernel.json's argv, or the default one."""
    return list(argv) if argv else list(DEFAULT_KERNEL_ARGV)


def is_bare_python(program: str) -> bool:
    return program in PYTHON_NAMES


def as_jupyter_client_runs_it(argv: Sequence[str]) -> list[str]:
    """``argv`` with a bare ``python`` swapped for this interpreter, as jupyter_client does."""
    out = list(argv)
    if out and is_bare_python(out[0]):
        out[0] = sys.executable
    return out


def local_argv(spec: Sequence[str], formatted: Sequence[str], wrapped: bool) -> list[str]:
    """The argv a local kernel runs: jupyter_client's, with the swap undone through a
    wrapper (the environment's ``python`` is meant there)."""
    argv = list(formatted)
    if wrapped and spec and argv and is_bare_python(spec[0]):
        argv[0] = spec[0]
    return argv


def remote_argv(spec: Sequence[str] | None, remote_python: str) -> list[str]:
    """The argv a remote kernel runs: a bare ``python`` becomes ``remote_python`` if set
    (else it is looked up there, after modules and setup lines)."""
    argv = spec_argv(spec)
    if remote_python and is_bare_python(argv[0]):
        argv[0] = remote_python
    return argv


def local_python(argv: Sequence[str] | None, wrapped: bool) -> str:
    """The Python a local kernel's argv runs (for ``check``)."""
    program = spec_argv(argv)[0]
    if is_bare_python(program) and not wrapped:
        return sys.executable
    return program
