"""One Slurm allocation: ask for it, wait for it with progress, read its state, cancel it.

Commands run through a *runner* (argv in; exit code, stdout, stderr out), so the
same code works on the login node Jupyter runs on and over SSH.  Blocking:
callers on an event loop run it in a thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..errors import NERSCProvisionerError, tail
from ..shell import join
from ..transports.local import run_command
from .commands import (
    SlurmOptions,
    check_job_id,
    holder_argv,
    hostnames_argv,
    job_id_from_sbatch,
    parse_scontrol,
    scancel_argv,
    scontrol_argv,
    show_node_argv,
    squeue_argv,
)
from .states import JobState

log = logging.getLogger("nersc_provisioner.slurm")

#: argv, timeout -> (exit code, stdout, stderr)
Runner = Callable[[Sequence[str], float], tuple[int, str, str]]

POLL_EVERY = 1.0
#: The first polls come sooner: each wait is FIRST_POLL longer than the last, up to
#: POLL_EVERY (10 polls in the first 5.5 s, then one a second).  An idle node often
#: runs the job within a scheduling cycle, and a start should not wait a whole
#: POLL_EVERY for it.
FIRST_POLL = 0.1
PROGRESS_EVERY = 5.0


class AllocationError(NERSCProvisionerError):
    """Slurm refused the allocation, or it ended before the kernel could start."""


class QueueTimeout(AllocationError):
    """The job waited in the queue longer than allowed; it was cancelled."""


def local_runner(argv: Sequence[str], timeout: float) -> tuple[int, str, str]:
    """Run a Slurm command on this machine."""
    result = run_command(argv, timeout=timeout, check=False)
    return result.returncode, result.stdout, result.stderr


#: (script, timeout) -> (exit code, output lines): how a host runs a bash script.
ScriptRunner = Callable[[str, float], tuple[int | None, list[str]]]

_ERR = "NPR_ERR "


def script_runner(run_script: ScriptRunner) -> Runner:
    """A :data:`Runner` for a host reached by scripts (an SSH connection).

    The command's stderr comes back marked, so that stdout and stderr stay apart.
    """

    def run(argv: Sequence[str], timeout: float) -> tuple[int, str, str]:
        script = (
            f"{{ npr_err=$({join(argv)} 2>&1 1>&3 3>&-); }} 3>&1; npr_code=$?\n"
            f'[ -n "$npr_err" ] && printf "%s\\n" "$npr_err" | sed "s/^/{_ERR}/"\n'
            'exit "$npr_code"\n'
        )
        code, lines = run_script(script, timeout)
        out = [line for line in lines if not line.startswith(_ERR)]
        err = [line[len(_ERR) :] for line in lines if line.startswith(_ERR)]
        return (255 if code is None else code), "\n".join(out), "\n".join(err)

    return run


@dataclass(frozen=True)
class JobStatus:
    state: JobState
    reason: str = ""
    nodes: str = ""
    elapsed: str = ""


class SlurmAllocation:
    """An allocation that holds nodes for kernels, which run in it as job steps."""

    def __init__(
        self,
        options: SlurmOptions,
        runner: Runner = local_runner,
        logger: logging.Logger | logging.LoggerAdapter[logging.Logger] | None = None,
    ) -> None:
        self.options = options
        self.runner = runner
        self.log = logger or log
        self.job_id = check_job_id(options.job_id) if options.job_id else ""
        #: True if we created the job (and so may cancel it).
        self.owned = False
        #: Set (from any thread) to stop a wait in the queue; the job is then cancelled.
        self.stop = threading.Event()
        self.stop_reason = ""
        self.cancelled = False

    def _run(self, argv: Sequence[str], timeout: float = 30.0) -> tuple[int, str, str]:
        return self.runner(argv, timeout)

    def submit(self) -> str:
        """Ask for the allocation (or attach to ``job_id``); returns the job id."""
        if self.job_id:
            status = self.status()
            if status.state.terminal:
                raise AllocationError(
                    f"Slurm job {self.job_id} is {status.state.value}, not usable",
                    hint="start a new allocation (leave job_id empty) or give a running job",
                )
            return self.job_id
        argv = holder_argv(self.options)
        code, out, err = self._run(argv, 60.0)
        if code != 0:
            raise AllocationError(
                f"Slurm refused the allocation (sbatch exit code {code}): {tail(err, 5)}",
                hint="check qos, constraint, account, time and partition with `sbatch --test-only`",
            )
        self.job_id = job_id_from_sbatch(out)
        self.owned = True
        self.log.info("Slurm job %s submitted: %s", self.job_id, " ".join(argv[3:-2]))
        return self.job_id

    def status(self) -> JobStatus:
        """The job's state.  A controller that does not answer gives UNKNOWN, never dead."""
        code, out, err = self._run(squeue_argv(self.job_id))
        if code == 0 and out.strip():
            state, reason, nodes, elapsed = (out.strip().splitlines()[0].split("|") + [""] * 4)[:4]
            return JobStatus(JobState.parse(state), reason, nodes, elapsed)
        if code != 0 and "Invalid job id" not in err:
            return JobStatus(JobState.UNKNOWN, tail(err, 1))
        # Not in the queue any more: scontrol remembers it for MinJobAge seconds.
        code, out, err = self._run(scontrol_argv(self.job_id))
        if code == 0:
            fields = parse_scontrol(out)
            return JobStatus(JobState.parse(fields.get("JobState", "")), fields.get("Reason", ""))
        if "Invalid job id" in err:
            return JobStatus(JobState.GONE)
        return JobStatus(JobState.UNKNOWN, tail(err, 1))

    def settled_status(self, timeout: float = 15.0, *, poll_every: float = 0.5) -> JobStatus:
        """The job's state, waiting out COMPLETING (a job that is ending) for its final state.

        When a job ends, its steps are killed first; squeue shows COMPLETING until the
        node is cleaned up, and only then TIMEOUT, CANCELLED, and so on.
        """
        deadline = time.monotonic() + timeout
        status = self.status()
        while status.state is JobState.COMPLETING and time.monotonic() < deadline:
            time.sleep(poll_every)
            status = self.status()
        return status

    def wait_running(self, timeout: float, *, poll_every: float = POLL_EVERY) -> JobStatus:
        """Wait until the job runs, logging progress; cancel it if ``timeout`` passes."""
        started = time.monotonic()
        last_report = 0.0
        polls = 0
        while True:
            if self.stop.is_set():
                reason = self.stop_reason or "the start was abandoned"
                if not self.owned:  # the user's own job: stop waiting, leave it alone
                    raise AllocationError(
                        f"stopped waiting for your Slurm job {self.job_id}: {reason}; "
                        "the job itself was left as it is",
                        hint="start the kernel again when the job runs (`squeue --me`)",
                    )
                self.cancel(force=True)
                raise AllocationError(
                    f"Slurm job {self.job_id} was cancelled while it waited in the queue: {reason}",
                    hint="start the kernel again when you want it",
                )
            status = self.status()
            waited = time.monotonic() - started
            if status.state is JobState.RUNNING:
                self.log.info(
                    "Slurm job %s running on %s after %.1f s in the queue",
                    self.job_id,
                    status.nodes,
                    waited,
                )
                return status
            if status.state.terminal:
                raise AllocationError(
                    f"Slurm job {self.job_id} ended while waiting: {status.state.value}"
                    + (f" ({status.reason})" if status.reason else ""),
                    hint="see `scontrol show job` for why; check the requested resources",
                )
            if waited - last_report >= PROGRESS_EVERY or not last_report:
                last_report = waited or 1e-9
                self.log.info(
                    "Slurm job %s: %s (reason: %s), waited %.0f s of %.0f s",
                    self.job_id,
                    status.state.value,
                    status.reason or "none",
                    waited,
                    timeout,
                )
            if waited >= timeout and not self.owned:
                raise QueueTimeout(
                    f"your Slurm job {self.job_id} is still {status.state.value} "
                    f"(reason: {status.reason or 'none'}) after {waited:.0f} s; it was left "
                    "in the queue, as it is yours",
                    hint="start the kernel when the job runs (`squeue --me`), or raise "
                    "queue_timeout",
                )
            if waited >= timeout:
                self.cancel(force=True)
                raise QueueTimeout(
                    f"Slurm job {self.job_id} still {status.state.value} "
                    f"(reason: {status.reason or 'none'}) after {waited:.0f} s; it was cancelled",
                    hint="raise queue_timeout, or ask for a qos/partition that starts sooner "
                    "(e.g. qos interactive)",
                )
            polls += 1
            self.stop.wait(min(poll_every, FIRST_POLL * polls))

    def request_stop(self, reason: str) -> None:
        """Stop a wait in the queue (thread-safe); the waiting thread cancels the job."""
        if not self.stop.is_set():  # the first reason is the one reported
            self.stop_reason = reason
            self.stop.set()

    def first_node(self, nodelist: str) -> tuple[str, str]:
        """The first node of ``nodelist`` and the address to reach it at (NodeAddr)."""
        code, out, err = self._run(hostnames_argv(nodelist))
        names = out.split()
        if code != 0 or not names:
            raise AllocationError(
                f"cannot read the nodes of Slurm job {self.job_id} ({nodelist!r}): {tail(err, 3)}",
                hint="check `scontrol show hostnames` on the login node",
            )
        code, out, err = self._run(show_node_argv(names[0]))
        address = parse_scontrol(out).get("NodeAddr", "") if code == 0 else ""
        return names[0], address or names[0]

    def cancel(self, *, force: bool = False) -> bool:
        """Cancel the job if it is ours (or ``force``), unless it is to be kept."""
        if not self.job_id or (not force and (not self.owned or self.options.keep)):
            return False
        if self.cancelled:
            return True
        code, _, err = self._run(scancel_argv(self.job_id))
        if code != 0:
            self.log.warning("scancel %s failed: %s", self.job_id, tail(err, 2))
            return False
        self.cancelled = True
        self.log.info("Slurm job %s cancelled", self.job_id)
        return True
