"""The SSH connections one remote kernel uses, and their release.

Without Slurm: one, to the login node.  With Slurm: the login node's (it submits and
watches the job; absent when Jupyter runs on the login node itself), and the job
node's, carried inside it (or made from here).  Connections come from the
process-wide :class:`ConnectionPool` and are given back to it, never closed here:
the last user of a connection closes it.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import replace
from typing import Any

from ..errors import SSHConnectError
from ..slurm.allocation import Runner, local_runner, script_runner
from ..transports.connection import ConnectionPool, SSHConnection
from ..transports.ssh import SSHTarget, resolve_target
from .remote_options import RemoteOptions
from .workers import SSH_EXECUTOR, in_thread

#: Where compute nodes' host keys are, besides the user's known_hosts.
SYSTEM_KNOWN_HOSTS = "/etc/ssh/ssh_known_hosts"


def node_target(options: RemoteOptions, address: str, login: SSHTarget | None) -> SSHTarget:
    """A job's node, as ssh reaches it: from here (``login_is_local``, ~/.ssh/config
    and default keys), or from the login node with its user and keys."""
    if options.login_is_local:
        target = resolve_target(
            address,
            user=options.user,
            identity_file=options.identity_file,
            ssh_config=options.ssh_config or None,
            known_hosts=options.known_hosts,
        )
        known = tuple(dict.fromkeys((*target.known_hosts, SYSTEM_KNOWN_HOSTS)))
        return replace(target, known_hosts=known)
    if login is None:
        raise SSHConnectError("the login node connection is not open")
    known = tuple(dict.fromkeys((*login.known_hosts, SYSTEM_KNOWN_HOSTS)))
    return SSHTarget(
        alias=address,
        hostname=address,
        port=22,
        user=login.user,
        identity_files=login.identity_files,
        known_hosts=known,
    )


def slurm_runner(login: SSHConnection | None) -> Runner:
    """How Slurm commands run: here, or on the login node over its connection."""
    if login is None:
        return local_runner

    def run(script: str, timeout: float) -> tuple[int | None, list[str]]:
        return login.run_script(script, timeout=timeout)

    return script_runner(run)


class HostConnections:
    """The login connection and the connection to where the kernel runs."""

    def __init__(self, options: RemoteOptions) -> None:
        self.options = options
        #: The connection to where the kernel runs: the login node, or the job's node.
        self.conn: SSHConnection | None = None
        self.target: SSHTarget | None = None
        #: The connection to the login node (the same as ``conn`` without Slurm).
        self.login: SSHConnection | None = None
        self.login_target: SSHTarget | None = None

    async def open_login(self) -> SSHConnection:
        if self.login is None:
            self.login_target = await in_thread(self.options.target)
            self.login = ConnectionPool.get(self.login_target)
        conn = self.login
        try:
            await in_thread(conn.open, self.options.launch_timeout)
        except BaseException:
            await self.release()
            raise
        return conn

    async def use_login(self) -> SSHConnection:
        """Without Slurm: the kernel runs on the login node."""
        login = await self.open_login()
        self.conn, self.target = login, self.login_target
        return login

    async def use_node(self, address: str, via: SSHConnection | None) -> SSHConnection:
        """With Slurm: the connection to the job's node at ``address`` (a restart in the
        same job reuses it; a new job's node replaces it)."""
        target = await in_thread(node_target, self.options, address, self.login_target)
        if self.conn is not None and self.target != target:
            await self.release_node()
        if self.conn is None:
            self.conn, self.target = ConnectionPool.get(target, via=via), target
        conn = self.conn
        try:
            await in_thread(conn.open, self.options.launch_timeout)
        except BaseException:
            await self.release_node()
            raise
        return conn

    async def release_node(self) -> None:
        conn, target = self.conn, self.target
        self.conn = self.target = None
        if conn is not None and target is not None and conn is not self.login:
            await in_thread(ConnectionPool.put, target, conn)

    async def release(self) -> None:
        """Give back both connections; the last user closes one (blocking: in a thread)."""
        await self.release_node()
        login, target = self.login, self.login_target
        self.login = None
        if login is not None and target is not None:
            keep = self.options.connection_persist
            await in_thread(ConnectionPool.put, target, login, keep)

    def release_after(self, work: Future[Any], then: Callable[[], None] | None = None) -> None:
        """Give the connections back once ``work`` (a thread using them) has ended."""
        node, node_target_ = self.conn, self.target
        login, login_target = self.login, self.login_target
        keep = self.options.connection_persist
        self.conn = self.target = self.login = None
        if then is not None:
            then()

        def release(_: Future[Any]) -> None:
            if node is not None and node_target_ is not None and node is not login:
                ConnectionPool.put(node_target_, node)
            if login is not None and login_target is not None:
                ConnectionPool.put(login_target, login, keep)

        work.add_done_callback(lambda done: SSH_EXECUTOR.submit(release, done))
