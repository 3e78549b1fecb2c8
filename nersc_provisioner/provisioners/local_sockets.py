"""How a ``nersc-local`` kernel's sockets are kept from the other users of the node.

Three ways, tried in order until one works (``transport_encryption``):

* ``CURVE``: TCP on 127.0.0.1, CurveZMQ with a server key only the connection
  file (mode 0600) holds (a kernel that exits given the keys, as ipykernel 6 next to
  jupyter_client 8.9+ does, goes on to IPC); the kernel binds ports of its own choosing (ports 0 in
  the file, written back by ipykernel), so no other process can take them
  between our choice and its bind.  The kernel's own ZMTP greeting decides
  whether it really encrypts, not its connection file.
* ``IPC``: Unix sockets in a new directory of mode 0700: a kernel that cannot
  encrypt, yet can be reached by no one else.
* ``PLAIN``: TCP without encryption, as jupyter_client's own provisioner runs
  every kernel: ``disabled``, or ``auto`` with a warning when neither of the
  others works.

This module decides and waits; it starts no process (the provisioner does).
"""

from __future__ import annotations

import asyncio
import enum
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from ..errors import LaunchError
from ..transports.local_sockets import (
    PORT_NAMES,
    ipc_connection,
    kernel_ports,
    probe_mechanism,
)


class Protection(enum.Enum):
    CURVE = "curve"
    IPC = "ipc"
    PLAIN = "plain"


#: Where a kernel protected so listens, for the log.
WHERE = {
    Protection.CURVE: "127.0.0.1 (CurveZMQ)",
    Protection.IPC: "IPC sockets in a private directory (mode 0700)",
    Protection.PLAIN: "127.0.0.1 (unencrypted)",
}


def writes_back_ports(argv: Sequence[str], metadata: Mapping[str, Any]) -> bool:
    """Whether the kernel binds ports 0 itself and writes them into its connection file.

    ipykernel does (every version in use); for other kernels we cannot tell, and
    they start on IPC instead, where the ports are names we choose.
    """
    declared = metadata.get("supported_encryption") or ()
    if isinstance(declared, str):
        declared = (declared,)
    if "curve" in {str(item).strip().lower() for item in declared}:
        return True
    return any("ipykernel" in arg for arg in argv)


def protection_attempts(
    policy: str, *, self_binding: bool, curve_keys: bool, remembered: Protection | None = None
) -> list[Protection]:
    """The ways to try, best first, under ``policy`` (auto, required or disabled).

    ``curve_keys``: whether the kernel manager can give its clients CurveZMQ keys
    (jupyter_client 8.9 or later).  A restart tries only what worked before: the
    clients are connected to it.
    """
    if remembered is not None:
        return [remembered]
    if policy == "disabled":
        return [Protection.PLAIN]
    attempts = []
    if self_binding and curve_keys and zmq.has("curve"):
        attempts.append(Protection.CURVE)
    attempts.append(Protection.IPC)
    if policy == "auto":
        attempts.append(Protection.PLAIN)
    return attempts


def connection_for(
    protection: Protection,
    file_info: Mapping[str, Any],
    *,
    curve_keys: tuple[bytes, bytes] | None,
    socket_dir: str | None,
    tcp_ports: Mapping[str, int] | None,
    self_binding: bool,
) -> dict[str, Any]:
    """The connection file's content for an attempt, from what jupyter_client wrote.

    ``tcp_ports``: the ports the kernel bound last time (a restart asks for the
    same ones, so connected clients find it again); else 0 for a kernel that binds
    its own, or jupyter_client's choice for one that does not.
    """
    info = {k: v for k, v in file_info.items() if not k.startswith("curve_")}
    if protection is Protection.IPC:
        if socket_dir is None:
            raise ValueError("IPC needs a private socket directory")
        return {**info, **ipc_connection(socket_dir)}
    info.update(transport="tcp", ip="127.0.0.1")
    if tcp_ports:
        info.update(tcp_ports)
    elif self_binding:
        info.update(dict.fromkeys(PORT_NAMES, 0))
    if protection is Protection.CURVE:
        if curve_keys is None:
            raise ValueError("CurveZMQ needs a key pair")
        info["curve_publickey"] = curve_keys[0].decode("ascii")
        info["curve_secretkey"] = curve_keys[1].decode("ascii")
    return info


def read_connection_file(path: str) -> dict[str, Any]:
    return dict(json.loads(Path(path).read_text()))


@dataclass
class SocketsReady:
    """The kernel listens: its ports (as bound) and the mechanism its greeting named."""

    ports: dict[str, int]
    mechanism: str


class KernelExited(Exception):
    def __init__(self, exit_code: int | None) -> None:
        super().__init__(f"exit code {exit_code}")
        self.exit_code = exit_code


#: How long a CurveZMQ kernel given its ports (a restart) may take, after its shell
#: socket answers, to write its connection file back; past it we go on without.
REWRITE_GRACE = 2.0


def _file_identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns)


def _rewritten(path: str, ours: tuple[int, int] | None) -> bool:
    """Whether the kernel has replaced the connection file we wrote, and finished."""
    return _file_identity(path) != ours and kernel_ports(path) is not None


async def wait_for_sockets(
    process: Any, connection_file: str, info: Mapping[str, Any], timeout: float
) -> SocketsReady:
    """Wait until the kernel started with ``info`` listens on its shell socket.

    Ports 0 are read back from the connection file once the kernel has written
    them.  A CurveZMQ kernel given its ports (a restart) writes the file back too,
    just after it binds (ipykernel 7.3+ always does: its keys are bytes, the file's
    are text): a new file at the same path, empty for a moment.  jupyter_client reads
    the file as soon as the start returns, so that write is waited for as well (for
    up to ``REWRITE_GRACE`` seconds).  Raises :class:`KernelExited` if the process
    ends first, TimeoutError after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    transport, ip = str(info["transport"]), str(info["ip"])
    ports = {name: int(info[name]) for name in PORT_NAMES}
    ours = _file_identity(connection_file) if all(ports.values()) else None
    rewrite = ours is not None and "curve_secretkey" in info
    step = 0.005
    mechanism: str | None = None
    listening_at = 0.0
    while True:
        code = process.poll()
        if code is not None:
            raise KernelExited(code)
        if not all(ports.values()):
            written = await asyncio.to_thread(kernel_ports, connection_file)
            ports = written or ports
        if mechanism is None and all(ports.values()):
            mechanism = await asyncio.to_thread(probe_mechanism, transport, ip, ports["shell_port"])
            listening_at = time.monotonic()
        if mechanism is not None and (
            not rewrite
            or time.monotonic() - listening_at > REWRITE_GRACE
            or await asyncio.to_thread(_rewritten, connection_file, ours)
        ):
            return SocketsReady(ports=ports, mechanism=mechanism)
        if time.monotonic() > deadline:
            raise TimeoutError
        await asyncio.sleep(step)
        step = min(step * 2, 0.05)


def refusal(reasons: Sequence[str], command: Sequence[str]) -> LaunchError:
    """``required``, and neither CurveZMQ nor private IPC sockets worked."""
    return LaunchError(
        "the kernel could be started neither with CurveZMQ encryption nor on IPC sockets "
        f"in a private directory ({'; '.join(reasons)}), and transport_encryption is "
        "'required': other users of this node could read its TCP ports",
        hint="use an ipykernel with CurveZMQ support (7.3 or later) beside jupyter_client "
        "8.9 or later, or a kernel that runs on the IPC transport; or set "
        "transport_encryption to auto (a warning) or disabled",
        command=command,
    )


UNPROTECTED_WARNING = (
    "nersc-local: kernel %s runs on TCP without encryption (%s): other users of this node "
    "can connect to its 127.0.0.1 ports and read its output. Use an ipykernel with CurveZMQ "
    "support (7.3 or later) beside jupyter_client 8.9 or later, or set transport_encryption "
    "to required to refuse this."
)
