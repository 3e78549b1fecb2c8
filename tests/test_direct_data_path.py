"""``data_path: direct``: no ZeroMQ byte through SSH, CurveZMQ required (real rig, real kernels).

The kernel binds the address SSH reached (the rig's login namespace, or the
Slurm node) and Jupyter connects to it.  These tests check where it listens,
that it keeps working while SSH is cut, that restarts keep its ports, that the
network sees only CurveZMQ, and that each way it cannot work is refused with a
named reason.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.asyncio
from zmq.utils.monitor import recv_monitor_message

from nersc_provisioner.errors import ConfigError, LaunchError
from nersc_provisioner.transports.connection import ConnectionPool
from nersc_provisioner.transports.forwarding import PortForwarder
from nersc_provisioner.transports.zmtp import read_mechanism
from tests.conftest import KernelFactory
from tests.kernels import (
    DROPPING_SHIM,
    interrupt_running_cell,
    ready_client,
    run_cell,
    wait_until,
)
from tests.rig import (
    JumpRig,
    Rig,
    SSHRig,
    jump_ssh_config,
    queue,
    rig_processes,
    start_sshd,
    stop_sshd,
)
from tests.stacks import needs_curve_stack

pytestmark = [pytest.mark.kernel, pytest.mark.rig]

PORTS = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")


@pytest.fixture
def direct_config(remote_config: dict[str, Any]) -> dict[str, Any]:
    """The rig login node, with data_path direct."""
    return {**remote_config, "data_path": "direct"}


def listening(netns: str) -> set[tuple[str, int]]:
    """(address, port) of every listening TCP socket in the namespace ("" = root's)."""
    argv = ["ss", "-Hltn"]
    if netns:
        argv = ["ip", "netns", "exec", netns, *argv]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    found = set()
    for line in out.splitlines():
        local = line.split()[3]
        address, _, port = local.rpartition(":")
        found.add((address.strip("[]"), int(port)))
    return found


async def handshake(monitor: zmq.asyncio.Socket, timeout: float = 10) -> str:
    """How a socket's first ZMTP handshake ends, read from its monitor (made before it
    connected): "HANDSHAKE_SUCCEEDED", or the name of the failure."""
    deadline = asyncio.get_running_loop().time() + timeout
    while (left := deadline - asyncio.get_running_loop().time()) > 0:
        if not await monitor.poll(left * 1000):
            break
        name = zmq.Event((await recv_monitor_message(monitor))["event"]).name or ""
        if name.startswith("HANDSHAKE"):
            return name
    return "no handshake"


async def receives(sock: zmq.asyncio.Socket, marker: bytes, timeout: float = 10) -> bool:
    """True once a message holding ``marker`` arrives on ``sock``, within ``timeout``."""
    deadline = asyncio.get_running_loop().time() + timeout
    while (left := deadline - asyncio.get_running_loop().time()) > 0:
        if not await sock.poll(left * 1000):
            break
        if marker in b"".join(await sock.recv_multipart()):
            return True
    return False


@needs_curve_stack
async def test_direct_lifecycle_listens_on_the_host_and_works_while_ssh_is_down(
    start_kernel: KernelFactory, direct_config: dict[str, Any], ssh_rig: SSHRig
) -> None:
    listeners_before = PortForwarder.instance().stats()["listeners"]
    km = await start_kernel(direct_config, provisioner="nersc-cori")
    kc = await ready_client(km)
    try:
        info = km.get_connection_info()
        assert info["ip"] == ssh_rig.host
        assert km.curve_publickey  # CurveZMQ is on (required by data_path direct)
        assert PortForwarder.instance().stats()["listeners"] == listeners_before  # no tunnel
        ports = {name: int(info[name]) for name in PORTS}  # type: ignore[literal-required]
        bound = listening(ssh_rig.netns)
        for port in ports.values():
            assert (ssh_rig.host, port) in bound, (port, bound)
            assert ("127.0.0.1", port) not in bound
        result = await run_cell(kc, "kept = 'kept'; import os; print(os.getpid())")
        first_pid = int(result.stdout)

        # sshd is stopped (its master and both halves of our session): SSH is down,
        # and stays down while the cell runs, which it does, with the variable kept.
        conn = km.provisioner.connection  # type: ignore[union-attr]
        before = conn.reconnects
        stop_sshd(ssh_rig)
        assert await wait_until(lambda: not conn.connected, 10)
        result = await run_cell(kc, "print(kept)", timeout=10)
        assert result.stdout.strip() == "kept"
        assert not conn.connected  # answered while SSH was down
        start_sshd(ssh_rig)
        assert await wait_until(lambda: conn.reconnects > before, 20)  # SSH itself came back

        reply = await interrupt_running_cell(km, kc)
        assert reply["ename"] == "KeyboardInterrupt"

        await km.restart_kernel()
        await kc.wait_for_ready(timeout=60)
        after = km.get_connection_info()
        assert {name: int(after[name]) for name in PORTS} == ports  # type: ignore[literal-required]
        result = await run_cell(kc, "import os; print(os.getpid())")
        assert int(result.stdout) != first_pid
    finally:
        kc.stop_channels()
    await km.shutdown_kernel()
    assert await wait_until(lambda: not rig_processes(ssh_rig.user), 10), rig_processes(
        ssh_rig.user
    )
    bound = listening(ssh_rig.netns)
    assert not any((ssh_rig.host, port) in bound for port in ports.values())


@needs_curve_stack
async def test_the_network_sees_only_curvezmq(
    start_kernel: KernelFactory, direct_config: dict[str, Any], ssh_rig: SSHRig
) -> None:
    """A subscriber from the network without the server key gets nothing; with it
    (the control case) it gets the marker, so the harness can see a success."""
    km = await start_kernel(direct_config, provisioner="nersc-cori")
    kc = await ready_client(km)
    ctx = zmq.asyncio.Context()
    try:
        info = km.get_connection_info()
        # What the kernel's own socket announces (the check launch_kernel makes, too).
        shell = (str(info["ip"]), int(info["shell_port"]))  # type: ignore[typeddict-item]
        with socket.create_connection(shell, timeout=5) as sock:
            assert read_mechanism(sock) == "CURVE"
        address = f"tcp://{info['ip']}:{info['iopub_port']}"
        plain = ctx.socket(zmq.SUB)
        plain.subscribe(b"")
        plain_events = plain.get_monitor_socket()
        plain.connect(address)
        keyed = ctx.socket(zmq.SUB)
        public, secret = zmq.curve_keypair()
        keyed.curve_publickey, keyed.curve_secretkey = public, secret
        server_key = km.curve_publickey
        assert server_key
        keyed.curve_serverkey = server_key if isinstance(server_key, bytes) else server_key.encode()
        keyed.subscribe(b"")
        keyed_events = keyed.get_monitor_socket()
        keyed.connect(address)
        # Each subscriber's handshake has ended: the kernel refused the one without the
        # server key (so nothing can reach it), and took the other's subscription.
        assert (await handshake(plain_events)).startswith("HANDSHAKE_FAILED")
        assert await handshake(keyed_events) == "HANDSHAKE_SUCCEEDED"
        await run_cell(kc, "print('direct-marker-7731')")
        assert await receives(keyed, b"direct-marker-7731")  # the control: it arrives
        assert not await plain.poll(0)  # and nothing at all came to the other one
    finally:
        kc.stop_channels()
        ctx.destroy(linger=0)


async def test_direct_without_encryption_is_refused(
    start_kernel: KernelFactory, direct_config: dict[str, Any]
) -> None:
    with pytest.raises(ConfigError) as info:
        await start_kernel(
            {**direct_config, "transport_encryption": "disabled"}, provisioner="nersc-cori"
        )
    text = str(info.value)
    assert "data_path" in text
    assert "transport_encryption" in text


@needs_curve_stack
async def test_direct_with_a_kernel_that_drops_curve_is_refused(
    start_kernel: KernelFactory, direct_config: dict[str, Any], ssh_rig: SSHRig
) -> None:
    argv = [ssh_rig.remote_python, "-c", DROPPING_SHIM, "-f", "{connection_file}"]
    with pytest.raises(LaunchError, match="data_path 'direct' requires"):
        await start_kernel(direct_config, argv=argv, provisioner="nersc-cori")
    assert await wait_until(lambda: not rig_processes(ssh_rig.user), 10), rig_processes(
        ssh_rig.user
    )


@needs_curve_stack
async def test_direct_through_a_jump_host_is_refused(
    start_kernel: KernelFactory, ssh_rig: SSHRig, jump_rig: JumpRig, tmp_path: Path
) -> None:
    config_file = jump_ssh_config(tmp_path / "ssh_config", jump_rig, "gate")
    config = {
        "host": "inner",
        "ssh_config": str(config_file),
        "remote_python": ssh_rig.remote_python,
        "data_path": "direct",
        "connection_persist": 0,
    }
    with pytest.raises(ConfigError, match="ProxyJump") as info:
        await start_kernel(config, provisioner="nersc-perlmutter")
    assert "data_path to tunnel" in str(info.value)
    # Nothing is left: no connection in the pool, no agent on the inner host.
    assert ConnectionPool.count() == 0
    assert await wait_until(lambda: not rig_processes(jump_rig.user), 10), rig_processes(
        jump_rig.user
    )


@needs_curve_stack
async def test_direct_in_a_slurm_job(
    start_kernel: KernelFactory, compute_node_rig: Rig, slurm_config: dict[str, Any]
) -> None:
    full = compute_node_rig
    assert full.slurm is not None
    km = await start_kernel({**slurm_config, "data_path": "direct"}, provisioner="nersc-cori")
    kc = await ready_client(km)
    job = km.provisioner.slurm_job  # type: ignore[union-attr]
    assert job is not None
    try:
        info = km.get_connection_info()
        assert info["ip"] == full.slurm.node_addr
        ports = {name: int(info[name]) for name in PORTS}  # type: ignore[literal-required]
        bound = listening("")  # the node is the rig host itself, in the root namespace
        assert (full.slurm.node_addr, ports["shell_port"]) in bound
        result = await run_cell(kc, "import os; print(os.environ['SLURM_JOB_ID'])")
        assert result.stdout.strip() == job.job_id
        await km.restart_kernel()
        await kc.wait_for_ready(timeout=60)
        result = await run_cell(kc, "print('again')")
        assert result.stdout.strip() == "again"
    finally:
        kc.stop_channels()
    await km.shutdown_kernel()
    # The job itself is ended at once (its batch step may still be listed a moment).
    job_rows = [entry for entry in queue() if entry.job_id == job.job_id]
    assert not [entry for entry in job_rows if entry.state in ("RUNNING", "PENDING")], job_rows


def test_data_path_is_validated() -> None:
    from nersc_provisioner.provisioners.remote import NERSCCoriProvisioner

    with pytest.raises(Exception, match="data_path"):
        NERSCCoriProvisioner(data_path="sideways")
    assert json.dumps(NERSCCoriProvisioner(data_path="DIRECT").data_path) == '"direct"'
