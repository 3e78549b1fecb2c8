"""Local port forwarding over SSH, with one thread for every stream of every kernel.

Each forwarded port is a listening socket on local 127.0.0.1.  An accepted
connection opens a ``direct-tcpip`` channel over the host's shared SSH
connection; one selector thread moves the bytes both ways for all of them,
so the thread count does not grow with kernels or streams.  Back-pressure:
a side whose buffer is full stops being read until the other side drains.

While the SSH connection is being re-established, a newly accepted local
connection is held (not closed) and its channel retried every
``RETRY_EVERY`` seconds, for up to ``HOLD_FOR``: ZeroMQ's reconnect then
completes the moment the SSH connection is back, instead of failing and
backing off in between.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import paramiko

log = logging.getLogger("nersc_provisioner.forwarding")

BUFFER_LIMIT = 4 * 1024 * 1024
CHUNK = 256 * 1024
# When a channel's window is full we cannot be woken by it; retry this often.
CHANNEL_RETRY = 0.005

#: What an opener returns when the channel cannot be opened *yet* (the connection
#: is being re-established); None means never (the kernel is gone).
RETRY = "retry"
RETRY_EVERY = 0.1
HOLD_FOR = 30.0

ChannelOpener = Callable[[], "paramiko.Channel | str | None"]


@dataclass(eq=False)
class _Pair:
    sock: socket.socket
    chan: paramiko.Channel
    to_chan: bytearray = field(default_factory=bytearray)
    to_sock: bytearray = field(default_factory=bytearray)
    sock_eof: bool = False
    chan_eof: bool = False
    closed: bool = False
    sock_events: int = 0
    chan_events: int = 0


def _alive(chan: paramiko.Channel) -> bool:
    transport = chan.get_transport()
    return transport is not None and transport.is_active()


class PortForwarder:
    """Moves bytes between local sockets and SSH channels on one thread."""

    _instance: PortForwarder | None = None
    _instance_lock = threading.Lock()

    @classmethod
    def instance(cls) -> PortForwarder:
        with cls._instance_lock:
            if cls._instance is None or not cls._instance._thread.is_alive():
                cls._instance = cls()
            return cls._instance

    @classmethod
    def _forget_after_fork(cls) -> None:
        """In a forked child: a forwarder of its own when one is needed (the parent's
        thread did not come along; the lock may have been held by a thread that is gone)."""
        cls._instance_lock = threading.Lock()
        cls._instance = None

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        self._lock = threading.Lock()
        self._todo: list[Callable[[], None]] = []
        self._listeners: dict[socket.socket, ChannelOpener] = {}
        self._pairs: set[_Pair] = set()
        # Pairs with bytes for a channel whose window was full: retried every
        # CHANNEL_RETRY.  Only these and the pairs that had events are revisited
        # after a wake-up, so the cost of one message does not grow with the
        # number of streams (at 50 kernels there are 250).
        self._blocked: set[_Pair] = set()
        # (when to try again, socket, opener, give up at): accepted, waiting for a channel
        self._held: list[tuple[float, socket.socket, ChannelOpener, float]] = []
        self._openers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="nersc-forward-open")
        self._thread = threading.Thread(target=self._run, name="nersc-forwarder", daemon=True)
        self._thread.start()

    # --- called from any thread -------------------------------------------------

    def listen(self, opener: ChannelOpener, port: int = 0, path: str = "") -> socket.socket:
        """Listen on 127.0.0.1:``port`` (0: any free port), or on the Unix socket ``path``
        (in a directory only its user can enter); forward through ``opener``."""
        if path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # a stale socket file: the directory is ours alone
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        else:
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind(path or ("127.0.0.1", port))
        except OSError:
            listener.close()
            raise
        listener.listen(64)
        listener.setblocking(False)
        self._call(lambda: self._add_listener(listener, opener))
        return listener

    def close_listener(self, listener: socket.socket) -> None:
        self._call(lambda: self._remove_listener(listener))

    def stats(self) -> dict[str, int]:
        return {
            "listeners": len(self._listeners),
            "streams": len(self._pairs),
            "held": len(self._held),
        }

    def _call(self, action: Callable[[], None]) -> None:
        with self._lock:
            self._todo.append(action)
        os.write(self._wake_w, b"x")

    # --- the forwarding thread --------------------------------------------------

    def _add_listener(self, listener: socket.socket, opener: ChannelOpener) -> None:
        self._listeners[listener] = opener
        self._selector.register(listener, selectors.EVENT_READ, ("listen", listener))

    def _remove_listener(self, listener: socket.socket) -> None:
        if self._listeners.pop(listener, None) is not None:
            self._selector.unregister(listener)
        listener.close()

    def _run(self) -> None:
        while True:
            timeout = CHANNEL_RETRY if self._blocked else None
            if self._held:
                wait = max(0.0, min(due for due, *_ in self._held) - time.monotonic())
                timeout = wait if timeout is None else min(timeout, wait)
            touched: set[_Pair] = set(self._blocked)
            for key, events in self._selector.select(timeout):
                kind, obj = key.data
                if isinstance(obj, _Pair):
                    touched.add(obj)
                try:
                    if kind == "wake":
                        with contextlib.suppress(BlockingIOError):
                            os.read(self._wake_r, 4096)
                    elif kind == "listen":
                        self._accept(obj)
                    elif kind == "sock":
                        self._on_sock(obj, events)
                    elif kind == "chan":
                        self._on_chan(obj)
                except Exception:  # one stream's failure must not stop every other's
                    log.exception("forwarding: dropping a stream after an error")
                    if isinstance(obj, _Pair):
                        self._close(obj)
            with self._lock:
                todo, self._todo = self._todo, []
            for action in todo:
                try:
                    action()
                except Exception:
                    log.exception("forwarding: an internal action failed")
            self._retry_held()
            self._blocked.clear()
            for pair in touched:
                if pair.closed:
                    continue
                try:
                    if pair.to_chan:
                        self._flush_to_chan(pair)
                    self._update(pair)
                except Exception:
                    log.exception("forwarding: dropping a stream after an error")
                    self._close(pair)
                if pair.to_chan and not pair.closed:
                    self._blocked.add(pair)

    def _accept(self, listener: socket.socket) -> None:
        try:
            sock, _ = listener.accept()
        except OSError:
            return
        if sock.family == socket.AF_INET:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        opener = self._listeners.get(listener)
        if opener is None:
            sock.close()
            return
        # Opening a channel waits for the server; a slow host must not stall the
        # streams of every other kernel, so that wait happens on a worker thread.
        self._openers.submit(self._open, sock, opener, time.monotonic() + HOLD_FOR)

    def _open(self, sock: socket.socket, opener: ChannelOpener, give_up: float) -> None:
        chan: paramiko.Channel | str | None = None
        with contextlib.suppress(Exception):
            chan = opener()
        if chan == RETRY and time.monotonic() < give_up:
            # Reconnecting: hold the local connection and try again shortly.
            due = time.monotonic() + RETRY_EVERY
            self._call(lambda: self._held.append((due, sock, opener, give_up)))
            return
        if not isinstance(chan, paramiko.Channel):
            sock.close()  # the kernel is gone, or the host stayed unreachable
            return
        self._call(lambda: self._add_pair(sock, chan))

    def _retry_held(self) -> None:
        now = time.monotonic()
        due = [item for item in self._held if item[0] <= now]
        if not due:
            return
        self._held = [item for item in self._held if item[0] > now]
        for _, sock, opener, give_up in due:
            self._openers.submit(self._open, sock, opener, give_up)

    def _add_pair(self, sock: socket.socket, chan: paramiko.Channel) -> None:
        sock.setblocking(False)
        chan.settimeout(0.0)
        pair = _Pair(sock=sock, chan=chan)
        self._pairs.add(pair)
        self._update(pair)

    def _on_sock(self, pair: _Pair, events: int) -> None:
        if events & selectors.EVENT_WRITE and not self._flush_to_sock(pair):
            return
        if events & selectors.EVENT_READ and len(pair.to_chan) < BUFFER_LIMIT:
            try:
                data = pair.sock.recv(CHUNK)
            except BlockingIOError:
                return
            except OSError:
                self._close(pair)
                return
            if not data:
                pair.sock_eof = True
            pair.to_chan += data
            self._flush_to_chan(pair)

    def _on_chan(self, pair: _Pair) -> None:
        while len(pair.to_sock) < BUFFER_LIMIT:
            try:
                data = pair.chan.recv(CHUNK)
            except TimeoutError:
                break
            except (OSError, EOFError, paramiko.SSHException):
                data = b""
            if not data:
                pair.chan_eof = True
                break
            if not pair.to_sock:
                # The usual case: nothing queued, so send straight from what was read
                # and queue only the part the socket did not take (one copy fewer).
                try:
                    sent = pair.sock.send(data)
                except BlockingIOError:
                    sent = 0
                except OSError:
                    self._close(pair)
                    return
                if sent == len(data):
                    continue
                data = data[sent:]
            pair.to_sock += data
        self._flush_to_sock(pair)

    def _flush_to_sock(self, pair: _Pair) -> bool:
        """Send what the socket takes now; False if the pair had to be closed."""
        if pair.to_sock:
            try:
                sent = pair.sock.send(pair.to_sock)
                del pair.to_sock[:sent]
            except BlockingIOError:
                pass
            except OSError:
                self._close(pair)
                return False
        return True

    def _flush_to_chan(self, pair: _Pair) -> None:
        while pair.to_chan:
            try:
                sent = pair.chan.send(bytes(pair.to_chan[:CHUNK]))
            except TimeoutError:
                return
            except (OSError, EOFError, paramiko.SSHException):
                # (paramiko raises EOFError when the connection under it has gone)
                self._close(pair)
                return
            if sent <= 0:
                return
            del pair.to_chan[:sent]

    def _update(self, pair: _Pair) -> None:
        """Watch each side only for what can make progress now."""
        if pair.closed:
            return
        if (pair.chan_eof and not pair.to_sock) or (pair.sock_eof and not pair.to_chan):
            self._close(pair)
            return
        if pair.chan_eof and not _alive(pair.chan):
            # The SSH connection died under it: the stream is cut mid-way anyway, and
            # a client that is not reading must not hold back its reconnect.
            self._close(pair)
            return
        sock_events = 0
        if len(pair.to_chan) < BUFFER_LIMIT and not pair.sock_eof:
            sock_events |= selectors.EVENT_READ
        if pair.to_sock:
            sock_events |= selectors.EVENT_WRITE
        chan_events = 0
        if len(pair.to_sock) < BUFFER_LIMIT and not pair.chan_eof:
            chan_events = selectors.EVENT_READ
        pair.sock_events = self._watch(pair.sock, pair.sock_events, sock_events, ("sock", pair))
        pair.chan_events = self._watch(
            pair.chan.fileno(), pair.chan_events, chan_events, ("chan", pair)
        )

    def _watch(
        self, target: socket.socket | int, old: int, new: int, data: tuple[str, _Pair]
    ) -> int:
        if old == new:
            return new
        if old and new:
            self._selector.modify(target, new, data)
        elif new:
            self._selector.register(target, new, data)
        else:
            self._selector.unregister(target)
        return new

    def _close(self, pair: _Pair) -> None:
        if pair.closed:
            return
        pair.closed = True
        self._pairs.discard(pair)
        self._blocked.discard(pair)
        with contextlib.suppress(KeyError, ValueError, OSError):
            if pair.sock_events:
                self._selector.unregister(pair.sock)
        with contextlib.suppress(KeyError, ValueError, OSError):
            if pair.chan_events:
                self._selector.unregister(pair.chan.fileno())
        with contextlib.suppress(OSError):
            pair.sock.close()
        with contextlib.suppress(Exception):
            pair.chan.close()


os.register_at_fork(after_in_child=PortForwarder._forget_after_fork)
