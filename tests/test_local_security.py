"""A second user of the Jupyter host attacks running ``nersc-local`` kernels.

The rig's intruder (an unprivileged user of this machine, as of the remote host)
connects to the kernel's 127.0.0.1 ports, which every user can list in
/proc/net/tcp, or to its IPC sockets.  Each attack must read no output and run
no code, for every way of starting a local kernel: plain, with modules, with
setup lines and in a container.  Control cases run the same attacks against a
kernel with ``transport_encryption: disabled`` (what jupyter_client's own
provisioner gives every kernel) and show that they succeed there, so these tests
can fail.
"""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

import pytest

from nersc_provisioner import LaunchError
from tests.conftest import PYTHON_ARGV, KernelFactory
from tests.intruder import EXECUTOR, intruder_python, read_iopub
from tests.kernels import DROPPING_SHIM, MERGING_SHIM, ready_client, run_cell
from tests.rig import LmodRig, SSHRig, require_lmod
from tests.stacks import needs_curve_stack

pytestmark = [pytest.mark.kernel, pytest.mark.rig]


def intruder_run(rig: SSHRig, code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run Python ``code`` as the intruder, on this host (not in the remote namespace)."""
    return subprocess.run(
        [*intruder_python(rig, on_remote_host=False), "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd="/",
    )


def endpoint(km: Any, channel: str) -> str:
    port = getattr(km, f"{channel}_port")
    if km.transport == "ipc":
        return f"ipc://{km.ip}-{port}"
    return f"tcp://127.0.0.1:{port}"


async def code_run_by_intruder(
    rig: SSHRig, km: Any, kc: Any, keys: dict[str, str]
) -> dict[str, bool]:
    """The intruder sends execute_requests signed with each of ``keys``: which ran?"""
    canaries = {name: Path(f"/tmp/npr-canary-{uuid.uuid4().hex[:8]}") for name in keys}
    try:
        attempts = await asyncio.gather(
            *(
                asyncio.to_thread(
                    intruder_run, rig, EXECUTOR, endpoint(km, "shell"), str(canaries[n]), k
                )
                for n, k in keys.items()
            )
        )
        for attempt in attempts:
            assert attempt.returncode == 0, attempt.stderr
        # The kernel still serves us; and as it takes shell requests in turn, its answer
        # to ours, sent after every intruder's request ended, means each of those has
        # been run by now if it got in at all.
        result = await run_cell(kc, "print('still mine')")
        assert result.stdout.strip() == "still mine"
        return {name: canary.exists() for name, canary in canaries.items()}
    finally:
        for canary in canaries.values():
            canary.unlink(missing_ok=True)


async def attack(rig: SSHRig, km: Any, kc: Any) -> dict[str, Any]:
    """Every attack on one running kernel; what each obtained.  The intruder subscribes
    to IOPub while the kernel prints, once plainly and once guessing at CurveZMQ; then
    sends execute_requests."""
    python = intruder_python(rig, on_remote_host=False)
    read = await read_iopub(python, kc, endpoint(km, "iopub"), ["plain", "guess-curve"])
    ran = await code_run_by_intruder(
        rig,
        km,
        kc,
        {
            "execute-unsigned": "",
            "execute-guessed-key": uuid.uuid4().hex,
            # Even the HMAC key, were it stolen, does not get past CurveZMQ or the directory.
            "execute-stolen-key": km.session.key.decode(),
        },
    )
    return {"subscribe": read["plain"], "subscribe-guessing-curve": read["guess-curve"], **ran}


NOTHING = {
    "subscribe": (0, 0),
    "subscribe-guessing-curve": (0, 0),
    "execute-unsigned": False,
    "execute-guessed-key": False,
    "execute-stolen-key": False,
}


def container_stand_in(tmp_path: Path) -> dict[str, str]:
    """A ``shifter`` on PATH that runs the kernel argv (Shifter is not on this machine)."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    stand_in = bindir / "shifter"
    stand_in.write_text(
        f"#!{sys.executable}\n"
        "import os, sys\n"
        "argv = [a for a in sys.argv[1:] if not a.startswith('--image=')]\n"
        "os.execvp(argv[0], argv)\n"
    )
    stand_in.chmod(0o755)
    return {"PATH": f"{bindir}:{os.environ['PATH']}"}


def target_config(target: str, tmp_path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    if target == "plain":
        return {}, {}
    if target == "modules":
        lmod = require_lmod()
        return {"module_use": [str(lmod.modulepath)], "modules": ["nersc-test/1.0"]}, {}
    if target == "setup":
        return {"setup": ["export NPR_SETUP=done"]}, {}
    return {"container": "docker:org/image:1"}, container_stand_in(tmp_path)


@needs_curve_stack
@pytest.mark.parametrize("target", ["plain", "modules", "setup", "container"])
async def test_intruder_reads_nothing_and_runs_nothing(
    start_kernel: KernelFactory, intruder_rig: SSHRig, tmp_path: Path, target: str
) -> None:
    config, env = target_config(target, tmp_path)
    km = await start_kernel(config, argv=PYTHON_ARGV, env=env)
    assert km.transport == "tcp"
    assert km.curve_publickey is not None  # CurveZMQ: ipykernel 7.4 encrypts
    kc = await ready_client(km)
    try:
        assert await attack(intruder_rig, km, kc) == NOTHING
    finally:
        kc.stop_channels()


async def test_control_the_same_attacks_work_without_protection(
    start_kernel: KernelFactory, intruder_rig: SSHRig
) -> None:
    """jupyter_client's default, and ours with transport_encryption 'disabled'."""
    km = await start_kernel({"transport_encryption": "disabled"}, argv=PYTHON_ARGV)
    assert km.curve_publickey is None
    kc = await ready_client(km)
    try:
        results = await attack(intruder_rig, km, kc)
    finally:
        kc.stop_channels()
    messages, markers = results["subscribe"]
    assert messages >= markers > 0, results
    assert results["execute-stolen-key"] is True, results  # with the key, code runs
    assert results["execute-unsigned"] is False  # the HMAC signature alone stops these
    assert results["execute-guessed-key"] is False


@pytest.mark.parametrize("shim", [DROPPING_SHIM, MERGING_SHIM], ids=["drops-keys", "merges"])
async def test_kernel_without_curve_runs_on_private_ipc_sockets(
    start_kernel: KernelFactory, intruder_rig: SSHRig, shim: str
) -> None:
    """An ipykernel without CurveZMQ (it drops our keys, or merges its ports as
    ipykernel 6 does): its greeting says NULL, so it is started again on IPC sockets in
    a directory of mode 0700, and no attack gets in."""
    km = await start_kernel({}, argv=[sys.executable, "-c", shim, "-f", "{connection_file}"])
    assert km.transport == "ipc"
    assert km.curve_publickey is None
    directory = os.path.dirname(km.ip)
    assert os.path.isabs(km.ip)
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    assert len(f"{km.ip}-5") <= 107
    kc = await ready_client(km)
    try:
        assert await attack(intruder_rig, km, kc) == NOTHING
        entered = intruder_run(
            intruder_rig, "import os, sys; print(os.listdir(sys.argv[1]))", directory
        )
        assert entered.returncode != 0
        assert "PermissionError" in entered.stderr
    finally:
        kc.stop_channels()
    await km.shutdown_kernel()
    assert not os.path.exists(directory)  # removed with the kernel


#: A kernel that cannot run on IPC (as IJulia and xeus-python were reported to):
#: it exits when its connection file asks for IPC, else it is ipykernel without CurveZMQ.
NO_IPC_SHIM = (
    "import json, sys; f = sys.argv[sys.argv.index('-f') + 1]; d = json.load(open(f)); "
    "sys.exit(3) if d['transport'] == 'ipc' else None; " + DROPPING_SHIM
)


@needs_curve_stack
async def test_kernel_that_can_do_neither_is_refused_or_warned(
    start_kernel: KernelFactory, caplog: pytest.LogCaptureFixture
) -> None:
    argv = [sys.executable, "-c", NO_IPC_SHIM, "-f", "{connection_file}"]
    with pytest.raises(LaunchError) as info:
        await start_kernel({"transport_encryption": "required"}, argv=argv)
    message = str(info.value)
    assert "neither with CurveZMQ" in message
    assert "not CurveZMQ" in message  # the first reason: its greeting
    assert "exited with code 3" in message  # the second: IPC
    assert "transport_encryption" in message
    km = await start_kernel({}, argv=argv, name="auto")  # auto: runs, with a warning
    assert km.transport == "tcp"
    assert km.curve_publickey is None
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("runs on TCP without encryption" in w for w in warnings), warnings
    kc = await ready_client(km)
    try:
        result = await run_cell(kc, "print('plain')")
        assert result.stdout.strip() == "plain"
    finally:
        kc.stop_channels()


# --- the tunnel's local listeners (nersc-cori): the Jupyter host's side of SSH ---------


@pytest.mark.parametrize(
    "encryption",
    [pytest.param("auto", marks=needs_curve_stack), "disabled", "auto-without-curve"],
)
async def test_tunnel_listeners_are_closed_to_other_users(
    start_kernel: KernelFactory,
    intruder_rig: SSHRig,
    remote_config: dict[str, Any],
    encryption: str,
) -> None:
    """With CurveZMQ the listeners are 127.0.0.1 ports carrying ciphertext that only the
    holder of the server key can open; without it (disabled, or a remote kernel without
    CurveZMQ under auto) they are Unix sockets in a directory of mode 0700."""
    config = dict(remote_config)
    argv = None
    if encryption == "auto-without-curve":
        argv = [intruder_rig.remote_python, "-c", DROPPING_SHIM, "-f", "{connection_file}"]
    else:
        config["transport_encryption"] = encryption
    km = await start_kernel(config, argv=argv, provisioner="nersc-cori")
    if encryption == "auto":
        assert (km.transport, km.ip) == ("tcp", "127.0.0.1")
        assert km.curve_publickey is not None
    else:
        assert km.transport == "ipc"
        assert getattr(km, "curve_publickey", None) is None
        directory = os.path.dirname(km.ip)
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    kc = await ready_client(km)
    try:
        assert await attack(intruder_rig, km, kc) == NOTHING
        # A restart keeps the listeners where the clients are (jupyter_client deletes
        # an IPC kernel's socket files at each restart; ours are bound again).
        endpoints = (km.transport, km.ip, km.shell_port)
        await km.restart_kernel()
        assert (km.transport, km.ip, km.shell_port) == endpoints
        await kc.wait_for_ready(timeout=60)
        result = await run_cell(kc, "print('after restart')")
        assert result.stdout.strip() == "after restart"
    finally:
        kc.stop_channels()
    await km.shutdown_kernel()
    if km.transport == "ipc":
        assert not os.path.exists(directory)


@needs_curve_stack
def test_demo_prints_no_encryption_warning(lmod_rig: LmodRig) -> None:
    """`make demo`'s script: ipykernel's "without encryption" warning is gone."""
    demo = Path(__file__).resolve().parent.parent / "scripts" / "demo.py"
    result = subprocess.run(
        [sys.executable, str(demo)], capture_output=True, text=True, timeout=120, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "without encryption" not in output
    assert "== the kernel's sockets: 127.0.0.1 ports" in output
    assert "with CurveZMQ encryption" in output


# --- a real ipykernel 6 (no CurveZMQ support), from the rig's second venv ---------------


@pytest.fixture
def ipykernel6(intruder_rig: SSHRig) -> str:
    if not intruder_rig.ipykernel6_python:
        pytest.fail("rig.json has no ssh.ipykernel6_python; run scripts/test-rig up")
    return intruder_rig.ipykernel6_python


VERSION = "import ipykernel; print(ipykernel.__version__)"


async def runs_ipykernel6_out_of_reach(intruder_rig: SSHRig, km: Any) -> None:
    """The kernel is ipykernel 6, it answers us, and no attack gets in."""
    kc = await ready_client(km)
    try:
        result = await run_cell(kc, VERSION)
        assert result.stdout.strip().startswith("6.")
        assert await attack(intruder_rig, km, kc) == NOTHING
    finally:
        kc.stop_channels()


@needs_curve_stack
async def test_real_ipykernel6_runs_on_private_ipc_sockets(
    start_kernel: KernelFactory, intruder_rig: SSHRig, ipykernel6: str
) -> None:
    """ipykernel 6 (with the jupyter_client 8.10 pip installs next to it) exits when
    its connection file holds CurveZMQ keys: it is started again on IPC sockets in a
    0700 directory, out of reach."""
    argv = [ipykernel6, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    # required accepts private IPC sockets, so it refuses this kernel only where IPC
    # fails too: here, behind a gate that exits when asked for IPC.
    with pytest.raises(LaunchError, match="neither with CurveZMQ") as info:
        await start_kernel(
            {"transport_encryption": "required"},
            argv=[ipykernel6, "-c", NO_IPC_WRAPPER, "-f", "{connection_file}"],
            name="refused",
        )
    assert "given the keys it exited with code 1" in str(info.value)
    assert "on IPC sockets it exited with code 3" in str(info.value)
    km = await start_kernel({}, argv=argv)
    assert km.transport == "ipc"
    assert km.curve_publickey is None
    assert stat.S_IMODE(os.stat(os.path.dirname(km.ip)).st_mode) == 0o700
    await runs_ipykernel6_out_of_reach(intruder_rig, km)


#: ipykernel 6 behind a gate that exits when asked for IPC (as IJulia was reported to).
NO_IPC_WRAPPER = (
    "import json, sys; f = sys.argv[sys.argv.index('-f') + 1]; "
    "sys.exit(3) if json.load(open(f))['transport'] == 'ipc' else None; "
    "from ipykernel import kernelapp; kernelapp.launch_new_instance()"
)


@needs_curve_stack
async def test_real_ipykernel6_on_a_remote_host(
    start_kernel: KernelFactory,
    intruder_rig: SSHRig,
    remote_config: dict[str, Any],
    ipykernel6: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """ipykernel 6 next to jupyter_client 8.10 (what pip installs with it) dies at startup
    when its connection file holds CurveZMQ keys.  Under required that is the error,
    its traceback quoted; under auto the kernel is started again without keys, with a
    warning, and the tunnel's listeners on this host are Unix sockets in a 0700
    directory."""
    config = {**remote_config, "remote_python": ipykernel6}
    with pytest.raises(LaunchError, match="exited during startup") as info:
        await start_kernel(
            {**config, "transport_encryption": "required"}, name="refused", provisioner="nersc-cori"
        )
    assert "curve_publickey" in str(info.value)  # the kernel's own traceback, quoted
    km = await start_kernel(config, provisioner="nersc-cori")
    assert km.transport == "ipc"
    assert km.curve_publickey is None
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("exited at startup when given CurveZMQ keys" in w for w in warnings), warnings
    await runs_ipykernel6_out_of_reach(intruder_rig, km)
