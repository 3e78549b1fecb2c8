"""A local kernel's sockets: private IPC directories, connection files, readiness probes.

Every user of a shared node can connect to any 127.0.0.1 port.  A local kernel's
sockets are therefore either CurveZMQ-encrypted TCP (only holders of the
connection file's server key can complete the handshake) or Unix sockets in a
directory only the user can enter.  This module holds the pieces that touch the
file system and the sockets; the policy (which to try, what to refuse) is the
provisioner's.  Blocking functions are run in threads by their callers.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .zmtp import read_mechanism

PORT_NAMES = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")

#: ``sun_path`` holds 108 bytes on Linux, one of them the terminating NUL.
MAX_SOCKET_PATH = 107

#: The name of the sockets in a private directory: ZeroMQ endpoints are
#: ``ipc://{ip}-{port}``, so ``ip`` is ``{directory}/k`` and the files ``k-1`` .. ``k-5``.
IPC_STEM = "k"
IPC_PORTS = {name: index for index, name in enumerate(PORT_NAMES, start=1)}


def _longest_socket_path(directory: str) -> int:
    return len(os.fsencode(os.path.join(directory, f"{IPC_STEM}-{len(PORT_NAMES)}")))


def make_private_dir(preferred_parents: tuple[str, ...]) -> str:
    """A new directory, mode 0700, whose socket paths fit the Unix limit.

    The first parent that exists, is the user's own and not writable by others,
    and leaves the paths short enough is used; ``tempfile.gettempdir()`` (usually
    /tmp) is the last resort, where ``mkdtemp`` still makes the directory 0700
    with an unguessable name.
    """
    uid = os.getuid()
    candidates = [p for p in preferred_parents if p]
    for parent in candidates:
        try:
            info = os.stat(parent)
        except OSError:
            continue
        if info.st_uid != uid or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            continue
        # mkdtemp adds 8 characters and our prefix 4.
        if _longest_socket_path(os.path.join(os.path.abspath(parent), "npr-12345678")) > (
            MAX_SOCKET_PATH
        ):
            continue
        return tempfile.mkdtemp(prefix="npr-", dir=os.path.abspath(parent))
    directory = tempfile.mkdtemp(prefix="npr-")
    if _longest_socket_path(directory) > MAX_SOCKET_PATH:  # pragma: no cover - a very long TMPDIR
        os.rmdir(directory)
        raise OSError(
            f"no directory gives socket paths under {MAX_SOCKET_PATH} bytes (TMPDIR is "
            f"{tempfile.gettempdir()!r}); set TMPDIR to a short path"
        )
    return directory


def check_private_dir(directory: str) -> None:
    """Raise ``PermissionError`` unless ``directory`` is ours and only ours (mode 0700)."""
    info = os.lstat(directory)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise PermissionError(f"{directory} is not a directory of this user")
    if info.st_mode & 0o077:
        raise PermissionError(f"{directory} is open to others (mode {info.st_mode & 0o777:o})")


def remove_private_dir(directory: str) -> None:
    shutil.rmtree(directory, ignore_errors=True)


def ipc_connection(directory: str) -> dict[str, Any]:
    """The ``ip``, ``transport`` and ports of a kernel on IPC sockets in ``directory``."""
    return {"transport": "ipc", "ip": os.path.join(directory, IPC_STEM), **IPC_PORTS}


def write_private_json(path: str, info: Mapping[str, Any]) -> None:
    """Write ``info`` to ``path`` with mode 0600 from the start (never readable by others)."""
    tmp = f"{path}.npr-tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(dict(info), out, indent=2)
    os.replace(tmp, path)


def kernel_ports(path: str) -> dict[str, int] | None:
    """The five ports a kernel wrote back into its connection file, once all are set."""
    try:
        info = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None  # not there, or being rewritten
    try:
        ports = {name: int(info.get(name) or 0) for name in PORT_NAMES}
    except (TypeError, ValueError):
        return None
    return ports if all(ports.values()) else None


def probe_mechanism(transport: str, ip: str, port: int, timeout: float = 2.0) -> str | None:
    """The ZMTP mechanism the kernel's socket announces (``"CURVE"``, ``"NULL"``, or ""
    without a greeting), or None if nothing listens there yet."""
    if transport == "ipc":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address: Any = f"{ip}-{port}"
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        address = (ip, port)
    with sock:
        sock.settimeout(timeout)
        try:
            sock.connect(address)
        except (ConnectionRefusedError, FileNotFoundError):
            return None
        except OSError:
            return None
        return read_mechanism(sock, timeout)
