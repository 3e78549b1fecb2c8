"""The remote provisioner's decisions, driven with a fake connection and a fake job.

No sshd, no Slurm, no kernel: these run in a second and cover every branch of
``poll``, shutdown while the job is queued, and the tunnel's reconnect gating.
The rig tests prove the real thing; these pin the logic.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import pytest

from nersc_provisioner.errors import SSHConnectError
from nersc_provisioner.provisioners.hosts import node_target
from nersc_provisioner.provisioners.kernel_job import JobPhase, SlurmJob
from nersc_provisioner.provisioners.remote import NERSCCoriProvisioner
from nersc_provisioner.provisioners.remote_session import RemoteKernel
from nersc_provisioner.provisioners.tunnel import IOPUB_HEAD_START, IOPUB_WAIT, Tunnel
from nersc_provisioner.provisioners.workers import in_thread
from nersc_provisioner.slurm.allocation import AllocationError, JobStatus, local_runner
from nersc_provisioner.slurm.commands import SlurmOptions
from nersc_provisioner.slurm.states import JobState
from nersc_provisioner.transports.forwarding import RETRY
from nersc_provisioner.transports.ssh import SSHTarget
from tests.kernels import wait_until


@dataclass
class Target:
    label: str = "login.example"


@dataclass
class FakeConnection:
    """What the provisioner reads of an SSHConnection, and what it asks of its agent."""

    connected: bool = True
    fatal: str | None = None
    reconnects: int = 0
    down_since: float | None = None
    reconnected_at: float | None = None
    answers: dict[str, Any] = field(default_factory=dict)
    requests: list[tuple[str, ...]] = field(default_factory=list)
    target: Target = field(default_factory=Target)
    forwards: list[int] = field(default_factory=list)

    def open(self, timeout: float = 60.0) -> None:
        self.requests.append(("open",))

    def request(self, command: str, *args: str, timeout: float = 15.0) -> str:
        self.requests.append((command, *args))
        answer = self.answers.get(command, "ok")
        if isinstance(answer, BaseException):
            raise answer
        return str(answer)

    def run_script(self, script: str, *, timeout: float, on_line: Any = None) -> Any:
        return 0, ["the kernel's last words"]

    def open_forward(self, port: int) -> Any:
        self.forwards.append(port)
        return f"channel-{port}"


class FakeAllocation:
    """What the kernel job reads of a SlurmAllocation."""

    def __init__(self, state: JobState = JobState.RUNNING) -> None:
        self.state, self.job_id, self.owned = state, "4242", True
        self.stop = threading.Event()
        self.stop_reasons: list[str] = []
        self.cancelled = False

    def status(self) -> JobStatus:
        return JobStatus(self.state, "")

    settled_status = status

    def request_stop(self, reason: str) -> None:
        self.stop_reasons.append(reason)
        self.stop.set()

    def cancel(self) -> bool:
        self.cancelled = True
        return True


def provisioner(slurm: bool = False) -> NERSCCoriProvisioner:
    config: dict[str, Any] = {"host": "login.example", "ssh_config": ""}
    if slurm:
        config["slurm"] = {"time": "10"}
    prov = NERSCCoriProvisioner(kernel_id="k1", **config)
    prov.log = logging.getLogger("test-remote-logic")
    return prov


def running(prov: NERSCCoriProvisioner, conn: FakeConnection) -> RemoteKernel:
    prov.hosts.conn = conn  # type: ignore[assignment]
    prov.hosted.remote = RemoteKernel("k1", 1234, "5678", "node1", {"shell_port": 4000})
    return prov.hosted.remote


def queued(prov: NERSCCoriProvisioner) -> FakeAllocation:
    alloc = FakeAllocation(JobState.PENDING)
    prov.kernel_job.allocation = alloc  # type: ignore[assignment]
    prov.kernel_job.phase = JobPhase.QUEUED
    return alloc


def job_of(prov: NERSCCoriProvisioner, state: JobState) -> FakeAllocation:
    alloc = FakeAllocation(state)
    prov.kernel_job.allocation = alloc  # type: ignore[assignment]
    prov.kernel_job.job = SlurmJob("4242", True, "node1", "10.0.0.1")
    prov.kernel_job.phase = JobPhase.RUNNING
    return alloc


# --- poll: every branch -------------------------------------------------------------


async def test_poll_without_a_kernel_is_ended() -> None:
    assert await provisioner().poll() == 0


async def test_poll_while_queued_is_alive_until_a_stop() -> None:
    prov = provisioner(slurm=True)
    alloc = queued(prov)
    assert prov.has_process
    assert await prov.poll() is None
    alloc.request_stop("test")
    assert await prov.poll() == 1


async def test_poll_of_a_lost_connection_reports_once(caplog: pytest.LogCaptureFixture) -> None:
    prov = provisioner()
    running(prov, FakeConnection(fatal="authentication failed"))
    assert await prov.poll() == 1
    assert await prov.poll() == 1
    lost = [r for r in caplog.records if "is lost" in r.getMessage()]
    assert len(lost) == 1


async def test_poll_notes_a_reconnect(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    prov = provisioner()
    conn = FakeConnection(reconnects=1, answers={"alive": "alive"})
    running(prov, conn)
    assert await prov.poll() is None
    assert any("re-established" in r.getMessage() for r in caplog.records)
    assert prov.remote is not None
    assert prov.remote.seen_reconnects == 1


async def test_poll_while_disconnected_counts_alive_for_the_grace() -> None:
    prov = provisioner()
    conn = FakeConnection(connected=False, down_since=time.monotonic())
    remote = running(prov, conn)
    assert await prov.poll() is None
    assert remote.reported_down
    conn.down_since = time.monotonic() - prov.reconnect_grace - 1
    assert await prov.poll() == 1
    assert conn.requests == []  # nothing is asked of a connection that is down


async def test_poll_while_disconnected_in_an_ended_job_is_dead_at_once() -> None:
    prov = provisioner(slurm=True)
    running(prov, FakeConnection(connected=False, down_since=time.monotonic()))
    job_of(prov, JobState.TIMEOUT)
    assert await prov.poll() == 1
    assert prov.kernel_job.phase is JobPhase.ENDED
    assert prov.kernel_job.end_status is not None


async def test_poll_asks_the_agent() -> None:
    prov = provisioner()
    conn = FakeConnection(answers={"alive": "alive"})
    running(prov, conn)
    assert await prov.poll() is None
    assert conn.requests == [("alive", "1234", "5678", "k1")]
    conn.answers["alive"] = SSHConnectError("reconnecting")
    assert await prov.poll() is None  # being re-established: not dead


async def test_poll_of_a_gone_kernel_reports_its_last_output(
    caplog: pytest.LogCaptureFixture,
) -> None:
    prov = provisioner()
    running(prov, FakeConnection(answers={"alive": "dead"}))
    assert await prov.poll() == 1
    gone = [r.getMessage() for r in caplog.records if "is gone" in r.getMessage()]
    assert len(gone) == 1
    assert "the kernel's last words" in gone[0]
    assert await prov.poll() == 1  # said once


async def test_poll_of_a_kernel_we_stopped_is_quiet(caplog: pytest.LogCaptureFixture) -> None:
    prov = provisioner()
    running(prov, FakeConnection(answers={"alive": "dead"}))
    prov.hosted.stopping = True
    assert await prov.poll() == 1
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_poll_of_a_gone_kernel_whose_job_ended_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    prov = provisioner(slurm=True)
    running(prov, FakeConnection(answers={"alive": "dead"}))
    job_of(prov, JobState.TIMEOUT)
    assert await prov.poll() == 1
    messages = [r.getMessage() for r in caplog.records]
    assert any("Slurm job 4242 has ended: TIMEOUT" in m for m in messages), messages
    assert not any("is gone" in m for m in messages)


# --- shutdown while the job is queued --------------------------------------------------


async def test_interrupt_while_queued_cancels_the_job() -> None:
    prov = provisioner(slurm=True)
    alloc = queued(prov)
    await prov.send_signal(signal.SIGINT)
    assert alloc.stop_reasons == ["the kernel was interrupted"]
    assert not prov.kernel_job.shut_down_while_queued


async def test_terminate_while_queued_is_a_shutdown() -> None:
    prov = provisioner(slurm=True)
    alloc = queued(prov)
    await prov.terminate()
    assert alloc.stop_reasons == ["the kernel was shut down"]
    assert prov.kernel_job.shut_down_while_queued


async def test_shutdown_requested_while_queued_stops_the_wait_but_not_at_restart() -> None:
    prov = provisioner(slurm=True)
    alloc = queued(prov)
    await prov.shutdown_requested(restart=True)
    assert alloc.stop_reasons == []
    await prov.shutdown_requested(restart=False)
    assert alloc.stop_reasons == ["the kernel was shut down"]


async def test_cleanup_while_queued_leaves_the_rest_to_the_waiting_start() -> None:
    prov = provisioner(slurm=True)
    alloc = queued(prov)
    await prov.cleanup(restart=False)
    assert alloc.stop_reasons == ["the kernel was shut down"]
    assert not alloc.cancelled  # the waiting start cancels it, through its own thread
    assert prov.kernel_job.allocation is alloc


async def test_cleanup_of_a_running_job_cancels_it() -> None:
    prov = provisioner(slurm=True)
    alloc = job_of(prov, JobState.RUNNING)
    await prov.cleanup(restart=False)
    assert alloc.cancelled
    assert prov.kernel_job.phase is JobPhase.CANCELLED
    assert prov.kernel_job.allocation is None


async def test_a_signal_reaches_the_kernel_through_the_agent() -> None:
    prov = provisioner()
    conn = FakeConnection()
    running(prov, conn)
    await prov.send_signal(signal.SIGINT)
    assert conn.requests == [("signal", "INT", "1234", "5678", "k1")]
    assert not prov.hosted.stopping
    await prov.send_signal(signal.SIGTERM)
    assert prov.hosted.stopping


# --- the tunnel's gating after a reconnect ---------------------------------------------


def test_requests_wait_for_iopub_after_a_reconnect() -> None:
    conn = FakeConnection()
    ports = {"shell_port": 4000, "iopub_port": 4001}
    tunnel = Tunnel(lambda: (conn, ports, False))  # type: ignore[arg-type,return-value]
    assert tunnel.open_channel("shell_port") == "channel-4000"  # no reconnect yet
    conn.reconnected_at = time.monotonic() - 1  # a second ago (IOPUB_WAIT is 3 s)
    assert tunnel.open_channel("shell_port") == RETRY  # IOPub not open again yet
    assert tunnel.open_channel("iopub_port") == "channel-4001"
    assert tunnel.open_channel("shell_port") == RETRY  # IOPub's head start
    tunnel._iopub_opened_at = time.monotonic() - IOPUB_HEAD_START - 0.01
    assert tunnel.open_channel("shell_port") == "channel-4000"


def test_requests_go_after_iopub_wait_without_a_subscriber() -> None:
    conn = FakeConnection(reconnected_at=time.monotonic() - IOPUB_WAIT - 0.01)
    tunnel = Tunnel(lambda: (conn, {"shell_port": 4000}, False))  # type: ignore[arg-type,return-value]
    assert tunnel.open_channel("shell_port") == "channel-4000"


def test_channels_are_held_while_reconnecting_and_refused_without_a_kernel() -> None:
    conn = FakeConnection(connected=False)
    tunnel = Tunnel(lambda: (conn, {"shell_port": 4000}, False))  # type: ignore[arg-type,return-value]
    assert tunnel.open_channel("shell_port") == RETRY
    stopping = Tunnel(lambda: (conn, {"shell_port": 4000}, True))  # type: ignore[arg-type,return-value]
    assert stopping.open_channel("shell_port") == "channel-4000"  # no wait when stopping
    gone = Tunnel(lambda: (conn, None, False))  # type: ignore[arg-type,return-value]
    assert gone.open_channel("shell_port") is None


# --- the Slurm job: a restart in a job that has ended (replace once) --------------------


def ended_job(prov: NERSCCoriProvisioner) -> FakeAllocation:
    return job_of(prov, JobState.TIMEOUT)


async def ensure(prov: NERSCCoriProvisioner, options: SlurmOptions) -> SlurmJob:
    async def nothing() -> None:
        return None

    return await prov.kernel_job.ensure(
        options, local_runner, 10.0, release_after=lambda _: None, after_failure=nothing
    )


async def test_a_restart_in_a_running_job_reuses_it() -> None:
    prov = provisioner(slurm=True)
    alloc = job_of(prov, JobState.RUNNING)
    job = await ensure(prov, SlurmOptions.from_config({"time": "10"}))
    assert job.job_id == "4242"
    assert prov.kernel_job.allocation is alloc  # no new job, no queue wait
    assert prov.kernel_job.phase is JobPhase.RUNNING


async def test_a_second_ended_job_is_not_replaced() -> None:
    prov = provisioner(slurm=True)
    ended_job(prov)
    prov.kernel_job.replaced_after = "4141 (TIMEOUT)"  # one replacement was had already
    with pytest.raises(AllocationError, match="already requested once") as info:
        await ensure(prov, SlurmOptions.from_config({"time": "10"}))
    assert "4242 (TIMEOUT)" in str(info.value)
    assert prov.kernel_job.phase is JobPhase.ENDED
    assert prov.kernel_job.allocation is None


async def test_the_users_own_ended_job_is_never_replaced() -> None:
    prov = provisioner(slurm=True)
    ended_job(prov)
    with pytest.raises(AllocationError, match="your Slurm job 4242 \\(TIMEOUT\\) has ended"):
        await ensure(prov, SlurmOptions.from_config({"job_id": "4242"}))
    assert prov.kernel_job.replaced_after == ""  # nothing was asked for


# --- long waits do not occupy the workers of short requests ----------------------------


class QueuedSlurm:
    """A scripted Slurm: sbatch gives job ids, squeue says PENDING until ``run`` is set."""

    def __init__(self) -> None:
        self.run = threading.Event()
        self.threads: set[str] = set()  # names of the threads that ran commands
        self.idents: set[int] = set()
        self.cancelled: list[str] = []
        self._ids = iter(range(100, 10_000))
        self._lock = threading.Lock()

    def __call__(self, argv: Any, timeout: float) -> tuple[int, str, str]:
        with self._lock:
            self.threads.add(threading.current_thread().name)
            self.idents.add(threading.get_ident())
        command = list(argv)
        if command[0] == "sbatch":
            return 0, f"{next(self._ids)}\n", ""
        if command[0] == "squeue":
            state = "RUNNING|None|node1|0:01" if self.run.is_set() else "PENDING|Priority||0:00"
            return 0, state + "\n", ""
        if command[:3] == ["scontrol", "show", "hostnames"]:
            return 0, "node1\n", ""
        if command[:2] == ["scontrol", "--oneliner"]:
            return 0, "NodeName=node1 NodeAddr=10.0.0.1 State=IDLE\n", ""
        if command[0] == "scancel":
            self.cancelled.append(command[1])
            return 0, "", ""
        return 1, "", f"unexpected command {command}"


async def test_queue_waits_leave_the_ssh_workers_free_for_short_requests() -> None:
    """40 kernels wait in the queue at once (more than SSH_EXECUTOR's 32 workers): a
    short request (an agent call, a poll) is still served at once, and the waits run
    in threads of their own."""
    slurm = QueuedSlurm()
    provs = [provisioner(slurm=True) for _ in range(40)]
    options = SlurmOptions.from_config({"time": "10"})

    async def nothing() -> None:
        return None

    waits = [
        asyncio.ensure_future(
            p.kernel_job.ensure(
                options, slurm, 60.0, release_after=lambda _: None, after_failure=nothing
            )
        )
        for p in provs
    ]
    try:
        assert await wait_until(lambda: all(p.kernel_job.queued for p in provs), 10)
        assert await wait_until(lambda: len(slurm.idents) >= 40, 10)
        # Every worker of short requests is free: one is served without waiting for
        # any queue (it would wait for all 40 if they held the workers).
        assert await asyncio.wait_for(in_thread(threading.current_thread), 5) is not None
        assert not any(name.startswith("nersc-ssh") for name in slurm.threads), slurm.threads
        slurm.run.set()
        jobs = await asyncio.wait_for(asyncio.gather(*waits), 30)
        assert {job.node for job in jobs} == {"node1"}
        assert len({job.job_id for job in jobs}) == 40
    finally:
        slurm.run.set()
        for wait in waits:
            wait.cancel()
    assert slurm.cancelled == []


async def test_a_restart_in_an_ended_job_asks_once_for_a_new_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The job the kernel ran in has ended (its time limit): a restart asks Slurm for
    one new allocation, waits for it, and runs in it; the old one is remembered."""
    prov = provisioner(slurm=True)
    ended_job(prov)
    slurm = QueuedSlurm()
    slurm.run.set()

    async def nothing() -> None:
        return None

    with caplog.at_level(logging.WARNING):
        job = await prov.kernel_job.ensure(
            SlurmOptions.from_config({"time": "10"}),
            slurm,
            10.0,
            release_after=lambda _: None,
            after_failure=nothing,
        )
    assert (job.job_id, job.node, job.node_addr, job.owned) == ("100", "node1", "10.0.0.1", True)
    assert prov.kernel_job.phase is JobPhase.RUNNING
    assert prov.kernel_job.replaced_after == "4242 (TIMEOUT)"
    assert "Slurm job 4242 (TIMEOUT) has ended; asking once for a new allocation" in caplog.text


# --- reattach: load_provisioner_info ----------------------------------------------------


async def saved_info(prov: NERSCCoriProvisioner) -> dict[str, Any]:
    """What a server saved of a running kernel, as JSON would carry it."""
    prov.connection_info = {"key": b"secret", "signature_scheme": "hmac-sha256"}
    return json.loads(json.dumps(await prov.get_provisioner_info()))


async def test_reattach_restores_the_kernel_and_forwards_again() -> None:
    """A new server process loads the saved info: the kernel is watched again, the
    listeners are open, the clients get them, and poll asks the agent."""
    old = provisioner()
    running(old, FakeConnection())
    info = await saved_info(old)
    assert info["connection_info"]["key"] == "secret"  # JSON-safe

    new = provisioner()
    conn = FakeConnection(reconnects=3)
    new.hosts.login, new.hosts.login_target = conn, Target()  # type: ignore[assignment]
    try:
        await new.load_provisioner_info(info)
        assert new.remote == RemoteKernel(
            "k1", 1234, "5678", "node1", {"shell_port": 4000}, seen_reconnects=3
        )
        assert ("watch", "k1") in conn.requests
        assert new.connection_info["key"] == b"secret"
        assert new.tunnel.is_open
        endpoints = new.tunnel.endpoints()
        assert {k: new.connection_info[k] for k in endpoints} == endpoints
        conn.answers["alive"] = "alive"
        assert await new.poll() is None
        assert conn.requests[-1][0] == "alive"
    finally:
        new.tunnel.close()


async def test_reattach_in_a_slurm_job_follows_the_job() -> None:
    """Saved in a Slurm job: the job is attached again (ours to cancel at shutdown), and
    the kernel is watched again through the node's connection."""
    old = provisioner(slurm=True)
    job_of(old, JobState.RUNNING)
    running(old, FakeConnection())
    info = await saved_info(old)
    assert info["slurm_job"] == {
        "job_id": "4242",
        "owned": True,
        "node": "node1",
        "node_addr": "10.0.0.1",
    }

    new = provisioner(slurm=True)
    login, node = FakeConnection(), FakeConnection()
    login_target = SSHTarget("login.example", "login.example", 22, "user", (), ())
    new.hosts.login, new.hosts.login_target = login, login_target  # type: ignore[assignment]
    # The node's connection is already in hand (as the pool would give it).
    new.hosts.conn = node  # type: ignore[assignment]
    new.hosts.target = node_target(new, "10.0.0.1", login_target)
    try:
        await new.load_provisioner_info(info)
        job = new.kernel_job
        assert job.phase is JobPhase.RUNNING
        assert job.allocation is not None
        assert (job.allocation.job_id, job.allocation.owned) == ("4242", True)
        assert ("watch", "k1") in node.requests
    finally:
        new.tunnel.close()
