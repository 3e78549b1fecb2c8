"""A second user of the login node attacks a running nersc-cori kernel.

The rig's remote host (netns npr-remote) has a second unprivileged user, the
intruder.  Every attack runs as that user, inside the namespace, where the
kernel's loopback ports are.  Each test fails if its attack works.  Where an
attack is stopped by one measure only (CurveZMQ), a control case shows that
the same attack does work without it: the harness can see a success.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import KernelFactory
from tests.intruder import EXECUTOR, intruder_python, read_iopub
from tests.kernels import DROPPING_SHIM, MERGING_SHIM, ready_client, run_cell
from tests.rig import SSHRig
from tests.stacks import CURVE_STACK, needs_curve_stack

pytestmark = [pytest.mark.kernel, pytest.mark.rig]


def as_intruder(rig: SSHRig, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` as the intruder on the remote host (inside its namespace)."""
    return subprocess.run(
        ["ip", "netns", "exec", rig.netns, "runuser", "-u", rig.intruder, "--", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd="/",
    )


def intruder_run(
    rig: SSHRig, code: str, *args: str, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    """Run Python ``code`` as the intruder on the remote host (inside its namespace)."""
    return subprocess.run(
        [*intruder_python(rig, on_remote_host=True), "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd="/",
        input=stdin,
    )


def remote_dir(rig: SSHRig, kernel_id: str) -> Path:
    return Path(f"/home/{rig.user}/.nersc_provisioner/kernels/{kernel_id}")


async def started(start_kernel: KernelFactory, config: dict[str, Any]) -> tuple[Any, Any]:
    km = await start_kernel(config, provisioner="nersc-cori")
    kc = await ready_client(km)
    return km, kc


def secrets_of(rig: SSHRig, km: Any) -> list[str]:
    """The HMAC key and the CurveZMQ secret key, as the remote connection file has them."""
    info = json.loads((remote_dir(rig, km.kernel_id) / "connection.json").read_text())
    return [value for name in ("key", "curve_secretkey") if (value := info.get(name))]


@needs_curve_stack
async def test_kernel_encrypts_with_curvezmq_by_default(
    start_kernel: KernelFactory, remote_config: dict[str, Any], intruder_rig: SSHRig
) -> None:
    km, kc = await started(start_kernel, remote_config)
    try:
        assert km.curve_publickey is not None
        info = json.loads((remote_dir(intruder_rig, km.kernel_id) / "connection.json").read_text())
        # The kernel wrote its file back with the curve keys: it runs with them.
        assert info["curve_publickey"] == km.curve_publickey.decode()
        result = await run_cell(kc, "print('through curve')")
        assert result.stdout.strip() == "through curve"
        kernel_log = (remote_dir(intruder_rig, km.kernel_id) / "kernel.log").read_text()
        assert "without encryption" not in kernel_log
    finally:
        kc.stop_channels()


async def test_intruder_cannot_read_our_files(
    start_kernel: KernelFactory, remote_config: dict[str, Any], intruder_rig: SSHRig
) -> None:
    km, kc = await started(start_kernel, remote_config)
    try:
        directory = remote_dir(intruder_rig, km.kernel_id)
        secrets = secrets_of(intruder_rig, km)
        for name in ("connection.json", "kernel.log", "wrapper.sh", "pid", "lease"):
            attempt = as_intruder(intruder_rig, "cat", str(directory / name))
            assert attempt.returncode != 0, name
            assert "Permission denied" in attempt.stderr
            assert not any(secret in attempt.stdout for secret in secrets)
        listing = as_intruder(intruder_rig, "ls", str(directory.parent))
        assert listing.returncode != 0
        assert km.kernel_id not in listing.stdout
        # What the intruder may list, it finds nothing of ours in.
        found = as_intruder(
            intruder_rig, "grep", "-rlF", secrets[0], "/tmp", "/var/tmp", "/dev/shm"
        )
        assert found.stdout == ""
    finally:
        kc.stop_channels()


async def test_intruder_finds_no_secret_in_proc(
    start_kernel: KernelFactory, remote_config: dict[str, Any], intruder_rig: SSHRig
) -> None:
    km, kc = await started(start_kernel, remote_config)
    try:
        secrets = secrets_of(intruder_rig, km)
        # The HMAC key, and the CurveZMQ secret key where jupyter_client carries one.
        assert len(secrets) == (2 if CURVE_STACK else 1)
        scan = intruder_run(
            intruder_rig,
            """
            import glob, sys
            secrets = [s.encode() for s in sys.stdin.read().split()]  # not on our cmdline
            readable = 0
            for path in glob.glob("/proc/[0-9]*/cmdline") + glob.glob("/proc/[0-9]*/environ"):
                try:
                    data = open(path, "rb").read()
                except OSError:
                    continue
                readable += 1
                for secret in secrets:
                    if secret in data:
                        print("LEAK", path)
            print("READABLE", readable)
            """,
            stdin="\n".join(secrets),
        )
        assert scan.returncode == 0, scan.stderr
        assert "LEAK" not in scan.stdout
        assert int(scan.stdout.split("READABLE")[1]) > 10  # it did read other processes
    finally:
        kc.stop_channels()


@pytest.mark.parametrize(
    ("encryption", "mode", "leaks"),
    [
        pytest.param("auto", "plain", False, marks=needs_curve_stack),
        ("auto", "guess-curve", False),
        ("disabled", "plain", True),  # control: without CurveZMQ the output is readable
    ],
)
async def test_intruder_subscribing_to_iopub_reads_nothing(
    start_kernel: KernelFactory,
    remote_config: dict[str, Any],
    intruder_rig: SSHRig,
    encryption: str,
    mode: str,
    leaks: bool,
) -> None:
    km, kc = await started(start_kernel, {**remote_config, "transport_encryption": encryption})
    try:
        port = km.provisioner.remote.ports["iopub_port"]
        python = intruder_python(intruder_rig, on_remote_host=True)
        read = await read_iopub(python, kc, f"tcp://127.0.0.1:{port}", [mode])
        messages, seen = read[mode]
        if leaks:  # the control: the same window reads the markers without CurveZMQ
            assert seen > 0, read
        else:
            assert messages == 0, read
            assert seen == 0
    finally:
        kc.stop_channels()


@pytest.mark.parametrize(
    ("encryption", "key", "runs"),
    [
        ("auto", "none", False),  # unsigned
        ("auto", "guessed", False),  # signed with a key of its own
        ("disabled", "none", False),  # the HMAC signature alone stops an unsigned request
        ("disabled", "guessed", False),
        ("disabled", "stolen", True),  # control: with the real key it would run
    ],
)
async def test_intruder_execute_request_does_not_run(
    start_kernel: KernelFactory,
    remote_config: dict[str, Any],
    intruder_rig: SSHRig,
    encryption: str,
    key: str,
    runs: bool,
) -> None:
    km, kc = await started(start_kernel, {**remote_config, "transport_encryption": encryption})
    canary = Path(f"/tmp/npr-canary-{uuid.uuid4().hex[:8]}")
    try:
        port = km.provisioner.remote.ports["shell_port"]
        secret = {
            "none": "",
            "guessed": uuid.uuid4().hex,
            "stolen": secrets_of(intruder_rig, km)[0],
        }[key]
        attempt = await asyncio.to_thread(
            intruder_run, intruder_rig, EXECUTOR, f"tcp://127.0.0.1:{port}", str(canary), secret
        )
        assert attempt.returncode == 0, attempt.stderr
        assert attempt.stdout.split() == ["REPLY", str(runs)]
        # The kernel still serves us; and as it takes shell requests in turn, its answer
        # to ours, sent after the intruder's ended, means the intruder's request has
        # been run by now if it got in at all.
        result = await run_cell(kc, "print('still mine')")
        assert result.stdout.strip() == "still mine"
        assert canary.exists() is runs, attempt.stdout
    finally:
        kc.stop_channels()
        canary.unlink(missing_ok=True)


async def test_intruder_cannot_signal_the_kernel(
    start_kernel: KernelFactory, remote_config: dict[str, Any], intruder_rig: SSHRig
) -> None:
    km, kc = await started(start_kernel, remote_config)
    try:
        pid = km.provisioner.remote.pid
        for sig in ("-INT", "-TERM", "-KILL"):
            for target in (str(pid), f"-{pid}"):  # the process, and its process group
                attempt = as_intruder(intruder_rig, "kill", sig, "--", target)
                assert attempt.returncode != 0
                assert "not permitted" in attempt.stderr
        # kill(2) refused each signal (EPERM): none was delivered, so none can act later.
        assert await km.is_alive()
        result = await run_cell(kc, "print(1 + 1)")
        assert result.stdout.strip() == "2"
    finally:
        kc.stop_channels()


async def test_nothing_of_ours_lives_in_shared_temporary_directories(
    start_kernel: KernelFactory, remote_config: dict[str, Any], intruder_rig: SSHRig
) -> None:
    """So files planted or replaced in /tmp by another user cannot reach the kernel."""
    km, kc = await started(start_kernel, remote_config)
    try:
        # The intruder plants what it can where a careless tool would look.
        for name in ("nersc_provisioner", "npr-agent", "kernel.json", "connection.json"):
            as_intruder(intruder_rig, "ln", "-sf", "/dev/null", f"/tmp/{name}")
        pid = km.provisioner.remote.pid
        ours = [psutil.Process(pid)]
        watchdog = remote_dir(intruder_rig, km.kernel_id) / "watchdog"
        ours.append(psutil.Process(int(watchdog.read_text().strip())))
        shared = ("/tmp", "/var/tmp", "/dev/shm")
        for proc in ours:
            paths = [f.path for f in proc.open_files()] + [proc.cwd()]
            assert not [p for p in paths if p.startswith(shared)], (proc.cmdline(), paths)
            assert not any(arg.startswith(shared) for arg in proc.cmdline()), proc.cmdline()
        result = await run_cell(kc, "print('unaffected')")
        assert result.stdout.strip() == "unaffected"
    finally:
        kc.stop_channels()
        for name in ("nersc_provisioner", "npr-agent", "kernel.json", "connection.json"):
            Path(f"/tmp/{name}").unlink(missing_ok=True)


@needs_curve_stack
@pytest.mark.parametrize("shim", [DROPPING_SHIM, MERGING_SHIM], ids=["drops-keys", "merges"])
async def test_curve_required_refuses_a_kernel_without_it(
    start_kernel: KernelFactory, remote_config: dict[str, Any], intruder_rig: SSHRig, shim: str
) -> None:
    """An ipykernel without CurveZMQ, whether it drops the curve keys from its
    connection file or (as ipykernel 6 does) merges its ports into the file and keeps
    them: the kernel's own ZMTP greeting decides, not the file. 'required' and
    data_path 'direct' refuse it; 'auto' runs it unencrypted, with a warning, and the
    clients connect without CurveZMQ."""
    argv = [intruder_rig.remote_python, "-c", shim, "-f", "{connection_file}"]
    start = time.monotonic()
    with pytest.raises(Exception, match="does not support CurveZMQ") as info:
        await start_kernel(
            {**remote_config, "transport_encryption": "required"},
            argv=argv,
            provisioner="nersc-cori",
        )
    assert "transport_encryption" in str(info.value)
    assert time.monotonic() - start < 30
    with pytest.raises(Exception, match="does not support CurveZMQ") as info:
        await start_kernel(
            {**remote_config, "data_path": "direct"}, argv=argv, provisioner="nersc-cori"
        )
    assert "data_path 'direct' requires" in str(info.value)
    km = await start_kernel(remote_config, argv=argv, provisioner="nersc-cori")
    assert km.curve_publickey is None  # the clients do not expect encryption
    kc = await ready_client(km)
    try:
        result = await run_cell(kc, "print('plain')")
        assert result.stdout.strip() == "plain"
    finally:
        kc.stop_channels()
