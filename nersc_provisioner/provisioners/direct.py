"""The direct data path (``data_path: direct``): the kernel binds the address SSH
reached, with CurveZMQ required, and Jupyter connects to it; no ZeroMQ byte goes
through SSH.  This module finds that address, waits until the kernel listens
there, and names what went wrong.  Blocking functions run in threads.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Sequence

from ..errors import ConfigError, LaunchError, SSHConnectError
from ..transports.connection import SSHConnection
from ..transports.ssh import SSHTarget


def bind_address(
    conn: SSHConnection | None, target: SSHTarget | None, node_addr: str | None
) -> str:
    """The IPv4 address the kernel binds and Jupyter connects to: the job's node
    (``node_addr``, Slurm), or else (None) the login node as SSH reached it.
    Blocking (DNS)."""
    host = node_addr or ""
    if node_addr is None:
        if conn is None or target is None:
            raise SSHConnectError("no connection to the kernel's host")
        if target.jumps or target.proxy_command:
            raise ConfigError(
                f"data_path 'direct': {target.label} is reached through "
                f"{'ProxyJump' if target.jumps else 'ProxyCommand'}, so this machine "
                "cannot connect to the kernel's ports directly",
                hint="set data_path to tunnel",
            )
        host = conn.target.address or target.hostname
    try:
        found = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
    except OSError as exc:
        raise ConfigError(
            f"data_path 'direct': cannot resolve {host!r} to an IPv4 address: {exc}",
            hint="set data_path to tunnel",
        ) from None
    return str(found[0][4][0])


def wait_reachable(address: str, port: int, alive: Callable[[], str], timeout: float) -> None:
    """Connect to ``address:port`` (the kernel's shell port), retrying while it is
    refused and the kernel is alive.  Blocking.

    Raises ConnectionRefusedError once the kernel has died, TimeoutError when the
    time is up, and any other OSError (unreachable, filtered) at once.
    """
    deadline = time.monotonic() + timeout
    next_check = time.monotonic() + 0.5
    while True:
        try:
            with socket.create_connection((address, port), timeout=min(5.0, timeout)):
                return
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{address}:{port} still refused after {timeout:g} s") from None
            if time.monotonic() > next_check:
                if alive() != "alive":
                    raise
                next_check = time.monotonic() + 0.5
            time.sleep(0.02)


def unreachable_error(
    exc: BaseException, where: str, address: str, port: int, cmd: Sequence[str], tail: str
) -> LaunchError:
    """What :func:`wait_reachable`'s failure means, for the user."""
    if isinstance(exc, ConnectionRefusedError):  # it ended before binding
        return LaunchError(
            f"the kernel on {where} ended before it listened on {address}:{port}",
            hint="see its output below; at a restart, another process may have taken one "
            "of its ports",
            command=cmd,
            stderr=tail,
        )
    return LaunchError(
        f"the kernel on {where} listens on {address}, but this machine cannot reach "
        f"{address}:{port}: {exc}",
        hint="data_path 'direct' needs that address reachable from here (inside the site's "
        "network); use data_path tunnel",
        command=cmd,
        stderr=tail,
    )
