"""Faults, each with a bound: nersc-cori against the rig when things break under it.

(Also elsewhere: a restarted sshd, a 5 s network cut and a killed sshd child in
test_remote_kernels.py; the killed Jupyter side in its watchdog test; a stopped
slurmctld in test_slurm_kernels.py.)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from jupyter_client.ioloop import AsyncIOLoopKernelManager

from nersc_provisioner import LaunchError
from nersc_provisioner.provisioners.remote import NERSCCoriProvisioner
from nersc_provisioner.transports.connection import ConnectionPool, SSHConnection
from tests.commands import run_cli
from tests.conftest import KernelFactory
from tests.kernels import (
    output_after_reconnect,
    ready_client,
    run_cell,
    shutdown_quietly,
    wait_until,
)
from tests.rig import (
    JumpRig,
    SSHRig,
    kill_sshd_sessions,
    rig_processes,
    start_sshd,
    stop_sshd,
)

pytestmark = [pytest.mark.kernel, pytest.mark.rig]


def ours(ssh_rig: SSHRig) -> list[str]:
    """The rig user's kernels and watchdogs (not the agents of connections still open)."""
    return rig_processes(ssh_rig.user, ("kernel", "watchdog"))


async def test_connection_reset_in_the_middle_of_20_mb_of_output(
    start_kernel: KernelFactory, remote_config: dict[str, Any], ssh_rig: SSHRig
) -> None:
    km = await start_kernel(remote_config, provisioner="nersc-cori")
    kc = await ready_client(km)
    try:
        await run_cell(kc, "kept = 'kept'")
        received = 0
        msg_id = kc.execute("import sys\nfor _ in range(20): sys.stdout.write('x' * 1_000_000)")
        deadline = time.monotonic() + 30
        while received < 2_000_000 and time.monotonic() < deadline:  # in the middle of it
            msg = await kc.get_iopub_msg(timeout=10)
            if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "stream":
                received += len(msg["content"]["text"])
        assert received >= 2_000_000
        conn = km.provisioner.connection  # type: ignore[union-attr]
        before = conn.reconnects
        assert kill_sshd_sessions(ssh_rig.sshd_pidfile) >= 2
        started = time.monotonic()
        # A request sent before the reset is noticed can be lost with the old TCP
        # connection (ZeroMQ does not resend); the cell goes once the connection is back.
        assert await wait_until(lambda: conn.reconnects > before, 15)
        # PUB/SUB output sent while the tunnel was down is not replayed; the kernel, its
        # variables and the next cell are what must survive, within a bound.
        tries = await output_after_reconnect(kc, "print(kept, len('y' * 10))", "kept 10")
        recovered = time.monotonic() - started
        assert tries <= 3, f"{tries} tries"  # the first cell's output can be lost (IOPub)
        assert recovered < 20, f"recovery took {recovered:.1f} s"
        assert conn.reconnects == before + 1  # the tunnel's connection really was reset
        assert await km.is_alive()
    finally:
        kc.stop_channels()
    await km.shutdown_kernel()
    assert await wait_until(lambda: not ours(ssh_rig), 15), ours(ssh_rig)


async def test_remote_kernel_killed_is_restarted_with_the_reason_logged(
    remote_config: dict[str, Any],
    ssh_rig: SSHRig,
    jupyter_dirs: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """SIGKILL on the remote kernel: jupyter_client's restarter (as Jupyter Server runs
    it) sees it dead through poll(), logs why, and starts a new one."""
    caplog.set_level(logging.INFO)
    name = "restarted"
    folder = jupyter_dirs / "kernels" / name
    folder.mkdir(parents=True)
    spec = {
        "display_name": name,
        "language": "python",
        "metadata": {
            "kernel_provisioner": {"provisioner_name": "nersc-cori", "config": remote_config}
        },
    }
    (folder / "kernel.json").write_text(json.dumps(spec))
    runtime = Path(os.environ["JUPYTER_RUNTIME_DIR"])
    runtime.mkdir(parents=True, exist_ok=True)
    km = AsyncIOLoopKernelManager(
        kernel_name=name, connection_file=str(runtime / f"kernel-{uuid.uuid4()}.json")
    )
    await km.start_kernel()
    try:
        km.start_restarter()
        first = km.provisioner.remote.pid  # type: ignore[union-attr]
        os.kill(first, 9)
        started = time.monotonic()

        def new_pid() -> int:
            remote = getattr(km.provisioner, "remote", None)
            return remote.pid if remote is not None else 0

        assert await wait_until(lambda: new_pid() not in (0, first), 45), "no restart"
        restarted_after = time.monotonic() - started
        messages = [r.getMessage() for r in caplog.records]
        assert any(str(first) in m and "not ended by us" in m for m in messages), (
            messages
        )  # the reason, with the pid that died
        assert any("restarting" in m.lower() for m in messages), messages
        assert restarted_after < 30, f"restart took {restarted_after:.1f} s"
        kc = await ready_client(km)
        try:
            result = await run_cell(kc, "print('back')")
            assert result.stdout.strip() == "back"
        finally:
            kc.stop_channels()
    finally:
        km.stop_restarter()
        await shutdown_quietly(km)
    assert await wait_until(lambda: not ours(ssh_rig), 15), ours(ssh_rig)


@contextlib.contextmanager
def broken_runtime_dir(ssh_rig: SSHRig, how: str) -> Iterator[Path]:
    """The remote user's ~/.nersc_provisioner made unwritable, or on a full filesystem."""
    base = Path(f"/home/{ssh_rig.user}/.nersc_provisioner")
    saved = base.with_name(".nersc_provisioner.saved-by-test")
    if base.exists():
        base.rename(saved)
    base.mkdir()
    shutil.chown(base, ssh_rig.user, ssh_rig.user)
    try:
        if how == "unwritable":
            base.chmod(0o500)
        else:  # a 64 KiB filesystem, filled up, as the remote host's sshd sees its files
            # (sshd runs in the mount namespace `ip netns exec` gave it)
            in_sshd = [
                "nsenter",
                "--target",
                ssh_rig.sshd_pidfile.read_text().strip(),
                "--mount",
                "--",
            ]
            subprocess.run(
                [*in_sshd, "mount", "-t", "tmpfs", "-o",
                 f"size=64k,mode=0700,uid={ssh_rig.user}", "npr-full", str(base)],
                check=True,
            )  # fmt: skip
            subprocess.run(
                [*in_sshd, "dd", "if=/dev/zero", f"of={base}/filler", "bs=4096"],
                capture_output=True,
                check=False,  # it ends with "No space left on device"
            )
            full = subprocess.run(
                [*in_sshd, "df", "--output=avail", str(base)],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            assert full.stdout.split()[-1] == "0", full.stdout
        yield base
    finally:
        if how == "full":
            sshd = ssh_rig.sshd_pidfile.read_text().strip()
            subprocess.run(["nsenter", "--target", sshd, "--mount", "--", "umount", str(base)],
                           check=False)  # fmt: skip
        base.chmod(0o700)
        shutil.rmtree(base, ignore_errors=True)
        if saved.exists():
            saved.rename(base)


@pytest.mark.parametrize("how", ["unwritable", "full"])
async def test_broken_remote_runtime_directory_is_a_clear_error(
    start_kernel: KernelFactory, remote_config: dict[str, Any], ssh_rig: SSHRig, how: str
) -> None:
    with broken_runtime_dir(ssh_rig, how):
        started = time.monotonic()
        with pytest.raises(LaunchError) as info:
            await start_kernel(remote_config, provisioner="nersc-cori")
        message = str(info.value)
        assert "cannot" in message
        assert ".nersc_provisioner" in message
        assert "writable and not over quota" in message  # the fix is named
        assert time.monotonic() - started < 30
        assert await wait_until(lambda: not ours(ssh_rig), 15), ours(ssh_rig)


async def test_killed_jupyter_side_leaves_nothing_that_ps_shows(
    remote_config: dict[str, Any], ssh_rig: SSHRig, jupyter_dirs: Path
) -> None:
    """The Jupyter side is SIGKILLed: the watchdog ends the kernel; `ps HOST` lists none."""
    spec_config = {**remote_config, "lease_timeout": 15}
    folder = jupyter_dirs / "kernels" / "orphaned"
    folder.mkdir(parents=True)
    spec = {
        "display_name": "orphaned",
        "language": "python",
        "metadata": {
            "kernel_provisioner": {"provisioner_name": "nersc-cori", "config": spec_config}
        },
    }
    (folder / "kernel.json").write_text(json.dumps(spec))
    code = (
        "import asyncio\n"
        "from jupyter_client.manager import AsyncKernelManager\n"
        "async def main():\n"
        "    km = AsyncKernelManager(kernel_name='orphaned')\n"
        "    await km.start_kernel()\n"
        "    print('STARTED', km.provisioner.remote.kernel_id, flush=True)\n"
        "    await asyncio.sleep(3600)\n"
        "asyncio.run(main())\n"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        stdout=asyncio.subprocess.PIPE,
        env=dict(os.environ),
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode().split()
        assert line[:1] == ["STARTED"], line
        kernel_id = line[1]
        listed = run_cli("ps", "orphaned")
        assert kernel_id in listed.stdout, listed.stdout + listed.stderr
        proc.kill()
        await proc.wait()
        assert await wait_until(lambda: kernel_id not in run_cli("ps", "orphaned").stdout, 60, 2)
        assert await wait_until(lambda: not ours(ssh_rig), 15), ours(ssh_rig)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


#: Where sshd was: a listener that accepts TCP connections and never says a word.
MUTE_LISTENER = """
import socket, sys
sock = socket.socket()
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.bind((sys.argv[1], int(sys.argv[2])))
sock.listen(64)
print("listening", flush=True)
held = []
while True:
    held.append(sock.accept()[0])
    print("accepted", flush=True)
"""


async def test_a_hanging_host_fails_a_new_start_within_launch_timeout(
    start_kernel: KernelFactory, remote_config: dict[str, Any], ssh_rig: SSHRig, jump_rig: JumpRig
) -> None:
    """The host's connection drops and its sshd is replaced by a listener that accepts
    TCP and never speaks: the reconnect hangs in its login.  A new kernel asked of that
    host fails within its launch_timeout, naming the host and the reconnect; a kernel
    on another host (the rig's jump host) starts meanwhile."""
    km = await start_kernel(remote_config, provisioner="nersc-cori")
    conn = km.provisioner.connection  # type: ignore[union-attr]
    stop_sshd(ssh_rig)
    mute = subprocess.Popen(
        ["ip", "netns", "exec", ssh_rig.netns, sys.executable, "-c", MUTE_LISTENER, ssh_rig.host,
         str(ssh_rig.port)],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert mute.stdout is not None
        assert mute.stdout.readline().strip() == "listening"
        assert await wait_until(lambda: not conn.connected, 10)
        # The monitor's reconnect reached the listener: it is inside its login, hanging.
        accepted = await asyncio.wait_for(asyncio.to_thread(mute.stdout.readline), 30)
        assert accepted.strip() == "accepted"
        other = {**remote_config, "host": jump_rig.host, "known_hosts": [str(jump_rig.known_hosts)]}
        timeout = 6.0
        started = time.monotonic()
        hanging = asyncio.create_task(
            start_kernel({**remote_config, "launch_timeout": timeout}, name="hanging",
                         provisioner="nersc-cori")
        )  # fmt: skip
        failed_at: list[float] = []
        hanging.add_done_callback(lambda _: failed_at.append(time.monotonic()))
        elsewhere = await start_kernel(other, name="elsewhere", provisioner="nersc-cori")
        kc = await ready_client(elsewhere)
        try:
            result = await run_cell(kc, "import socket; print(socket.gethostname())")
            assert result.status == "ok"
        finally:
            kc.stop_channels()
        with pytest.raises(Exception, match="still reconnecting to") as info:
            await hanging
        elapsed = failed_at[0] - started
        assert ssh_rig.host in str(info.value)
        assert elapsed < timeout + 4, f"failed after {elapsed:.1f} s"
    finally:
        mute.kill()
        mute.wait()
        if mute.stdout is not None:
            mute.stdout.close()
        start_sshd(ssh_rig)
    assert await wait_until(lambda: conn.connected, 60)  # the first kernel's host is back


# --- a login under way when its connection is given up ------------------------------


@contextlib.contextmanager
def paused_sshd(ssh_rig: SSHRig) -> Iterator[None]:
    """The rig's sshd stopped (SIGSTOP): a new TCP connection is accepted by the kernel's
    backlog, and its login waits for a banner until the sshd is continued."""
    pid = int(ssh_rig.sshd_pidfile.read_text())
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def tcp_to(ssh_rig: SSHRig) -> list[Any]:
    """This process's TCP connections to the rig's sshd."""
    return [
        c
        for c in psutil.Process().net_connections(kind="tcp")
        if c.raddr and (c.raddr.ip, c.raddr.port) == (ssh_rig.host, ssh_rig.port)
    ]


async def test_a_close_during_a_reconnect_leaves_no_login_thread_or_agent(
    remote_config: dict[str, Any], ssh_rig: SSHRig
) -> None:
    """The connection drops and its reconnect is inside its login (the sshd paused) when
    the last kernel gives the connection up.  When the login then completes, it is
    closed at once: no TCP connection, no monitor thread, no agent on the host."""
    target = NERSCCoriProvisioner(**remote_config).target()
    conn = SSHConnection(target)
    await asyncio.to_thread(conn.open, 30)
    try:
        with paused_sshd(ssh_rig):
            since = time.time()
            assert kill_sshd_sessions(ssh_rig.sshd_pidfile) >= 2
            # The monitor's reconnect has its TCP connection (in the paused sshd's
            # backlog) and waits for the banner: a login under way.
            assert await wait_until(lambda: not conn.connected and len(tcp_to(ssh_rig)) == 1, 15)
            conn.close()
        # The sshd runs again: the login completes, sees the close, and ends.
        assert await asyncio.to_thread(conn.wait_closed, 30)
        assert tcp_to(ssh_rig) == []
        assert not conn.connected
        assert await wait_until(
            lambda: rig_processes(ssh_rig.user, ["agent"], since=since) == [], 10
        )
    finally:
        conn.close()


async def test_a_start_cancelled_during_its_login_leaves_nothing(
    start_kernel: KernelFactory, remote_config: dict[str, Any], ssh_rig: SSHRig
) -> None:
    """A start cancelled while its login waits (the server stopping, a client giving up):
    the login completes later and closes itself; no listener, no pooled connection, no
    TCP connection, no agent, and the cancellation reaches the caller."""
    assert ConnectionPool.count() == 0, "a connection of an earlier test is still open"
    managers: list[Any] = []
    with paused_sshd(ssh_rig):
        since = time.time()
        start = asyncio.create_task(
            start_kernel(remote_config, provisioner="nersc-cori", created=managers.append)
        )
        assert await wait_until(lambda: managers and len(tcp_to(ssh_rig)) == 1, 15)
        prov = managers[0].provisioner
        conn = prov.hosts.login
        assert conn is not None
        start.cancel()
        with pytest.raises(asyncio.CancelledError):
            await start
    assert await asyncio.to_thread(conn.wait_closed, 30)
    assert not prov.tunnel.is_open
    assert ConnectionPool.count() == 0
    assert tcp_to(ssh_rig) == []
    assert await wait_until(lambda: rig_processes(ssh_rig.user, ["agent"], since=since) == [], 10)
