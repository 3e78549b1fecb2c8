"""Operations on a remote host outside any kernel's lifetime: ``ps`` and ``kill``."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import SSHConnectError
from .launchers.remote import PS_SCRIPT, kill_script
from .transports.ssh import SSHTarget, connect, exec_script


@dataclass(frozen=True)
class RemoteKernelEntry:
    """One kernel directory of ours on a host."""

    kernel_id: str
    pid: int
    running: bool
    lease_age: int  # seconds since the lease was last renewed


def _run(target: SSHTarget, script: str) -> list[str]:
    login = connect(target)
    try:
        transport = login.client.get_transport()
        if transport is None:
            raise SSHConnectError(f"connection to {target.label} closed")
        _, lines = exec_script(transport, script, timeout=30)
        return lines
    finally:
        login.close()


def list_remote_kernels(target: SSHTarget) -> list[RemoteKernelEntry]:
    """Our kernels on ``target``'s host (one login, one exec)."""
    entries = []
    for line in _run(target, PS_SCRIPT):
        words = line.split()
        if len(words) == 6 and words[0] == "NPR_PS":
            entries.append(
                RemoteKernelEntry(
                    kernel_id=words[1],
                    pid=int(words[2]) if words[2].isdigit() else 0,
                    running=words[4] == "running",
                    lease_age=int(words[5]) if words[5].lstrip("-").isdigit() else -1,
                )
            )
    return entries


def kill_remote_kernels(target: SSHTarget, kernel_ids: list[str]) -> list[str]:
    """End the given kernels (verified by PID and start time) and remove their directories."""
    lines = _run(target, kill_script(kernel_ids)) if kernel_ids else []
    return [line.split()[1] for line in lines if line.startswith("NPR_KILLED ")]
