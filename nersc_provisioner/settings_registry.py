"""Every setting, declared once: the registry the traits, the environment and ``install`` use.

A :class:`Setting` is one key of kernel.json's ``metadata.kernel_provisioner.config``:
its kind, default, help, whether a ``NERSC_PROVISIONER_*`` variable carries it (and how
that is split into a list), the ``install`` flag that writes it, and which provisioners
have it (its scopes). :data:`SLURM_KEYS` declares the keys of the ``slurm`` mapping the
same way. From these:

* ``provisioners/options.py`` and ``provisioners/remote_options.py`` make their traits
  from it (``str_trait("cwd")``, ...); the checks with their own messages (ranges, the
  allowed runtimes) stay there, as ``@validate`` methods;
* ``settings.py`` reads the environment;
* ``cli.py`` adds the ``install`` flags and writes kernel.json from them;
* ``tests/test_registry.py`` checks the traits, the variables and the flags against this,
  and the settings tables of docs/configuration.md (and of remote-kernels.md, cli.md and
  compute-nodes.md).

Pure data, at the bottom of the import layers: it imports nothing but the standard library.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal

#: How a value is typed: the trait, the environment reader and the install flag follow it.
Kind = Literal["str", "bool", "int", "float", "list", "mapping", "choice"]


class Scope(enum.Enum):
    """A group of settings: which provisioners have it, and its table in the docs."""

    #: Every provisioner: the generated wrapper (``WrapperOptions``).
    WRAPPER = "wrapper"
    #: nersc-cori, nersc-perlmutter: the login and the remote kernel (``RemoteOptions``).
    REMOTE = "remote"
    #: nersc-local, used only with ``slurm``: the ssh from here into the job's node.
    NODE_SSH = "node-ssh"
    #: Every provisioner: the Slurm job (``WrapperOptions``).
    SLURM = "slurm"
    #: Every provisioner: CurveZMQ on the kernel's sockets (``WrapperOptions``).
    ENCRYPTION = "encryption"


#: The scopes each provisioner has (kernel.json ``provisioner_name`` -> scopes).
PROVISIONER_SCOPES: dict[str, frozenset[Scope]] = {
    "nersc-local": frozenset({Scope.WRAPPER, Scope.SLURM, Scope.ENCRYPTION, Scope.NODE_SSH}),
    "nersc-cori": frozenset({Scope.WRAPPER, Scope.SLURM, Scope.ENCRYPTION, Scope.REMOTE}),
    "nersc-perlmutter": frozenset({Scope.WRAPPER, Scope.SLURM, Scope.ENCRYPTION, Scope.REMOTE}),
}


@dataclass(frozen=True)
class Flag:
    """The ``install`` flag that writes a setting (or a key of ``slurm``)."""

    name: str
    help: str
    #: What ``--help`` shows for the value; None for a switch or a flag with choices.
    metavar: str | None = None


@dataclass(frozen=True)
class Setting:
    """One setting: a config key of kernel.json, or a key of its ``slurm`` mapping."""

    name: str
    kind: Kind
    #: The trait's help (for nersc-cori and nersc-perlmutter when the scopes differ).
    help: str
    scopes: tuple[Scope, ...] = ()
    #: None: the kind's empty value ("", False, 0, 0.0, [] or {}).
    default: str | bool | int | float | None = None
    #: The allowed values of a ``choice`` (case-insensitive).
    choices: tuple[str, ...] = ()
    #: Unit of a number, for the docs ("seconds").
    unit: str = ""
    #: A ``NERSC_PROVISIONER_<NAME>`` variable carries it.
    environment: bool = False
    #: What separates the items of a list in that variable.
    delimiter: str = ""
    flag: Flag | None = None
    #: Names the ``System`` field that replaces the default on nersc-cori/nersc-perlmutter.
    system_default: str = ""
    #: The trait's help on nersc-local (``Scope.NODE_SSH``), where the key is for the node.
    node_help: str = ""

    def __post_init__(self) -> None:
        """Refuse a declaration that contradicts itself (at import, so it cannot ship)."""
        wrong = []
        if self.default is not None and not self._default_fits():
            wrong.append(f"default {self.default!r}")
        if bool(self.choices) != (self.kind == "choice"):
            wrong.append(f"choices {self.choices!r}")
        if self.environment and self.kind not in ("str", "bool", "int", "float", "list"):
            wrong.append("environment (no variable reader for this kind)")
        if bool(self.delimiter) != (self.environment and self.kind == "list"):
            wrong.append(f"delimiter {self.delimiter!r}")
        if wrong:
            raise ValueError(f"setting {self.name!r} ({self.kind}): bad {', '.join(wrong)}")

    def _default_fits(self) -> bool:
        value = self.default
        if self.kind == "bool":
            return isinstance(value, bool)
        if isinstance(value, bool):
            return False
        if self.kind == "int":
            return isinstance(value, int)
        if self.kind == "float":
            return isinstance(value, int | float)
        if self.kind == "choice":
            return value in self.choices
        return self.kind == "str" and isinstance(value, str)

    def default_value(self) -> object:
        """The default as the trait holds it (a new list or dict for those kinds)."""
        if self.kind == "list":
            return []
        if self.kind == "mapping":
            return {}
        if self.default is not None:
            return self.default
        empty: dict[Kind, object] = {"str": "", "bool": False, "int": 0, "float": 0.0}
        return empty[self.kind]


def _slurm_key(
    name: str, kind: Kind, flag: str, metavar: str | None, help: str, default: int | None = None
) -> Setting:
    return Setting(name, kind, help="", default=default, flag=Flag(flag, help, metavar))


#: The keys of kernel.json's ``slurm`` mapping, in the order ``install --help`` lists them.
SLURM_KEYS: tuple[Setting, ...] = (
    _slurm_key("qos", "str", "--slurm-qos", "QOS",
               "QOS, e.g. interactive (Cori) or debug, regular (sbatch --qos)"),
    _slurm_key("constraint", "str", "--slurm-constraint", "FEATURES",
               "node type, e.g. gpu or cpu (Perlmutter), haswell or knl (Cori) "
               "(sbatch --constraint)"),
    _slurm_key("time", "str", "--slurm-time", "TIME",
               "the job's time limit, e.g. 1:00:00, or 30 for minutes (sbatch --time)"),
    _slurm_key("account", "str", "--slurm-account", "ACCOUNT",
               "project to charge, e.g. m1234 (sbatch --account)"),
    _slurm_key("nodes", "int", "--slurm-nodes", "N",
               "nodes to allocate (default 1); the kernel runs on the first one", default=1),
    _slurm_key("gpus", "str", "--slurm-gpus", "GPUS",
               "GPUs for the job, e.g. 1 or 4 (sbatch --gpus)"),
    _slurm_key("partition", "str", "--slurm-partition", "PARTITION",
               "partition, on sites that use them (sbatch --partition)"),
    _slurm_key("reservation", "str", "--slurm-reservation", "NAME",
               "reservation to run in, e.g. a training's (sbatch --reservation)"),
    _slurm_key("extra_args", "list", "--slurm-arg", "ARG",
               "one more sbatch argument, as one word (repeatable), e.g. --slurm-arg=--mem=8G; "
               "write it with '=' as shown, since a value that starts with '-' would be read "
               "as a flag"),
    _slurm_key("job_id", "str", "--slurm-job-id", "JOBID",
               "run in this job of yours (the number `squeue --me` shows) instead of submitting "
               "one; it is never cancelled"),
    _slurm_key("keep", "bool", "--slurm-keep", None,
               "leave the job running when the kernel shuts down (default: cancel the job the "
               "kernel asked for)"),
)  # fmt: skip

_WRAPPER = (Scope.WRAPPER,)
_REMOTE = (Scope.REMOTE,)
_LOGIN_AND_NODE = (Scope.REMOTE, Scope.NODE_SSH)

#: Every config key, in the order ``install`` writes them (and lists their flags).
SETTINGS: tuple[Setting, ...] = (
    # --- the wrapper: every provisioner ---------------------------------------------------
    Setting(
        "modules", "list", "Modules to `module load`, in order.", _WRAPPER,
        environment=True, delimiter=",",
        flag=Flag("--module", "module to load (repeatable)", "MODULE"),
    ),
    Setting(
        "module_use", "list",
        "Directories to `module use` before loading, e.g. /global/common/software/m1234/"
        "modulefiles (absolute paths: `~` is not expanded).", _WRAPPER,
        environment=True, delimiter=":",
        flag=Flag("--module-use", "directory to `module use` before loading (repeatable)", "DIR"),
    ),
    Setting(
        "purge", "bool", "Run `module purge` before loading modules.", _WRAPPER,
        environment=True, flag=Flag("--purge", "run `module purge` first"),
    ),
    Setting(
        "module_init", "str",
        "How to make `module` exist: auto (detect Lmod, then Environment Modules), "
        "lmod, environment-modules, none, or the path of an init script to source.", _WRAPPER,
        default="auto", environment=True,
        flag=Flag(
            "--module-init",
            "auto, lmod, environment-modules, none, or an init script path (default: auto)",
            "MODULE_INIT",
        ),
    ),
    Setting(
        "setup", "list",
        "Extra shell lines run before the kernel, e.g. `conda activate myenv`. "
        "Each line runs on its own; a failing line fails the start.", _WRAPPER,
        environment=True, delimiter="\n",
        flag=Flag(
            "--setup",
            "shell line run before the kernel, e.g. 'conda activate myenv' (repeatable)",
            "LINE",
        ),
    ),
    Setting(
        "container", "str", "Container image to run the kernel in ('' for none).", _WRAPPER,
        environment=True,
        flag=Flag("--container", "container image, e.g. docker:org/image:tag", "IMAGE"),
    ),
    Setting(
        "container_runtime", "str", "shifter or podman-hpc.", _WRAPPER,
        default="shifter", environment=True,
        flag=Flag("--container-runtime", "shifter (default) or podman-hpc", "RUNTIME"),
    ),
    Setting(
        "container_args", "list", "Extra arguments for the container runtime.", _WRAPPER,
        environment=True, delimiter=" ",
        flag=Flag(
            "--container-arg", "extra argument for the container runtime (repeatable)", "ARG"
        ),
    ),
    Setting(
        "cwd", "str", "Directory the kernel starts in ('' to keep Jupyter's choice).", _WRAPPER,
        environment=True, flag=Flag("--cwd", "directory the kernel starts in", "CWD"),
    ),
    Setting(
        "launch_timeout", "float",
        "Seconds allowed for the environment setup (modules, setup lines) to finish, "
        "and again for the kernel to open its sockets.", _WRAPPER,
        default=60.0, unit="seconds", environment=True,
        flag=Flag("--launch-timeout", "seconds allowed for the setup", "SECONDS"),
    ),
    # --- the remote host: nersc-cori, nersc-perlmutter ------------------------------------
    Setting(
        "host", "str", "Host to log in to (an ~/.ssh/config alias works).", _REMOTE,
        environment=True, system_default="host",
        flag=Flag("--host", "host or ~/.ssh/config alias (default: the system's)", "HOST"),
    ),
    Setting(
        "user", "str", "User name on the host ('' : from ~/.ssh/config or local).", _REMOTE,
        environment=True, flag=Flag("--remote-user", "user name on the host", "USER"),
    ),
    Setting(
        "port", "int", "SSH port (0: from ~/.ssh/config, else 22).", _REMOTE,
        environment=True, flag=Flag("--ssh-port", "SSH port", "PORT"),
    ),
    Setting(
        "identity_file", "str",
        "Private key; its '-cert.pub' certificate is used with it "
        "('' : IdentityFile from ~/.ssh/config, else the system's default, ~/.ssh/nersc "
        "for NERSC systems).", _LOGIN_AND_NODE,
        environment=True,
        flag=Flag(
            "--identity-file",
            "private key (its -cert.pub is used too; NERSC: ~/.ssh/nersc); nersc-local with "
            "Slurm: the key for the job's node",
            "KEY",
        ),
        node_help="With slurm: the key for the ssh into the job's node ('' : ~/.ssh/config, "
        "else ssh's default keys).",
    ),
    Setting(
        "ssh_config", "str", "ssh config file to honour ('' to ignore).", _LOGIN_AND_NODE,
        default="~/.ssh/config", environment=True,
        flag=Flag(
            "--ssh-config",
            "ssh config file ('' to ignore ~/.ssh/config); nersc-local with Slurm: for the "
            "job's node",
            "FILE",
        ),
        node_help="With slurm: ssh config file to honour for the job's nodes.",
    ),
    Setting(
        "known_hosts", "list", "known_hosts files (default ~/.ssh/known_hosts).",
        _LOGIN_AND_NODE,
        environment=True, delimiter=":",
        flag=Flag(
            "--known-hosts",
            "known_hosts file (repeatable); nersc-local with Slurm: for the job's node "
            "(/etc/ssh/ssh_known_hosts is read too)",
            "FILE",
        ),
        node_help="With slurm: known_hosts files for the job's nodes (default "
        "~/.ssh/known_hosts; /etc/ssh/ssh_known_hosts is always read).",
    ),
    Setting(
        "remote_python", "str",
        "Python on the remote host that runs ipykernel (replaces a bare `python` in "
        "argv); resolved there, after modules and setup lines.", _REMOTE,
        environment=True,
        flag=Flag("--remote-python", "the Python on the host that runs ipykernel", "PYTHON"),
    ),
    Setting(
        "remote_cwd", "str", "Directory the kernel starts in on the remote host.", _REMOTE,
        environment=True,
        flag=Flag("--remote-cwd", "directory the kernel starts in on the host", "DIR"),
    ),
    Setting(
        "lease_timeout", "int",
        "Seconds without contact after which the remote watchdog ends the kernel.", _REMOTE,
        default=1800, unit="seconds", environment=True,
        flag=Flag(
            "--lease-timeout",
            "seconds without contact before the remote watchdog ends the kernel",
            "SECONDS",
        ),
    ),
    Setting(
        "reconnect_grace", "float",
        "Seconds a kernel is still reported alive while its connection is down.", _REMOTE,
        default=300.0, unit="seconds", environment=True,
    ),
    Setting(
        "connection_persist", "float",
        "Seconds the SSH connection to the host stays open after its last kernel ends, so "
        "that the next kernel there needs no new login (like OpenSSH's ControlPersist); "
        "0 closes it at once.", _REMOTE,
        default=60.0, unit="seconds", environment=True,
        flag=Flag(
            "--connection-persist",
            "seconds the connection stays open after the host's last kernel ends "
            "(default: 60; 0: close at once)",
            "SECONDS",
        ),
    ),
    Setting(
        "data_path", "choice",
        "How Jupyter reaches the kernel's ZeroMQ ports. tunnel: forwarded over the SSH "
        "connection, the kernel bound to the host's 127.0.0.1 (works from anywhere SSH "
        "works). direct: the kernel binds the address SSH reached (the login node's, or the "
        "job node's) and Jupyter connects to it with CurveZMQ required; faster, but only "
        "where that address is reachable (inside the site's network).", _REMOTE,
        default="tunnel", choices=("tunnel", "direct"),
        flag=Flag(
            "--data-path",
            "how Jupyter reaches the kernel's ports: tunnel (default: forwarded over SSH, "
            "works from anywhere) or direct (the kernel binds the host's address, CurveZMQ "
            "required; faster, but only where that address is reachable, e.g. Jupyter inside "
            "NERSC). See docs/data-path.md",
        ),
    ),
    # --- the Slurm job: every provisioner --------------------------------------------------
    Setting(
        "slurm", "mapping",
        "Run the kernel as a step of a Slurm job on a compute node. Keys: "
        + ", ".join(key.name for key in SLURM_KEYS)
        + ". Empty: no Slurm. See docs/compute-nodes.md.", (Scope.SLURM,),
    ),
    Setting(
        "queue_timeout", "float",
        "Seconds the Slurm job may wait in the queue before it is cancelled "
        "(separate from launch_timeout).", (Scope.SLURM,),
        default=900.0, unit="seconds",
        flag=Flag(
            "--queue-timeout",
            "seconds the job may wait in the queue before the start fails and the job is "
            "cancelled (a --slurm-job-id job is left as it is) (default 900; separate from "
            "--launch-timeout)",
            "SECONDS",
        ),
    ),
    # --- CurveZMQ: every provisioner ---------------------------------------------------------
    Setting(
        "transport_encryption", "choice",
        "Keep other users of the node out of the kernel's ZeroMQ sockets. Remote: "
        "CurveZMQ; auto (on when the remote ipykernel supports it, else a warning), "
        "required (refuse a kernel without it), disabled. nersc-local: CurveZMQ, else IPC "
        "sockets in a 0700 directory; auto warns and required refuses when neither works.",
        (Scope.ENCRYPTION,),
        default="auto", choices=("auto", "required", "disabled"),
    ),
)  # fmt: skip

#: Settings by name.
BY_NAME: dict[str, Setting] = {setting.name: setting for setting in SETTINGS}


def setting(name: str) -> Setting:
    """The setting called ``name`` (KeyError if there is none)."""
    return BY_NAME[name]


def settings_of(provisioner: str) -> tuple[Setting, ...]:
    """The settings a provisioner has (its kernel.json config keys), in registry order."""
    scopes = PROVISIONER_SCOPES[provisioner]
    return tuple(s for s in SETTINGS if scopes.intersection(s.scopes))


def in_scope(scope: Scope) -> tuple[Setting, ...]:
    """The settings of one scope, in registry order."""
    return tuple(s for s in SETTINGS if scope in s.scopes)
