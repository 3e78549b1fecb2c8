"""The error tree.

Every error says what went wrong and what to do next.  Errors that come from a
command carry their evidence: the command, its exit code and the tail of its
stderr.
"""

from __future__ import annotations

from collections.abc import Sequence

STDERR_TAIL_LINES = 20


def tail(text: str, lines: int = STDERR_TAIL_LINES) -> str:
    """The last ``lines`` non-empty lines of ``text``."""
    kept = [line for line in text.splitlines() if line.strip()]
    return "\n".join(kept[-lines:])


class NERSCProvisionerError(Exception):
    """Base class of every error raised by nersc_provisioner."""

    def __init__(self, message: str, *, hint: str = "") -> None:
        self.message = message
        self.hint = hint
        super().__init__(str(self))

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}\nWhat to do: {self.hint}"
        return self.message


class ConfigError(NERSCProvisionerError, ValueError):
    """A setting in kernel.json, a Jupyter config file or the environment is invalid."""


class UnsafeValueError(ConfigError):
    """A value cannot be carried safely to a shell, a flag, a path or a file name."""


class KernelSpecError(NERSCProvisionerError):
    """Writing, reading or removing an installed kernel spec failed."""


class LaunchError(NERSCProvisionerError, RuntimeError):
    """The kernel did not start.  Carries the command, exit code and stderr tail."""

    def __init__(
        self,
        message: str,
        *,
        hint: str = "",
        command: Sequence[str] = (),
        exit_code: int | None = None,
        stderr: str = "",
    ) -> None:
        self.command = list(command)
        self.exit_code = exit_code
        self.stderr_tail = tail(stderr)
        super().__init__(message, hint=hint)

    def __str__(self) -> str:
        parts = [self.message]
        if self.exit_code is not None:
            parts.append(f"(exit code {self.exit_code})")
        text = " ".join(parts)
        if self.stderr_tail:
            indented = "\n".join("  | " + line for line in self.stderr_tail.splitlines())
            text += f"\nLast lines of stderr:\n{indented}"
        if self.hint:
            text += f"\nWhat to do: {self.hint}"
        return text


class ModuleSystemError(LaunchError):
    """No ``module`` command could be set up (neither Lmod nor Environment Modules)."""


class ModuleLoadError(LaunchError):
    """``module load`` or ``module purge`` failed."""


class SetupError(LaunchError):
    """A ``setup`` line or the ``cwd`` change failed."""


class KernelCommandError(LaunchError):
    """The kernel's program, its Python package, or the container runtime is missing."""


class KernelNotFoundError(KernelCommandError, FileNotFoundError):
    """The wrapper found no kernel program, Python package or container runtime to run.

    Also a :class:`FileNotFoundError`, as jupyter_client's own provisioner raises when
    the kernel's program is not there (callers may catch either)."""


class LaunchTimeout(LaunchError):
    """The environment setup did not finish within ``launch_timeout``."""


class CommandError(NERSCProvisionerError):
    """A helper command (not the kernel) failed."""

    def __init__(
        self,
        command: Sequence[str],
        exit_code: int | None,
        stdout: str,
        stderr: str,
        *,
        hint: str = "",
    ) -> None:
        self.command = list(command)
        self.exit_code = exit_code
        self.stdout = stdout
        self.stderr = stderr
        message = (
            f"command {self.command[0] if self.command else '?'} failed (exit code {exit_code})"
        )
        if tail(stderr):
            message += ":\n" + tail(stderr)
        super().__init__(message, hint=hint)


class SSHError(NERSCProvisionerError):
    """Reaching a host over SSH failed."""


class UnknownHostKeyError(SSHError):
    """The host's key is not in known_hosts; it is never accepted automatically."""


class ChangedHostKeyError(SSHError):
    """The host's key differs from the one in known_hosts."""


class AuthenticationError(SSHError):
    """The host refused every key offered.  Reported once; never retried automatically."""


class CertificateExpiredError(SSHError):
    """The SSH certificate (e.g. NERSC sshproxy's ~/.ssh/nersc-cert.pub) is not valid now."""


class SSHConnectError(SSHError):
    """The host could not be reached (network, DNS, proxy)."""
