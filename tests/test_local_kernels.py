"""Real ipykernel kernels through AsyncKernelManager with ``nersc-local`` and real Lmod."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import psutil
import pytest

from nersc_provisioner import (
    KernelCommandError,
    LaunchTimeout,
    ModuleLoadError,
    ModuleSystemError,
    SetupError,
    missing_modules,
)
from nersc_provisioner.transports.local import session_processes
from tests.conftest import PYTHON_ARGV, KernelFactory
from tests.kernels import interrupt_running_cell, ready_client, run_cell
from tests.rig import LmodRig

pytestmark = [pytest.mark.kernel, pytest.mark.rig]


@pytest.fixture
def lmod_config(lmod_rig: LmodRig) -> dict[str, object]:
    return {"module_use": [str(lmod_rig.modulepath)], "modules": ["nersc-test/1.0"]}


@pytest.mark.oldest
async def test_cell_runs_and_sees_module_variable(
    start_kernel: KernelFactory, lmod_config: dict[str, object]
) -> None:
    km = await start_kernel(lmod_config, argv=PYTHON_ARGV)
    kc = await ready_client(km)
    try:
        result = await run_cell(kc, "import os; print(os.environ.get('NERSC_TEST_MODULE'))")
        assert result.status == "ok"
        assert result.stdout.strip() == "nersc-test-1.0"
    finally:
        kc.stop_channels()


@pytest.mark.oldest
async def test_default_argv_uses_python_found_after_setup(
    start_kernel: KernelFactory, lmod_config: dict[str, object], tmp_path: Path
) -> None:
    """kernel.json without argv: `python -m ipykernel_launcher` resolved through the wrapper."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    shim = bindir / "python"
    shim.write_text(f'#!/bin/sh\nexport NPR_SHIM=used\nexec {sys.executable} "$@"\n')
    shim.chmod(0o755)
    config = {**lmod_config, "setup": [f"export PATH={bindir}:$PATH"]}
    km = await start_kernel(config)
    kc = await ready_client(km)
    try:
        result = await run_cell(kc, "import os; print(os.environ.get('NPR_SHIM'))")
        assert result.status == "ok"
        assert result.stdout.strip() == "used"
    finally:
        kc.stop_channels()


@pytest.mark.oldest
async def test_interrupt_restart_shutdown_leave_nothing(
    start_kernel: KernelFactory, lmod_config: dict[str, object]
) -> None:
    km = await start_kernel(lmod_config, argv=PYTHON_ARGV)
    kc = await ready_client(km)
    first_pid = km.provisioner.pid  # type: ignore[union-attr]
    # exec: the wrapper became the kernel, so the kernel runs as the launched PID.
    assert "ipykernel_launcher" in " ".join(psutil.Process(first_pid).cmdline())

    reply = await interrupt_running_cell(km, kc)
    assert reply["status"] == "error"
    assert reply["ename"] == "KeyboardInterrupt"

    await km.restart_kernel()
    await kc.wait_for_ready(timeout=60)
    second_pid = km.provisioner.pid  # type: ignore[union-attr]
    assert second_pid != first_pid
    assert not psutil.pid_exists(first_pid) or psutil.Process(first_pid).status() == "zombie"
    result = await run_cell(kc, "import os; print(os.environ['NERSC_TEST_MODULE'])")
    assert result.stdout.strip() == "nersc-test-1.0"

    kc.stop_channels()
    await km.shutdown_kernel()
    assert not psutil.pid_exists(second_pid)
    assert session_processes(first_pid) == []
    assert session_processes(second_pid) == []


async def test_background_process_from_setup_is_reaped_at_shutdown(
    start_kernel: KernelFactory, lmod_config: dict[str, object], tmp_path: Path
) -> None:
    pidfile = tmp_path / "daemon.pid"
    config = {**lmod_config, "setup": [f"(sleep 300 & echo $! > {pidfile}) 2>/dev/null"]}
    km = await start_kernel(config, argv=PYTHON_ARGV)
    kc = await ready_client(km)
    kc.stop_channels()
    daemon = int(pidfile.read_text())
    assert psutil.pid_exists(daemon)
    await km.shutdown_kernel()
    assert not psutil.pid_exists(daemon)


async def test_broken_module_fails_fast_with_lmod_message(
    start_kernel: KernelFactory, lmod_config: dict[str, object]
) -> None:
    config = {**lmod_config, "modules": ["nersc-test/1.0", "broken/1.0"]}
    started = time.monotonic()
    with pytest.raises(ModuleLoadError) as info:
        await start_kernel(config, argv=PYTHON_ARGV)
    elapsed = time.monotonic() - started
    assert elapsed < 10, f"the failure took {elapsed:.1f} s"
    text = str(info.value)
    assert "broken/1.0: this modulefile fails on" in text  # Lmod's own message, quoted
    assert "module load broken/1.0 failed" in text
    assert "What to do:" in text


async def test_unknown_module_is_named(
    start_kernel: KernelFactory, lmod_config: dict[str, object], jupyter_dirs: Path
) -> None:
    config = {**lmod_config, "modules": ["no-such-module"]}
    with pytest.raises(ModuleLoadError) as info:
        await start_kernel(config, argv=PYTHON_ARGV)
    assert "unknown" in str(info.value)
    assert '"no-such-module"' in str(info.value)
    # Nothing left behind: no connection file in the runtime directory.
    runtime = Path(os.environ["JUPYTER_RUNTIME_DIR"])
    assert runtime.is_dir()
    assert not list(runtime.glob("kernel-*.json"))


async def test_failing_setup_line_fails_fast(start_kernel: KernelFactory) -> None:
    with pytest.raises(SetupError) as info:
        await start_kernel({"setup": ["conda-not-here activate myenv"]}, argv=PYTHON_ARGV)
    assert "setup line 1 failed" in str(info.value)
    assert "conda-not-here" in str(info.value)


async def test_missing_ipykernel_is_reported(start_kernel: KernelFactory) -> None:
    argv = [sys.executable, "-m", "no_such_kernel_package", "-f", "{connection_file}"]
    with pytest.raises(KernelCommandError) as info:
        await start_kernel({"setup": ["true"]}, argv=argv)
    assert "cannot import no_such_kernel_package" in str(info.value)


async def test_hanging_setup_times_out_and_is_killed(
    start_kernel: KernelFactory, tmp_path: Path
) -> None:
    pidfile = tmp_path / "setup.pid"
    config = {"setup": [f"echo $$ > {pidfile}; sleep 300"], "launch_timeout": 1.5}
    with pytest.raises(LaunchTimeout) as info:
        await start_kernel(config, argv=PYTHON_ARGV)
    assert "1.5 s" in str(info.value)
    assert not psutil.pid_exists(int(pidfile.read_text()))


async def test_env_is_applied_as_jupyter_client_does(start_kernel: KernelFactory) -> None:
    env = {"NPR_PLAIN": "plain", "NPR_TEMPLATE": "home=${HOME}"}
    km = await start_kernel({"setup": ["true"]}, argv=PYTHON_ARGV, env=env)
    kc = await ready_client(km)
    try:
        code = f"import os, json; print(json.dumps([os.environ[k] for k in {list(env)!r}]))"
        result = await run_cell(kc, code)
        assert json.loads(result.stdout) == ["plain", f"home={os.environ['HOME']}"]
    finally:
        kc.stop_channels()


async def test_connection_key_in_no_command_line(
    start_kernel: KernelFactory, lmod_config: dict[str, object]
) -> None:
    km = await start_kernel(lmod_config, argv=PYTHON_ARGV)
    kc = await ready_client(km)
    kc.stop_channels()
    key = km.session.key
    assert len(key) >= 16
    seen = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        seen += 1
        assert key not in cmdline, f"key found in the command line of pid {proc.name}"
    assert seen > 10


HOSTILE_MODULES = ["$(touch {c})", "`touch {c}`", "x; touch {c}", "x\ntouch {c}", 'it\'s "q"']


async def test_hostile_module_names_run_nothing(
    start_kernel: KernelFactory, lmod_config: dict[str, object], tmp_path: Path
) -> None:
    canary = tmp_path / "pwned"
    for template in HOSTILE_MODULES:
        config = {**lmod_config, "modules": [template.format(c=canary)]}
        with pytest.raises(ModuleLoadError):
            await start_kernel(config, argv=PYTHON_ARGV)
        assert not canary.exists(), template
    names = [t.format(c=canary) for t in HOSTILE_MODULES]
    assert missing_modules(names, module_use=lmod_config["module_use"]) == names  # type: ignore[arg-type]
    assert not canary.exists()


async def test_hostile_env_value_reaches_the_kernel_verbatim(
    start_kernel: KernelFactory, lmod_config: dict[str, object], tmp_path: Path
) -> None:
    canary = tmp_path / "pwned"
    value = f"$(touch {canary}) `touch {canary}`; touch {canary}\n'\" end"
    km = await start_kernel(lmod_config, argv=PYTHON_ARGV, env={"NPR_HOSTILE": value})
    kc = await ready_client(km)
    try:
        result = await run_cell(kc, "import os; print(repr(os.environ['NPR_HOSTILE']))")
        assert result.stdout.strip() == repr(value)
    finally:
        kc.stop_channels()
    assert not canary.exists()


async def test_explicit_module_init_script(
    start_kernel: KernelFactory, lmod_config: dict[str, object], lmod_rig: LmodRig
) -> None:
    config = {**lmod_config, "module_init": str(lmod_rig.init), "modules": ["nersc-test/2.0"]}
    km = await start_kernel(config, argv=PYTHON_ARGV)
    kc = await ready_client(km)
    try:
        result = await run_cell(kc, "import os; print(os.environ['NERSC_TEST_MODULE'])")
        assert result.stdout.strip() == "nersc-test-2.0"
    finally:
        kc.stop_channels()


async def test_missing_module_init_script_is_named(
    start_kernel: KernelFactory, lmod_config: dict[str, object]
) -> None:
    config = {**lmod_config, "module_init": "/nonexistent/init/bash"}
    with pytest.raises(ModuleSystemError, match="/nonexistent/init/bash"):
        await start_kernel(config, argv=PYTHON_ARGV)


async def test_container_runtime_is_exec_d_with_the_kernel(
    start_kernel: KernelFactory, tmp_path: Path
) -> None:
    """Shifter is not on this machine; a stand-in records its argv and runs the rest.

    It checks what we hand to the runtime (``--image=...`` then the kernel argv), and
    that the kernel started through it works; it does not test Shifter itself.
    """
    bindir = tmp_path / "bin"
    bindir.mkdir()
    record = tmp_path / "shifter-argv.json"
    stand_in = bindir / "shifter"
    stand_in.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        f"open({str(record)!r}, 'w').write(json.dumps(sys.argv[1:]))\n"
        "argv = [a for a in sys.argv[1:] if not a.startswith('--image=')]\n"
        "os.execvp(argv[0], argv)\n"
    )
    stand_in.chmod(0o755)
    env = {"PATH": f"{bindir}:{os.environ['PATH']}"}
    km = await start_kernel({"container": "docker:org/image:1"}, argv=PYTHON_ARGV, env=env)
    kc = await ready_client(km)
    try:
        result = await run_cell(kc, "print(6 * 7)")
        assert result.stdout.strip() == "42"
    finally:
        kc.stop_channels()
    argv = json.loads(record.read_text())
    assert argv[0] == "--image=docker:org/image:1"
    assert argv[1:4] == [sys.executable, "-m", "ipykernel_launcher"]


async def test_missing_container_runtime_is_named(start_kernel: KernelFactory) -> None:
    with pytest.raises(KernelCommandError, match="container runtime podman-hpc not found"):
        await start_kernel(
            {"container": "img", "container_runtime": "podman-hpc"},
            argv=PYTHON_ARGV,
            env={"PATH": "/usr/bin:/bin"},
        )
