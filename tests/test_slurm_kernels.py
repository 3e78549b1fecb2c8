"""Kernels inside Slurm allocations: nersc-cori against the rig's real Slurm and sshds.

The "login node" is the sshd in netns npr-remote; the job's node is this machine
(root namespace), reached by ssh through the login node's connection.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import time
from typing import Any

import psutil
import pytest

from nersc_provisioner.slurm import AllocationError, QueueTimeout
from tests.conftest import KernelFactory
from tests.kernels import ready_client, run_cell
from tests.rig import Rig, require_compute_node

pytestmark = [pytest.mark.kernel, pytest.mark.rig]


@pytest.fixture
def rig() -> Rig:
    return require_compute_node()


@pytest.fixture
def config(rig: Rig) -> dict[str, Any]:
    ssh = rig.ssh
    assert ssh is not None and ssh.remote_python
    return {
        "host": ssh.host,
        "user": ssh.user,
        "identity_file": str(ssh.identity_file),
        "known_hosts": [str(ssh.known_hosts)],
        "ssh_config": "",
        "remote_python": ssh.remote_python,
        "slurm": {"time": "10"},
    }


def queue(user: str = "") -> list[tuple[str, str, str]]:
    """(job id or job.step, state, name) of every job and step in the queue."""
    argv = ["squeue", "--noheader", "--format=%i|%T|%j"]
    steps = ["squeue", "--noheader", "--steps", "--format=%i|%T|%j"]
    if user:
        argv.append(f"--user={user}")
        steps.append(f"--user={user}")
    rows = []
    for cmd in (argv, steps):
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows += [tuple(line.split("|", 2)) for line in out.splitlines() if line.strip()]
    return rows  # type: ignore[return-value]


def kernel_processes(user: str) -> list[str]:
    found = []
    for proc in psutil.process_iter(["username", "cmdline", "status"]):
        if proc.info["status"] == psutil.STATUS_ZOMBIE or proc.info["username"] != user:
            continue
        line = " ".join(proc.info["cmdline"] or [])
        if any(mark in line for mark in ("ipykernel", "npr-watchdog", "srun")):
            found.append(line)
    return found


async def wait_until(predicate: Any, timeout: float, step: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(step)
    return bool(predicate())


def job_of(km: Any) -> str:
    job = km.provisioner._job
    assert job is not None
    return str(job.job_id)


async def test_lifecycle_in_an_allocation(
    start_kernel: KernelFactory, config: dict[str, Any], rig: Rig
) -> None:
    user = rig.ssh.user  # type: ignore[union-attr]
    started = time.monotonic()
    km = await start_kernel(config, provisioner="nersc-cori")
    kc = await ready_client(km)
    first_start = time.monotonic() - started
    job_id = job_of(km)
    try:
        result = await run_cell(kc, "import os, socket; print(os.environ['SLURM_JOB_ID'])")
        assert result.stdout.strip() == job_id

        msg_id = kc.execute("import time; time.sleep(60)")
        await asyncio.sleep(1.0)
        t0 = time.monotonic()
        await km.interrupt_kernel()
        while True:
            reply = await kc.get_shell_msg(timeout=5)
            if reply["parent_header"].get("msg_id") == msg_id:
                break
        interrupt = time.monotonic() - t0
        assert reply["content"]["ename"] == "KeyboardInterrupt"
        assert interrupt < 2.0, f"interrupt took {interrupt:.2f} s"

        t0 = time.monotonic()
        await km.restart_kernel()
        await kc.wait_for_ready(timeout=60)
        restart = time.monotonic() - t0
        assert job_of(km) == job_id  # the same allocation
        result = await run_cell(kc, "import os; print(os.environ['SLURM_JOB_ID'], 6 * 7)")
        assert result.stdout.split() == [job_id, "42"]
        print(f"first start {first_start:.2f} s, restart {restart:.2f} s, interrupt {interrupt:.3f} s")
        assert restart < first_start
    finally:
        kc.stop_channels()
    await km.shutdown_kernel()
    assert await wait_until(lambda: not [r for r in queue(user) if r[0].split(".")[0] == job_id], 30), queue(user)
    assert await wait_until(lambda: not kernel_processes(user), 15), kernel_processes(user)
