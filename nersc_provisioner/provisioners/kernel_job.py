"""The Slurm job a kernel runs in: its allocation, the replace-once policy, status, end.

One object per kernel, kept across restarts (a restart is a new step in the same
job).  Its phase is explicit::

    NONE --ensure()--> QUEUED --the job runs--> RUNNING --report_end()--> ENDED
                         |                          |
                         +--stop / failure----------+--end()--> CANCELLED (or NONE: kept)

A start while RUNNING reuses the job; one after ENDED asks, once per kernel, for a
new allocation (never for the user's own ``job_id``).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any

from ..errors import NERSCProvisionerError
from ..slurm.allocation import AllocationError, JobStatus, Runner, SlurmAllocation
from ..slurm.commands import SlurmOptions
from ..slurm.states import JobState
from .workers import in_own_thread, in_thread


@dataclass
class SlurmJob:
    """The allocation a kernel runs in, for reattaching (``get_provisioner_info``)."""

    job_id: str
    owned: bool
    node: str
    node_addr: str


class JobPhase(enum.Enum):
    NONE = "none"
    QUEUED = "queued"
    RUNNING = "running"
    ENDED = "ended"
    CANCELLED = "cancelled"


def _allocate(alloc: SlurmAllocation, queue_timeout: float) -> tuple[str, str]:
    """Submit (or attach), wait in the queue, find the node: (name, address).  Blocking.

    On any failure, including a stop requested while waiting, the job is cancelled
    (if it is ours) before the error propagates.
    """
    try:
        alloc.submit()
        status = alloc.wait_running(queue_timeout)
        return alloc.first_node(status.nodes)
    except BaseException:
        if alloc.owned:
            alloc.cancel(force=True)
        raise


async def let_shutdown_finish(manager: Any) -> None:
    """A shutdown_kernel() overlapping a start that waited in the queue: end the start
    after it.

    jupyter_client's start and shutdown share the manager's ``ready`` future; the
    one that ends last finds it set.  Ending after the shutdown lets the shutdown
    call succeed (the abandoned start then ends in jupyter_client's
    InvalidStateError, with our error as its context).
    """
    ready = getattr(manager, "ready", None)
    if isinstance(ready, asyncio.Future) and not ready.done():
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(ready), 10)


class KernelJob:
    """The Slurm side of one kernel."""

    def __init__(self, name: str, log: Any) -> None:
        self.name, self.log = name, log
        self.phase = JobPhase.NONE
        self.allocation: SlurmAllocation | None = None
        self.job: SlurmJob | None = None
        #: "JOB (STATE)" of the job whose end led to a new allocation (at most once).
        self.replaced_after = ""
        #: How the job ended, once seen (reported once).
        self.end_status: JobStatus | None = None
        #: A shutdown came while the job was queued.
        self.shut_down_while_queued = False

    @property
    def queued(self) -> bool:
        return self.phase is JobPhase.QUEUED

    def new_start(self) -> None:
        self.end_status = None
        self.shut_down_while_queued = False

    def stop_while_queued(self, reason: str, *, shutdown: bool = True) -> bool:
        """If the job is still queued, have the waiting start cancel it; True if so."""
        alloc = self.allocation
        if not self.queued or alloc is None:
            return False
        self.shut_down_while_queued = shutdown
        alloc.request_stop(reason)
        return True

    def stop_requested(self) -> bool:
        alloc = self.allocation
        return alloc is not None and alloc.stop.is_set()

    async def ensure(
        self,
        options: SlurmOptions,
        runner: Runner,
        queue_timeout: float,
        *,
        release_after: Callable[[Future[Any]], None],
        after_failure: Callable[[], Awaitable[None]],
    ) -> SlurmJob:
        """A running allocation: the one held (a restart), or a new one, with a wait."""
        held, job = self.allocation, self.job
        if held is not None and job is not None and await self._still_running(held, options):
            return job
        alloc = SlurmAllocation(options, runner=runner, logger=self.log)
        self.allocation = alloc
        self.phase = JobPhase.QUEUED
        started = time.monotonic()
        # One thread submits, waits and finds the node; on any failure it cancels the job.
        # A thread of its own: the wait may last hours, and must not hold a worker of
        # the short requests (workers.py).
        work = in_own_thread(_allocate, alloc, queue_timeout, name="nersc-slurm-wait")
        try:
            node, address = await asyncio.wrap_future(work)
        except asyncio.CancelledError:
            # The start was abandoned (the server is stopping, a client gave up). The
            # thread cancels the job through the login connection, which is given
            # back only after that.
            alloc.request_stop("the start was cancelled")
            self._forget(JobPhase.CANCELLED)
            release_after(work)
            raise
        except BaseException:
            self._forget(JobPhase.CANCELLED)
            if self.shut_down_while_queued:
                await after_failure()
            raise
        self.phase = JobPhase.RUNNING
        self.job = SlurmJob(alloc.job_id, alloc.owned, node, address)
        self.log.info(
            "%s: Slurm job %s ready on %s (%s) after %.1f s",
            self.name,
            alloc.job_id,
            node,
            address,
            time.monotonic() - started,
        )
        return self.job

    async def _still_running(self, alloc: SlurmAllocation, options: SlurmOptions) -> bool:
        """The job held: True if it runs; else the replace-once policy (or an error)."""
        status: JobStatus = await in_thread(alloc.status)
        if not status.state.terminal:
            return True
        ended = f"{alloc.job_id} ({status.state.value})"
        self._forget(JobPhase.ENDED)
        if options.job_id:
            raise AllocationError(
                f"your Slurm job {ended} has ended; the kernel cannot run in it again",
                hint="get a new allocation and put its id in job_id, or remove job_id to "
                "let the kernel ask for one",
            )
        if self.replaced_after:
            raise AllocationError(
                f"Slurm job {ended} has ended, and a new allocation was already requested "
                f"once for this kernel (after job {self.replaced_after} ended); none is "
                "requested again",
                hint="shut the kernel down and start it anew when you want another "
                "allocation; check `time` in the slurm settings",
            )
        self.replaced_after = ended
        self.log.warning(
            "%s: Slurm job %s has ended; asking once for a new allocation", self.name, ended
        )
        return False

    def _forget(self, phase: JobPhase) -> None:
        self.allocation = self.job = None
        self.phase = phase

    def attach(self, job: SlurmJob, options: SlurmOptions, runner: Runner) -> None:
        """Reattach to a saved job (``load_provisioner_info``)."""
        self.job = job
        options = replace(options, job_id=job.job_id)
        self.allocation = SlurmAllocation(options, runner=runner, logger=self.log)
        self.allocation.owned = job.owned
        self.phase = JobPhase.RUNNING

    async def status(self, *, settle: bool = False) -> JobStatus | None:
        """The job's state (UNKNOWN if the controller does not answer); with ``settle``,
        a job that is ending (COMPLETING) is waited for until its final state shows."""
        alloc = self.allocation
        if alloc is None:
            return None
        try:
            status: JobStatus = await in_thread(alloc.settled_status if settle else alloc.status)
        except NERSCProvisionerError:
            return JobStatus(JobState.UNKNOWN, "the login node does not answer")
        return status

    async def report_end(self, kernel_id: str) -> bool:
        """If the kernel's job has ended, say so (once) and return True."""
        status = await self.status(settle=True)
        if status is None or not status.state.terminal:
            return False
        self.phase = JobPhase.ENDED
        if self.end_status is None:
            self.end_status = status
            alloc = self.allocation
            self.log.error(
                "kernel %s: Slurm job %s has ended: %s%s",
                kernel_id,
                alloc.job_id if alloc else "?",
                status.state.value,
                f" ({status.reason})" if status.reason and status.reason != "None" else "",
            )
        return True

    async def end(self) -> None:
        """At shutdown: cancel the job unless it is the user's own or is to be kept."""
        alloc = self.allocation
        if alloc is None:
            return
        if self.queued:
            alloc.request_stop("the kernel was shut down")
            self._forget(JobPhase.CANCELLED)
            return
        self.allocation = self.job = None
        if self.end_status is not None:
            self.phase = JobPhase.ENDED
            self.log.info(
                "%s: Slurm job %s had already ended (%s); nothing to cancel",
                self.name,
                alloc.job_id,
                self.end_status.state.value,
            )
            return
        if await in_thread(alloc.cancel):
            self.phase = JobPhase.CANCELLED
            return
        self.phase = JobPhase.NONE  # not ours to end: left running
        if alloc.job_id:
            self.log.info(
                "%s: Slurm job %s left running (%s)",
                self.name,
                alloc.job_id,
                "keep is set" if alloc.owned else "it is your own allocation (job_id)",
            )
