"""The generated module-loading wrapper: environment setup, then ``exec`` the kernel.

The wrapper replaces the hand-written ``kernel-helper.sh`` of NERSC's old
Jupyter page.  It is a bash script built from the provisioner's settings and
run as ``bash --noprofile --norc -c SCRIPT nersc-kernel STATUS_FD KERNEL_ARGV...``:

* the kernel argv arrives as positional parameters, never pasted into the
  script text;
* every setting is quoted by :mod:`nersc_provisioner.shell`, the one place
  that quotes;
* while the environment is being set up, stderr goes to the status file
  descriptor, so the provisioner can quote the module system's own message
  when something fails;
* every failure exits with its own code (:class:`Failure`), so the
  provisioner can name the cause without parsing messages;
* on success the wrapper writes :data:`READY_MARKER` and ``exec``\\ s the
  kernel: the kernel keeps the wrapper's PID, so signals reach it directly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum

from ..errors import (
    KernelNotFoundError,
    LaunchError,
    ModuleLoadError,
    ModuleSystemError,
    SetupError,
    UnsafeValueError,
)
from ..shell import export_line, quote
from .container import ContainerSpec, container_prefix

READY_MARKER = "NERSC_PROVISIONER_READY"
WRAPPER_ARGV0 = "nersc-kernel"
BASH = ("bash", "--noprofile", "--norc", "-c")

MODULE_INIT_CHOICES = ("auto", "lmod", "environment-modules", "none")

# Init scripts that define `module`, in the order they are tried.
_LMOD_INITS = (
    "${LMOD_PKG:+$LMOD_PKG/init/bash}",
    "/usr/share/lmod/lmod/init/bash",
    "/opt/cray/pe/lmod/lmod/init/bash",
    "/usr/share/lmod/6.6/init/bash",
    "/etc/profile.d/lmod.sh",
)
_ENV_MODULES_INITS = (
    "${MODULESHOME:+$MODULESHOME/init/bash}",
    "/usr/share/modules/init/bash",
    "/etc/profile.d/modules.sh",
)


class Failure(IntEnum):
    """Exit codes of the wrapper, one per cause."""

    MODULE_SYSTEM = 90
    MODULE_LOAD = 91
    SETUP = 92
    KERNEL_COMMAND = 93
    CONTAINER_RUNTIME = 94


_FAILURES: dict[int, tuple[type[LaunchError], str, str]] = {
    Failure.MODULE_SYSTEM: (
        ModuleSystemError,
        "no `module` command could be set up",
        "set module_init to the init script of your module system "
        "(e.g. /usr/share/lmod/lmod/init/bash), or remove modules and purge",
    ),
    Failure.MODULE_LOAD: (
        ModuleLoadError,
        "a module failed to load",
        "check the module name with `module avail NAME` (or `module spider NAME`) "
        "and fix `modules` in the kernel spec",
    ),
    Failure.SETUP: (
        SetupError,
        "the environment setup failed",
        "run the failing line in a shell to see why, then fix `setup` or `cwd`",
    ),
    Failure.KERNEL_COMMAND: (
        KernelNotFoundError,
        "the kernel command cannot run",
        "install ipykernel into that Python (`python -m pip install ipykernel`), "
        "load the module that provides it, or fix the kernel argv",
    ),
    Failure.CONTAINER_RUNTIME: (
        KernelNotFoundError,
        "the container runtime is missing",
        "run the kernel where Shifter or podman-hpc is installed (a NERSC login or "
        "compute node), load its module in `modules`, or remove `container`",
    ),
}


@dataclass(frozen=True)
class EnvironmentSetup:
    """What the wrapper does before it ``exec``\\ s the kernel."""

    modules: tuple[str, ...] = ()
    purge: bool = False
    module_init: str = "auto"
    module_use: tuple[str, ...] = ()
    setup: tuple[str, ...] = ()
    cwd: str = ""
    exports: tuple[tuple[str, str], ...] = field(default=())
    container: ContainerSpec | None = None

    @property
    def uses_modules(self) -> bool:
        return bool(self.modules or self.module_use) or self.purge

    @property
    def needed(self) -> bool:
        """Whether a wrapper is needed at all (otherwise the kernel runs directly)."""
        return bool(self.uses_modules or self.setup or self.cwd or self.exports or self.container)

    @classmethod
    def create(
        cls,
        *,
        modules: Sequence[str] = (),
        purge: bool = False,
        module_init: str = "auto",
        module_use: Sequence[str] = (),
        setup: Sequence[str] = (),
        cwd: str = "",
        env: Mapping[str, str] | None = None,
        container: ContainerSpec | None = None,
    ) -> EnvironmentSetup:
        for name in (*modules, *module_use):
            if not name or name.startswith("-"):
                raise UnsafeValueError(
                    f"invalid module name or path {name!r}: `module` would read it as an option",
                    hint="give module names as `module avail` lists them, e.g. python/3.11",
                )
        for line in setup:
            if "\n" in line or "\r" in line:
                raise UnsafeValueError(
                    f"setup line {line!r} holds a line break",
                    hint="give each line as its own entry of `setup`, so that each one is "
                    "checked on its own",
                )
        return cls(
            modules=tuple(modules),
            purge=purge,
            module_init=module_init,
            module_use=tuple(module_use),
            setup=tuple(setup),
            cwd=cwd,
            exports=tuple((env or {}).items()),
            container=container,
        )


def _fail(code: Failure, message: str) -> str:
    return f"npr_fail {int(code)} {quote(message)}"


def _module_init_lines(module_init: str) -> list[str]:
    if module_init == "none":
        return []
    if module_init in ("auto", "lmod", "environment-modules"):
        candidates = {
            "auto": _LMOD_INITS + _ENV_MODULES_INITS,
            "lmod": _LMOD_INITS,
            "environment-modules": _ENV_MODULES_INITS,
        }[module_init]
        # The candidates are our own constants (they expand $LMOD_PKG and
        # $MODULESHOME at run time), so they are written as double-quoted words.
        words = " ".join(f'"{path}"' for path in candidates)
        return [
            "if ! type module >/dev/null 2>&1; then",
            f"  for npr_init in {words}; do",
            '    if [ -n "$npr_init" ] && [ -r "$npr_init" ]; then . "$npr_init"; break; fi',
            "  done",
            "fi",
        ]
    return [
        "if ! type module >/dev/null 2>&1; then",
        f"  . {quote(module_init, what='module_init')} || "
        + _fail(Failure.MODULE_SYSTEM, f"cannot source module_init script {module_init}"),
        "fi",
    ]


def build_script(setup: EnvironmentSetup) -> str:
    """The wrapper script for ``setup``.  Pure: same input, same text."""
    lines = [
        "# generated by nersc_provisioner: set up the environment, then exec the kernel",
        'npr_fail() { printf "nersc_provisioner: %s\\n" "$2" >&2; exit "$1"; }',
        "npr_fd=$1; shift",
        'if [ "$npr_fd" != 3 ]; then exec 3>&"$npr_fd" {npr_fd}>&-; fi',
        "exec 4>&2 2>&3",
    ]
    lines += [export_line(name, value) for name, value in setup.exports]
    if setup.uses_modules:
        lines += _module_init_lines(setup.module_init)
        lines.append(
            "type module >/dev/null 2>&1 || "
            + _fail(
                Failure.MODULE_SYSTEM,
                f"no module command: no Lmod or Environment Modules found "
                f"(module_init={setup.module_init})",
            )
        )
    for path in setup.module_use:
        lines.append(
            f"module use {quote(path, what='module_use path')} || "
            + _fail(Failure.MODULE_LOAD, f"module use {path} failed")
        )
    if setup.purge:
        lines.append("module purge || " + _fail(Failure.MODULE_LOAD, "module purge failed"))
    for name in setup.modules:
        lines.append(
            f"module load {quote(name, what='module name')} || "
            + _fail(Failure.MODULE_LOAD, f"module load {name} failed")
        )
    if setup.cwd:
        lines.append(
            f"cd -- {quote(setup.cwd, what='cwd')} || "
            + _fail(Failure.SETUP, f"cannot change directory to {setup.cwd}")
        )
    for number, line in enumerate(setup.setup, start=1):
        quoted = quote(line, what="setup line")
        lines += [
            # Parse first: a syntax error inside $(...) would end this shell at the
            # `eval` itself (status 127), before `||` could name the line.
            f"bash --noprofile --norc -n -c {quoted} || "
            + _fail(Failure.SETUP, f"setup line {number} is not valid shell: {line}"),
            f"eval {quoted} || " + _fail(Failure.SETUP, f"setup line {number} failed: {line}"),
        ]
    if setup.container is None:
        lines += [
            'command -v -- "$1" >/dev/null 2>&1 || npr_fail '
            f'{int(Failure.KERNEL_COMMAND)} "kernel command not found: $1 (PATH=$PATH)"',
            # `python -m PACKAGE`: check that the package is importable, so a
            # missing ipykernel fails here with a clear message (Python 3.6+).
            'if [ "${2:-}" = -m ] && [ -n "${3:-}" ]; then',
            '  "$1" -c "import sys, importlib.util as u; '
            'sys.exit(0 if u.find_spec(sys.argv[1].split(\'.\')[0]) else 1)" "$3" || '
            f'npr_fail {int(Failure.KERNEL_COMMAND)} "$1 cannot import $3"',
            "fi",
        ]
        exec_line = 'exec "$@"'
    else:
        runtime = container_prefix(setup.container)
        lines.append(
            f"command -v -- {quote(runtime[0])} >/dev/null 2>&1 || "
            + _fail(
                Failure.CONTAINER_RUNTIME,
                f"container runtime {runtime[0]} not found on PATH",
            )
        )
        exec_line = f'exec {" ".join(quote(arg) for arg in runtime)} "$@"'
    lines += [
        f"printf '%s\\n' {READY_MARKER} >&3",
        "exec 2>&4 3>&- 4>&-",
        exec_line,
    ]
    return "\n".join(lines) + "\n"


def wrap_command(setup: EnvironmentSetup, argv: Sequence[str], status_fd: str) -> list[str]:
    """The full argv that runs ``argv`` through the wrapper for ``setup``."""
    return [*BASH, build_script(setup), WRAPPER_ARGV0, status_fd, *argv]


def launch_error_from_exit(
    exit_code: int | None, stderr: str, command: Sequence[str]
) -> LaunchError:
    """Turn the wrapper's exit code and stderr into the error that names the cause."""
    known = _FAILURES.get(exit_code) if exit_code is not None else None
    if known is None:
        return LaunchError(
            "the kernel wrapper exited before starting the kernel",
            hint="see the stderr lines above; run `python -m nersc_provisioner show NAME` "
            "to see the exact script",
            command=command,
            exit_code=exit_code,
            stderr=stderr,
        )
    cls, message, hint = known
    return cls(message, hint=hint, command=command, exit_code=exit_code, stderr=stderr)


_MISSING = "NPR_MISSING"


def build_module_probe(
    modules: Sequence[str], module_init: str = "auto", module_use: Sequence[str] = ()
) -> str:
    """A script that reports which of ``modules`` the module system does not know.

    It prints ``NPR_MISSING <index>`` per unknown module and exits with
    :attr:`Failure.MODULE_SYSTEM` when there is no module system.
    """
    lines = _module_init_lines(module_init)
    lines.append(f"type module >/dev/null 2>&1 || exit {int(Failure.MODULE_SYSTEM)}")
    lines += [f"module use {quote(path, what='module_use path')}" for path in module_use]
    for index, name in enumerate(modules):
        lines.append(
            f"module is-avail {quote(name, what='module name')} >/dev/null 2>&1 || "
            f"echo {_MISSING} {index}"
        )
    return "\n".join(lines) + "\n"


def parse_module_probe(
    modules: Sequence[str], exit_code: int, stdout: str, stderr: str, module_init: str
) -> list[str]:
    """The unknown module names reported by :func:`build_module_probe`'s script."""
    if exit_code == Failure.MODULE_SYSTEM:
        cls, message, hint = _FAILURES[Failure.MODULE_SYSTEM]
        raise cls(f"{message} (module_init={module_init})", hint=hint, stderr=stderr)
    missing = []
    for line in stdout.splitlines():
        word, _, index = line.partition(" ")
        if word == _MISSING and index.isdigit() and int(index) < len(modules):
            missing.append(modules[int(index)])
    return missing
