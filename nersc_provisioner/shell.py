"""The one place that quotes values for a POSIX shell.

Every value that reaches a generated shell script goes through :func:`quote`.
Values that no shell can carry (NUL bytes) and names that cannot be
environment variable names are rejected with :class:`UnsafeValueError`.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable

from .errors import UnsafeValueError

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_TOKEN = re.compile(r"[A-Za-z0-9._-]+\Z")


def check_token(value: str, what: str) -> str:
    """A word that may travel unquoted (kernel ids, numbers, signal names in the agent
    protocol and in paths of scripts); raise :class:`UnsafeValueError` otherwise."""
    if not _TOKEN.match(value):
        raise UnsafeValueError(f"invalid {what} {value!r} for the remote agent")
    return value


def quote(value: str, *, what: str = "value") -> str:
    """Quote ``value`` so that a POSIX shell reads it back as exactly one word."""
    if not isinstance(value, str):
        raise UnsafeValueError(f"{what} must be a string, not {type(value).__name__}: {value!r}")
    if "\x00" in value:
        raise UnsafeValueError(
            f"{what} contains a NUL byte, which no shell or command line can carry: {value!r}",
            hint="remove the NUL character from the setting",
        )
    return shlex.quote(value)


def join(argv: Iterable[str], *, what: str = "argument") -> str:
    """Quote every element of ``argv`` and join them into one shell command."""
    return " ".join(quote(arg, what=what) for arg in argv)


#: Variables bash sets or reads itself: an export of one is overwritten by bash, or
#: changes how the generated script runs.
BASH_MANAGED = frozenset(
    {
        "_", "BASHOPTS", "BASHPID", "BASH_ENV", "BASH_XTRACEFD", "EUID", "FUNCNAME",
        "GROUPS", "IFS", "LINENO", "OLDPWD", "OPTARG", "OPTIND", "PPID", "PS4", "PWD",
        "RANDOM", "SECONDS", "SHELLOPTS", "SHLVL", "SRANDOM", "UID", "EPOCHREALTIME",
        "EPOCHSECONDS", "HISTCMD", "DIRSTACK", "PIPESTATUS", "COMP_WORDBREAKS",
    }
)  # fmt: skip


def check_env_name(name: str) -> str:
    """Return ``name`` if it is a valid environment variable name, else raise."""
    if not isinstance(name, str) or not _ENV_NAME.match(name):
        raise UnsafeValueError(
            f"invalid environment variable name {name!r}",
            hint="use letters, digits and underscores only, not starting with a digit",
        )
    if name in BASH_MANAGED or name.startswith("BASH_"):
        raise UnsafeValueError(
            f"environment variable {name!r} is set by bash itself; a value for it would "
            "not reach the kernel as given",
            hint="use another name; set it in a setup line if the kernel must see it",
        )
    return name


def export_line(name: str, value: str) -> str:
    """A shell line that exports ``name=value``."""
    return f"export {check_env_name(name)}={quote(value, what=f'env value of {name}')}"
