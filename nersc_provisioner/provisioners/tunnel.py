"""The tunnel data path: five local listeners forwarded over SSH to the remote kernel.

Jupyter's clients connect to the listeners; each connection becomes a
``direct-tcpip`` channel to the kernel's port on the remote loopback.  The
listeners outlive reconnects and restarts, so the clients keep their addresses.

They are 127.0.0.1 ports while the kernel's traffic is CurveZMQ ciphertext, and
Unix sockets in a directory of mode 0700 when it is not (``plain``): other users of
the Jupyter host can then not reach the kernel through us.

After a reconnect, requests are held until IOPub's channel is open again (plus a
head start), so that a request's output is not published before IOPub is
subscribed again.
"""

from __future__ import annotations

import functools
import os
import socket
import time
from collections.abc import Callable
from typing import Any

from ..launchers.remote import PORT_NAMES
from ..transports.connection import SSHConnection
from ..transports.forwarding import RETRY, PortForwarder
from ..transports.local_sockets import (
    IPC_PORTS,
    ipc_connection,
    make_private_dir,
    remove_private_dir,
)

#: After a reconnect, the channels that carry requests reopen this much later than
#: IOPub's, so that IOPub is subscribed again before a request's output is published.
IOPUB_HEAD_START = 0.3
IOPUB_WAIT = 3.0
REQUEST_PORTS = frozenset({"shell_port", "control_port", "stdin_port"})

#: What a channel is opened to: the connection, the kernel's remote ports, and
#: whether the kernel is being stopped (None, None, _ while there is no kernel).
Route = Callable[[], tuple[SSHConnection | None, dict[str, int] | None, bool]]


class Tunnel:
    """The listeners of one kernel, and the opening of its channels."""

    def __init__(self, route: Route) -> None:
        self._route = route
        self.listeners: dict[str, socket.socket] | None = None
        self.plain = False
        self.socket_dir: str | None = None
        self._iopub_opened_at: float | None = None

    @property
    def is_open(self) -> bool:
        return self.listeners is not None

    def open(self, connection_file: str = "") -> None:
        """Listen: Unix sockets beside ``connection_file`` if ``plain``, else 127.0.0.1."""
        forwarder = PortForwarder.instance()
        listeners = {}
        if self.plain:
            if self.socket_dir is None:
                parents = (os.path.dirname(os.path.abspath(connection_file)),)
                self.socket_dir = make_private_dir(parents if connection_file else ())
            for name in PORT_NAMES:
                listeners[name] = forwarder.listen(self._opener(name), path=self._path(name))
        else:
            for name in PORT_NAMES:
                listeners[name] = forwarder.listen(self._opener(name))
        self.listeners = listeners

    def make_plain(self, connection_file: str = "") -> None:
        """The kernel does not encrypt: move the listeners off 127.0.0.1."""
        if self.plain:
            return
        self.close()
        self.plain = True
        self.open(connection_file)

    def restore_unlinked(self) -> None:
        """jupyter_client removes a kernel's IPC socket files at every restart
        (``cleanup_ipc_files``); ours outlive the remote kernel, so they are bound
        again at the same paths, where the clients reconnect."""
        if not self.plain or self.listeners is None or self.socket_dir is None:
            return
        if all(os.path.exists(self._path(name)) for name in PORT_NAMES):
            return
        forwarder = PortForwarder.instance()
        for name, listener in self.listeners.items():
            forwarder.close_listener(listener)
            self.listeners[name] = forwarder.listen(self._opener(name), path=self._path(name))

    def endpoints(self) -> dict[str, Any]:
        """transport, ip and the five ports by which the clients reach the listeners."""
        if self.plain and self.socket_dir is not None:
            return ipc_connection(self.socket_dir)
        ports = {name: lst.getsockname()[1] for name, lst in (self.listeners or {}).items()}
        return {"transport": "tcp", "ip": "127.0.0.1", **ports}

    def point_manager(self, km: Any) -> None:
        for name, value in self.endpoints().items():
            setattr(km, name, value)

    def close(self) -> None:
        if self.listeners:
            forwarder = PortForwarder.instance()
            for listener in self.listeners.values():
                forwarder.close_listener(listener)
        self.listeners = None
        if self.socket_dir is not None:
            remove_private_dir(self.socket_dir)
            self.socket_dir = None

    def _path(self, name: str) -> str:
        return f"{ipc_connection(self.socket_dir or '')['ip']}-{IPC_PORTS[name]}"

    def _opener(self, name: str) -> Callable[[], Any]:
        return functools.partial(self.open_channel, name)

    def open_channel(self, name: str) -> Any:
        """A channel to the kernel's ``name`` port; RETRY while reconnecting or gated."""
        conn, ports, stopping = self._route()
        if ports is None or conn is None:
            return None
        if not conn.connected and conn.fatal is None and not stopping:
            return RETRY  # being re-established: the forwarder holds the socket
        if name in REQUEST_PORTS and self._held_after_reconnect(conn, time.monotonic()):
            return RETRY
        chan = conn.open_forward(ports.get(name, 0))
        if name == "iopub_port" and chan is not None:
            self._iopub_opened_at = time.monotonic()
        return chan

    def _held_after_reconnect(self, conn: SSHConnection, now: float) -> bool:
        """Just reconnected: IOPub's subscription must reach the kernel before the first
        request does, or that request's output is published to no one.  So requests
        wait until IOPub's channel is open again, plus a head start for the
        subscription (at most IOPUB_WAIT if no one subscribes)."""
        if conn.reconnected_at is None:
            return False
        iopub_at = self._iopub_opened_at
        if iopub_at is None or iopub_at < conn.reconnected_at:
            return now - conn.reconnected_at < IOPUB_WAIT
        return now - iopub_at < IOPUB_HEAD_START
