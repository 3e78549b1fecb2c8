"""Kernels inside Slurm allocations: nersc-cori against the rig's real Slurm and sshds.

The "login node" is the sshd in netns npr-remote; the job's node is this machine
(root namespace), reached by ssh through the login node's connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from nersc_provisioner.errors import ConfigError, UnknownHostKeyError
from nersc_provisioner.provisioners import NERSCCoriProvisioner
from nersc_provisioner.slurm import AllocationError, JobState, QueueTimeout
from tests.conftest import KernelFactory
from tests.kernels import interrupt_running_cell, poll_until, ready_client, run_cell, wait_until
from tests.rig import (
    PROCESS_KINDS,
    LmodRig,
    QueueEntry,
    Rig,
    job_entries,
    job_state,
    queue,
    rig_processes,
    sbatch,
)

pytestmark = [pytest.mark.kernel, pytest.mark.rig]


def kernel_processes(user: str, *, agents: bool = True) -> list[str]:
    """Command lines of ``user``'s kernels, watchdogs, sruns (and our ssh agents)."""
    kinds = PROCESS_KINDS if agents else ("kernel", "watchdog", "srun")
    return rig_processes(user, kinds)


@contextlib.contextmanager
def running_job(*args: str, user: str | None = None) -> Iterator[str]:
    """A job submitted (as ``user``, if given), once it runs; cancelled after."""
    job_id = sbatch(*args, user=user)
    try:
        assert poll_until(lambda: job_state(job_id) == "RUNNING", 30), job_state(job_id)
        yield job_id
    finally:
        subprocess.run(["scancel", job_id], check=False)


def node_filled() -> contextlib.AbstractContextManager[str]:
    """A job of another user that takes every CPU of the node, so that ours must wait."""
    return running_job("--exclusive", "--wrap", "sleep 600")


def job_of(km: Any) -> str:
    """The Slurm job of a kernel manager's provisioner (or of a provisioner)."""
    job = getattr(km, "provisioner", km).slurm_job
    assert job is not None
    return str(job.job_id)


@pytest.mark.oldest
async def test_lifecycle_in_an_allocation(
    start_kernel: KernelFactory, slurm_config: dict[str, Any], compute_node_rig: Rig
) -> None:
    user = compute_node_rig.ssh.user  # type: ignore[union-attr]
    km = await start_kernel(slurm_config, provisioner="nersc-cori")
    kc = await ready_client(km)
    job_id = job_of(km)
    try:
        result = await run_cell(kc, "import os, socket; print(os.environ['SLURM_JOB_ID'])")
        assert result.stdout.strip() == job_id

        reply = await interrupt_running_cell(km, kc)
        assert reply["ename"] == "KeyboardInterrupt"

        submitted = {entry.job_id for entry in queue(user)}
        await km.restart_kernel()
        await kc.wait_for_ready(timeout=60)
        assert job_of(km) == job_id  # the same allocation: a new step, no new job
        assert {entry.job_id for entry in queue(user)} == submitted
        result = await run_cell(kc, "import os; print(os.environ['SLURM_JOB_ID'], 6 * 7)")
        assert result.stdout.split() == [job_id, "42"]
    finally:
        kc.stop_channels()
    await km.shutdown_kernel()
    assert await wait_until(lambda: not job_entries(job_id, user), 30), job_entries(job_id, user)
    assert await wait_until(lambda: not kernel_processes(user), 15), kernel_processes(user)


async def test_job_cancelled_from_outside_is_reported_then_replaced_once(
    start_kernel: KernelFactory,
    slurm_config: dict[str, Any],
    compute_node_rig: Rig,
    caplog: pytest.LogCaptureFixture,
) -> None:
    user = compute_node_rig.ssh.user  # type: ignore[union-attr]
    caplog.set_level(logging.INFO)
    km = await start_kernel(slurm_config, provisioner="nersc-cori")
    first = job_of(km)
    assert await km.is_alive()
    subprocess.run(["scancel", first], check=True)
    assert await wait_until(lambda: not_alive(km), 30)
    ended = [r.getMessage() for r in caplog.records if "has ended" in r.getMessage()]
    assert any(first in m and "CANCELLED" in m for m in ended), ended

    # The policy: after a job ends, a restart asks for one new allocation ...
    await km.restart_kernel(now=True)
    second = job_of(km)
    assert second != first
    kc = await ready_client(km)
    try:
        result = await run_cell(kc, "import os; print(os.environ['SLURM_JOB_ID'])")
        assert result.stdout.strip() == second
    finally:
        kc.stop_channels()
    # ... and no more: a second end is final.
    subprocess.run(["scancel", second], check=True)
    assert await wait_until(lambda: not_alive(km), 30)
    with pytest.raises(AllocationError) as info:
        await km.restart_kernel(now=True)
    assert first in str(info.value)
    assert second in str(info.value)
    assert "shut the kernel down and start it anew" in str(info.value)
    assert not job_entries(first, user)
    assert not job_entries(second, user)
    submitted = [r.getMessage() for r in caplog.records if "submitted" in r.getMessage()]
    assert len(submitted) == 2, submitted  # no third job was asked for


async def not_alive(km: Any) -> bool:
    """What the restarter's poll sees: the kernel is not alive."""
    return not await km.is_alive()


async def test_time_limit_is_reported_as_timeout(
    start_kernel: KernelFactory,
    slurm_config: dict[str, Any],
    compute_node_rig: Rig,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    km = await start_kernel({**slurm_config, "slurm": {"time": "1"}}, provisioner="nersc-cori")
    job_id = job_of(km)
    assert await km.is_alive()
    assert await wait_until(lambda: not_alive(km), 200, step=0.5)
    ended = [r.getMessage() for r in caplog.records if "has ended" in r.getMessage()]
    assert any(job_id in m and "TIMEOUT" in m for m in ended), ended
    await km.shutdown_kernel(now=True)
    messages = [r.getMessage() for r in caplog.records]
    assert any(job_id in m and "had already ended (TIMEOUT)" in m for m in messages)
    assert not any(f"Slurm job {job_id} cancelled" in m for m in messages)
    user = compute_node_rig.ssh.user  # type: ignore[union-attr]
    assert await wait_until(lambda: not kernel_processes(user), 15), kernel_processes(user)


async def test_queue_wait_logs_progress_and_times_out_leaving_nothing(
    start_kernel: KernelFactory,
    slurm_config: dict[str, Any],
    compute_node_rig: Rig,
    caplog: pytest.LogCaptureFixture,
) -> None:
    user = compute_node_rig.ssh.user  # type: ignore[union-attr]
    caplog.set_level(logging.INFO)
    with node_filled():
        started = time.monotonic()
        with pytest.raises(QueueTimeout) as info:
            await start_kernel({**slurm_config, "queue_timeout": 7}, provisioner="nersc-cori")
        waited = time.monotonic() - started
    message = str(info.value)
    assert "PENDING" in message
    assert "cancelled" in message
    assert "queue_timeout" in message  # the fix is named
    assert 7 <= waited < 40
    progress = [r.getMessage() for r in caplog.records if "waited" in r.getMessage()]
    assert len(progress) >= 2, progress  # at the start and every few seconds
    assert all("PENDING" in line and "reason:" in line for line in progress)
    assert await wait_until(lambda: not queue(user, steps=True), 15), queue(user, steps=True)
    assert await wait_until(lambda: not kernel_processes(user), 15), kernel_processes(user)


@pytest.mark.oldest
@pytest.mark.parametrize("how", ["interrupt", "cancel", "shutdown"])
async def test_interrupt_or_shutdown_while_queued_cancels_the_job(
    start_kernel: KernelFactory, slurm_config: dict[str, Any], compute_node_rig: Rig, how: str
) -> None:
    """interrupt: km.interrupt_kernel(); cancel: the start is abandoned (a stopping server
    cancels it); shutdown: km.shutdown_kernel(now=True) while the start waits."""
    user = compute_node_rig.ssh.user  # type: ignore[union-attr]
    managers: list[Any] = []

    async def start() -> None:
        await start_kernel(
            {**slurm_config, "queue_timeout": 120},
            provisioner="nersc-cori",
            created=managers.append,
        )

    with node_filled():
        task = asyncio.create_task(start())

        def our_job() -> str:
            provisioner = managers[0].provisioner if managers else None
            alloc = provisioner.kernel_job.allocation if provisioner is not None else None
            return alloc.job_id if alloc is not None else ""

        assert await wait_until(lambda: our_job() and job_state(our_job()) == "PENDING", 30)
        km = managers[0]
        job_id = our_job()
        t0 = time.monotonic()
        if how == "interrupt":
            await km.interrupt_kernel()
            with pytest.raises(AllocationError, match=r"cancelled while it waited.*interrupted"):
                await asyncio.wait_for(task, 30)
        elif how == "cancel":
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        else:
            await km.shutdown_kernel(now=True)
            # The shutdown call succeeds.  jupyter_client's start and shutdown share one
            # "ready" future, so the abandoned start may end in its InvalidStateError;
            # what it ended with is our error.
            with pytest.raises(Exception) as info:  # noqa: PT011
                await asyncio.wait_for(task, 30)
            error = info.value
            if isinstance(error, asyncio.InvalidStateError):
                error = error.__context__  # type: ignore[assignment]
            assert isinstance(error, AllocationError)
            assert "shut down" in str(error)
        assert await wait_until(lambda: not job_entries(job_id, user), 15), queue(user, steps=True)
        assert job_state(job_id) == "CANCELLED"
        assert time.monotonic() - t0 < 15
    assert await wait_until(lambda: not kernel_processes(user), 15), kernel_processes(user)


async def test_attached_allocation_stays_after_shutdown(
    start_kernel: KernelFactory,
    slurm_config: dict[str, Any],
    compute_node_rig: Rig,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    user = compute_node_rig.ssh.user  # type: ignore[union-attr]
    with running_job("--time=10", "--wrap", "exec sleep infinity", user=user) as job_id:
        config = {**slurm_config, "slurm": {"job_id": job_id}}
        km = await start_kernel(config, provisioner="nersc-cori")
        kc = await ready_client(km)
        try:
            result = await run_cell(kc, "import os; print(os.environ['SLURM_JOB_ID'])")
            assert result.stdout.strip() == job_id
        finally:
            kc.stop_channels()
        await km.shutdown_kernel()
        # The shutdown has decided, and said so: the job is not ours to end.  (Where it is
        # ours, the same shutdown has cancelled it by now: test_lifecycle_in_an_allocation.)
        left = [r.getMessage() for r in caplog.records if "left running" in r.getMessage()]
        assert any(job_id in m and "your own allocation" in m for m in left), left
        assert job_state(job_id) == "RUNNING"  # the user's own allocation is left alone
        entries = job_entries(job_id, user)
        assert [e for e in entries if not e.is_step], entries
        assert await wait_until(lambda: not kernel_processes(user), 15), kernel_processes(user)


async def test_kernel_ports_bind_the_node_loopback_only(
    start_kernel: KernelFactory, slurm_config: dict[str, Any], compute_node_rig: Rig
) -> None:
    """Other users on other nodes cannot reach the kernel; only the node's loopback is bound."""
    km = await start_kernel(slurm_config, provisioner="nersc-cori")
    remote = km.provisioner.remote  # type: ignore[union-attr]
    assert remote is not None
    proc = psutil.Process(remote.pid)  # the node is this machine
    # psutil 6 renamed connections() to net_connections(); the oldest stack has 5.9.4.
    connections = getattr(proc, "net_connections", None) or proc.connections
    listening = [c.laddr for c in connections() if c.status == psutil.CONN_LISTEN]
    assert {addr.ip for addr in listening} == {"127.0.0.1"}, listening
    assert set(remote.ports.values()) <= {addr.port for addr in listening}
    ssh, slurm = compute_node_rig.ssh, compute_node_rig.slurm
    assert ssh is not None
    assert slurm is not None
    # From the login node (another host on the cluster), the node's ports are closed.
    for port in remote.ports.values():
        probe = subprocess.run(
            ["ip", "netns", "exec", ssh.netns, "bash", "-c",
             f"exec 3<>/dev/tcp/{slurm.node_addr}/{port}"],
            capture_output=True,
            timeout=10,
        )  # fmt: skip
        assert probe.returncode != 0


async def test_hostile_slurm_values_are_values(
    start_kernel: KernelFactory, slurm_config: dict[str, Any], compute_node_rig: Rig
) -> None:
    user = compute_node_rig.ssh.user  # type: ignore[union-attr]
    canaries = Path("/tmp/npr-slurm-canaries")
    canaries.mkdir(exist_ok=True)
    shutil.chown(canaries, user)  # writable by the rig user, so an injection would show
    canaries.chmod(0o700)
    for leftover in canaries.iterdir():
        leftover.unlink()
    comment = (
        f"a b; touch {canaries}/semi $(touch {canaries}/dollar) `touch {canaries}/tick` "
        "'q\" && touch x"
    )
    km = await start_kernel(
        {**slurm_config, "slurm": {"time": "10", "extra_args": [f"--comment={comment}"]}},
        provisioner="nersc-cori",
    )
    job_id = job_of(km)
    out = subprocess.run(
        ["scontrol", "show", "job", job_id], capture_output=True, text=True, check=True
    ).stdout
    assert f"Comment={comment}" in out  # carried verbatim to Slurm
    await km.shutdown_kernel()
    assert list(canaries.iterdir()) == []

    # A value Slurm refuses is reported with Slurm's words, and nothing is left.
    with pytest.raises(AllocationError) as info:
        await start_kernel(
            {
                **slurm_config,
                "slurm": {"partition": f"x; touch {canaries}/p $(touch {canaries}/p2)"},
            },
            provisioner="nersc-cori",
        )
    assert "sbatch" in str(info.value)
    assert "invalid partition" in str(info.value).lower()
    assert list(canaries.iterdir()) == []

    # Values no shell or flag can carry are refused when the provisioner is built,
    # before anything runs.
    for bad in ({"qos": "a\nb"}, {"account": "-Aevil"}, {"nodes": 0}, {"bogus": 1},
                {"extra_args": "--mem=1G"}, {"job_id": "1; scancel -u x"}):  # fmt: skip
        with pytest.raises(ConfigError) as refused:
            NERSCCoriProvisioner(**{**slurm_config, "slurm": bad})
        assert "slurm" in str(refused.value).lower()
        assert "What to do" in str(refused.value)
    assert list(canaries.iterdir()) == []


@pytest.mark.oldest
async def test_nersc_local_on_a_login_node_runs_the_kernel_in_a_job(
    start_kernel: KernelFactory, compute_node_rig: Rig, lmod_rig: LmodRig
) -> None:
    """Jupyter on the login node (here: this machine, as root): sbatch runs locally and
    the job's node is reached by ssh from here; the module wrapper runs in the step."""
    ssh = compute_node_rig.ssh
    assert ssh is not None
    config = {
        "slurm": {"time": "10"},
        "identity_file": str(ssh.identity_file),
        "known_hosts": [str(ssh.known_hosts)],
        "ssh_config": "",
        "module_use": [str(lmod_rig.modulepath)],
        "modules": ["nersc-test/1.0"],
    }
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    km = await start_kernel(config, argv=argv)  # provisioner: nersc-local
    job_id = job_of(km.provisioner.hosted)  # type: ignore[union-attr]
    kc = await ready_client(km)
    try:
        code = "import os; print(os.environ['SLURM_JOB_ID'], os.environ['NERSC_TEST_MODULE'])"
        result = await run_cell(kc, code)
        assert result.stdout.split() == [job_id, "nersc-test-1.0"]
        await km.restart_kernel()
        await kc.wait_for_ready(timeout=60)
        result = await run_cell(kc, "import os; print(os.environ['SLURM_JOB_ID'])")
        assert result.stdout.strip() == job_id  # the same allocation
    finally:
        kc.stop_channels()
    await km.shutdown_kernel()
    assert await wait_until(lambda: not job_entries(job_id, "root"), 30), job_entries(
        job_id, "root"
    )
    assert job_state(job_id) in ("CANCELLED", "")


def controller_up() -> bool:
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, check=False)
    return "UP" in ping.stdout


async def test_silent_controller_means_unknown_not_dead(
    start_kernel: KernelFactory, slurm_config: dict[str, Any], compute_node_rig: Rig
) -> None:
    """slurmctld stopped while a kernel runs in a job: the state reads UNKNOWN, the
    kernel is alive all along and keeps its variables; then the controller is back."""
    pidfile = compute_node_rig.directory / "slurmctld.pid"
    km = await start_kernel(slurm_config, provisioner="nersc-cori")
    kc = await ready_client(km)
    try:
        await run_cell(kc, "x = 41")
        pid = int(pidfile.read_text())
        os.kill(pid, signal.SIGTERM)
        try:
            assert await wait_until(lambda: not psutil.pid_exists(pid), 20)
            status = await km.provisioner.kernel_job.status()  # type: ignore[union-attr]
            assert status is not None
            assert status.state is JobState.UNKNOWN
            assert await km.is_alive()
            result = await run_cell(kc, "x += 1; print(x)")
            assert result.stdout.strip() == "42"
        finally:
            subprocess.run(["slurmctld"], check=True)
            assert await wait_until(controller_up, 30, step=0.5)
        status = await km.provisioner.kernel_job.status()  # type: ignore[union-attr]
        assert status is not None
        assert status.state is JobState.RUNNING
        assert await km.is_alive()
    finally:
        kc.stop_channels()
    await km.shutdown_kernel()


REATTACH_AND_SHUT_DOWN = textwrap.dedent(
    """
    import asyncio, json, sys
    from jupyter_client.manager import AsyncKernelManager
    from jupyter_client.provisioning import KernelProvisionerFactory

    async def main():
        info = json.loads(sys.stdin.read())
        km = AsyncKernelManager(kernel_name=info["kernel_name"])
        provisioner = KernelProvisionerFactory.instance().create_provisioner_instance(
            info["kernel_id"], km.kernel_spec, parent=km
        )
        await provisioner.load_provisioner_info(info["provisioner"])
        km.provisioner = provisioner
        km.kernel_id = info["kernel_id"]
        km.load_connection_info(provisioner.connection_info)
        kc = km.client()
        kc.start_channels()
        await kc.wait_for_ready(timeout=30)
        out = []
        await kc.execute_interactive(
            "import os; print(secret, os.environ['SLURM_JOB_ID'])", timeout=30,
            output_hook=lambda m: out.append(m["content"].get("text", "")),
        )
        kc.stop_channels()
        print("REATTACHED", "".join(out).strip(), flush=True)
        await km.shutdown_kernel()
        print("SHUT DOWN", flush=True)

    asyncio.run(main())
    """
)


@pytest.mark.oldest
async def test_reattach_from_a_second_process_then_shut_down_there(
    start_kernel: KernelFactory, slurm_config: dict[str, Any], compute_node_rig: Rig
) -> None:
    """The job travels with get/load_provisioner_info; the second process's shutdown
    cancels the job the first one submitted."""
    user = compute_node_rig.ssh.user  # type: ignore[union-attr]
    km = await start_kernel(slurm_config, name="reattach-job", provisioner="nersc-cori")
    job_id = job_of(km)
    kc = await ready_client(km)
    await run_cell(kc, "secret = 'kept'")
    kc.stop_channels()
    info = await km.provisioner.get_provisioner_info()  # type: ignore[union-attr]
    assert info["slurm_job"]["job_id"] == job_id
    payload = json.dumps(
        {"kernel_name": "reattach-job", "kernel_id": km.kernel_id, "provisioner": info}
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        REATTACH_AND_SHUT_DOWN,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=dict(os.environ),
    )
    out, err = await asyncio.wait_for(proc.communicate(payload.encode()), 120)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert f"REATTACHED kept {job_id}" in out.decode()
    assert "SHUT DOWN" in out.decode()
    assert await wait_until(lambda: not job_entries(job_id, user), 30), job_entries(job_id, user)
    # (this process's manager still holds its connections, so their agents remain)
    left = lambda: kernel_processes(user, agents=False)  # noqa: E731
    assert await wait_until(lambda: not left(), 15), left()


async def test_unknown_node_host_key_fails_clearly_and_cancels_the_job(
    start_kernel: KernelFactory, slurm_config: dict[str, Any], compute_node_rig: Rig, tmp_path: Path
) -> None:
    """Host keys are verified for the job's node too; a failure leaves no job behind."""
    ssh, slurm = compute_node_rig.ssh, compute_node_rig.slurm
    assert ssh is not None
    assert slurm is not None
    user = ssh.user
    login_only = tmp_path / "known_hosts"
    login_only.write_text(
        "".join(
            line + "\n"
            for line in ssh.known_hosts.read_text().splitlines()
            if line.split(" ", 1)[0] != slurm.node_addr
        )
    )
    assert slurm.node_addr not in login_only.read_text()
    submitted_before = {entry.job_id for entry in queue(user)}
    with pytest.raises(UnknownHostKeyError) as info:
        await start_kernel(
            {**slurm_config, "known_hosts": [str(login_only)]}, provisioner="nersc-cori"
        )
    assert slurm.node_addr in str(info.value)
    assert "SHA256:" in str(info.value)

    def new_jobs() -> list[QueueEntry]:
        return [e for e in queue(user, steps=True) if e.job_id not in submitted_before]

    assert await wait_until(lambda: not new_jobs(), 15), new_jobs()


async def test_kept_allocation_stays_after_shutdown(
    start_kernel: KernelFactory,
    slurm_config: dict[str, Any],
    compute_node_rig: Rig,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    km = await start_kernel(
        {**slurm_config, "slurm": {"time": "10", "keep": True}}, provisioner="nersc-cori"
    )
    job_id = job_of(km)
    try:
        await km.shutdown_kernel()
        # The shutdown has decided, and said so (see the test above).
        kept = [r.getMessage() for r in caplog.records if "left running" in r.getMessage()]
        assert any(job_id in m and "keep" in m for m in kept), kept
        assert job_state(job_id) == "RUNNING"
    finally:
        subprocess.run(["scancel", job_id], check=False)
