"""The test rig started by ``scripts/test-rig up``, as seen from the tests.

``scripts/test-rig up`` (run as root) starts real services and describes them in
``<state dir>/rig.json``; the state dir is ``$NERSC_RIG_DIR`` or
``/var/tmp/nersc-provisioner-rig``. The pieces:

- ``lmod``: Lmod with the repo's ``tests/modulefiles`` (``nersc-test/1.0``, ``nersc-test/2.0``,
  ``broken/1.0``);
- ``ssh``: an OpenSSH sshd "remote login node" at 10.203.0.2 inside network namespace
  ``npr-remote``, user ``nerscuser``, host key pinned in a known_hosts file, and a CA key
  whose signed user certificates sshd accepts; ``remote_python`` is a Python with ipykernel
  that ``nerscuser`` can run there (and on the jump hosts: they all share the filesystem);
- ``jump``: a jump host, sshd at 10.203.1.2 in netns ``npr-jump``, and behind it an sshd at
  10.203.2.2 in netns ``npr-inner`` that only ``npr-jump`` can reach (for ProxyJump); same
  user, key, CA and known_hosts file as ``ssh``;
- ``slurm``: a one-node Slurm cluster (munged, slurmctld, slurmd) with partition ``debug``;
  the node is this machine (root namespace, ``node_addr`` 10.203.0.1), and an sshd there
  lets the rig user ssh into it from the login node, as NERSC allows inside one's own job.

Tests take the fixtures of ``tests/conftest.py`` (``ssh_rig``, ``jump_rig``, ``lmod_rig``,
``slurm_rig``, ``compute_node_rig``, ``intruder_rig``, ``remote_config``, ``slurm_config``),
which call :func:`require_rig` (through :func:`require_lmod`, :func:`require_ssh`,
:func:`require_jump`, :func:`require_slurm`, :func:`require_compute_node`): when the piece is
missing or not alive the test is skipped, or fails when ``CI=true``, with a reason that says
how to start the rig.

What the tests look at on the rig goes through one helper each: :func:`rig_processes` (the
rig user's kernels, watchdogs, agents and sruns), :func:`queue` (squeue's jobs and steps),
:func:`job_state` (scontrol) and :func:`sbatch`.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import psutil
import pytest

DEFAULT_RIG_DIR = Path("/var/tmp/nersc-provisioner-rig")
PIECES = ("lmod", "ssh", "jump", "slurm", "compute-node")
UP_HINT = "start it with `scripts/test-rig up` (as root)"

#: When this test run began: processes older than that are not this run's to answer for.
TESTS_STARTED = time.time()


def rig_dir() -> Path:
    """The rig's state directory: ``$NERSC_RIG_DIR`` or the default."""
    return Path(os.environ.get("NERSC_RIG_DIR") or DEFAULT_RIG_DIR)


@dataclass(frozen=True)
class LmodRig:
    init: Path
    modulepath: Path


@dataclass(frozen=True)
class SSHRig:
    netns: str
    host: str
    port: int
    user: str
    identity_file: Path
    known_hosts: Path
    ca_key: Path
    sshd_pidfile: Path
    sshd_config: Path
    remote_python: str = ""
    """Path of a Python with ipykernel on the remote hosts; "" if rig.json predates it."""
    intruder: str = ""
    """Another unprivileged user of the same hosts, for the attack tests."""
    ipykernel6_python: str = ""
    """A Python with ipykernel 6 (no CurveZMQ), on every rig host and here; "" if older."""


@dataclass(frozen=True)
class JumpRig:
    """``host`` (in ``netns``) is reachable from here; ``inner_host`` only through ``host``.

    ``user``, ``identity_file`` and ``known_hosts`` (which pins all three rig hosts) are the
    ones of the "ssh" entry.
    """

    netns: str
    host: str
    port: int
    sshd_pidfile: Path
    inner_netns: str
    inner_host: str
    inner_sshd_pidfile: Path
    user: str
    identity_file: Path
    known_hosts: Path


@dataclass(frozen=True)
class SlurmRig:
    """One node (this machine, root namespace), also reachable by ssh as a compute node."""

    conf: Path
    partition: str
    node: str
    node_addr: str = ""
    node_sshd_pidfile: Path | None = None
    cpus: int = 0


@dataclass(frozen=True)
class Rig:
    """What ``rig.json`` says; a piece is ``None`` when rig.json has no entry for it."""

    directory: Path
    lmod: LmodRig | None = None
    ssh: SSHRig | None = None
    jump: JumpRig | None = None
    slurm: SlurmRig | None = None

    @classmethod
    def load(cls, directory: Path | None = None) -> Rig:
        """Read ``<directory>/rig.json``; raises OSError or ValueError if it is unusable."""
        directory = rig_dir() if directory is None else directory
        data = json.loads((directory / "rig.json").read_text())
        if not isinstance(data, dict):
            raise ValueError(f"{directory / 'rig.json'}: expected a JSON object")
        try:
            return cls(
                directory=directory,
                lmod=_lmod(data["lmod"]) if "lmod" in data else None,
                ssh=_ssh(data["ssh"]) if "ssh" in data else None,
                jump=_jump(data["jump"], data["ssh"]) if "jump" in data else None,
                slurm=_slurm(data["slurm"]) if "slurm" in data else None,
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{directory / 'rig.json'}: malformed entry: {exc!r}") from exc


def _lmod(d: dict[str, Any]) -> LmodRig:
    return LmodRig(init=Path(d["init"]), modulepath=Path(d["modulepath"]))


def _ssh(d: dict[str, Any]) -> SSHRig:
    return SSHRig(
        netns=str(d["netns"]),
        host=str(d["host"]),
        port=int(d["port"]),
        user=str(d["user"]),
        identity_file=Path(d["identity_file"]),
        known_hosts=Path(d["known_hosts"]),
        ca_key=Path(d["ca_key"]),
        sshd_pidfile=Path(d["sshd_pidfile"]),
        sshd_config=Path(d["sshd_config"]),
        remote_python=str(d.get("remote_python", "")),
        intruder=str(d.get("intruder", "")),
        ipykernel6_python=str(d.get("ipykernel6_python", "")),
    )


def _jump(d: dict[str, Any], ssh: dict[str, Any]) -> JumpRig:
    """The "jump" entry; user, key and known_hosts come from the "ssh" entry."""
    return JumpRig(
        netns=str(d["netns"]),
        host=str(d["host"]),
        port=int(d["port"]),
        sshd_pidfile=Path(d["sshd_pidfile"]),
        inner_netns=str(d["inner_netns"]),
        inner_host=str(d["inner_host"]),
        inner_sshd_pidfile=Path(d["inner_sshd_pidfile"]),
        user=str(ssh["user"]),
        identity_file=Path(ssh["identity_file"]),
        known_hosts=Path(ssh["known_hosts"]),
    )


def _slurm(d: dict[str, Any]) -> SlurmRig:
    return SlurmRig(
        conf=Path(d["conf"]),
        partition=str(d["partition"]),
        node=str(d["node"]),
        node_addr=str(d.get("node_addr", "")),
        node_sshd_pidfile=Path(d["node_sshd_pidfile"]) if d.get("node_sshd_pidfile") else None,
        cpus=int(d.get("cpus", 0)),
    )


def _pid_running(pidfile: Path, comm: str) -> bool:
    try:
        pid = int(pidfile.read_text().strip())
        return Path(f"/proc/{pid}/comm").read_text().strip() == comm
    except (OSError, ValueError):
        return False


def _answers(host: str, port: int) -> str | None:
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as exc:
        return f"sshd at {host}:{port} does not answer: {exc}"
    return None


def _problem(rig: Rig, piece: str) -> str | None:
    """Why ``piece`` is unusable, or None if it is up."""
    if piece == "lmod":
        if rig.lmod is None:
            return "rig.json has no 'lmod' entry"
        if not rig.lmod.init.is_file():
            return f"Lmod init script {rig.lmod.init} is missing (is lmod installed?)"
        if not rig.lmod.modulepath.is_dir():
            return f"modulepath {rig.lmod.modulepath} is missing"
        return None
    if piece == "ssh":
        if rig.ssh is None:
            return "rig.json has no 'ssh' entry"
        if not _pid_running(rig.ssh.sshd_pidfile, "sshd"):
            return f"sshd is not running (pidfile {rig.ssh.sshd_pidfile})"
        return _answers(rig.ssh.host, rig.ssh.port)
    if piece == "jump":
        if rig.jump is None:
            return "rig.json has no 'jump' entry"
        for pidfile in (rig.jump.sshd_pidfile, rig.jump.inner_sshd_pidfile):
            if not _pid_running(pidfile, "sshd"):
                return f"sshd is not running (pidfile {pidfile})"
        return _answers(rig.jump.host, rig.jump.port)
    if piece == "slurm":
        if rig.slurm is None:
            return "rig.json has no 'slurm' entry"
        try:
            ping = subprocess.run(
                ["scontrol", "ping"], capture_output=True, text=True, timeout=15, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"`scontrol ping` failed: {exc}"
        if ping.returncode != 0 or "UP" not in ping.stdout:
            return f"slurmctld is not up: {(ping.stdout + ping.stderr).strip()}"
        return None
    if piece == "compute-node":
        problem = _problem(rig, "slurm") or _problem(rig, "ssh")
        if problem is not None:
            return problem
        assert rig.slurm is not None
        if rig.slurm.node_sshd_pidfile is None or not rig.slurm.node_addr:
            return "rig.json has no slurm.node_sshd_pidfile/node_addr (an older rig)"
        if not _pid_running(rig.slurm.node_sshd_pidfile, "sshd"):
            return f"the compute node's sshd is not running ({rig.slurm.node_sshd_pidfile})"
        return _answers(rig.slurm.node_addr, 22)
    raise ValueError(f"unknown rig piece {piece!r}; expected one of {PIECES}")


def _unavailable(reason: str) -> NoReturn:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true, so this is a failure)", pytrace=False)
    pytest.skip(reason)


def require_rig(piece: str) -> Rig:
    """Return the rig if ``piece`` (one of :data:`PIECES`) is up; else skip (fail on CI)."""
    if piece not in PIECES:
        raise ValueError(f"unknown rig piece {piece!r}; expected one of {PIECES}")
    try:
        rig = Rig.load()
    except (OSError, ValueError) as exc:
        _unavailable(f"test rig not available ({exc}); {UP_HINT}")
    problem = _problem(rig, piece)
    if problem is not None:
        _unavailable(f"test rig piece {piece!r} is down: {problem}; {UP_HINT}")
    return rig


def require_lmod() -> LmodRig:
    lmod = require_rig("lmod").lmod
    assert lmod is not None
    return lmod


def require_ssh() -> SSHRig:
    ssh = require_rig("ssh").ssh
    assert ssh is not None
    return ssh


def require_compute_node() -> Rig:
    """Slurm, the login node's sshd and the compute node's sshd (ssh into one's own job)."""
    return require_rig("compute-node")


def login_config(ssh: SSHRig) -> dict[str, Any]:
    """nersc-cori settings that reach the rig's login node (no ~/.ssh/config read)."""
    if not ssh.remote_python:
        pytest.fail("rig.json has no ssh.remote_python; run scripts/test-rig up")
    return {
        "host": ssh.host,
        "user": ssh.user,
        "identity_file": str(ssh.identity_file),
        "known_hosts": [str(ssh.known_hosts)],
        "ssh_config": "",
        "remote_python": ssh.remote_python,
        # Close the connection with its last kernel, so that each test's checks of what
        # is left see its own; keeping it (the default, 60 s) has a test of its own.
        "connection_persist": 0,
    }


def jump_ssh_config(path: Path, jump: JumpRig, proxy_jump: str) -> Path:
    """An ssh config at ``path``: ``gate`` is the jump host, ``inner`` the host behind it,
    reached with ``ProxyJump proxy_jump`` (e.g. "gate", or "gate,gate" for two hops)."""
    common = (
        f"  User {jump.user}\n  IdentityFile {jump.identity_file}\n"
        f"  UserKnownHostsFile {jump.known_hosts}\n"
    )
    path.write_text(
        f"Host inner\n  HostName {jump.inner_host}\n{common}  ProxyJump {proxy_jump}\n"
        f"Host gate\n  HostName {jump.host}\n{common}"
    )
    return path


def stop_sshd(ssh: SSHRig) -> None:
    """Stop the login node's sshd: its master, then both halves of every session (the
    user's half holds the TCP connection), so the host is unreachable until
    :func:`start_sshd`."""
    master = psutil.Process(int(ssh.sshd_pidfile.read_text()))
    sessions = [p for p in master.children(recursive=True) if p.name() == "sshd"]
    master.terminate()
    master.wait(10)
    for child in sessions:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()


def start_sshd(ssh: SSHRig) -> None:
    """Start the login node's sshd again, as scripts/test-rig does."""
    log = ssh.sshd_pidfile.parent / "sshd.log"
    subprocess.run(
        ["ip", "netns", "exec", ssh.netns, "/usr/sbin/sshd", "-f", str(ssh.sshd_config),
         "-E", str(log)],
        check=True,
    )  # fmt: skip


def kill_sshd_sessions(pidfile: Path) -> int:
    """SIGKILL every sshd process serving a connection of the sshd of ``pidfile``.

    Both halves: the root ``[priv]`` monitor and the user's process that holds the
    TCP socket (killing the monitor alone leaves the connection up).  Returns how many.
    """
    master = psutil.Process(int(pidfile.read_text()))
    sessions = [p for p in master.children(recursive=True) if p.name() == "sshd"]
    # The user's half is reparented when its monitor dies: find it by the monitor first.
    for monitor in list(sessions):
        sessions += [p for p in monitor.children(recursive=True) if p.name() == "sshd"]
    for proc in {p.pid: p for p in sessions}.values():
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    return len({p.pid for p in sessions})


def require_jump() -> JumpRig:
    jump = require_rig("jump").jump
    assert jump is not None
    return jump


def require_slurm() -> SlurmRig:
    slurm = require_rig("slurm").slurm
    assert slurm is not None
    return slurm


# --- what the tests look at: processes, the Slurm queue ---------------------------------

#: The kinds of process :func:`rig_processes` tells apart, by command line.
PROCESS_KINDS = ("agent", "watchdog", "kernel", "srun")


def process_kind(cmdline: str) -> str:
    """What a process is to us, by its command line; "" if none of ours.

    ``agent``: a connection's remote agent (``bash -c AGENT npr-agent``; its script names
    the watchdog, so it is told apart first); ``watchdog``: a kernel's watchdog;
    ``kernel``: a kernel, or the wrapper (``nersc-kernel``) that becomes one; ``srun``: a
    Slurm step's srun.
    """
    if "npr-agent" in cmdline:
        return "agent"
    if "npr-watchdog" in cmdline:
        return "watchdog"
    if "ipykernel" in cmdline or "nersc-kernel" in cmdline:
        return "kernel"
    if "srun" in cmdline:
        return "srun"
    return ""


def rig_processes(
    user: str,
    kinds: Collection[str] = ("kernel", "watchdog", "agent"),
    *,
    since: float = TESTS_STARTED,
    containing: str = "",
) -> list[str]:
    """Command lines of ``user``'s live processes of these ``kinds`` (see
    :func:`process_kind`) started at or after ``since`` (a ``time.time()``), whose
    command line holds ``containing``.

    The rig's namespaces share this machine's PID namespace, so the remote hosts' and the
    Slurm node's processes are all visible here.  Processes from before this test run
    (another run's leftovers) are not counted.
    """
    unknown = set(kinds) - set(PROCESS_KINDS)
    if unknown:
        raise ValueError(f"unknown process kinds {sorted(unknown)}; expected {PROCESS_KINDS}")
    found = []
    for proc in psutil.process_iter(["username", "cmdline", "status", "create_time"]):
        info = proc.info
        if info["username"] != user or info["create_time"] < since:
            continue
        if info["status"] == psutil.STATUS_ZOMBIE:
            continue
        line = " ".join(info["cmdline"] or [])
        if process_kind(line) in kinds and containing in line:
            found.append(line)
    return found


@dataclass(frozen=True)
class QueueEntry:
    """A job (``id`` "123") or a job step (``id`` "123.0", "123.batch") as squeue shows it."""

    id: str
    state: str
    user: str
    name: str

    @property
    def job_id(self) -> str:
        return self.id.split(".", 1)[0]

    @property
    def is_step(self) -> bool:
        return "." in self.id


#: squeue's --Format for jobs and for steps: a field's suffix after ":" is printed after it,
#: so "|" ends each field; the name, the one field that may hold a "|", comes last.
_JOB_FORMAT = "JobID:|,State:|,UserName:|,Name:"
_STEP_FORMAT = "StepId:|,StepState:|,UserName:|,StepName:"


def queue(user: str | None = None, *, steps: bool = False) -> list[QueueEntry]:
    """The jobs in the Slurm queue (of ``user``, if given), and with ``steps`` their steps
    too.  A failing squeue fails the test (a silent controller is not an empty queue)."""
    formats = [["--Format", _JOB_FORMAT]]
    if steps:
        formats.append(["--steps", "--Format", _STEP_FORMAT])
    entries = []
    for fmt in formats:
        argv = ["squeue", "--noheader", *fmt, *([f"--user={user}"] if user else [])]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        assert result.returncode == 0, f"{argv}: {result.stderr.strip()}"
        for line in result.stdout.splitlines():
            if line.strip():
                job_id, state, owner, name = line.split("|", 3)
                entries.append(QueueEntry(job_id.strip(), state.strip(), owner.strip(), name))
    return entries


def job_entries(job_id: str, user: str | None = None) -> list[QueueEntry]:
    """The job ``job_id`` and its steps, as long as squeue lists them (COMPLETING too)."""
    return [entry for entry in queue(user, steps=True) if entry.job_id == job_id]


def job_state(job_id: str) -> str:
    """The job's state as scontrol has it ("" once slurmctld has purged the job)."""
    out = subprocess.run(
        ["scontrol", "--oneliner", "show", "job", job_id],
        capture_output=True, text=True, timeout=30, check=False,
    ).stdout  # fmt: skip
    fields = dict(word.split("=", 1) for word in out.split() if "=" in word)
    return fields.get("JobState", "")


def sbatch(*args: str, user: str | None = None) -> str:
    """Submit a job (as ``user``, if given: the rig user's own job); its id."""
    argv = ["sbatch", "--parsable", "--output=/dev/null", *args]
    if user is not None:
        argv = ["runuser", "-u", user, "--", *argv]
    out = subprocess.run(
        argv, capture_output=True, text=True, check=True, timeout=30, cwd="/tmp"
    ).stdout
    return out.strip().split(";")[0]
