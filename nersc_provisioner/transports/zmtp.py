"""Ask a ZeroMQ socket which security mechanism it uses, from its ZMTP greeting.

Every ZMTP 3 peer (libzmq 4.0 and later) opens a connection with a 64-byte
greeting: a 10-byte signature, the version, then the name of its security
mechanism (``NULL``, ``PLAIN`` or ``CURVE``), padded to 20 bytes.  Reading it
tells whether a kernel's socket really encrypts, whatever its connection file
says: ipykernel *merges* its ports into an existing connection file, so a
kernel without CurveZMQ support leaves our curve keys in that file untouched.

The probe sends the start of a greeting (signature and major version), reads
the peer's greeting up to its mechanism, and closes; the kernel sees a
connection that ended during its handshake, and ignores it.
Blocking: callers on an event loop run it in a thread.
"""

from __future__ import annotations

from typing import Protocol

SIGNATURE = b"\xff" + b"\x00" * 8 + b"\x7f"
GREETING = SIGNATURE + b"\x03\x00" + b"NULL".ljust(20, b"\x00") + b"\x00" + b"\x00" * 31


def parse_mechanism(greeting: bytes) -> str:
    """The mechanism named in a ZMTP 3 greeting, or "" if it is not one."""
    if len(greeting) < 32 or greeting[:1] != b"\xff" or greeting[9:10] != b"\x7f":
        return ""
    if greeting[10] < 3:  # ZMTP 1 or 2: no mechanism field
        return ""
    return greeting[12:32].rstrip(b"\x00").decode("ascii", "replace")


class Stream(Protocol):
    """A socket, or a paramiko channel (a ``direct-tcpip`` channel to the port)."""

    def settimeout(self, timeout: float | None) -> None: ...
    def sendall(self, data: bytes) -> None: ...
    def recv(self, size: int) -> bytes: ...


def read_mechanism(stream: Stream, timeout: float = 5.0) -> str:
    """``"CURVE"``, ``"NULL"``, ... as the ZeroMQ socket at the other end of ``stream``
    announces it, or "" if it sent no ZMTP 3 greeting within ``timeout``.  The caller
    closes ``stream``."""
    stream.settimeout(timeout)
    data = b""
    try:
        # Only the signature and the major version: libzmq answers with the rest of
        # its greeting (its mechanism among it) once it has read those, while a
        # mechanism of ours that does not match its own makes it close the
        # connection before its own greeting has gone out.
        stream.sendall(GREETING[:11])
        while len(data) < 32:
            chunk = stream.recv(64 - len(data))
            if not chunk:
                break
            data += chunk
    except (TimeoutError, OSError, EOFError):
        pass
    return parse_mechanism(data)
