"""Opening one session stream: the caller's ``open_stream()``, then the handshake.

Blocking, with a deadline; the local end runs it on a worker thread, never on its
own loop (``open_stream`` may wait for an SSH channel) and never on an asyncio loop.
"""

from __future__ import annotations

import select
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from .protocol import Handshake


class Stream(Protocol):
    """What ``open_stream()`` returns: a connected socket, or a paramiko ``Channel``
    (a ``direct-tcpip`` channel to the relay's port).  ``fileno()`` must be selectable."""

    def recv(self, size: int, /) -> bytes: ...

    def send(self, data: bytes, /) -> int: ...

    def close(self) -> None: ...

    def fileno(self) -> int: ...

    def setblocking(self, flag: bool, /) -> None: ...


#: Returns a new stream to the relay, or None while the link is down (then it is
#: asked again shortly).  It may raise OSError (the relay refuses: it is gone).
StreamOpener = Callable[[], "Stream | None"]


class LinkDown(Exception):
    """``open_stream()`` returned None: no link to the relay's host right now."""


@dataclass
class Opened:
    stream: Stream
    peer_instance: bytes
    #: Bytes that followed the handshake in the same read.
    leftover: bytes


def _send_all(stream: Stream, data: bytes, deadline: float) -> None:
    view = memoryview(data)
    while view:
        if time.monotonic() > deadline:
            raise TimeoutError("the handshake timed out")
        sent = stream.send(bytes(view))
        view = view[sent:]


def open_session(
    open_stream: StreamOpener, secret: bytes, instance: bytes, timeout: float
) -> Opened:
    """A stream on which both sides have proved the secret.

    Raises :class:`LinkDown`, :class:`~.protocol.AuthError` (the peer does not know
    the secret: nothing but our HELLO was sent to it), :class:`~.protocol.ProtocolError`,
    ``OSError`` or ``TimeoutError``.  A stream that fails is closed.
    """
    stream = open_stream()
    if stream is None:
        raise LinkDown("no link to the relay")
    try:
        stream.setblocking(True)
        deadline = time.monotonic() + timeout
        handshake = Handshake(secret, initiator=True, instance=instance)
        _send_all(stream, handshake.opening(), deadline)
        while not handshake.done:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("the relay did not complete the handshake in time")
            readable, _, _ = select.select([stream.fileno()], [], [], remaining)
            if not readable:
                continue
            data = stream.recv(4096)
            if not data:
                raise ConnectionError("the relay closed the connection during the handshake")
            reply = handshake.feed(data)
            if reply:
                _send_all(stream, reply, deadline)
        return Opened(stream, handshake.peer_instance or b"", handshake.leftover())
    except BaseException:
        stream.close()
        raise
