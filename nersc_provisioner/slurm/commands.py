"""Slurm command lines: pure argv builders, no shell, no I/O."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError, UnsafeValueError

HOLDER_NAME = "nersc-kernel"
#: The keys of kernel.json's ``slurm`` section.
SLURM_KEYS = (
    "qos", "constraint", "time", "account", "nodes", "gpus", "partition", "reservation",
    "extra_args", "job_id", "keep",
)  # fmt: skip
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

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> SlurmOptions:
        """Read kernel.json's ``slurm`` section; raise :class:`ConfigError` naming a bad key."""
        if not isinstance(config, Mapping):
            raise ConfigError(
                f"the slurm setting must be a mapping of keys to values, not {config!r}",
                hint='e.g. {"qos": "interactive", "time": "1:00:00"}; keys: '
                + ", ".join(SLURM_KEYS),
            )
        unknown = sorted(set(config) - set(SLURM_KEYS))
        if unknown:
            raise ConfigError(
                f"unknown key(s) in the slurm settings: {', '.join(map(repr, unknown))}",
                hint=f"valid keys are: {', '.join(SLURM_KEYS)}; pass anything else to sbatch "
                "with extra_args",
            )
        values: dict[str, Any] = {}
        for key, value in config.items():
            if key == "nodes":
                if (
                    isinstance(value, bool)
                    or not isinstance(value, int | str)
                    or not (str(value).isascii() and str(value).isdigit())
                    or int(value) < 1
                ):
                    raise ConfigError(
                        f"slurm nodes must be a positive whole number, not {value!r}",
                        hint='e.g. "nodes": 1',
                    )
                values[key] = int(value)
            elif key == "keep":
                if not isinstance(value, bool):
                    raise ConfigError(
                        f"slurm keep must be true or false, not {value!r}",
                        hint='e.g. "keep": true to leave the allocation running at shutdown',
                    )
                values[key] = value
            elif key == "extra_args":
                if (
                    isinstance(value, str)
                    or not isinstance(value, list | tuple)
                    or not all(isinstance(arg, str) for arg in value)
                ):
                    raise ConfigError(
                        f"slurm extra_args must be a list of strings, not {value!r}",
                        hint='one argument per element: e.g. ["--mem=8G", "--licenses=scratch"]',
                    )
                values[key] = tuple(value)
            elif key == "job_id":
                values[key] = check_job_id(str(value)) if str(value) else ""
            else:
                if not isinstance(value, str | int) or isinstance(value, bool):
                    raise ConfigError(
                        f"slurm {key} must be a string, not {value!r}",
                        hint=f"give it as Slurm's --{key} takes it",
                    )
                values[key] = str(value)
        options = cls(**values)
        options.flags()  # values that cannot be carried fail now, with their key named
        return options

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


def step_argv(job_id: str, node: str, kernel_id: str) -> list[str]:
    """A job step on ``node`` that shares the allocation's resources (``--overlap``).

    Its task reads the launch script on stdin (``bash -s``).
    """
    return [
        "srun", f"--jobid={check_job_id(job_id)}", "--overlap", "--nodes=1", "--ntasks=1",
        f"--nodelist={_flag_value('nodelist', node)}",
        f"--job-name={HOLDER_NAME}-{_flag_value('kernel id', kernel_id)}", "--quiet",
        "--kill-on-bad-exit=0", "bash", "--noprofile", "--norc", "-s",
    ]  # fmt: skip


def hostnames_argv(nodelist: str) -> list[str]:
    return ["scontrol", "show", "hostnames", _flag_value("nodelist", nodelist)]


def show_node_argv(node: str) -> list[str]:
    return ["scontrol", "--oneliner", "show", "node", _flag_value("node", node)]


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
