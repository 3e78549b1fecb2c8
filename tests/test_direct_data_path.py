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

import psutil
import pytest
import zmq
import zmq.asyncio

from nersc_provisioner.errors import ConfigError, LaunchError
from nersc_provisioner.transports.connection import ConnectionPool
from nersc_provisioner.transports.forwarding import PortForwarder
from nersc_provisioner.transports.zmtp import read_mechanism
from tests.conftest import KernelFactory
from tests.kernels import DROPPING_SHIM, TESTS_STARTED, ready_client, run_cell, wait_until
from tests.rig import (
    SSHRig,
    jump_ssh_config,
    remote_config,
    require_compute_node,
    require_jump,
    require_ssh,
    start_sshd,
    stop_sshd,
)
from tests.stacks import needs_curve_stack

pytestmark = [pytest.mark.kernel, pytest.mark.rig]

PORTS = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")


@pytest.fixture
def rig() -> SSHRig:
    return require_ssh()


@pytest.fixture
def config(rig: SSHRig) -> dict[str, Any]:
    return {**remote_config(rig), "data_path": "direct"}


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


def kernel_procs(user: str) -> list[str]:
    found = []
    for proc in psutil.process_iter(["username", "cmdline", "status", "create_time"]):
        if proc.info["create_time"] < TESTS_STARTED or proc.info["username"] != user:
            continue
        if proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        line = " ".join(proc.info["cmdline"] or [])
        if any(mark in line for mark in ("ipykernel", "npr-watchdog", "npr-agent")):
            found.append(line)
    return found


@needs_curve_stack
async def test_direct_lifecycle_listens_on_the_host_and_works_while_ssh_is_down(
    start_kernel: KernelFactory, config: dict[str, Any], rig: SSHRig
) -> None:
    listeners_before = PortForwarder.instance().stats()["listeners"]
    km = await start_kernel(config, provisioner="nersc-cori")
    kc = await ready_client(km)
    try:
        info = km.get_connection_info()
        assert info["ip"] == rig.host
        assert km.curve_publickey  # CurveZMQ is on (required by data_path direct)
        assert PortForwarder.instance().stats()["listeners"] == listeners_before  # no tunnel
        ports = {name: int(info[name]) for name in PORTS}  # type: ignore[literal-required]
        bound = listening(rig.netns)
        for port in ports.values():
            assert (rig.host, port) in bound, (port, bound)
            assert ("127.0.0.1", port) not in bound
        result = await run_cell(kc, "kept = 'kept'; import os; print(os.getpid())")
        first_pid = int(result.stdout)

        # sshd is stopped (its master and both halves of our session): SSH is down,
        # and stays down while the cell runs, which it does, with the variable kept.
        conn = km.provisioner.connection  # type: ignore[union-attr]
        before = conn.reconnects
        stop_sshd(rig)
        assert await wait_until(lambda: not conn.connected, 10)
        result = await run_cell(kc, "print(kept)", timeout=10)
        assert result.stdout.strip() == "kept"
        assert not conn.connected  # answered while SSH was down
        start_sshd(rig)
        assert await wait_until(lambda: conn.reconnects > before, 20)  # SSH itself came back

        msg_id = kc.execute("import time; time.sleep(60)")
        await asyncio.sleep(0.5)
        await km.interrupt_kernel()
        while True:
            reply = await kc.get_shell_msg(timeout=5)
            if reply["parent_header"].get("msg_id") == msg_id:
                break
        assert reply["content"]["ename"] == "KeyboardInterrupt"

        await km.restart_kernel()
        await kc.wait_for_ready(timeout=60)
        after = km.get_connection_info()
        assert {name: int(after[name]) for name in PORTS} == ports  # type: ignore[literal-required]
        result = await run_cell(kc, "import os; print(os.getpid())")
        assert int(result.stdout) != first_pid
    finally:
        kc.stop_channels()
    await km.shutdown_kernel()
    assert await wait_until(lambda: not kernel_procs(rig.user), 10), kernel_procs(rig.user)
    bound = listening(rig.netns)
    assert not any((rig.host, port) in bound for port in ports.values())


@needs_curve_stack
async def test_the_network_sees_only_curvezmq(
    start_kernel: KernelFactory, config: dict[str, Any], rig: SSHRig
) -> None:
    """A subscriber from the network without the server key gets nothing; with it
    (the control case) it gets the marker, so the harness can see a success."""
    km = await start_kernel(config, provisioner="nersc-cori")
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
        plain.connect(address)
        keyed = ctx.socket(zmq.SUB)
        public, secret = zmq.curve_keypair()
        keyed.curve_publickey, keyed.curve_secretkey = public, secret
        server_key = km.curve_publickey
        assert server_key
        keyed.curve_serverkey = server_key if isinstance(server_key, bytes) else server_key.encode()
        keyed.subscribe(b"")
        keyed.connect(address)
        await asyncio.sleep(1.0)  # both subscriptions in place
        await run_cell(kc, "print('direct-marker-7731')")

        async def received(sock: zmq.asyncio.Socket) -> bytes:
            data = b""
            while await sock.poll(1000):
                data += b"".join(await sock.recv_multipart())
            return data

        assert b"direct-marker-7731" not in await received(plain)
        assert b"direct-marker-7731" in await received(keyed)
    finally:
        kc.stop_channels()
        ctx.destroy(linger=0)


async def test_direct_without_encryption_is_refused(
    start_kernel: KernelFactory, config: dict[str, Any]
) -> None:
    with pytest.raises(ConfigError) as info:
        await start_kernel({**config, "transport_encryption": "disabled"}, provisioner="nersc-cori")
    text = str(info.value)
    assert "data_path" in text
    assert "transport_encryption" in text


@needs_curve_stack
async def test_direct_with_a_kernel_that_drops_curve_is_refused(
    start_kernel: KernelFactory, config: dict[str, Any], rig: SSHRig
) -> None:
    argv = [rig.remote_python, "-c", DROPPING_SHIM, "-f", "{connection_file}"]
    with pytest.raises(LaunchError, match="data_path 'direct' requires"):
        await start_kernel(config, argv=argv, provisioner="nersc-cori")
    assert await wait_until(lambda: not kernel_procs(rig.user), 10), kernel_procs(rig.user)


@needs_curve_stack
async def test_direct_through_a_jump_host_is_refused(
    start_kernel: KernelFactory, rig: SSHRig, tmp_path: Path
) -> None:
    jump = require_jump()
    config_file = jump_ssh_config(tmp_path / "ssh_config", jump, "gate")
    config = {
        "host": "inner",
        "ssh_config": str(config_file),
        "remote_python": rig.remote_python,
        "data_path": "direct",
        "connection_persist": 0,
    }
    with pytest.raises(ConfigError, match="ProxyJump") as info:
        await start_kernel(config, provisioner="nersc-perlmutter")
    assert "data_path to tunnel" in str(info.value)
    # Nothing is left: no connection in the pool, no agent on the inner host.
    assert ConnectionPool.count() == 0
    assert await wait_until(lambda: not kernel_procs(jump.user), 10), kernel_procs(jump.user)


@needs_curve_stack
async def test_direct_in_a_slurm_job(start_kernel: KernelFactory) -> None:
    full = require_compute_node()
    assert full.ssh is not None
    assert full.slurm is not None
    config = {**remote_config(full.ssh), "data_path": "direct", "slurm": {"time": "10"}}
    km = await start_kernel(config, provisioner="nersc-cori")
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
    out = subprocess.run(
        ["squeue", "--noheader", "--jobs", job.job_id, "--format=%T"],
        capture_output=True,
        text=True,
    ).stdout
    assert "RUNNING" not in out, out
    assert "PENDING" not in out, out


def test_data_path_is_validated() -> None:
    from nersc_provisioner.provisioners.remote import NERSCCoriProvisioner

    with pytest.raises(Exception, match="data_path"):
        NERSCCoriProvisioner(data_path="sideways")
    assert json.dumps(NERSCCoriProvisioner(data_path="DIRECT").data_path) == '"direct"'
