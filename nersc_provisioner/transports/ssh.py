"""Reaching a host over SSH with paramiko: resolve, verify, authenticate once.

* The target is resolved through ``~/.ssh/config`` with paramiko's own parser
  (``HostName``, ``User``, ``Port``, ``IdentityFile``, ``ProxyJump`` with any
  number of hops, ``ProxyCommand``, ``UserKnownHostsFile``).
* Host keys are checked against known_hosts.  An unknown or changed key is an
  error that shows the fingerprint and how to trust it; nothing is accepted
  automatically.
* An SSH certificate that has expired (NERSC's ``sshproxy.sh`` issues 24-hour
  ones) is reported, with its expiry time, before any login attempt.
* Authentication uses keys (with their certificates) and the agent, never a
  password or a prompt.  A refusal is raised once and never retried here.

Everything here blocks: callers on an event loop run it in a thread.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
import socket
import subprocess
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import paramiko

from ..errors import (
    AuthenticationError,
    CertificateExpiredError,
    ChangedHostKeyError,
    SSHConnectError,
    UnknownHostKeyError,
)

DEFAULT_SSH_CONFIG = "~/.ssh/config"

# paramiko logs routine events (a forward refused while a kernel restarts) at
# ERROR; we report what matters ourselves, with context, so its log is muted.
PARAMIKO_LOG = "nersc_provisioner.paramiko"
logging.getLogger(PARAMIKO_LOG).setLevel(logging.CRITICAL)
DEFAULT_KNOWN_HOSTS = ("~/.ssh/known_hosts",)
CONNECT_TIMEOUT = 20.0

# AES-GCM first: an AEAD cipher needs no separate HMAC, which paramiko computes in
# Python for every packet (about a sixth of its transport thread's samples in a
# profile of bulk output).  Every OpenSSH since 6.2 offers it; the rest of paramiko's list follows.
_AEAD = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")


def _transport(sock: Any, /, **kwargs: Any) -> paramiko.Transport:
    """paramiko's Transport, preferring AES-GCM (see ``_AEAD``)."""
    transport = paramiko.Transport(sock, **kwargs)
    options = transport.get_security_options()
    offered = tuple(options.ciphers)
    options.ciphers = tuple(c for c in _AEAD if c in offered) + tuple(
        c for c in offered if c not in _AEAD
    )
    return transport


@dataclass(frozen=True)
class SSHTarget:
    """Where and as whom to log in, after ``~/.ssh/config`` and explicit settings."""

    alias: str
    hostname: str
    port: int = 22
    user: str = ""
    identity_files: tuple[str, ...] = ()
    known_hosts: tuple[str, ...] = DEFAULT_KNOWN_HOSTS
    jumps: tuple[SSHTarget, ...] = field(default=())
    proxy_command: str = ""
    #: Connect to this address but verify the host key under ``hostname``
    #: (set after the first login, so reconnects reach the same login node).
    address: str = ""

    @property
    def known_hosts_name(self) -> str:
        """How this host is named in known_hosts."""
        return self.hostname if self.port == 22 else f"[{self.hostname}]:{self.port}"

    @property
    def label(self) -> str:
        return f"{self.user}@{self.hostname}:{self.port}" if self.user else self.known_hosts_name


def _load_ssh_config(path: str | None) -> paramiko.SSHConfig:
    if not path:
        return paramiko.SSHConfig()
    expanded = os.path.expanduser(path)
    if not os.path.exists(expanded):
        return paramiko.SSHConfig()
    return paramiko.SSHConfig.from_path(expanded)


def resolve_target(
    host: str,
    *,
    user: str = "",
    port: int = 0,
    identity_file: str = "",
    ssh_config: str | None = DEFAULT_SSH_CONFIG,
    known_hosts: Sequence[str] = (),
    fallback_identity_file: str = "",
) -> SSHTarget:
    """Resolve ``host`` the way ``ssh`` would.

    Explicit settings win over the config file; ``fallback_identity_file`` (a
    system's default, e.g. NERSC's ``~/.ssh/nersc``) is used only when neither
    names a key.
    """
    config = _load_ssh_config(ssh_config)
    target = _resolve(
        config,
        host,
        user=user,
        port=port,
        identity_file=identity_file,
        known_hosts=tuple(known_hosts),
        depth=0,
    )
    if not target.identity_files and fallback_identity_file:
        target = replace(target, identity_files=(os.path.expanduser(fallback_identity_file),))
    return target


def _resolve(
    config: paramiko.SSHConfig,
    host: str,
    *,
    user: str,
    port: int,
    identity_file: str,
    known_hosts: tuple[str, ...],
    depth: int,
) -> SSHTarget:
    if depth > 8:
        raise SSHConnectError(
            f"ProxyJump chain through {host!r} is longer than 8 hops (a loop?)",
            hint="check the ProxyJump lines in your ssh config",
        )
    jump_user, _, rest = host.rpartition("@") if "@" in host else ("", "", host)
    name, _, jump_port = rest.partition(":")
    entry = config.lookup(name)
    identity = [identity_file] if identity_file else list(entry.get("identityfile", []))
    files = tuple(os.path.expanduser(path) for path in identity)
    config_known = tuple(entry.get("userknownhostsfile", "").split())
    jumps: tuple[SSHTarget, ...] = ()
    proxyjump = entry.get("proxyjump", "")
    if proxyjump and proxyjump.lower() != "none":
        jumps = tuple(
            _resolve(
                config,
                hop.strip(),
                user="",
                port=0,
                identity_file="",
                known_hosts=known_hosts,
                depth=depth + 1,
            )
            for hop in proxyjump.split(",")
            if hop.strip()
        )
    return SSHTarget(
        alias=host,
        hostname=entry.get("hostname", name),
        port=port or int(jump_port or entry.get("port", "22")),
        user=user or jump_user or entry.get("user", "") or _local_user(),
        identity_files=files,
        known_hosts=known_hosts or config_known or DEFAULT_KNOWN_HOSTS,
        jumps=jumps,
        proxy_command="" if jumps else entry.get("proxycommand", ""),
    )


def _local_user() -> str:
    import getpass

    return getpass.getuser()


# --- certificates -----------------------------------------------------------------

_CERT_KEY_FIELDS = {
    "ssh-ed25519": ("string",),
    "ssh-rsa": ("mpint", "mpint"),
    "ssh-dss": ("mpint", "mpint", "mpint", "mpint"),
    "ecdsa-sha2-nistp256": ("string", "string"),
    "ecdsa-sha2-nistp384": ("string", "string"),
    "ecdsa-sha2-nistp521": ("string", "string"),
}


@dataclass(frozen=True)
class CertificateValidity:
    path: str
    valid_after: datetime
    valid_before: datetime

    def expired(self, now: datetime | None = None) -> bool:
        now = now or datetime.now(timezone.utc)
        return not (self.valid_after <= now < self.valid_before)


def certificate_validity(cert_path: str) -> CertificateValidity:
    """Read the validity window of an OpenSSH user certificate (``*-cert.pub``)."""
    parts = Path(cert_path).read_text().split()
    blob = paramiko.Message(base64.b64decode(parts[1]))
    cert_type = blob.get_text()
    base_type = cert_type.replace("-cert-v01@openssh.com", "")
    blob.get_binary()  # nonce
    for kind in _CERT_KEY_FIELDS.get(base_type, ()):
        blob.get_mpint() if kind == "mpint" else blob.get_binary()
    blob.get_int64()  # serial
    blob.get_int()  # type
    blob.get_binary()  # key id
    blob.get_binary()  # principals
    after, before = blob.get_int64(), blob.get_int64()
    forever = datetime.max.replace(tzinfo=timezone.utc)
    return CertificateValidity(
        path=cert_path,
        valid_after=datetime.fromtimestamp(after, timezone.utc),
        valid_before=forever if before >= 2**63 else datetime.fromtimestamp(before, timezone.utc),
    )


def check_certificate(cert_path: str) -> CertificateValidity | None:
    """Raise :class:`CertificateExpiredError` if the certificate is not valid now."""
    if not os.path.exists(cert_path):
        return None
    validity = certificate_validity(cert_path)
    if validity.expired():
        raise CertificateExpiredError(
            f"SSH certificate {cert_path} is not valid now: valid from "
            f"{validity.valid_after:%Y-%m-%d %H:%M:%S %Z} to "
            f"{validity.valid_before:%Y-%m-%d %H:%M:%S %Z}",
            hint="run `sshproxy.sh -u $USER` to get a new 24-hour key and certificate, "
            "then start the kernel again",
        )
    return validity


def usable_identity_files(identity_files: Sequence[str]) -> list[str]:
    """The identity files that exist, after checking each one's ``-cert.pub``.

    paramiko loads ``<key>-cert.pub`` together with ``<key>``; an expired
    certificate is reported here, before any login attempt.
    """
    found = []
    for path in identity_files:
        if os.path.exists(path):
            check_certificate(path + "-cert.pub")
            found.append(path)
    return found


# --- host keys --------------------------------------------------------------------


def fingerprint(key: paramiko.PKey) -> str:
    """The OpenSSH SHA256 fingerprint of ``key``."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


class _RejectUnknown(paramiko.MissingHostKeyPolicy):
    def __init__(self, target: SSHTarget) -> None:
        self.target = target

    def missing_host_key(
        self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey
    ) -> None:
        files = ", ".join(self.target.known_hosts)
        raise UnknownHostKeyError(
            f"the host key of {self.target.known_hosts_name} is not in {files}: "
            f"{key.get_name()} {fingerprint(key)}",
            hint="compare that fingerprint with the one the site publishes (NERSC lists "
            "them in its docs); if it matches, add the key with `ssh-keyscan -p "
            f"{self.target.port} {self.target.hostname} >> {self.target.known_hosts[0]}` "
            f"or log in once with `ssh -o UserKnownHostsFile={self.target.known_hosts[0]} "
            f"{self.target.alias}` and answer yes",
        )


# --- connecting -------------------------------------------------------------------


class _ProxyCommand(paramiko.ProxyCommand):
    """paramiko's ProxyCommand, with a close() that may run twice and reaps the process."""

    def close(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()


@dataclass
class SSHLogin:
    """A logged-in connection to a target, with the jump-host logins it rides on."""

    target: SSHTarget
    clients: list[paramiko.SSHClient]
    proxy: _ProxyCommand | None = None

    @property
    def client(self) -> paramiko.SSHClient:
        return self.clients[-1]

    def close(self) -> None:
        """Close the target, then each jump host, then reap a ProxyCommand process."""
        for client in reversed(self.clients):
            client.close()
        if self.proxy is not None:
            self.proxy.close()


def connect(target: SSHTarget) -> SSHLogin:
    """Log in to ``target`` through its jump hosts, or its ProxyCommand."""
    login = SSHLogin(target=target, clients=[])
    dialed: socket.socket | None = None
    try:
        for hop in target.jumps:
            hop_sock = _forward(login.clients[-1], hop) if login.clients else None
            login.clients.append(_login(hop, hop_sock))
        final_sock: paramiko.Channel | _ProxyCommand | socket.socket | None = None
        if login.clients:
            final_sock = _forward(login.clients[-1], target)
        elif target.proxy_command:
            final_sock = login.proxy = _ProxyCommand(target.proxy_command)
        else:
            final_sock = dialed = _dial(target)
        login.clients.append(_login(target, final_sock))
        return login
    except BaseException:
        login.close()
        if dialed is not None:
            dialed.close()  # paramiko does not always close a socket it was handed
        raise


def connect_through(target: SSHTarget, via: paramiko.SSHClient) -> SSHLogin:
    """Log in to ``target`` over a channel of an existing login (a compute node
    reached through the login node's connection: no second login to the login node)."""
    return SSHLogin(target=target, clients=[_login(target, _forward(via, target))])


def _dial(target: SSHTarget) -> socket.socket:
    try:
        sock = socket.create_connection(
            (target.address or target.hostname, target.port), timeout=CONNECT_TIMEOUT
        )
    except OSError as exc:
        where = f" at {target.address}" if target.address else ""
        raise SSHConnectError(
            f"cannot connect to {target.label}{where}: {exc}",
            hint="check the host name, port and network (ProxyJump/ProxyCommand if needed); "
            "the login node may be down",
        ) from exc
    # Small ZeroMQ messages (a cell's request, an interrupt) must not wait for the
    # ACK of the previous segment.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _forward(via: paramiko.SSHClient, target: SSHTarget) -> paramiko.Channel:
    transport = via.get_transport()
    if transport is None:
        raise SSHConnectError(f"jump host connection closed before reaching {target.label}")
    try:
        return transport.open_channel(
            "direct-tcpip", (target.hostname, target.port), ("127.0.0.1", 0)
        )
    except (paramiko.SSHException, OSError) as exc:
        raise SSHConnectError(
            f"the jump host could not open a connection to {target.label}: {exc}",
            hint="check HostName/Port of the target and that the jump host allows forwarding",
        ) from exc


def _login(
    target: SSHTarget, sock: paramiko.Channel | paramiko.ProxyCommand | socket.socket | None
) -> paramiko.SSHClient:
    """One login attempt: every key and the agent are offered within one connection."""
    client = paramiko.SSHClient()
    client.set_log_channel(PARAMIKO_LOG)
    for path in target.known_hosts:
        expanded = os.path.expanduser(path)
        if os.path.exists(expanded):
            client.load_host_keys(expanded)
    client.set_missing_host_key_policy(_RejectUnknown(target))
    try:
        keys = usable_identity_files(target.identity_files)
        client.connect(
            target.hostname,
            port=target.port,
            username=target.user,
            key_filename=keys or None,  # type: ignore[arg-type]
            sock=sock,
            allow_agent=True,
            look_for_keys=False,
            timeout=CONNECT_TIMEOUT,
            banner_timeout=CONNECT_TIMEOUT,
            auth_timeout=CONNECT_TIMEOUT,
            transport_factory=_transport,
        )
    except paramiko.BadHostKeyException as exc:
        client.close()
        raise ChangedHostKeyError(
            f"the host key of {target.known_hosts_name} has CHANGED: known_hosts has "
            f"{fingerprint(exc.expected_key)}, the host sent {exc.key.get_name()} "
            f"{fingerprint(exc.key)}. This can mean someone is intercepting the connection.",
            hint="confirm the new fingerprint with the site; if it is genuine, remove the "
            f"old key with `ssh-keygen -f {target.known_hosts[0]} -R '{target.known_hosts_name}'` "
            "and trust the new one",
        ) from exc
    except paramiko.AuthenticationException as exc:
        client.close()
        raise AuthenticationError(
            f"{target.label} refused every key offered "
            f"({', '.join(target.identity_files) or 'no IdentityFile'}, plus the agent): {exc}",
            hint="check the user name and key; for NERSC run `sshproxy.sh -u $USER` for a new "
            "key. Not retried automatically: repeated failures can lock your account",
        ) from exc
    except paramiko.SSHException as exc:
        client.close()
        if "No authentication methods available" in str(exc):
            raise AuthenticationError(
                f"no key to offer to {target.label}: none of "
                f"{', '.join(target.identity_files) or 'the IdentityFile settings'} exists "
                "and no ssh-agent holds a key",
                hint="for NERSC run `sshproxy.sh -u $USER` (writes ~/.ssh/nersc), or set "
                "identity_file / IdentityFile to your key",
            ) from exc
        raise SSHConnectError(
            f"cannot connect to {target.label}: {exc}",
            hint="check the host name, port and network (ProxyJump/ProxyCommand if needed)",
        ) from exc
    except (OSError, EOFError) as exc:
        client.close()
        raise SSHConnectError(
            f"cannot connect to {target.label}: {exc}",
            hint="check the host name, port and network (ProxyJump/ProxyCommand if needed)",
        ) from exc
    except BaseException:
        client.close()
        raise
    return client


def exec_script(
    transport: paramiko.Transport,
    script: str,
    *,
    timeout: float,
    on_line: Callable[[str], bool] | None = None,
) -> tuple[int | None, list[str]]:
    """Run ``script`` with ``bash -s`` over one session: the script goes on stdin.

    Returns the exit code (None if ``on_line`` stopped reading early by
    returning True) and the output lines (stdout and stderr together).
    """
    chan = transport.open_session(timeout=timeout)
    try:
        chan.settimeout(timeout)
        chan.set_combine_stderr(True)
        chan.exec_command("bash --noprofile --norc -s")
        chan.sendall(script.encode())
        chan.shutdown_write()
        collected: list[str] = []
        for line in _lines(chan):
            collected.append(line)
            if on_line is not None and on_line(line):
                return None, collected
        return chan.recv_exit_status(), collected
    finally:
        chan.close()


def _lines(chan: paramiko.Channel) -> Iterator[str]:
    buffer = b""
    while True:
        data = chan.recv(65536)
        if not data:
            break
        buffer += data
        *complete, buffer = buffer.split(b"\n")
        for raw in complete:
            yield raw.decode(errors="replace").rstrip("\r")
    if buffer:
        yield buffer.decode(errors="replace").rstrip("\r")
