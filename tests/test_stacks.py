"""The declared dependency ranges are the tested ones, and both ends of them work.

``make test`` runs this file on the newest stack (``.venv``) and on the oldest that
pyproject.toml admits (``make test-oldest``: ``.venv-oldest``, pinned by
``.ci/oldest-stack.txt``).  On the oldest, jupyter_client cannot give a kernel's
clients CurveZMQ keys: kernels run as ``transport_encryption: auto`` allows, and
``required`` is refused with the version that is needed.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import re
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.manager import AsyncKernelManager
from traitlets import HasTraits, Unicode

from nersc_provisioner import ConfigError
from nersc_provisioner.provisioners.encryption import (
    announced_mechanism,
    manager_carries_curve_keys,
    no_curve_keys_reason,
)
from tests.conftest import PYTHON_ARGV, KernelFactory
from tests.kernels import ready_client, run_cell
from tests.stacks import CURVE_STACK, JUPYTER_CLIENT

ROOT = Path(__file__).resolve().parent.parent
VERSION_NAMED = f"jupyter_client {JUPYTER_CLIENT} gives a kernel's clients no CurveZMQ keys"


def lower_bounds() -> dict[str, str]:
    """``name>=X`` of each runtime dependency (pyproject.toml, as installed), by name."""
    declared = importlib.metadata.requires("nersc_provisioner") or []
    bounds = {}
    for requirement in (r for r in declared if "extra ==" not in r):
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9][0-9.]*)", requirement)
        assert match, f"{requirement!r}: every dependency has one lower bound and no other"
        bounds[match[1].lower().replace("_", "-")] = match[2]
    return bounds


def oldest_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / ".ci" / "oldest-stack.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    return pins


def test_lower_bounds_are_the_pinned_oldest_stack() -> None:
    assert lower_bounds() == oldest_pins()


def test_the_curve_check_follows_the_jupyter_client_version() -> None:
    assert manager_carries_curve_keys(AsyncKernelManager) is CURVE_STACK
    assert manager_carries_curve_keys(AsyncKernelManager()) is CURVE_STACK

    class Older(HasTraits):  # what a KernelManager of jupyter_client 8.8 or older has
        ip = Unicode()

    older = Older()
    older.curve_publickey = None  # a plain attribute is not the trait a client reads
    assert not manager_carries_curve_keys(older)
    assert not manager_carries_curve_keys(object())
    assert no_curve_keys_reason() == f"{VERSION_NAMED} (jupyter_client 8.10 or later does)"


async def shell_mechanism(km: AsyncKernelManager) -> str:
    """What the remote kernel's shell socket announces in its ZMTP greeting."""
    provisioner: Any = km.provisioner
    port = provisioner.remote.ports["shell_port"]
    return await asyncio.to_thread(
        announced_mechanism, provisioner.connection, "127.0.0.1", port, direct=False
    )


async def prints_42(km: AsyncKernelManager) -> None:
    kc = await ready_client(km)
    try:
        result = await run_cell(kc, "print(6 * 7)")
        assert result.stdout.strip() == "42"
    finally:
        kc.stop_channels()


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]


@pytest.mark.rig
@pytest.mark.kernel
@pytest.mark.oldest
async def test_cori_kernel_under_auto_on_this_jupyter_client(
    start_kernel: KernelFactory, remote_config: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """The default policy starts a kernel and runs a cell on either stack; on the oldest
    without CurveZMQ (its greeting says NULL), and the log says why."""
    km = await start_kernel(remote_config, provisioner="nersc-cori")
    await prints_42(km)
    said = [w for w in warnings(caplog) if VERSION_NAMED in w]
    if CURVE_STACK:
        assert await shell_mechanism(km) == "CURVE"
        assert km.transport == "tcp"
        assert not said
    else:
        assert await shell_mechanism(km) == "NULL"
        # Plain traffic does not pass through 127.0.0.1 ports here: Unix sockets (0700).
        assert km.transport == "ipc"
        assert said, warnings(caplog)
        assert "without transport encryption" in said[0]


@pytest.mark.rig
@pytest.mark.kernel
@pytest.mark.oldest
async def test_cori_kernel_under_required_on_this_jupyter_client(
    start_kernel: KernelFactory, remote_config: dict[str, Any]
) -> None:
    """``required`` starts an encrypting kernel on the newest stack; on the oldest it is
    refused before any login, naming the installed and the needed jupyter_client, and
    so is ``data_path: direct`` (which requires CurveZMQ)."""
    config = {**remote_config, "transport_encryption": "required"}
    if CURVE_STACK:
        km = await start_kernel(config, provisioner="nersc-cori")
        assert await shell_mechanism(km) == "CURVE"
        await prints_42(km)
        return
    for name, settings in (("required", config), ("direct", {**config, "data_path": "direct"})):
        with pytest.raises(ConfigError) as info:
            await start_kernel(settings, name=name, provisioner="nersc-cori")
        message = str(info.value)
        assert f"{VERSION_NAMED} (jupyter_client 8.10 or later does)" in message
        assert "What to do: install jupyter_client 8.10 or later" in message


@pytest.mark.kernel
@pytest.mark.oldest
async def test_local_kernel_under_required_on_this_jupyter_client(
    start_kernel: KernelFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A plain ``nersc-local`` kernel is out of other users' reach on either stack: with
    CurveZMQ on the newest; on IPC sockets in a 0700 directory on the oldest, where
    ``required`` is met that way (the log says why CurveZMQ is not used)."""
    caplog.set_level("INFO")
    km = await start_kernel({"transport_encryption": "required"}, argv=PYTHON_ARGV)
    await prints_42(km)
    said = [r.getMessage() for r in caplog.records if VERSION_NAMED in r.getMessage()]
    if CURVE_STACK:
        assert km.transport == "tcp"
        assert km.curve_publickey is not None
        assert not said
    else:
        assert km.transport == "ipc"
        assert said
