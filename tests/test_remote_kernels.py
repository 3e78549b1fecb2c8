"""nersc-cori against the rig's real sshd in its network namespace, with real kernels."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from nersc_provisioner import KernelCommandError, LaunchError, ModuleLoadError
from nersc_provisioner.errors import UnknownHostKeyError
from nersc_provisioner.transports.connection import ConnectionPool
from tests.commands import run_cli
from tests.conftest import KernelFactory
from tests.kernels import (
    interrupt_running_cell,
    logged,
    output_after_reconnect,
    ready_client,
    run_cell,
    wait_until,
)
from tests.rig import (
    PROCESS_KINDS,
    JumpRig,
    LmodRig,
    SSHRig,
    jump_ssh_config,
    kill_sshd_sessions,
    rig_processes,
    start_sshd,
    stop_sshd,
)

pytestmark = [pytest.mark.kernel, pytest.mark.rig]


def running(pid: int) -> bool:
    """True if ``pid`` runs (a zombie waiting for PID 1 to reap it does not)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.oldest
async def test_lifecycle_inside_the_namespace(
    start_kernel: KernelFactory, remote_config: dict[str, Any], ssh_rig: SSHRig
) -> None:
    since = time.time() - 1
    km = await start_kernel(remote_config, provisioner="nersc-cori")
    kc = await ready_client(km)
    ports = {name: getattr(km, name) for name in ("shell_port", "iopub_port", "hb_port")}
    try:
        result = await run_cell(kc, "import subprocess; print(subprocess.getoutput('hostname -I'))")
        assert ssh_rig.host in result.stdout.split()

        reply = await interrupt_running_cell(km, kc)
        assert reply["ename"] == "KeyboardInterrupt"

        first_pid = km.provisioner.remote.pid  # type: ignore[union-attr]
        await km.restart_kernel()
        await kc.wait_for_ready(timeout=60)
        assert km.provisioner.remote.pid != first_pid  # type: ignore[union-attr]
        assert {name: getattr(km, name) for name in ports} == ports  # same local ports
        result = await run_cell(kc, "print(6 * 7)")
        assert result.stdout.strip() == "42"
    finally:
        kc.stop_channels()
    await km.shutdown_kernel()
    assert await wait_until(lambda: not rig_processes(ssh_rig.user, since=since), 10), (
        rig_processes(ssh_rig.user, since=since)
    )
    home = Path(f"/home/{ssh_rig.user}/.nersc_provisioner/kernels")
    assert not (home / str(km.kernel_id)).exists()


async def test_secrets_stay_put(
    start_kernel: KernelFactory, remote_config: dict[str, Any], ssh_rig: SSHRig
) -> None:
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(self.format(record))

    handler = Collect(level=logging.DEBUG)
    for name in ("nersc_provisioner", "traitlets", "paramiko", ""):
        logging.getLogger(name).addHandler(handler)
    root_level = logging.getLogger().level
    logging.getLogger().setLevel(logging.DEBUG)
    try:
        km = await start_kernel(remote_config, provisioner="nersc-cori")
        km.log.setLevel(logging.DEBUG)
        kc = await ready_client(km)
        await run_cell(kc, "x = 1")
        kc.stop_channels()
        key = km.session.key
        assert len(key) >= 16
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            for part in ("cmdline", "environ"):
                try:
                    data = (proc / part).read_bytes()
                except OSError:
                    continue
                assert key not in data, f"key in /proc/{proc.name}/{part}"
        kernel_dir = Path(f"/home/{ssh_rig.user}/.nersc_provisioner/kernels/{km.kernel_id}")
        assert kernel_dir.stat().st_mode & 0o777 == 0o700
        assert (kernel_dir / "connection.json").stat().st_mode & 0o777 == 0o600
        remote = km.provisioner.remote  # type: ignore[union-attr]
        listening = subprocess.run(
            ["ip", "netns", "exec", ssh_rig.netns, "ss", "-ltnH"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for port in remote.ports.values():
            binds = [
                line.split()[3] for line in listening.splitlines() if f":{port} " in line + " "
            ]
            assert binds == [f"127.0.0.1:{port}"], (port, listening)
    finally:
        for name in ("nersc_provisioner", "traitlets", "paramiko", ""):
            logging.getLogger(name).removeHandler(handler)
        logging.getLogger().setLevel(root_level)
    assert records, "nothing was logged at DEBUG, so the check below would prove nothing"
    assert not [r for r in records if key.decode() in r]


@pytest.mark.oldest
async def test_drop_and_recovery_keeps_the_kernel(
    start_kernel: KernelFactory, remote_config: dict[str, Any], ssh_rig: SSHRig
) -> None:
    km = await start_kernel(remote_config, provisioner="nersc-cori")
    kc = await ready_client(km)
    conn = km.provisioner.connection  # type: ignore[union-attr]
    before = conn.reconnects
    try:
        await run_cell(kc, "kept = 'still here'")
        assert kill_sshd_sessions(ssh_rig.sshd_pidfile) >= 2  # the sshd serving our connection
        started = time.monotonic()
        # A request sent before the reset is noticed (about 0.2 s here) can be lost
        # with the old TCP connection; so the cell goes once the connection is back.
        assert await wait_until(lambda: conn.reconnects > before, 15)
        tries = await output_after_reconnect(kc, "print(kept)", "still here")
        elapsed = time.monotonic() - started
        assert tries <= 3, f"{tries} tries"  # the first cell's output can be lost (IOPub)
        assert elapsed < 15, f"recovery took {elapsed:.1f} s"
        assert conn.reconnects == before + 1  # the connection really was reset
        assert await km.is_alive()
    finally:
        kc.stop_channels()


async def test_missing_remote_python_is_named(
    start_kernel: KernelFactory, remote_config: dict[str, Any]
) -> None:
    config = {**remote_config, "remote_python": "/nonexistent/bin/python"}
    started = time.monotonic()
    with pytest.raises(KernelCommandError) as info:
        await start_kernel(config, provisioner="nersc-cori")
    assert time.monotonic() - started < 10
    assert "kernel command not found: /nonexistent/bin/python" in str(info.value)


async def test_kernel_crashing_at_import_fails_fast_with_its_stderr(
    start_kernel: KernelFactory, remote_config: dict[str, Any]
) -> None:
    crash = "import sys; sys.stderr.write('ImportError: crash at import (test)\\n'); sys.exit(3)"
    argv = [remote_config["remote_python"], "-c", crash, "{connection_file}"]
    started = time.monotonic()
    with pytest.raises(LaunchError) as info:
        await start_kernel(remote_config, provisioner="nersc-cori", argv=argv)
    assert time.monotonic() - started < 10
    text = str(info.value)
    assert "exited during startup" in text
    assert "crash at import (test)" in text
    assert "exit code 3" in text


async def test_failing_module_is_named(
    start_kernel: KernelFactory, remote_config: dict[str, Any], ssh_rig: SSHRig, lmod_rig: LmodRig
) -> None:
    config = {
        **remote_config,
        "module_use": [str(lmod_rig.modulepath)],
        "modules": ["broken/1.0"],
    }
    since = time.time() - 1
    with pytest.raises(ModuleLoadError) as info:
        await start_kernel(config, provisioner="nersc-cori")
    assert "broken/1.0: this modulefile fails on" in str(info.value)
    assert ssh_rig.host in str(info.value)
    # The failed start closed the connection; sshd ends the agent's session soon after.
    assert await wait_until(lambda: not rig_processes(ssh_rig.user, since=since), 10), (
        rig_processes(ssh_rig.user, since=since)
    )


async def test_module_variable_is_seen_remotely(
    start_kernel: KernelFactory, remote_config: dict[str, Any], lmod_rig: LmodRig
) -> None:
    config = {
        **remote_config,
        "module_use": [str(lmod_rig.modulepath)],
        "modules": ["nersc-test/2.0"],
    }
    km = await start_kernel(config, provisioner="nersc-cori", env={"NPR_FROM_SPEC": "a b'c"})
    kc = await ready_client(km)
    try:
        code = "import os; print(os.environ['NERSC_TEST_MODULE'], os.environ['NPR_FROM_SPEC'])"
        result = await run_cell(kc, code)
        assert result.stdout.strip() == "nersc-test-2.0 a b'c"
    finally:
        kc.stop_channels()


async def test_unknown_host_key_fails_the_start(
    start_kernel: KernelFactory, remote_config: dict[str, Any], tmp_path: Path
) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with pytest.raises(UnknownHostKeyError, match="SHA256:"):
        await start_kernel({**remote_config, "known_hosts": [str(empty)]}, provisioner="nersc-cori")


async def test_ten_kernels_share_one_connection(
    start_kernel: KernelFactory, remote_config: dict[str, Any], ssh_rig: SSHRig
) -> None:
    log = ssh_rig.sshd_pidfile.parent / "sshd.log"
    before = len(log.read_text().splitlines())
    managers = await asyncio.gather(
        *(start_kernel(remote_config, name=f"k{i}", provisioner="nersc-cori") for i in range(10))
    )
    assert ConnectionPool.count() == 1
    clients = [await ready_client(km) for km in managers]
    try:
        results = await asyncio.gather(*(run_cell(kc, "print(2 + 2)") for kc in clients))
        assert [r.stdout.strip() for r in results] == ["4"] * 10
    finally:
        for kc in clients:
            kc.stop_channels()
    logins = [
        line for line in log.read_text().splitlines()[before:] if "Accepted publickey" in line
    ]
    assert len(logins) == 1, logins


async def test_a_new_kernel_after_a_shutdown_needs_no_second_login(
    start_kernel: KernelFactory, remote_config: dict[str, Any], ssh_rig: SSHRig
) -> None:
    """With connection_persist (default 60 s) the connection outlives the host's last
    kernel: a kernel started after a shutdown uses it, with no second login."""
    config = {**remote_config}
    del config["connection_persist"]  # the default
    log = ssh_rig.sshd_pidfile.parent / "sshd.log"
    before = len(log.read_text().splitlines())
    first = await start_kernel(config, name="first", provisioner="nersc-cori")
    conn = first.provisioner.connection  # type: ignore[union-attr]
    await first.shutdown_kernel()
    assert conn is not None
    assert conn.connected  # kept, with no kernel
    assert ConnectionPool.count() == 1
    second = await start_kernel(config, name="second", provisioner="nersc-cori")
    assert second.provisioner.connection is conn  # type: ignore[union-attr]
    kc = await ready_client(second)
    try:
        assert (await run_cell(kc, "print(6 * 7)")).stdout.strip() == "42"
    finally:
        kc.stop_channels()
    await second.shutdown_kernel()
    logins = [
        line for line in log.read_text().splitlines()[before:] if "Accepted publickey" in line
    ]
    assert len(logins) == 1, logins
    assert ConnectionPool.close_idle() == 1  # kept for the next kernel until closed
    assert ConnectionPool.count() == 0
    assert not conn.connected


REATTACH = textwrap.dedent(
    """
    import asyncio, json, sys
    from jupyter_client.manager import AsyncKernelManager
    from jupyter_client.provisioning import KernelProvisionerFactory

    async def main():
        info = json.loads(sys.stdin.read())
        km = AsyncKernelManager(kernel_name=info["kernel_name"])
        provisioner = KernelProvisionerFactory.instance().create_provisioner_instance(
            info["kernel_id"], km.kernel_spec, parent=km
        )
        await provisioner.load_provisioner_info(info["provisioner"])
        km.provisioner = provisioner
        km.kernel_id = info["kernel_id"]
        km.load_connection_info(provisioner.connection_info)
        kc = km.client()
        kc.start_channels()
        await kc.wait_for_ready(timeout=30)
        out = []
        await kc.execute_interactive(
            "print(secret)", timeout=30,
            output_hook=lambda m: out.append(m["content"].get("text", "")),
        )
        kc.stop_channels()
        await provisioner.cleanup(restart=True)
        print("REATTACHED", "".join(out).strip())

    asyncio.run(main())
    """
)


@pytest.mark.oldest
async def test_reattach_from_a_second_process(
    start_kernel: KernelFactory, remote_config: dict[str, Any]
) -> None:
    km = await start_kernel(remote_config, name="reattach", provisioner="nersc-cori")
    kc = await ready_client(km)
    await run_cell(kc, "secret = 'from the first process'")
    kc.stop_channels()
    info = await km.provisioner.get_provisioner_info()  # type: ignore[union-attr]
    payload = json.dumps(
        {"kernel_name": "reattach", "kernel_id": km.kernel_id, "provisioner": info}
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        REATTACH,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=dict(os.environ),
    )
    out, err = await asyncio.wait_for(proc.communicate(payload.encode()), 90)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert "REATTACHED from the first process" in out.decode()


ORPHAN = textwrap.dedent(
    """
    import asyncio, sys
    from jupyter_client.manager import AsyncKernelManager

    async def main():
        km = AsyncKernelManager(kernel_name=sys.argv[1])
        await km.start_kernel()
        remote = km.provisioner.remote
        print("STARTED", remote.pid, remote.kernel_id, flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
    """
)


async def test_watchdog_ends_the_kernel_of_a_killed_manager(
    start_kernel: KernelFactory, remote_config: dict[str, Any], ssh_rig: SSHRig, jupyter_dirs: Path
) -> None:
    config = {**remote_config, "lease_timeout": 15}
    folder = jupyter_dirs / "kernels" / "orphan"
    folder.mkdir(parents=True)
    spec = {
        "display_name": "orphan",
        "language": "python",
        "metadata": {"kernel_provisioner": {"provisioner_name": "nersc-cori", "config": config}},
    }
    (folder / "kernel.json").write_text(json.dumps(spec))
    proc = subprocess.Popen(
        [sys.executable, "-c", ORPHAN, "orphan"],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ),
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().split()
        assert line[:1] == ["STARTED"], line
        pid, kernel_id = int(line[1]), line[2]
        assert running(pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        started = time.monotonic()
        assert await wait_until(lambda: not running(pid), 60, step=1)
        gone_after = time.monotonic() - started
        assert gone_after > 5, "the kernel died too early: the lease should have kept it"
        # Its watchdog is gone too, and so is its directory.
        assert await wait_until(
            lambda: not rig_processes(ssh_rig.user, PROCESS_KINDS, containing=kernel_id), 15
        )
        assert not Path(f"/home/{ssh_rig.user}/.nersc_provisioner/kernels/{kernel_id}").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


async def test_proxyjump_with_two_hops(
    start_kernel: KernelFactory, remote_config: dict[str, Any], jump_rig: JumpRig, tmp_path: Path
) -> None:
    jump = jump_rig
    # inner is reachable only from inside the jump namespace; two hops lead there.
    config_file = jump_ssh_config(tmp_path / "ssh_config", jump, "gate,gate")
    config = {
        "host": "inner",
        "ssh_config": str(config_file),
        "remote_python": remote_config["remote_python"],
        "connection_persist": 0,
    }
    km = await start_kernel(config, provisioner="nersc-perlmutter")
    kc = await ready_client(km)
    try:
        result = await run_cell(kc, "import subprocess; print(subprocess.getoutput('hostname -I'))")
        assert jump.inner_host in result.stdout.split()
    finally:
        kc.stop_channels()


async def test_check_ps_and_kill_commands(
    remote_config: dict[str, Any], ssh_rig: SSHRig, jupyter_dirs: Path
) -> None:
    installed = run_cli(
        "install", "--user", "--name", "rig-check", "--provisioner", "nersc-cori",
        "--host", ssh_rig.host, "--remote-user", ssh_rig.user,
        "--identity-file", str(ssh_rig.identity_file),
        "--known-hosts", str(ssh_rig.known_hosts), "--remote-python", ssh_rig.remote_python,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr
    checked = run_cli("check", "rig-check")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    steps = [line for line in checked.stdout.splitlines() if line.startswith("[")]
    assert len(steps) == 5, checked.stdout
    assert all(step.startswith("[ok  ]") for step in steps), checked.stdout
    assert "ipykernel" in checked.stdout

    proc = subprocess.Popen(
        [sys.executable, "-c", ORPHAN, "rig-check"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        words = proc.stdout.readline().split()
        pid, kernel_id = int(words[1]), words[2]
        listed = run_cli("ps", "rig-check")
        assert kernel_id in listed.stdout
        assert "running" in listed.stdout
        killed = run_cli("kill", "rig-check", kernel_id)
        assert killed.returncode == 0, killed.stderr
        assert f"ended {kernel_id}" in killed.stdout
        assert await wait_until(lambda: not running(pid), 10)
        assert kernel_id not in run_cli("ps", "rig-check").stdout
    finally:
        proc.kill()
        proc.communicate()


async def test_bad_check_names_the_failing_step(
    remote_config: dict[str, Any], ssh_rig: SSHRig, jupyter_dirs: Path, tmp_path: Path
) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    installed = run_cli(
        "install", "--user", "--name", "rig-bad", "--provisioner", "nersc-cori",
        "--host", ssh_rig.host, "--remote-user", ssh_rig.user,
        "--identity-file", str(ssh_rig.identity_file),
        "--known-hosts", str(empty),
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr
    checked = run_cli("check", "rig-bad")
    assert checked.returncode == 1
    assert "[FAIL] connect and verify host key" in checked.stdout
    assert "ssh-keyscan" in checked.stdout


async def test_restarted_sshd_is_survived(
    start_kernel: KernelFactory, remote_config: dict[str, Any], ssh_rig: SSHRig
) -> None:
    km = await start_kernel(remote_config, provisioner="nersc-cori")
    kc = await ready_client(km)
    try:
        await run_cell(kc, "kept = 41 + 1")
        conn = km.provisioner.connection  # type: ignore[union-attr]
        before = conn.reconnects
        with logged(f"@{ssh_rig.host}:{ssh_rig.port} failed") as reconnect_failed:
            stop_sshd(ssh_rig)
            # The host is unreachable for a while: a reconnect to it has failed.
            assert await asyncio.to_thread(reconnect_failed.wait, 30)
        assert not conn.connected
        start_sshd(ssh_rig)
        started = time.monotonic()
        assert await wait_until(lambda: conn.reconnects > before, 15)
        tries = await output_after_reconnect(kc, "print(kept)", "42")
        assert tries <= 3, f"{tries} tries"  # the first cell's output can be lost (IOPub)
        assert time.monotonic() - started < 15
        assert await km.is_alive()
    finally:
        kc.stop_channels()


async def test_lease_is_renewed_while_connected(
    start_kernel: KernelFactory, remote_config: dict[str, Any]
) -> None:
    """A connected kernel outlives its lease many times over, polled as the restarter does."""
    km = await start_kernel({**remote_config, "lease_timeout": 15}, provisioner="nersc-cori")
    kc = await ready_client(km)
    try:
        await run_cell(kc, "kept = 'alive'")
        pid = km.provisioner.remote.pid  # type: ignore[union-attr]
        for _ in range(14):  # 42 s: almost three lease periods
            assert await km.is_alive()
            # Time itself is what this test needs to pass (the lease is wall-clock), at
            # the pace of jupyter_client's restarter, which polls every 3 s.
            await asyncio.sleep(3)
        assert running(pid)
        assert km.provisioner.remote.pid == pid  # type: ignore[union-attr]
        result = await run_cell(kc, "print(kept)")
        assert result.stdout.strip() == "alive"
    finally:
        kc.stop_channels()


async def test_network_cut_for_five_seconds_is_survived(
    start_kernel: KernelFactory, remote_config: dict[str, Any], ssh_rig: SSHRig
) -> None:
    km = await start_kernel(remote_config, provisioner="nersc-cori")
    kc = await ready_client(km)
    link = ["ip", "link", "set", "npr-host"]  # the root-namespace end of the rig's veth
    try:
        await run_cell(kc, "kept = 'across the cut'")
        subprocess.run([*link, "down"], check=True)
        await asyncio.sleep(5)  # the fault itself: the cut lasts 5 s
        subprocess.run([*link, "up"], check=True)
        started = time.monotonic()
        result = await run_cell(kc, "print(kept)", timeout=30)
        assert result.stdout.strip() == "across the cut"
        assert time.monotonic() - started < 15
        assert await km.is_alive()
    finally:
        subprocess.run([*link, "up"], check=False)
        kc.stop_channels()
