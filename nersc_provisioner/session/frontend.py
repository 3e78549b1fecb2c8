"""The five sockets that Jupyter's clients connect to, on the Jupyter side.

ROUTER for shell, control and stdin (a reply goes back to the client whose identity
leads it), XPUB for IOPub (a PUB that also says when a subscriber comes and goes),
ROUTER for the heartbeat (it answers like REP, but may also stay silent).  Either TCP
on 127.0.0.1 with CurveZMQ (the server keys are the kernel manager's, so its clients
connect unchanged), or IPC in a private directory: other users of the Jupyter host can
neither read nor drive them.  They are bound once and
keep their ports (or paths) across reconnects and kernel restarts.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import deque
from collections.abc import Mapping, Sequence

import zmq

from ..transports.local_sockets import check_private_dir
from .protocol import CONTROL, IOPUB, SHELL, STDIN

PORT_NAMES = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")
#: The channel each port carries ("hb" is answered here).
PORT_CHANNELS = {
    "shell_port": SHELL,
    "control_port": CONTROL,
    "stdin_port": STDIN,
    "iopub_port": IOPUB,
}
#: In a private directory the sockets are ``{dir}/k-1`` .. ``k-5`` (ZeroMQ's IPC
#: endpoints are ``ipc://{ip}-{port}``), as the tunnel's are.
IPC_STEM = "k"
IPC_PORTS = {name: index for index, name in enumerate(PORT_NAMES, start=1)}
CHANNEL_PORTS = {channel: name for name, channel in PORT_CHANNELS.items()}
#: IOPub messages kept while no client subscribes, at most this many bytes.
DEFAULT_HOLD_BYTES = 64 * 1024 * 1024

_context: zmq.Context[zmq.Socket[bytes]] | None = None
_context_lock = threading.Lock()


def shared_context() -> zmq.Context[zmq.Socket[bytes]]:
    """One ZeroMQ context for every local end of the process (one I/O thread)."""
    global _context
    with _context_lock:
        if _context is None or _context.closed:
            _context = zmq.Context()
        return _context


def _key(value: str | bytes) -> bytes:
    key = value.encode("ascii") if isinstance(value, str) else value
    if len(key) != 40:
        raise ValueError("CurveZMQ keys are 40 characters of Z85")
    return key


class Frontend:
    """The bound sockets and their addresses; IOPub held while no one subscribes
    (a Jupyter server that has just reattached, before its first client connects)."""

    def __init__(
        self,
        *,
        curve_keys: tuple[str | bytes, str | bytes] | None = None,
        ipc_dir: str | None = None,
        ports: Mapping[str, int] | None = None,
        hold_bytes: int = DEFAULT_HOLD_BYTES,
    ) -> None:
        self.hold_bytes = hold_bytes
        self.subscriptions: set[bytes] = set()
        self.held: deque[Sequence[memoryview]] = deque()
        self.held_bytes = 0
        self.held_dropped = 0
        if (curve_keys is None) == (ipc_dir is None):
            raise ValueError("give curve_keys (TCP on 127.0.0.1) or ipc_dir, not both or neither")
        self.ipc_dir = ipc_dir
        self.curve = (_key(curve_keys[0]), _key(curve_keys[1])) if curve_keys else None
        if ipc_dir is not None:
            check_private_dir(ipc_dir)
            self.transport, self.ip = "ipc", os.path.join(ipc_dir, IPC_STEM)
            wanted = dict(IPC_PORTS)
        else:
            self.transport, self.ip = "tcp", "127.0.0.1"
            wanted = dict.fromkeys(PORT_NAMES, 0)
        wanted.update(ports or {})
        self.ports: dict[str, int] = {}
        self.sockets: dict[str, zmq.Socket[bytes]] = {}
        try:
            for name in PORT_NAMES:
                self._bind(name, wanted[name])
        except BaseException:
            self.close()
            raise

    def _bind(self, name: str, port: int) -> None:
        kind = zmq.XPUB if name == "iopub_port" else zmq.ROUTER
        sock: zmq.Socket[bytes] = shared_context().socket(kind)
        self.sockets[name] = sock
        sock.linger = 0
        sock.sndhwm = 0  # a slow client gets everything late rather than not at all
        sock.rcvhwm = 0
        if self.curve is not None:
            sock.curve_server = True
            sock.curve_publickey, sock.curve_secretkey = self.curve
        if self.transport == "ipc":
            sock.bind(self.address(name, port))
            self.ports[name] = port
        else:
            sock.bind(f"tcp://127.0.0.1:{port}")
            endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
            self.ports[name] = int(endpoint.rsplit(":", 1)[1])

    def send(self, channel: int, parts: Sequence[memoryview]) -> None:
        """A message from the kernel, to the client its first part names (IOPub: all)."""
        if channel == IOPUB and not self.subscriptions:
            self._hold(parts)
            return
        self.sockets[CHANNEL_PORTS[channel]].send_multipart(parts, copy=False)

    def subscription(self, event: bytes) -> None:
        """XPUB says a topic gained its first subscriber (1) or lost its last (0)."""
        if event[:1] == b"\x01":
            self.subscriptions.add(event[1:])
            iopub = self.sockets["iopub_port"]
            while self.held:
                iopub.send_multipart(self.held.popleft(), copy=False)
            self.held_bytes = 0
        elif event[:1] == b"\x00":
            self.subscriptions.discard(event[1:])

    def _hold(self, parts: Sequence[memoryview]) -> None:
        self.held.append(parts)
        self.held_bytes += sum(len(p) for p in parts)
        while self.held_bytes > self.hold_bytes and len(self.held) > 1:
            dropped = self.held.popleft()
            self.held_bytes -= sum(len(p) for p in dropped)
            self.held_dropped += 1

    def address(self, name: str, port: int | None = None) -> str:
        port = self.ports[name] if port is None else port
        if self.transport == "ipc":
            return f"ipc://{self.ip}-{port}"
        return f"tcp://127.0.0.1:{port}"

    def connection_info(self) -> dict[str, object]:
        return {"transport": self.transport, "ip": self.ip, **self.ports}

    def restore(self) -> None:
        """Bind again the IPC sockets whose files were removed (jupyter_client removes
        a kernel's IPC files at a restart; the clients reconnect to the same paths)."""
        if self.transport != "ipc":
            return
        for name, sock in self.sockets.items():
            if not os.path.exists(f"{self.ip}-{self.ports[name]}"):
                with contextlib.suppress(zmq.ZMQError):
                    sock.unbind(self.address(name))
                sock.bind(self.address(name))

    def close(self) -> None:
        for sock in self.sockets.values():
            sock.close(linger=0)
        self.sockets = {}
