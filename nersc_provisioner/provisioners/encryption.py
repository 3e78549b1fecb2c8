"""CurveZMQ: whether the Jupyter side can carry its keys at all (every provisioner asks
here), and for remote and Slurm kernels the keys, the greeting check, the refusals.

The keys are made on the Jupyter side and kept across restarts.  Whether the kernel
really encrypts is read from its shell socket's ZMTP greeting, not from its
connection file: ipykernel merges its ports into that file, so one without CurveZMQ
(ipykernel 6) leaves our keys there.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import re
import socket
from collections.abc import Sequence
from typing import Any

import zmq
from traitlets import TraitType

from ..errors import ConfigError, LaunchError
from ..launchers.remote import LaunchReport
from ..transports.connection import SSHConnection
from ..transports.zmtp import read_mechanism

UNENCRYPTED_WARNING = (
    "%s: kernel %s on %s runs without transport encryption: its ipykernel does not "
    "support CurveZMQ. SSH still encrypts the network, but other users of that host can "
    "read the kernel's output on its loopback ports. Upgrade ipykernel there, or set "
    "transport_encryption to required to refuse this."
)

DIED_WITH_KEYS_WARNING = (
    "%s: kernel %s on %s exited at startup when given CurveZMQ keys (an ipykernel "
    "without CurveZMQ next to a jupyter_client 8.9 or later does); starting it again "
    "without encryption (transport_encryption auto). Upgrade ipykernel there to 7.3 or "
    "later, or set transport_encryption to required to refuse this."
)


#: The first jupyter_client whose KernelManager carries CurveZMQ keys to the kernel's
#: clients. 8.9 added the keys (``curve_publickey`` and ``curve_secretkey`` traits), but
#: its ``KernelManager.client()`` hands them over as text, which every client refuses
#: with a TraitError (jupyter_client#1136, fixed in 8.10.0): no ``km.client()`` works.
CURVE_JUPYTER_CLIENT = "8.10"


def clients_take_curve_keys(version: str | None = None) -> bool:
    """Whether jupyter_client ``version`` (default: the installed one) gives the clients
    ``KernelManager.client()`` makes the kernel's CurveZMQ keys."""
    installed = version or importlib.metadata.version("jupyter_client")
    release = tuple(int(part) for part in re.findall(r"\d+", installed)[:2])
    return release >= tuple(int(part) for part in CURVE_JUPYTER_CLIENT.split("."))


def _has_curve_traits(km: Any) -> bool:
    cls = km if isinstance(km, type) else type(km)
    return all(
        isinstance(getattr(cls, trait, None), TraitType)
        for trait in ("curve_publickey", "curve_secretkey")
    )


def manager_carries_curve_keys(km: Any) -> bool:
    """Whether this kernel manager (or manager class) can give its clients CurveZMQ keys:
    jupyter_client 8.10 or later.  The one place that tells the stacks apart."""
    return _has_curve_traits(km) and clients_take_curve_keys()


def no_curve_keys_reason() -> str:
    """Why a kernel of this Jupyter side cannot use CurveZMQ, naming the versions."""
    installed = importlib.metadata.version("jupyter_client")
    return (
        f"jupyter_client {installed} gives a kernel's clients no CurveZMQ keys "
        f"(jupyter_client {CURVE_JUPYTER_CLIENT} or later does)"
    )


def curve_keys_usable(km: Any, policy: str, *, name: str, log: logging.Logger | Any) -> bool:
    """Whether the kernel can be given CurveZMQ keys under ``policy``; logs why not when
    the manager cannot carry them (``disabled`` asks for none, so needs no reason)."""
    if policy == "disabled":
        return False
    if manager_carries_curve_keys(km):
        return True
    log.info("%s: CurveZMQ is not used: %s", name, no_curve_keys_reason())
    return False


NO_CURVE_KEYS_WARNING = (
    "%s: the kernel runs without transport encryption (transport_encryption auto): %s. "
    "SSH still encrypts the network, but other users of the kernel's host can read its "
    "output on its loopback ports. Upgrade jupyter_client where Jupyter runs, or set "
    "transport_encryption to required to refuse this."
)


def provide_curve_keys(km: Any, policy: str, *, name: str, log: logging.Logger | Any) -> bool:
    """Give the manager a CurveZMQ server key pair (kept across restarts), per ``policy``
    (``required`` for data_path direct: its ports are on the network).  Whether it has
    one now; refuses ``required`` where the manager cannot carry one."""
    if not manager_carries_curve_keys(km):
        if _has_curve_traits(km):  # 8.9.x: no kernel gets keys its clients cannot take
            km.curve_publickey = km.curve_secretkey = None
        if policy == "required":
            raise ConfigError(
                "CurveZMQ is required (transport_encryption 'required', or data_path "
                f"'direct'), but {no_curve_keys_reason()}",
                hint=f"install jupyter_client {CURVE_JUPYTER_CLIENT} or later where Jupyter "
                "runs (pip install --upgrade jupyter_client), or set transport_encryption "
                "to auto and data_path to tunnel",
            )
        if policy == "auto":
            log.warning(NO_CURVE_KEYS_WARNING, name, no_curve_keys_reason())
        return False
    if policy == "disabled":
        km.curve_publickey = km.curve_secretkey = None
        return False
    if not zmq.has("curve"):
        if policy == "required":
            raise ConfigError(
                "CurveZMQ is required (transport_encryption 'required', or data_path "
                "'direct'), but this pyzmq has no CurveZMQ",
                hint="install pyzmq from a PyPI wheel (it bundles libsodium), or set "
                "transport_encryption to auto and data_path to tunnel",
            )
        log.warning("%s: this pyzmq has no CurveZMQ; the kernel's sockets are not encrypted", name)
        return False
    if km.curve_publickey is None or km.curve_secretkey is None:
        km.curve_publickey, km.curve_secretkey = zmq.curve_keypair()
    return True


def announced_mechanism(conn: SSHConnection, address: str, port: int, *, direct: bool) -> str:
    """The mechanism the kernel's shell socket announces ("" without an answer).

    Direct: a TCP connection to ``address:port``; tunnel: a ``direct-tcpip`` channel
    to the port on the remote loopback.  Blocking.
    """
    if direct:
        with (
            contextlib.suppress(OSError),
            socket.create_connection((address, port), timeout=5.0) as sock,
        ):
            return read_mechanism(sock)
        return ""
    chan = conn.open_forward(port)
    if chan is None:
        return ""
    try:
        return read_mechanism(chan)
    finally:
        chan.close()


def kernel_encrypts(
    conn: SSHConnection, report: LaunchReport, address: str, direct: bool, log: Any
) -> bool:
    """Whether the kernel's shell socket announces CurveZMQ in its ZMTP greeting.
    Without an answer, the launch script's reading of the file decides.  Blocking."""
    port = report.ports.get("shell_port", 0)
    mechanism = announced_mechanism(conn, address, port, direct=direct)
    if not mechanism:
        log.debug("no ZMTP greeting from the kernel on %s:%s", address, port)
        return bool(report.curve)
    return mechanism == "CURVE"


def curve_refusal(where: str, command: Sequence[str], *, direct: bool) -> LaunchError:
    """A kernel that does not encrypt, where encryption is required."""
    if direct:
        return LaunchError(
            f"the kernel on {where} does not support CurveZMQ transport encryption (its "
            "sockets announce none: an ipykernel without it), which data_path 'direct' "
            "requires",
            hint="use an ipykernel with CurveZMQ support on the remote side, or set "
            "data_path to tunnel",
            command=command,
        )
    return LaunchError(
        f"the kernel on {where} does not support CurveZMQ transport encryption (its sockets "
        "announce none: an ipykernel without it), and transport_encryption is 'required'",
        hint="use an ipykernel with CurveZMQ support on the remote side (its kernelspec "
        "lists supported_encryption: curve), or set transport_encryption to auto",
        command=command,
    )
