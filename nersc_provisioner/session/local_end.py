"""The Jupyter side of a session: five local sockets, one stream to the relay.

A :class:`LocalEnd` runs in a thread of its own in the Jupyter server's process (it
never blocks an asyncio loop).  Jupyter's clients connect to its sockets
(:mod:`.frontend`); it carries their requests to the relay over a stream that the
caller opens (``open_stream()``: a paramiko ``direct-tcpip`` channel, or a socket),
and the kernel's replies and output back.  When the stream dies it opens another;
nothing in flight is lost, nothing is delivered twice (:class:`~.protocol.Link`).

IOPub messages that arrive while no client subscribes (a Jupyter server that has just
reattached, before its first client connects) are held, up to ``hold_bytes``, and
published when one does, instead of being published to no one.

The heartbeat is answered here: while a session is up, and for ``hb_grace`` seconds
while it reconnects, so that a frontend does not declare the kernel dead during a
network blip.  Not after that, nor once the relay has said that the kernel ended.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import zmq

from .connector import Dialer, Opened, Stream, StreamOpener
from .frontend import DEFAULT_HOLD_BYTES, PORT_CHANNELS, Frontend
from .protocol import (
    ACK_DELAY,
    IOPUB,
    AuthError,
    Delivery,
    Link,
    Notice,
    ProtocolError,
    SendBuffer,
)

log = logging.getLogger("nersc_provisioner.session")

#: Default heartbeat grace: a 30 s Wi-Fi blip, plus the SSH connection's own time to
#: notice it (keepalives every 10 s) and to come back (its reconnect backoff).
DEFAULT_HB_GRACE = 60.0
READ_SIZE = 256 * 1024
WRITE_RETRY = 0.005  # a channel whose window is full cannot wake us; retry this often
HEARTBEAT = -1  # (not a protocol channel: answered here)


@dataclass(frozen=True)
class SessionStats:
    connected: bool
    #: Authenticated streams so far (the first one included).
    sessions: int
    kernel_exited: bool
    #: Another Jupyter side connected to the relay since (a reattach elsewhere): this
    #: one no longer reconnects by itself (``reconnect_now()`` takes the session back).
    replaced: bool
    heartbeat_answered: bool
    #: Requests not yet acknowledged by the relay (and their bytes).
    unacknowledged: int
    unacknowledged_bytes: int
    #: Messages passed on to Jupyter's clients; duplicates dropped on the way.
    delivered: int
    duplicates: int
    #: Output the relay dropped at its bound (as its notices said).
    dropped_messages: int
    dropped_bytes: int
    #: Requests given up at ``new_relay`` (the old kernel never acknowledged them).
    dropped_at_new_relay: int
    #: IOPub messages held for want of a subscriber; and those dropped past hold_bytes.
    iopub_held: int
    iopub_held_dropped: int
    auth_failures: int
    stream_errors: int
    last_error: str

    @classmethod
    def of(cls, end: LocalEnd) -> SessionStats:
        counts, link, frontend = end._counts, end._link, end._frontend
        return cls(
            connected=end.connected,
            sessions=link.streams,
            kernel_exited=end._kernel_exited,
            replaced=end._replaced,
            heartbeat_answered=end._answering(time.monotonic()),
            unacknowledged=len(link.buffer),
            unacknowledged_bytes=link.buffer.nbytes,
            delivered=counts["delivered"],
            duplicates=link.receiver.duplicates,
            dropped_messages=counts["dropped_messages"],
            dropped_bytes=counts["dropped_bytes"],
            dropped_at_new_relay=counts["dropped_at_new_relay"],
            iopub_held=len(frontend.held) if frontend else 0,
            iopub_held_dropped=frontend.held_dropped if frontend else 0,
            auth_failures=counts["auth_failures"],
            stream_errors=counts["stream_errors"],
            last_error=end._last_error,
        )


class LocalEnd:
    """One kernel's sockets on the Jupyter side, and its session with the relay.

    ``curve_keys`` (public, secret; the kernel manager's) for TCP on 127.0.0.1, or
    ``ipc_dir`` (a 0700 directory) for IPC.  ``ports``: the ports (or IPC numbers) to
    bind; by default free ones.  ``secret``: the relay's, 16 bytes or more.
    """

    def __init__(
        self,
        open_stream: StreamOpener,
        secret: bytes,
        *,
        curve_keys: tuple[str | bytes, str | bytes] | None = None,
        ipc_dir: str | None = None,
        ports: Mapping[str, int] | None = None,
        hb_grace: float = DEFAULT_HB_GRACE,
        ping_interval: float = 5.0,
        dead_after: float = 20.0,
        handshake_timeout: float = 10.0,
        hold_bytes: int = DEFAULT_HOLD_BYTES,
        name: str = "npr-session",
    ) -> None:
        if len(secret) < 16:
            raise ValueError("the relay secret must be at least 16 bytes")
        self._frontend_args: dict[str, Any] = {
            "curve_keys": curve_keys,
            "ipc_dir": ipc_dir,
            "ports": ports,
        }
        self.hb_grace, self.ping_interval, self.dead_after = hb_grace, ping_interval, dead_after
        self.handshake_timeout = handshake_timeout
        self.hold_bytes = hold_bytes
        self.name = name
        self._dialer = Dialer(
            open_stream,
            bytes(secret),
            instance=os.urandom(16),
            timeout=handshake_timeout,
            wake=self._wake,
        )
        self._link = Link(SendBuffer(), resume_on_ack=False)
        self._frontend: Frontend | None = None
        self._thread: threading.Thread | None = None
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = -1, -1
        self._up = threading.Event()
        self._poller = zmq.Poller()
        # Loop state (the loop thread's alone).
        self._stream: Stream | None = None
        self._stream_fd = -1
        self._write_retry_at: float | None = None
        self._ack_at: float | None = None
        self._down_since: float | None = time.monotonic()
        self._last_rx = self._last_tx = 0.0
        self._pings = 0
        self._stopping = False
        self._kernel_exited = False
        self._replaced = False
        self._counts = dict.fromkeys(
            ("delivered", "dropped_messages", "dropped_bytes", "dropped_at_new_relay"), 0
        )
        self._counts.update(auth_failures=0, stream_errors=0)
        self._last_error = ""

    # --- the API (any thread) -----------------------------------------------------------

    def start(self) -> None:
        """Bind the five sockets (errors raise here) and start the thread."""
        self._frontend = Frontend(**self._frontend_args, hold_bytes=self.hold_bytes)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def connection_info(self) -> dict[str, object]:
        """``transport``, ``ip`` and the five ports, for the kernel manager."""
        if self._frontend is None:
            raise RuntimeError("start() the local end first")
        return self._frontend.connection_info()

    @property
    def ports(self) -> dict[str, int]:
        return dict(self._frontend.ports) if self._frontend else {}

    @property
    def connected(self) -> bool:
        return self._up.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._up.wait(timeout)

    def stats(self) -> SessionStats:
        return SessionStats.of(self)

    def new_relay(self, open_stream: StreamOpener, secret: bytes) -> None:
        """The kernel was restarted, with a relay of its own: talk to that one.  The old
        kernel's unacknowledged requests are dropped (counted in the stats)."""
        self._call(lambda: self._switch_relay(open_stream, bytes(secret)))

    def reconnect_now(self) -> None:
        """The link is back (say, SSH reconnected): try at once, without back-off.  After
        another Jupyter side took the session over, this takes it back."""
        self._call(self._take_back)

    def restore_endpoints(self) -> None:
        """Bind again IPC socket files that were removed (at a restart); waits for it."""
        if self._frontend is not None:
            self._call(self._frontend.restore, wait=5.0)

    def stop(self, timeout: float = 5.0) -> None:
        """Close the stream and the sockets; end the thread."""
        if self._thread is None:
            return
        self._call(self._request_stop)
        self._thread.join(timeout)
        self._thread = None

    def _call(self, action: Callable[[], None], wait: float = 0.0) -> None:
        """Run ``action`` on the loop's thread (the sockets are its alone)."""
        done = threading.Event()

        def run() -> None:
            try:
                action()
            finally:
                done.set()

        self._commands.put(run)
        self._wake()
        if wait:
            done.wait(wait)

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    # --- the loop -----------------------------------------------------------------------

    def _run(self) -> None:
        frontend = self._frontend
        if frontend is None:
            return
        poller = self._poller
        poller.register(self._wake_r, zmq.POLLIN)
        channels = {}
        for name, sock in frontend.sockets.items():
            poller.register(sock, zmq.POLLIN)  # (IOPub's XPUB: subscriptions)
            channels[sock] = PORT_CHANNELS.get(name, HEARTBEAT)
        try:
            while not self._stopping:
                now = time.monotonic()
                self._timers(now)
                self._flush(now)  # (what came in last time round, and an ACK or PING due)
                ready = dict(poller.poll(self._timeout(now)))
                now = time.monotonic()
                if self._wake_r in ready:
                    self._run_commands()
                if self._stream is not None and self._stream_fd in ready:
                    self._from_stream(now)
                for sock, channel in channels.items():
                    if sock in ready:
                        self._from_clients(sock, channel, now)
        except Exception:  # the loop must not die silently: say why, then clean up
            log.exception("session %s: the local end failed", self.name)
        finally:
            self._shutdown()

    def _timeout(self, now: float) -> int:
        due = [now + 1.0]
        if self._stream is None and not self._dialer.busy and self._may_dial:
            due.append(self._dialer.retry_at)
        if self._stream is not None:
            due.append(self._last_tx + self.ping_interval)
            due.append(self._last_rx + self.dead_after)
        if self._write_retry_at is not None:
            due.append(self._write_retry_at)
        if self._ack_at is not None:
            due.append(self._ack_at)
        return max(0, int((min(due) - now) * 1000) + 1)

    def _timers(self, now: float) -> None:
        self._collect_attempt(now)
        if self._stream is None:
            if self._may_dial:
                self._dialer.dial(now)
            return
        if self._ack_at is not None and now >= self._ack_at:
            self._ack_at = None
            self._link.ack_soon()
        if now - self._last_rx > self.dead_after:
            self._end_stream(now, f"no word from the relay for {self.dead_after:.0f} s")
        elif now - self._last_tx >= self.ping_interval:
            self._pings += 1
            self._link.ping(self._pings)

    def _run_commands(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self._wake_r, 4096)
        while True:
            try:
                action = self._commands.get_nowait()
            except queue.Empty:
                return
            action()

    def _request_stop(self) -> None:
        self._stopping = True

    @property
    def _may_dial(self) -> bool:
        return not self._kernel_exited and not self._replaced

    def _take_back(self) -> None:
        self._replaced = False
        self._dialer.retry_now()

    def _switch_relay(self, open_stream: StreamOpener, secret: bytes) -> None:
        now = time.monotonic()
        self._dialer.switch(open_stream, secret)
        if self._stream is not None:
            self._end_stream(now, "a new relay (kernel restart)")
        self._counts["dropped_at_new_relay"] += self._link.buffer.clear()
        self._link.receiver.reset()
        self._link.peer_instance = None
        self._kernel_exited = self._replaced = False
        self._down_since = now

    # --- the stream ---------------------------------------------------------------------

    def _collect_attempt(self, now: float) -> None:
        try:
            opened = self._dialer.result(now)
        except AuthError as exc:
            self._counts["auth_failures"] += 1
            self._report(f"refused the relay's port: {exc}")
            return
        except Exception as exc:  # OSError, ProtocolError; paramiko's EOFError, SSHException
            self._counts["stream_errors"] += 1
            self._report(f"cannot open a session: {exc.__class__.__name__}: {exc}")
            return
        if opened is not None and self._stopping:
            opened.stream.close()
        elif opened is not None:
            self._begin(opened, now)

    def _report(self, why: str) -> None:
        if why != self._last_error:
            log.warning("session %s: %s", self.name, why)
        self._last_error = why

    def _begin(self, opened: Opened, now: float) -> None:
        stream = opened.stream
        stream.setblocking(False)
        self._stream, self._stream_fd = stream, stream.fileno()
        self._poller.register(self._stream_fd, zmq.POLLIN)
        fresh = self._link.begin(opened.peer_instance)
        self._last_rx = self._last_tx = now
        self._down_since = None
        self._write_retry_at = None
        self._up.set()
        log.info("session %s: up (%s)", self.name, "new relay" if fresh else "resumed")
        if opened.leftover:
            self._deliver(self._link.feed(opened.leftover))

    def _end_stream(self, now: float, why: str) -> None:
        stream, self._stream = self._stream, None
        self._up.clear()
        self._link.end()
        self._write_retry_at = self._ack_at = None
        if self._down_since is None:
            self._down_since = now
        self._last_error = why
        self._dialer.retry_at = now  # open_stream() says quickly whether the link is down
        if stream is not None:
            with contextlib.suppress(KeyError, zmq.ZMQError):
                self._poller.unregister(self._stream_fd)
            with contextlib.suppress(Exception):
                stream.close()
        log.info("session %s: down (%s)", self.name, why)

    def _from_stream(self, now: float) -> None:
        stream = self._stream
        for _ in range(16):
            if stream is None or self._stream is not stream:
                return
            try:
                data = stream.recv(READ_SIZE)
            except (BlockingIOError, TimeoutError):
                return
            except Exception as exc:  # a socket's OSError; paramiko's EOFError, SSHException
                self._end_stream(now, f"stream lost: {exc.__class__.__name__}: {exc}")
                return
            if not data:
                self._end_stream(now, "the relay closed the stream")
                return
            self._last_rx = now
            try:
                self._deliver(self._link.feed(data))
            except ProtocolError as exc:
                self._counts["stream_errors"] += 1
                self._end_stream(now, f"protocol error: {exc}")
                self._dialer.back_off(now)  # (it may recur)
                return
            if self._ack_at is None and self._link.ack_waiting:
                self._ack_at = now + ACK_DELAY

    def _deliver(self, events: list[Delivery | Notice]) -> None:
        frontend = self._frontend
        if frontend is None:
            return
        for event in events:
            if isinstance(event, Delivery):
                self._counts["delivered"] += 1
                frontend.send(event.channel, event.parts)
            elif event.info.get("kernel") == "exited":
                self._kernel_exited = True
                log.info("session %s: the relay says the kernel has ended", self.name)
            elif event.info.get("session") == "replaced":
                self._replaced = True
                log.warning("session %s: another Jupyter side took the session over", self.name)
            elif isinstance(event.info.get("dropped"), dict):
                self._counts["dropped_messages"] += int(event.info["dropped"].get("messages", 0))
                self._counts["dropped_bytes"] += int(event.info["dropped"].get("bytes", 0))

    def _flush(self, now: float) -> None:
        stream = self._stream
        if stream is None or (self._write_retry_at is not None and now < self._write_retry_at):
            return
        self._write_retry_at = None
        while self._stream is stream:
            view = self._link.pending()
            if not view:
                return
            try:
                sent = stream.send(bytes(view))
            except (BlockingIOError, TimeoutError):
                sent = 0
            except Exception as exc:
                self._end_stream(now, f"stream lost while sending: {exc.__class__.__name__}")
                return
            if sent <= 0:  # full: a channel cannot wake us when it drains
                self._write_retry_at = now + WRITE_RETRY
                return
            self._link.wrote(sent)
            self._last_tx = now

    # --- the clients --------------------------------------------------------------------

    def _from_clients(self, sock: zmq.Socket[bytes], channel: int, now: float) -> None:
        frontend = self._frontend
        if frontend is None:
            return
        for _ in range(1000):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            if channel == HEARTBEAT:  # echo, while the kernel counts as alive
                if self._answering(now):
                    sock.send_multipart(frames, copy=False)
            elif channel == IOPUB:
                frontend.subscription(frames[0].bytes)
            else:
                try:
                    self._link.send(channel, [frame.buffer for frame in frames])
                except ProtocolError as exc:  # over 2 GiB: it cannot be framed
                    log.warning("session %s: a request was not sent: %s", self.name, exc)

    def _answering(self, now: float) -> bool:
        if self._kernel_exited:
            return False
        if self._up.is_set():
            return True
        down = self._down_since
        return down is not None and now - down < self.hb_grace

    def _shutdown(self) -> None:
        if self._stream is not None:
            self._end_stream(time.monotonic(), "stopped")
        self._dialer.abandon()
        if self._frontend is not None:
            self._frontend.close()
        wake_r, wake_w = self._wake_r, self._wake_w
        self._wake_r = self._wake_w = -1  # (first: no other thread writes to a reused fd)
        for fd in (wake_r, wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)


def tcp_opener(host: str, port: int, timeout: float = 5.0) -> StreamOpener:
    """An ``open_stream`` that connects a plain TCP socket (tests, benchmarks)."""

    def open_stream() -> Stream | None:
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    return open_stream
