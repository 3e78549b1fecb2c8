"""Opening one session stream: the caller's ``open_stream()``, then the handshake.

Blocking, with a deadline; the local end runs it on a worker thread, never on its
own loop (``open_stream`` may wait for an SSH channel) and never on an asyncio loop.
"""

from __future__ import annotations

import contextlib
import select
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
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


RETRY_DOWN = 0.1  # open_stream() said the link is down: ask again this soon
RETRY_MAX = 2.0  # after errors (refused, failed handshake), back off up to this

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _workers() -> ThreadPoolExecutor:
    """Workers that open streams and run handshakes, shared by all local ends."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="npr-session-open")
        return _pool


def _close_opened(attempt: Future[Opened]) -> None:
    with contextlib.suppress(Exception):
        attempt.result().stream.close()


class Dialer:
    """One attempt at a time to open a session, on the shared workers, with back-off.

    Owned by one local end's loop (not thread-safe); ``wake`` is called from the
    worker when an attempt ends."""

    def __init__(
        self,
        open_stream: StreamOpener,
        secret: bytes,
        *,
        instance: bytes,
        timeout: float,
        wake: Callable[[], None],
    ) -> None:
        self._open_stream, self._secret = open_stream, secret
        self._instance, self._timeout, self._wake = instance, timeout, wake
        self._attempt: Future[Opened] | None = None
        self._generation = self._attempt_generation = 0
        self.retry_at = 0.0
        self.backoff = RETRY_DOWN

    @property
    def busy(self) -> bool:
        return self._attempt is not None

    def switch(self, open_stream: StreamOpener, secret: bytes) -> None:
        """Another relay from now on; an attempt under way for the old one is discarded."""
        self._generation += 1
        self._open_stream, self._secret = open_stream, secret
        self.retry_now()

    def retry_now(self) -> None:
        self.retry_at = 0.0
        self.backoff = RETRY_DOWN

    def back_off(self, now: float) -> None:
        self.retry_at = now + self.backoff
        self.backoff = min(RETRY_MAX, self.backoff * 2)

    def dial(self, now: float) -> None:
        if self._attempt is not None or now < self.retry_at:
            return
        self._attempt_generation = self._generation
        attempt = _workers().submit(
            open_session, self._open_stream, self._secret, self._instance, self._timeout
        )
        attempt.add_done_callback(lambda _: self._wake())
        self._attempt = attempt

    def result(self, now: float) -> Opened | None:
        """The opened session, once an attempt has ended; its error re-raised (after
        scheduling the next attempt); None meanwhile, or when the link was down."""
        attempt = self._attempt
        if attempt is None or not attempt.done():
            return None
        self._attempt = None
        try:
            opened = attempt.result()
        except LinkDown:
            self.retry_at = now + RETRY_DOWN
            return None
        except Exception:
            self.back_off(now)
            raise
        if self._attempt_generation != self._generation:
            opened.stream.close()  # opened for a relay that has since been replaced
            self.retry_now()
            return None
        self.backoff = RETRY_DOWN
        return opened

    def abandon(self) -> None:
        """Stopping: a stream still being opened is closed when it is."""
        if self._attempt is not None:
            self._attempt.add_done_callback(_close_opened)
            self._attempt = None
