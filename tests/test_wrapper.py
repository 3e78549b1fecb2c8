"""The generated wrapper: golden text, and hostile values through a real bash."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nersc_provisioner.errors import KernelCommandError, LaunchError, ModuleLoadError
from nersc_provisioner.launchers import (
    READY_MARKER,
    ContainerSpec,
    EnvironmentSetup,
    Failure,
    build_script,
    container_prefix,
    launch_error_from_exit,
    wrap_command,
)

GOLDEN = Path(__file__).parent / "golden"

HOSTILE = [
    "two words",
    "it's",
    'say "hi"',
    "$(touch {canary})",
    "`touch {canary}`",
    "a; touch {canary}",
    "line1\ntouch {canary}",
    "$HOME and ${{PATH}}",
    "back\\slash",
    "-n",
    "",
]


def run_wrapper(setup: EnvironmentSetup, argv: list[str]) -> tuple[int, str, str]:
    """Run the wrapper for real; return (exit code, status-pipe text, stdout)."""
    read_fd, write_fd = os.pipe()
    try:
        proc = subprocess.Popen(
            wrap_command(setup, argv, str(write_fd)),
            pass_fds=(write_fd,),
            stdout=subprocess.PIPE,
            text=True,
        )
        os.close(write_fd)
        with os.fdopen(read_fd) as status:
            status_text = status.read()
        stdout, _ = proc.communicate(timeout=30)
    finally:
        for fd in (read_fd, write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
    return proc.returncode, status_text, stdout


REPORT = [
    sys.executable,
    "-c",
    "import os, json, sys; json.dump({'cwd': os.getcwd(), 'env': dict(os.environ), "
    "'argv': sys.argv[1:]}, sys.stdout)",
]


def test_golden_modules_script() -> None:
    setup = EnvironmentSetup.create(
        modules=["python", "cudatoolkit/12.2"],
        purge=True,
        module_use=["/global/common/software/m1234/modulefiles"],
        setup=["conda activate myenv", "export OMP_NUM_THREADS=4"],
        cwd="/global/homes/u/user",
    )
    assert build_script(setup) == (GOLDEN / "wrapper-modules.sh").read_text()


def test_golden_container_script() -> None:
    setup = EnvironmentSetup.create(
        container=ContainerSpec(image="docker:continuumio/anaconda3:latest")
    )
    assert build_script(setup) == (GOLDEN / "wrapper-shifter.sh").read_text()


def test_container_prefixes() -> None:
    assert container_prefix(ContainerSpec(image="docker:a/b:1")) == [
        "shifter",
        "--image=docker:a/b:1",
    ]
    podman = ContainerSpec(image="a/b:1", runtime="podman-hpc", mounts=("/run/user/1",))
    assert container_prefix(podman) == [
        "podman-hpc", "run", "--rm", "--net", "host", "-v", "/run/user/1:/run/user/1", "a/b:1",
    ]  # fmt: skip


def test_trivial_setup_needs_no_wrapper() -> None:
    assert not EnvironmentSetup.create().needed
    assert EnvironmentSetup.create(setup=["true"]).needed


@pytest.mark.parametrize("template", HOSTILE)
def test_hostile_values_are_carried_not_run(template: str, tmp_path: Path) -> None:
    canary = tmp_path / "pwned"
    value = template.format(canary=canary)
    workdir = tmp_path / ("dir " + value.replace("/", "_").replace("\n", "_"))
    workdir.mkdir()
    setup = EnvironmentSetup.create(env={"NPR_HOSTILE": value}, cwd=str(workdir))
    code, status, stdout = run_wrapper(setup, [*REPORT, value])
    assert code == 0, status
    assert READY_MARKER in status
    report = json.loads(stdout)
    assert report["env"]["NPR_HOSTILE"] == value
    assert report["cwd"] == str(workdir)
    assert report["argv"] == [value]
    assert not canary.exists()


@pytest.mark.parametrize("template", [t for t in HOSTILE if t])
def test_hostile_setup_line_cannot_break_out(template: str, tmp_path: Path) -> None:
    """A setup line runs as one command; quoting tricks cannot reach the wrapper's code."""
    canary = tmp_path / "pwned"
    value = template.format(canary=canary)
    breakout = f"'; touch {canary}; '"
    setup = EnvironmentSetup.create(setup=[breakout])
    code, status, _ = run_wrapper(setup, REPORT)
    assert code == Failure.SETUP
    assert not canary.exists()
    # The value itself, as an argument of a setup line's own command, is data.
    setup = EnvironmentSetup.create(
        env={"NPR_V": value}, setup=['test -n "$NPR_V" || test -z "$NPR_V"']
    )
    code, status, _ = run_wrapper(setup, REPORT)
    assert code == 0, status
    assert not canary.exists()


def test_nul_byte_is_rejected() -> None:
    from nersc_provisioner.errors import UnsafeValueError

    with pytest.raises(UnsafeValueError, match="NUL"):
        build_script(EnvironmentSetup.create(setup=["echo a\x00b"]))
    with pytest.raises(UnsafeValueError, match="environment variable name"):
        build_script(EnvironmentSetup.create(env={"A B": "x"}))


def test_missing_kernel_command_and_package(tmp_path: Path) -> None:
    setup = EnvironmentSetup.create(setup=["true"])
    code, status, _ = run_wrapper(setup, ["/nonexistent/python", "-m", "ipykernel_launcher"])
    assert code == Failure.KERNEL_COMMAND
    assert "kernel command not found: /nonexistent/python" in status
    code, status, _ = run_wrapper(setup, [sys.executable, "-m", "surely_not_installed_pkg"])
    assert code == Failure.KERNEL_COMMAND
    assert "cannot import surely_not_installed_pkg" in status


def test_exit_codes_map_to_named_errors() -> None:
    error = launch_error_from_exit(Failure.MODULE_LOAD, "Lmod says no", ["x"])
    assert isinstance(error, ModuleLoadError)
    assert "Lmod says no" in str(error)
    assert "module avail" in str(error)
    assert isinstance(launch_error_from_exit(Failure.KERNEL_COMMAND, "", []), KernelCommandError)
    # A missing program is a FileNotFoundError too, as with jupyter_client's own provisioner.
    for missing in (Failure.KERNEL_COMMAND, Failure.CONTAINER_RUNTIME):
        assert isinstance(launch_error_from_exit(missing, "", []), FileNotFoundError)
    assert not isinstance(launch_error_from_exit(Failure.SETUP, "", []), FileNotFoundError)
    unknown = launch_error_from_exit(1, "boom", [])
    assert type(unknown) is LaunchError
    assert "exit code 1" in str(unknown)


def test_status_fd_three_is_kept(tmp_path: Path) -> None:
    """The wrapper must not close its status pipe when it already is fd 3."""
    script = build_script(EnvironmentSetup.create(setup=["true"]))
    proc = subprocess.run(
        ["bash", "-c", f'exec 3>"{tmp_path}/status"; bash --noprofile --norc -c "$1" x 3 true',
         "outer", script],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert READY_MARKER in (tmp_path / "status").read_text()
