"""Slurm command lines: pure argv builders, no shell, no I/O."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import UnsafeValueError

HOLDER_NAME = "nersc-kernel"
_JOB_ID = re.compile(r"[0-9]+(_[0-9]+)?\Z")


def check_job_id(job_id: str) -> str:
    if not _JOB_ID.match(str(job_id)):
        raise UnsafeValueError(
            f"invalid Slurm job id {job_id!r}", hint="use the number `squeue` shows"
        )
    return str(job_id)


def _flag_value(name: str, value: str) -> str:
    if not value or value.startswith("-") or any(c in value for c in "\x00\n\r"):
        raise UnsafeValueError(
            f"invalid slurm {name} {value!r}",
            hint=f"give the {name} as Slurm expects it, e.g. --{name} in `salloc --help`",
        )
    return value


@dataclass(frozen=True)
class SlurmOptions:
    """What to ask Slurm for.  Every value travels as one argv element."""

    qos: str = ""
    constraint: str = ""
    time: str = ""
    account: str = ""
    nodes: int = 1
    gpus: str = ""
    partition: str = ""
    reservation: str = ""
    extra_args: tuple[str, ...] = field(default=())
    job_id: str = ""  # attach to an allocation the user already holds
    keep: bool = False  # leave the allocation running at shutdown

    def flags(self) -> list[str]:
        flags = [f"--nodes={int(self.nodes)}"]
        for name in ("qos", "constraint", "time", "account", "gpus", "partition", "reservation"):
            value = getattr(self, name)
            if value:
                flags.append(f"--{name}={_flag_value(name, str(value))}")
        for arg in self.extra_args:
            if "\x00" in arg or "\n" in arg:
                raise UnsafeValueError(f"invalid slurm extra argument {arg!r}")
            flags.append(arg)
        return flags


def holder_argv(options: SlurmOptions, job_name: str = HOLDER_NAME) -> list[str]:
    """An sbatch job that only holds its nodes; kernels run in it as steps."""
    return [
        "sbatch", "--parsable", f"--job-name={job_name}", "--output=/dev/null",
        *options.flags(), "--wrap", "exec sleep infinity",
    ]  # fmt: skip


def squeue_argv(job_id: str) -> list[str]:
    return ["squeue", "--noheader", f"--jobs={check_job_id(job_id)}", "--format=%T|%r|%N|%M"]


def scontrol_argv(job_id: str) -> list[str]:
    return ["scontrol", "--oneliner", "show", "job", check_job_id(job_id)]


def scancel_argv(job_id: str, signal: str = "", step: str = "") -> list[str]:
    target = check_job_id(job_id) + (f".{int(step)}" if step else "")
    return ["scancel", *([f"--signal={signal}"] if signal else []), target]


def parse_scontrol(text: str) -> dict[str, str]:
    """``scontrol --oneliner show job`` output as a dict (JobState, Reason, NodeList, ...)."""
    fields: dict[str, str] = {}
    for word in text.split():
        key, sep, value = word.partition("=")
        if sep and key not in fields:
            fields[key] = value
    return fields


def job_id_from_sbatch(stdout: str) -> str:
    """``sbatch --parsable`` prints ``JOBID`` or ``JOBID;CLUSTER``."""
    return check_job_id(stdout.strip().splitlines()[-1].split(";")[0]) if stdout.strip() else ""
