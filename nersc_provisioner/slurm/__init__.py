"""Slurm: allocations that hold compute nodes, separate from the kernels run in them.

Slurm is the scheduler; nothing here schedules.  ``states`` translates Slurm's
job states once; ``commands`` builds argvs (no shell); ``allocation`` asks for
an allocation, waits for it with progress, reads its state, and cancels it.
"""

from .allocation import AllocationError, JobStatus, QueueTimeout, SlurmAllocation
from .commands import SlurmOptions
from .states import TERMINAL_STATES, JobState

__all__ = [
    "TERMINAL_STATES",
    "AllocationError",
    "JobState",
    "JobStatus",
    "QueueTimeout",
    "SlurmAllocation",
    "SlurmOptions",
]
