"""Slurm allocations: state translation (units) and the real one-node Slurm of the rig."""

from __future__ import annotations

import logging
import subprocess

import pytest

from nersc_provisioner.errors import UnsafeValueError
from nersc_provisioner.slurm import (
    TERMINAL_STATES,
    AllocationError,
    JobState,
    QueueTimeout,
    SlurmAllocation,
    SlurmOptions,
)
from nersc_provisioner.slurm.commands import holder_argv, parse_scontrol
from tests.kernels import poll_until
from tests.rig import SlurmRig, job_entries


@pytest.mark.parametrize(
    ("text", "state"),
    [
        ("RUNNING", JobState.RUNNING),
        ("PD", JobState.PENDING),
        ("CANCELLED by 0", JobState.CANCELLED),
        ("CANCELLED+", JobState.CANCELLED),
        ("OOM", JobState.OUT_OF_MEMORY),
        ("TIMEOUT", JobState.TIMEOUT),
        ("NODE_FAIL", JobState.NODE_FAIL),
        ("", JobState.UNKNOWN),
        ("something new", JobState.UNKNOWN),
    ],
)
def test_states_are_translated_once(text: str, state: JobState) -> None:
    assert JobState.parse(text) is state


def test_terminal_states() -> None:
    assert JobState.TIMEOUT.terminal
    assert JobState.PREEMPTED in TERMINAL_STATES
    assert not JobState.UNKNOWN.terminal  # a silent controller is not a dead job
    assert not JobState.PENDING.terminal


def test_values_travel_as_single_argv_elements() -> None:
    hostile = "debug; touch /tmp/pwned"
    argv = holder_argv(SlurmOptions(qos=hostile, time="01:00:00", extra_args=("--exclusive",)))
    assert f"--qos={hostile}" in argv
    assert "--time=01:00:00" in argv
    assert "--exclusive" in argv
    with pytest.raises(UnsafeValueError):
        holder_argv(SlurmOptions(account="-A evil"))
    with pytest.raises(UnsafeValueError):
        holder_argv(SlurmOptions(constraint="cpu\n#SBATCH --x"))
    with pytest.raises(UnsafeValueError):
        SlurmAllocation(SlurmOptions(job_id="1; scancel -u x"))


def test_parse_scontrol() -> None:
    fields = parse_scontrol("JobId=7 JobName=x JobState=TIMEOUT Reason=TimeLimit NodeList=vm")
    assert fields["JobState"] == "TIMEOUT"
    assert fields["Reason"] == "TimeLimit"


@pytest.mark.rig
def test_allocation_runs_and_is_cancelled(slurm_rig: SlurmRig) -> None:
    allocation = SlurmAllocation(SlurmOptions(time="10"))
    job_id = allocation.submit()
    try:
        status = allocation.wait_running(timeout=60)
        assert status.state is JobState.RUNNING
        assert status.nodes
    finally:
        assert allocation.cancel()
    assert poll_until(lambda: not job_entries(job_id), 30), job_entries(job_id)
    assert allocation.status().state in (JobState.CANCELLED, JobState.GONE)


@pytest.mark.rig
def test_queue_timeout_cancels_the_job_and_says_so(
    slurm_rig: SlurmRig, caplog: pytest.LogCaptureFixture
) -> None:
    allocation = SlurmAllocation(SlurmOptions(extra_args=("--begin=now+1hour",)))
    job_id = allocation.submit()
    caplog.set_level(logging.INFO, logger="nersc_provisioner.slurm")
    with pytest.raises(QueueTimeout) as info:
        allocation.wait_running(timeout=3, poll_every=0.5)
    assert job_id in str(info.value)
    assert "PENDING" in str(info.value)
    assert "cancelled" in str(info.value)
    assert any("waited" in r.getMessage() and job_id in r.getMessage() for r in caplog.records)
    assert not job_entries(job_id), job_entries(job_id)


@pytest.mark.rig
def test_external_scancel_is_seen_as_cancelled(slurm_rig: SlurmRig) -> None:
    allocation = SlurmAllocation(SlurmOptions())
    job_id = allocation.submit()
    try:
        allocation.wait_running(timeout=60)
        subprocess.run(["scancel", job_id], check=True)
        assert poll_until(lambda: allocation.status().state.terminal, 30, step=0.5)
        assert allocation.status().state is JobState.CANCELLED
    finally:
        allocation.cancel()


@pytest.mark.rig
def test_attaching_to_a_finished_job_is_refused(slurm_rig: SlurmRig) -> None:
    first = SlurmAllocation(SlurmOptions())
    job_id = first.submit()
    first.cancel()
    with pytest.raises(AllocationError, match=job_id):
        SlurmAllocation(SlurmOptions(job_id=job_id)).submit()


@pytest.mark.rig
def test_job_hitting_its_time_limit_reports_timeout(slurm_rig: SlurmRig) -> None:
    allocation = SlurmAllocation(SlurmOptions(time="1"))  # one minute
    allocation.submit()
    try:
        allocation.wait_running(timeout=60)
        assert poll_until(lambda: allocation.status().state.terminal, 180, step=2)
        assert allocation.status().state is JobState.TIMEOUT
    finally:
        allocation.cancel()
