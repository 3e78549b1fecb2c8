"""One SSH connection per host, shared by every kernel on it, kept alive.

An :class:`SSHConnection` holds:

* the login (:func:`~nersc_provisioner.transports.ssh.connect`), pinned to the
  address of the first login, so that a reconnect through a load-balanced
  name lands on the same login node, where the kernels are;
* the remote agent on one PTY session (the PTY makes sshd set TCP_NODELAY on
  the whole connection; the agent answers ``alive``/``signal``/``cleanup``
  and renews the leases of the kernels it watches);
* a monitor thread that waits for the connection to end and reconnects with
  backoff.  Authentication and host-key errors stop it: they are reported
  once and never retried, so a locked account cannot come from us.

Everything here blocks; provisioners call it from worker threads.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import replace

import paramiko

from ..errors import (
    AuthenticationError,
    CertificateExpiredError,
    ChangedHostKeyError,
    SSHConnectError,
    SSHError,
    UnknownHostKeyError,
)
from .agent import agent_command, parse_reply, request_line
from .ssh import SSHLogin, SSHTarget, connect, connect_through, exec_script

log = logging.getLogger("nersc_provisioner.ssh")

WINDOW_SIZE = 16 * 1024 * 1024
MAX_PACKET = 256 * 1024
KEEPALIVE = 10
# sshd allows MaxSessions (default 10) session channels per connection.  The
# agent holds one; launches and other scripts share what is left, so that the
# 11th kernel started at once waits for a session instead of being refused.
EXEC_SESSIONS = 8
SESSION_RETRIES = 5  # a refused session channel (MaxSessions momentarily full) is retried
RENEW_EVERY = 5  # the agent renews each lease this often (lease_timeout >= 15)
BACKOFF = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0)
_FATAL = (AuthenticationError, CertificateExpiredError, ChangedHostKeyError, UnknownHostKeyError)


class SSHConnection:
    """A shared, self-healing SSH connection to one host."""

    def __init__(self, target: SSHTarget, via: SSHConnection | None = None) -> None:
        self.target = target
        #: Reach the target through this connection (a compute node via its login node).
        self.via = via
        self.login: SSHLogin | None = None
        self.node = ""
        self.reconnects = 0
        #: When the last reconnect made its new login usable (time.monotonic()), or None.
        self.reconnected_at: float | None = None
        self.down_since: float | None = None
        self.fatal: SSHError | None = None
        #: Guards the fields below; held for bookkeeping only, never across network I/O
        #: (a login that hangs must not hold up a request, a close or another opener).
        self._state = threading.Lock()
        self._agent: paramiko.Channel | None = None
        self._pending: dict[int, Future[str]] = {}
        self._seq = 0
        self._watched: set[str] = set()
        self._closing = False
        self._closed = threading.Event()  # wakes the monitor's backoff at close()
        self._logging_in = False  # a first login is under way (in some caller's thread)
        self._monitoring = False
        self._monitor_thread: threading.Thread | None = None
        self._users = 0
        self._users_lock = threading.Lock()
        #: Notified when the connection comes up, a login ends, it fails for good, or closes.
        self._changed = threading.Condition(threading.Lock())
        self._sessions = threading.BoundedSemaphore(EXEC_SESSIONS)
        # Agent requests are single short lines; one writer at a time keeps them whole.
        self._write = threading.Lock()

    # --- lifecycle ------------------------------------------------------------------

    def open(self, timeout: float = 60.0) -> None:
        """Log in (once) and start the agent.  Raises the login's error.

        One caller logs in; the others wait for it (or for the monitor's reconnect) on
        a condition, never past ``timeout``: a login that hangs (a host that accepts
        TCP and never speaks) must not keep a new kernel's start past its own time.
        """
        deadline = time.monotonic() + timeout
        while True:
            if self.fatal is not None:
                raise self.fatal
            with self._state:
                if self._closing:
                    raise SSHConnectError(f"the connection to {self.target.label} was closed")
                if self._monitoring and self.connected:
                    return
                first = not self._monitoring and not self._logging_in
                if first:
                    self._logging_in = True
            if first:
                self._first_login()
                return
            # Woken by the login or reconnect itself (or its end, or close()): no polling.
            with self._changed:
                self._changed.wait_for(
                    lambda: (
                        self.connected
                        or self.fatal is not None
                        or self._closing
                        or not (self._logging_in or self._monitoring)
                    ),
                    timeout=max(0.0, deadline - time.monotonic()),
                )
            if self.connected and self._monitoring:
                return
            if time.monotonic() >= deadline:
                raise self._still_reconnecting(timeout)

    def _first_login(self) -> None:
        try:
            self._login()
        except BaseException:
            with self._state:
                self._logging_in = False
            self._notify()
            raise
        monitor = threading.Thread(
            target=self._monitor, name=f"nersc-ssh-{self.target.hostname}", daemon=True
        )
        monitor.start()  # before it is published: wait_closed() may join it at once
        with self._state:
            self._logging_in = False
            self._monitoring = True
            self._monitor_thread = monitor
        self._notify()

    def _notify(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def _still_reconnecting(self, timeout: float) -> SSHConnectError:
        return SSHConnectError(
            f"still reconnecting to {self.target.label} after {timeout:.0f} s",
            hint="check the network and the host; the kernel is kept until "
            "reconnect_grace runs out",
        )

    def _connect(self) -> SSHLogin:
        if self.via is None:
            return connect(self.target)
        via = self.via.login
        if via is None or not self.via.connected:
            raise SSHConnectError(
                f"no connection to {self.via.target.label}, through which "
                f"{self.target.label} is reached",
                hint="it is being re-established; try again in a moment",
            )
        return connect_through(self.target, via.client)

    def _login(self) -> None:
        """Log in and start the agent, then make both visible at once, unless the
        connection was closed meanwhile: then the new login is closed, and with it the
        remote agent (its PTY session ends)."""
        login = self._connect()
        try:
            transport = login.client.get_transport()
            if transport is None:  # pragma: no cover - connect() returns a live login
                raise SSHConnectError(f"connection to {self.target.label} closed at once")
            transport.set_keepalive(KEEPALIVE)
            chan, pending, node = self._start_agent(transport)
        except BaseException:
            login.close()
            raise
        with self._state:
            closing = self._closing
            if not closing:
                if not self.target.jumps and not self.target.proxy_command and self.via is None:
                    # Pin the address: a reconnect must reach the same login node.
                    self.target = replace(self.target, address=transport.getpeername()[0])
                if self.down_since is not None:
                    # Set before the new login is visible: a channel opened on it (IOPub's,
                    # say) must count as opened after the reconnect, or the provisioner's
                    # IOPub-first gate waits its full IOPUB_WAIT for nothing.
                    self.reconnected_at = time.monotonic()
                self.login, self._agent, self._pending, self.node = login, chan, pending, node
        if closing:
            login.close()
            raise SSHConnectError(f"the connection to {self.target.label} was closed")
        for kernel_id in sorted(self._watched):
            self.request("watch", kernel_id)
        self.down_since = None
        self._notify()

    def _start_agent(
        self, transport: paramiko.Transport
    ) -> tuple[paramiko.Channel, dict[int, Future[str]], str]:
        """The agent on a PTY session of ``transport``: its channel, its table of pending
        requests, and the node it reports."""
        chan = transport.open_session()
        chan.get_pty(term="dumb", width=500, height=24)
        chan.exec_command(agent_command(RENEW_EVERY))
        ready: Future[str] = Future()
        # Each agent session has its own table of pending requests, so that the
        # reader of a dead session cannot fail the requests of its successor.
        pending = {0: ready}
        threading.Thread(
            target=self._read_agent, args=(chan, pending), name="nersc-ssh-agent", daemon=True
        ).start()
        node = ready.result(timeout=30).partition(" ")[2]
        return chan, pending, node

    def _read_agent(self, chan: paramiko.Channel, pending: dict[int, Future[str]]) -> None:
        buffer = b""
        while True:
            try:
                data = chan.recv(65536)
            except (OSError, EOFError):
                data = b""
            if not data:
                break
            buffer += data
            *lines, buffer = buffer.split(b"\n")
            for raw in lines:
                reply = parse_reply(raw)
                if reply is not None:
                    future = pending.pop(reply[0], None)
                    if future is not None and not future.done():
                        future.set_result(reply[1])
        for future in list(pending.values()):
            if not future.done():
                future.set_exception(SSHConnectError(f"connection to {self.target.label} lost"))
        pending.clear()

    def _monitor(self) -> None:
        while not self._closing:
            login = self.login
            transport = login.client.get_transport() if login else None
            if transport is not None:
                transport.join()  # returns when the connection ends
            if self._closing:
                return
            down_since = self.down_since = self.down_since or time.monotonic()
            log.warning("SSH connection to %s lost; reconnecting", self.target.label)
            with self._state:
                if self.login is login:
                    self.login = self._agent = None
            if login is not None:
                with contextlib.suppress(Exception):
                    login.close()
            if self._reconnect(down_since):
                return

    def _reconnect(self, down_since: float) -> bool:
        """Log in again, with backoff; True when the monitor is to stop (closed, or a
        fatal error: authentication and host-key errors are never retried)."""
        for attempt, delay in enumerate(_delays(), start=1):
            if self._closed.wait(delay):
                return True
            try:
                self._login()
            except _FATAL as exc:
                self.fatal = exc
                self._notify()
                log.error("not reconnecting to %s: %s", self.target.label, exc)
                return True
            except Exception as exc:
                if self._closing:
                    return True
                log.info("reconnect %d to %s failed: %s", attempt, self.target.label, exc)
                continue
            self.reconnects += 1
            log.warning(
                "reconnected to %s after %.1f s", self.target.label, time.monotonic() - down_since
            )
            return False
        return True  # not reached: _delays() is endless

    def close(self) -> None:
        """Close now.  A login under way meanwhile (a reconnect, a first open) closes
        its own new login when it ends, and its thread then stops."""
        with self._state:
            self._closing = True
            login, self.login, self._agent = self.login, None, None
        self._closed.set()
        if login is not None:
            login.close()
        self._notify()

    def wait_closed(self, timeout: float) -> bool:
        """After :meth:`close`: wait until no login is under way and the monitor thread
        has ended; True if so within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._changed:
            self._changed.wait_for(lambda: not self._logging_in, timeout=timeout)
        monitor = self._monitor_thread
        if monitor is not None:
            monitor.join(max(0.0, deadline - time.monotonic()))
        return self._closing and not self._logging_in and not (monitor and monitor.is_alive())

    @property
    def connected(self) -> bool:
        login = self.login
        transport = login.client.get_transport() if login else None
        return bool(transport and transport.is_active())

    # --- using it -------------------------------------------------------------------

    def transport(self) -> paramiko.Transport | None:
        login = self.login
        transport = login.client.get_transport() if login else None
        return transport if transport is not None and transport.is_active() else None

    def open_forward(self, port: int) -> paramiko.Channel | None:
        """A ``direct-tcpip`` channel to the remote 127.0.0.1:``port``, or None if down."""
        transport = self.transport()
        if transport is None or port <= 0:
            return None
        try:
            return transport.open_channel(
                "direct-tcpip",
                ("127.0.0.1", port),
                ("127.0.0.1", 0),
                window_size=WINDOW_SIZE,
                max_packet_size=MAX_PACKET,
                timeout=10,
            )
        except (paramiko.SSHException, OSError):
            return None

    def request(self, command: str, *args: str, timeout: float = 15.0) -> str:
        """Ask the agent; returns its answer ("ok", "alive", "dead", ...)."""
        request_line(0, command, args)  # every word checked before anything is registered
        if not self.connected:  # at once, not after a hanging reconnect's login (its lock)
            raise SSHConnectError(f"not connected to {self.target.label}")
        with self._state:
            chan = self._agent
            if chan is None or chan.closed or not self.connected:
                raise SSHConnectError(f"not connected to {self.target.label}")
            self._seq += 1
            seq = self._seq
            future: Future[str] = Future()
            self._pending[seq] = future
        with self._write:
            chan.sendall(request_line(seq, command, args))
        if command == "watch":
            self._watched.add(args[0])
        elif command == "unwatch":
            self._watched.discard(args[0])
        return future.result(timeout=timeout)

    def run_script(
        self, script: str, *, timeout: float, on_line: Callable[[str], bool] | None = None
    ) -> tuple[int | None, list[str]]:
        """Run ``script`` on the host (see :func:`~.ssh.exec_script`)."""
        with self._sessions:
            for attempt in range(SESSION_RETRIES + 1):
                transport = self.transport()
                if transport is None:
                    raise SSHConnectError(f"not connected to {self.target.label}")
                try:
                    return exec_script(transport, script, timeout=timeout, on_line=on_line)
                except TimeoutError:
                    raise
                except paramiko.SSHException as exc:
                    # The session was refused before anything ran: sshd frees a closed
                    # session's slot a moment after we close it, so under many
                    # simultaneous launches MaxSessions can still be full.  Retrying
                    # runs nothing twice; this is a channel, not a login.  (paramiko
                    # hands a refusal's ChannelException to whichever thread asks
                    # first, so a concurrent opener can see a bare "Unable to open
                    # channel." for its own refusal, on a live connection.)
                    refused = isinstance(exc, paramiko.ChannelException) or (
                        str(exc) == "Unable to open channel." and transport.is_active()
                    )
                    if not refused:
                        raise SSHConnectError(
                            f"the connection to {self.target.label} failed during a "
                            f"command: {type(exc).__name__}: {exc}",
                            hint="it is being re-established; try again in a moment",
                        ) from exc
                    if attempt == SESSION_RETRIES:
                        raise SSHConnectError(
                            f"{self.target.label} refused a session {attempt + 1} times: {exc}",
                            hint="sshd's MaxSessions may be lower than 10 there; fewer "
                            "kernels at once will do",
                        ) from exc
                    time.sleep(0.1 * (attempt + 1))
                except (EOFError, OSError) as exc:
                    raise SSHConnectError(
                        f"the connection to {self.target.label} failed during a command: "
                        f"{type(exc).__name__}: {exc}",
                        hint="it is being re-established; try again in a moment",
                    ) from exc
        raise SSHConnectError(f"no session on {self.target.label}")  # not reached

    # --- sharing --------------------------------------------------------------------

    def acquire(self) -> None:
        # Its own lock: the pool counts users while other callers wait on it.
        with self._users_lock:
            self._users += 1

    def release(self) -> int:
        with self._users_lock:
            self._users -= 1
            return self._users

    @property
    def users(self) -> int:
        with self._users_lock:
            return self._users


def _delays() -> Iterable[float]:
    yield from BACKOFF
    while True:
        yield BACKOFF[-1]


class ConnectionPool:
    """One :class:`SSHConnection` per target, shared by all kernels in this process.

    The last user's release closes a connection, or (``keep`` seconds, like OpenSSH's
    ControlPersist) leaves it open for the next kernel on that host, which then pays
    no second login."""

    _lock = threading.Lock()
    _connections: dict[SSHTarget, SSHConnection] = {}  # noqa: RUF012
    #: The pending close of each connection kept open with no user.
    _expiries: dict[SSHConnection, threading.Timer] = {}  # noqa: RUF012

    @classmethod
    def get(cls, target: SSHTarget, via: SSHConnection | None = None) -> SSHConnection:
        with cls._lock:
            conn = cls._connections.get(target)
            if conn is None or conn.fatal is not None or conn._closing or conn.via is not via:
                conn = SSHConnection(target, via)
                cls._connections[target] = conn
            expiry = cls._expiries.pop(conn, None)
            if expiry is not None:
                expiry.cancel()
            conn.acquire()
        return conn

    @classmethod
    def put(cls, target: SSHTarget, conn: SSHConnection, keep: float = 0.0) -> None:
        """Give back a connection.  The last user closes it, unless ``keep`` > 0 and it is
        up: then it closes after ``keep`` seconds without a new user."""
        with cls._lock:
            if conn.release() > 0:
                return
            pooled = cls._connections.get(target) is conn
            if keep > 0 and pooled and conn.connected:
                expiry = threading.Timer(keep, cls._expire, (target, conn))
                expiry.daemon = True
                cls._expiries[conn] = expiry
                expiry.start()
                return
            if pooled:
                del cls._connections[target]
        conn.close()

    @classmethod
    def _expire(cls, target: SSHTarget, conn: SSHConnection) -> None:
        with cls._lock:
            if cls._expiries.get(conn) is None or conn.users > 0:
                return  # taken again meanwhile
            del cls._expiries[conn]
            if cls._connections.get(target) is conn:
                del cls._connections[target]
        log.info("closing the SSH connection to %s: no kernel used it", target.label)
        conn.close()

    @classmethod
    def close_idle(cls) -> int:
        """Close at once every connection kept open with no user; how many."""
        with cls._lock:
            idle = list(cls._expiries.items())
            cls._expiries.clear()
            for conn, expiry in idle:
                expiry.cancel()
                for target, pooled in list(cls._connections.items()):
                    if pooled is conn:
                        del cls._connections[target]
        for conn, _ in idle:
            conn.close()
        return len(idle)

    @classmethod
    def count(cls) -> int:
        with cls._lock:
            return len(cls._connections)

    @classmethod
    def _forget_after_fork(cls) -> None:
        """In a forked child: the parent's connections are not ours to use or close.

        Their threads did not come along (nor the timers of those kept open without a
        user), and their sockets are the parent's SSH sessions (a message sent on one
        would corrupt the parent's).  The child opens connections of its own; the lock
        may have been held by a thread that is gone.
        """
        cls._lock = threading.Lock()
        cls._connections = {}
        cls._expiries = {}


os.register_at_fork(after_in_child=ConnectionPool._forget_after_fork)
