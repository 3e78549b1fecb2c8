"""``python -m nersc_provisioner``: install, list, show and remove kernel specs.

A thin layer over :mod:`nersc_provisioner.kernelspec`.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence
from typing import Any

from . import __version__
from .diagnostics import Step, check
from .errors import ConfigError, NERSCProvisionerError
from .hostops import kill_remote_kernels, list_remote_kernels
from .kernelspec import (
    build_kernel_spec,
    get_kernel_spec,
    install_kernel_spec,
    launch_plan,
    list_kernel_specs,
    missing_modules,
    provisioner_class,
    remove_kernel_spec,
)
from .provisioners import PROVISIONERS
from .settings_registry import SETTINGS, SLURM_KEYS, Scope, Setting, in_scope, settings_of
from .shell import join
from .slurm.commands import SlurmOptions
from .transports.ssh import SSHTarget, resolve_target

_DESCRIPTION = """\
Write and manage Jupyter kernel specs that start kernels through nersc_provisioner.

A kernel spec names a provisioner (e.g. nersc-local) and its settings: modules to
load, setup lines, a container image.  The provisioner generates the wrapper
script at launch, so there is no kernel-helper.sh to write or maintain.
"""

_EPILOG = """\
examples:
  python -m nersc_provisioner install --user --name py-mods \\
      --module python --module cudatoolkit --setup 'conda activate myenv'
  python -m nersc_provisioner install --user --name shifter-py \\
      --container docker:continuumio/anaconda3:latest --python /opt/conda/bin/python
  python -m nersc_provisioner install --user --name pm-gpu --provisioner nersc-perlmutter \\
      --slurm-constraint gpu --slurm-qos interactive --slurm-gpus 1 --slurm-time 1:00:00 \\
      --slurm-account m1234 --slurm-arg=--mem=8G
  python -m nersc_provisioner check pm-gpu
  python -m nersc_provisioner install --user --name job-here \
      --slurm-qos interactive --slurm-constraint cpu --slurm-time 30 --identity-file ~/.ssh/nersc
  (the last: Jupyter on a login node itself; sbatch runs there, the node is reached by ssh)
  python -m nersc_provisioner list
  python -m nersc_provisioner show py-mods
  python -m nersc_provisioner remove py-mods

docs: docs/cli.md (every flag), docs/configuration.md (every setting)
"""


def _add_setting_flags(group: Any, settings: Sequence[Setting], namespace: str) -> None:
    """One flag per setting that has one, as the registry declares it.

    Its value goes to ``NAMESPACE.NAME`` (``config.user``, ``slurm.qos``), so that no
    setting can clash with install's own flags (``--user`` is not ``user``).
    """
    for declared in settings:
        flag = declared.flag
        if flag is None:
            continue
        options: dict[str, Any] = {"dest": f"{namespace}.{declared.name}", "help": flag.help}
        if declared.kind == "bool":
            options["action"] = "store_true"
        elif declared.kind == "choice":
            options["choices"] = declared.choices
        else:
            options["metavar"] = flag.metavar
            if declared.kind == "list":
                options.update(action="append", default=[])
            elif declared.kind in ("int", "float"):
                options["type"] = int if declared.kind == "int" else float
        group.add_argument(flag.name, **options)


def _flag_values(
    args: argparse.Namespace, settings: Sequence[Setting], namespace: str
) -> dict[str, Any]:
    """The settings whose flags were given, with their values (0 and '' count as given)."""
    values = {}
    for declared in settings:
        if declared.flag is not None:
            value = getattr(args, f"{namespace}.{declared.name}")
            if value is not None and value is not False and value != []:
                values[declared.name] = value
    return values


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m nersc_provisioner",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    install = commands.add_parser(
        "install",
        help="write a kernel spec (flags follow `python -m ipykernel install`)",
        description="Write a kernel spec that starts its kernel through a provisioner of ours.",
    )
    where = install.add_argument_group("where and what (as in `python -m ipykernel install`)")
    where.add_argument("--name", help="kernel spec name (default: the provisioner's name)")
    where.add_argument("--display-name", help="name shown in Jupyter's launcher")
    where.add_argument("--user", action="store_true", help="install for the current user")
    where.add_argument("--prefix", help="install under this prefix (PREFIX/share/jupyter)")
    where.add_argument(
        "--sys-prefix", action="store_true", help="install into the current Python environment"
    )
    where.add_argument(
        "--env",
        nargs=2,
        action="append",
        default=[],
        metavar=("KEY", "VALUE"),
        help="set an environment variable for the kernel (repeatable)",
    )
    how = install.add_argument_group("how the kernel starts")
    how.add_argument(
        "--provisioner",
        default="nersc-local",
        choices=sorted(PROVISIONERS),
        help="which provisioner starts the kernel (default: nersc-local)",
    )
    _add_setting_flags(how, in_scope(Scope.WRAPPER), "config")
    argv = how.add_mutually_exclusive_group()
    argv.add_argument(
        "--python",
        help="the Python that runs ipykernel (default: `python` as found after the setup)",
    )
    argv.add_argument(
        "--kernel-argv",
        help="the whole kernel command, shell-style; must contain {connection_file}",
    )
    remote = install.add_argument_group(
        "remote host (nersc-cori, nersc-perlmutter); defaults come from ~/.ssh/config",
        "--identity-file, --ssh-config and --known-hosts also apply to nersc-local with "
        "--slurm-* flags: there they are for the ssh from this machine into the job's node.",
    )
    _add_setting_flags(remote, in_scope(Scope.REMOTE), "config")
    slurm = install.add_argument_group(
        "Slurm: run the kernel as a step of a Slurm job on a compute node",
        "With any of these, the kernel does not run on the login node: a job is submitted "
        "there (sbatch), and once it runs the kernel starts in it as an `srun --overlap` step "
        "on its first node. The job is cancelled when the kernel shuts down (unless "
        "--slurm-keep or --slurm-job-id). Each value reaches sbatch as one argument, never "
        "through a shell. With nersc-cori or nersc-perlmutter, sbatch runs on that login node "
        "over ssh and the node is reached through that connection; with nersc-local (Jupyter "
        "running on a login node itself), sbatch runs here and the node is reached by ssh from "
        "here (see --identity-file, --known-hosts, --ssh-config).",
    )
    _add_setting_flags(slurm, SLURM_KEYS, "slurm")
    _add_setting_flags(slurm, in_scope(Scope.SLURM), "config")
    how.add_argument(
        "--no-check",
        action="store_true",
        help="do not check here that the modules exist (e.g. they exist only where "
        "the kernel runs)",
    )

    check = commands.add_parser(
        "check",
        help="diagnose an installed kernel spec step by step, with timings",
        description="Resolve the ssh config, connect, verify the host key, check the "
        "certificate, check the Python, ipykernel and modules, start the kernel and run a "
        "cell. With a slurm section: submit the job, wait in the queue, ssh into its node, "
        "probe the Python in a job step, start the kernel in the job, and cancel the job the "
        "check submitted (for nersc-local, sbatch runs here and there is no login step). "
        "Each step is timed; a failing step says what failed and how to fix it.",
    )
    check.add_argument("name")

    for verb, text in (("ps", "list our kernels on a host"), ("kill", "end our kernels on a host")):
        sub = commands.add_parser(verb, help=text, description=text + ".")
        sub.add_argument(
            "host",
            help="host or ~/.ssh/config alias, or an installed remote kernel spec's name "
            "(its host settings are used)",
        )
        if verb == "kill":
            sub.add_argument("kernel_ids", nargs="*", help="kernel ids (see `ps`)")
            sub.add_argument("--all", action="store_true", help="every kernel of ours there")

    listing = commands.add_parser("list", help="list installed kernel specs that use us")
    listing.add_argument("--json", action="store_true", help="print JSON")

    show = commands.add_parser(
        "show", help="print the exact wrapper and command a kernel spec would run"
    )
    show.add_argument("name")

    remove = commands.add_parser("remove", help="remove an installed kernel spec of ours")
    remove.add_argument("name")
    return parser


def _install(args: argparse.Namespace) -> int:
    given = _flag_values(args, SETTINGS, "config")
    slurm = _slurm_config(_flag_values(args, SLURM_KEYS, "slurm"))
    if args.provisioner == "nersc-local":
        _refuse_remote_flags(given, slurm)
    queue_timeout = given.get("queue_timeout")
    if queue_timeout is not None and not queue_timeout > 0:
        raise ConfigError(
            f"--queue-timeout must be a positive number of seconds, not {queue_timeout}",
            hint="e.g. --queue-timeout 1800 to wait up to half an hour in the queue",
        )
    # One key per flag given, in registry order; build_kernel_spec leaves out empty values.
    config: dict[str, Any] = {}
    for declared in settings_of(args.provisioner):
        if declared.name == "slurm" and slurm:
            config["slurm"] = slurm
        elif declared.name in given:
            config[declared.name] = given[declared.name]
    kernel_argv = None
    if args.kernel_argv:
        kernel_argv = shlex.split(args.kernel_argv)
    elif args.python:
        kernel_argv = [args.python, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    name = args.provisioner if args.name is None else args.name
    spec = build_kernel_spec(
        args.provisioner,
        config=config,
        display_name=args.display_name,
        argv=kernel_argv,
        env=dict(args.env),
    )
    if given.get("ssh_config") == "":
        # build_kernel_spec leaves out empty values; here '' means "ignore ~/.ssh/config".
        spec["metadata"]["kernel_provisioner"]["config"]["ssh_config"] = ""
    modules = given.get("modules", [])
    if modules and not args.no_check and args.provisioner == "nersc-local":
        unknown = missing_modules(
            modules, given.get("module_init") or "auto", given.get("module_use", [])
        )
        if unknown:
            raise ConfigError(
                f"unknown module(s): {', '.join(unknown)}",
                hint="check the names with `module avail` or `module spider`; "
                "use --no-check if they exist only where the kernel runs",
            )
    path = install_kernel_spec(
        spec, name, user=args.user, prefix=args.prefix, sys_prefix=args.sys_prefix
    )
    print(f"Installed kernel spec {name} in {path}")
    return 0


def _refuse_remote_flags(given: dict[str, Any], slurm: dict[str, Any]) -> None:
    """nersc-local: no remote-host flags; the node's ssh flags only with --slurm-*."""
    local = settings_of("nersc-local")
    remote = [
        s.flag.name
        for s in in_scope(Scope.REMOTE)
        if s.flag is not None and s not in local and s.name in given
    ]
    if remote:
        raise ConfigError(
            f"{', '.join(remote)}: the remote host flags need a remote provisioner",
            hint="add --provisioner nersc-perlmutter (or nersc-cori); for a kernel on this "
            "machine use --python, --cwd and --launch-timeout",
        )
    node = [s.flag.name for s in in_scope(Scope.NODE_SSH) if s.flag is not None and s.name in given]
    if node and not slurm:
        raise ConfigError(
            f"{', '.join(node)}: with nersc-local, the ssh flags are for the ssh into a Slurm "
            "job's node, so they need --slurm-* flags",
            hint="add the --slurm-* flags of the job (e.g. --slurm-qos interactive), or "
            "--provisioner nersc-perlmutter (or nersc-cori) for a kernel on a remote login node",
        )


def _slurm_config(given: dict[str, Any]) -> dict[str, Any]:
    """The ``slurm`` section from the --slurm-* flags given (only those), each value checked."""
    for key in SLURM_KEYS:
        if key.name not in given or key.flag is None:
            continue
        try:
            SlurmOptions.from_config({key.name: given[key.name]})
        except ConfigError as exc:
            flag = key.flag.name
            hint = exc.hint or (
                "give one sbatch argument per --slurm-arg, with no newline or NUL byte, "
                "e.g. --slurm-arg=--mem=8G"
                if flag == "--slurm-arg"
                else f"see {flag} in `python -m nersc_provisioner install --help`"
            )
            raise ConfigError(f"{flag}: {exc.message}", hint=hint) from None
    SlurmOptions.from_config(given)
    return given


def _list(args: argparse.Namespace) -> int:
    specs = list_kernel_specs()
    if args.json:
        print(
            json.dumps(
                {
                    s.name: {
                        "resource_dir": s.resource_dir,
                        "provisioner": s.provisioner,
                        "config": s.config,
                    }
                    for s in specs
                },
                indent=1,
            )
        )
        return 0
    if not specs:
        print("No kernel specs use nersc_provisioner; write one with `install`.")
        return 0
    for s in specs:
        print(f"{s.name}  ({s.provisioner})  {s.resource_dir}")
        for key, value in sorted(s.config.items()):
            print(f"    {key} = {json.dumps(value)}")
    return 0


def _show(args: argparse.Namespace) -> int:
    installed = get_kernel_spec(args.name)
    plan = launch_plan(args.name)
    print(f"# kernel spec {installed.name} ({installed.provisioner}): {installed.resource_dir}")
    if installed.spec.get("env"):
        print("# environment added to the kernel's:")
        for key, value in installed.spec["env"].items():
            print(f"#   {key}={value}")
    if plan.script is None:
        print("# no wrapper needed: the kernel runs directly")
    elif plan.script not in plan.command:
        print("# launch script, sent on the stdin of one SSH exec (the real key, kernel id")
        print("# and ports are filled in at launch):")
        print(plan.script, end="")
        print(f"# run as: {plan.command[0]} {join(plan.command[1:])}")
        return 0
    else:
        print("# wrapper script (bash), generated at launch:")
        print(plan.script, end="")
    print("# command ({connection_file} and <status-fd> are filled in at launch):")
    if plan.script is None:
        print(join(plan.command))
    else:
        at = plan.command.index(plan.script)
        print(" ".join([join(plan.command[:at]), '"$WRAPPER_ABOVE"', join(plan.command[at + 1 :])]))
    return 0


def _target(host: str) -> SSHTarget:
    """A host, alias, or the name of an installed remote kernel spec."""
    for installed in list_kernel_specs():
        if installed.name == host and installed.provisioner != "nersc-local":
            provisioner = provisioner_class(installed.provisioner)(**installed.config)
            return provisioner.target()  # type: ignore[attr-defined,no-any-return]
    return resolve_target(host)


def _ps(args: argparse.Namespace) -> int:
    target = _target(args.host)
    entries = list_remote_kernels(target)
    if not entries:
        print(f"No kernels of ours on {target.label}.")
        return 0
    print(f"{'KERNEL ID':<38} {'PID':>8}  {'STATE':<8} LAST CONTACT")
    for e in entries:
        print(f"{e.kernel_id:<38} {e.pid:>8}  {'running' if e.running else 'dead':<8} "
              f"{e.lease_age} s ago")  # fmt: skip
    return 0


def _kill(args: argparse.Namespace) -> int:
    target = _target(args.host)
    ids = list(args.kernel_ids)
    if args.all:
        ids = [e.kernel_id for e in list_remote_kernels(target)]
        if not ids:
            print(f"No kernels of ours on {target.label}.")
            return 0
    if not ids:
        raise ConfigError("no kernel ids given", hint="name them (see `ps`) or use --all")
    for kernel_id in kill_remote_kernels(target, ids):
        print(f"ended {kernel_id} on {target.label}")
    return 0


def _check(args: argparse.Namespace) -> int:
    def report(step: Step) -> None:
        mark = "ok  " if step.ok else "FAIL"
        print(f"[{mark}] {step.name:<32} {step.seconds:7.2f} s  {step.detail}", flush=True)

    def progress(text: str) -> None:
        print(f"       ... {text}", flush=True)

    try:
        return 0 if check(args.name, report, progress) else 1
    except KeyboardInterrupt:
        print("check interrupted", file=sys.stderr)
        return 130


def _remove(args: argparse.Namespace) -> int:
    print(f"Removed {remove_kernel_spec(args.name)}")
    return 0


_COMMANDS = {
    "install": _install,
    "list": _list,
    "show": _show,
    "remove": _remove,
    "check": _check,
    "ps": _ps,
    "kill": _kill,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return _COMMANDS[args.command](args)
    except NERSCProvisionerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
