"""The remote-side scripts, run for real by a local bash (no SSH needed).

The SSH tests run them on the rig's sshd; these check each script's own
behaviour closely: file modes, reports, PID checks, the watchdog's lease.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from jupyter_client.blocking.client import BlockingKernelClient

from nersc_provisioner.errors import ModuleLoadError, UnsafeValueError
from nersc_provisioner.launchers.remote import (
    PORT_NAMES,
    WATCHDOG,
    LaunchReport,
    RelayStart,
    RemoteLaunch,
    build_launch_script,
    kill_script,
)
from nersc_provisioner.launchers.wrapper import EnvironmentSetup
from nersc_provisioner.session import LocalEnd, RelaySettings, relay_program, tcp_opener
from nersc_provisioner.transports.agent import AGENT

KEY = "0123456789abcdef0123456789abcdef"


def run_bash(script: str, home: Path, timeout: float = 60) -> list[str]:
    result = subprocess.run(
        ["bash", "--noprofile", "--norc", "-s"],
        input=script,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "HOME": str(home)},
        check=False,
    )
    return (result.stdout + result.stderr).splitlines()


def launch(
    home: Path,
    kernel_id: str,
    setup: EnvironmentSetup | None = None,
    relay: RelayStart | None = None,
) -> LaunchReport:
    connection = {
        **dict.fromkeys(PORT_NAMES, 0),
        "ip": "127.0.0.1",
        "transport": "tcp",
        "signature_scheme": "hmac-sha256",
        "key": KEY,
    }
    script = build_launch_script(
        RemoteLaunch(
            kernel_id=kernel_id,
            argv=(sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"),
            connection=connection,
            setup=setup or EnvironmentSetup(),
            relay=relay,
        )
    )
    assert KEY in script  # it travels on stdin, which is the point
    report = LaunchReport()
    for line in run_bash(script, home):
        report.feed(line)
    return report


def test_launch_script_starts_a_kernel_and_reports(tmp_path: Path) -> None:
    report = launch(tmp_path, "k-1")
    try:
        assert report.done, report.other
        assert report.ready
        assert set(report.ports) == set(PORT_NAMES)
        assert all(port > 0 for port in report.ports.values())
        proc = psutil.Process(report.pid)
        assert os.getsid(report.pid) == report.pid  # a session of its own
        assert "ipykernel_launcher" in " ".join(proc.cmdline())
        kernel_dir = tmp_path / ".nersc_provisioner" / "kernels" / "k-1"
        assert kernel_dir.stat().st_mode & 0o777 == 0o700
        connection = kernel_dir / "connection.json"
        assert connection.stat().st_mode & 0o777 == 0o600
        assert json.loads(connection.read_text())["key"] == KEY
        assert json.loads(connection.read_text())["ip"] == "127.0.0.1"
    finally:
        lines = run_bash(kill_script(["k-1", "not-there"]), tmp_path)
    assert "NPR_KILLED k-1" in lines
    assert "NPR_MISSING not-there" in lines
    assert not psutil.pid_exists(report.pid) or psutil.Process(report.pid).status() == "zombie"
    assert not (tmp_path / ".nersc_provisioner" / "kernels" / "k-1").exists()


def test_failed_setup_is_reported_with_the_module_message(tmp_path: Path) -> None:
    setup = EnvironmentSetup.create(setup=["echo 'no such env' >&2; false"])
    report = launch(tmp_path, "k-2", setup)
    assert not report.done
    assert not report.ready
    assert report.died_code == 92
    error = report.error("host", ["python"])
    assert "no such env" in str(error)
    assert "setup line 1 failed" in str(error)
    assert not (tmp_path / ".nersc_provisioner" / "kernels" / "k-2").exists()
    broken = EnvironmentSetup.create(modules=["x"], module_init="/nonexistent")
    assert launch(tmp_path, "k-3", broken).died_code == 90
    assert isinstance(LaunchReport(died_code=91).error("h", []), ModuleLoadError)


@pytest.mark.parametrize("kernel_id", ["../x", "a b", "$(id)", "", "a;b"])
def test_unsafe_kernel_ids_are_refused(kernel_id: str) -> None:
    with pytest.raises(UnsafeValueError):
        build_launch_script(RemoteLaunch(kernel_id=kernel_id, argv=("python",), connection={}))


def test_watchdog_ends_a_kernel_whose_lease_expired(tmp_path: Path) -> None:
    kernel_dir = tmp_path / "k"
    kernel_dir.mkdir()
    lease = kernel_dir / "lease"
    lease.write_text("")
    kernel = subprocess.Popen(["sleep", "300"], start_new_session=True)
    (kernel_dir / "pid").write_text(f"{kernel.pid} 0\n")
    watchdog = subprocess.Popen(
        ["bash", "-c", WATCHDOG, "npr-watchdog", str(kernel_dir), str(kernel.pid), "2", "1"],
        start_new_session=True,
    )
    try:
        # Renewed: the kernel lives past the timeout.  Time itself is what must pass here
        # (the lease is wall-clock): 4 s, twice the 2 s timeout, renewed every second.
        for _ in range(4):
            time.sleep(1)
            lease.touch()
        assert kernel.poll() is None
        # Not renewed: it ends within timeout + interval (+ slack).
        started = time.monotonic()
        kernel.wait(timeout=10)
        assert time.monotonic() - started < 8
        watchdog.wait(timeout=10)
        assert not kernel_dir.exists()
        # A watchdog whose kernel was replaced (a restart under the same kernel id)
        # exits without touching the new kernel's directory.
        kernel_dir.mkdir()
        (kernel_dir / "pid").write_text("999999 0\n")
        old = subprocess.run(
            ["bash", "-c", WATCHDOG, "npr-watchdog", str(kernel_dir), str(kernel.pid), "2", "1"],
            timeout=10,
            check=False,
        )
        assert old.returncode == 0
        assert (kernel_dir / "pid").exists()
    finally:
        for proc in (kernel, watchdog):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_agent_verifies_pid_and_signals_the_group(tmp_path: Path) -> None:
    base = tmp_path / ".nersc_provisioner" / "kernels" / "kid"
    base.mkdir(parents=True)
    connection = base / "connection.json"
    connection.write_text("{}")
    # A stand-in for a kernel: its command line names its connection file, as a kernel's does.
    kernel = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(300)", str(connection)],
        start_new_session=True,
        text=True,
    )
    start = Path(f"/proc/{kernel.pid}/stat").read_text().split()[21]
    agent = subprocess.Popen(
        ["bash", "--noprofile", "--norc", "-c", AGENT, "npr-agent", "30"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "HOME": str(tmp_path)},
    )
    assert agent.stdin is not None
    assert agent.stdout is not None

    def ask(line: str) -> str:
        agent.stdin.write(line + "\n")  # type: ignore[union-attr]
        agent.stdin.flush()  # type: ignore[union-attr]
        while True:
            words = agent.stdout.readline().split()  # type: ignore[union-attr]
            if words[:2] == ["NPR", line.split()[1]]:
                return words[2]

    try:
        assert agent.stdout.readline().startswith("NPR 0 ready")
        assert ask(f"alive 1 {kernel.pid} {start} kid") == "alive"
        assert ask(f"alive 2 {kernel.pid} {int(start) + 1} kid") == "dead"  # a reused PID
        assert ask(f"alive 3 {kernel.pid} {start} other") == "dead"  # not that kernel
        assert ask(f"signal 4 TERM {kernel.pid} {int(start) + 1} kid") == "gone"
        assert kernel.poll() is None
        assert ask(f"signal 5 TERM {kernel.pid} {start} kid") == "ok"
        assert kernel.wait(timeout=5) == -15
        assert ask("cleanup 6 kid") == "ok"
        assert not base.exists()
        # A command name with ") " and digits in it must not shift the stat fields.
        base.mkdir(parents=True)
        connection.write_text("{}")
        odd = tmp_path / "k) 7 8 9"
        odd.symlink_to(sys.executable)
        kernel = subprocess.Popen(
            [str(odd), "-c", "import time; print('up', flush=True); time.sleep(300)",
             str(connection)],
            start_new_session=True,
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        assert kernel.stdout is not None
        assert kernel.stdout.readline() == "up\n"  # it runs: exec'd under its odd name
        stat = Path(f"/proc/{kernel.pid}/stat").read_text()
        assert "k) 7" in stat
        start = stat.rpartition(") ")[2].split()[19]
        assert ask(f"alive 7 {kernel.pid} {start} kid") == "alive"
        assert ask(f"alive 8 {kernel.pid} 7 kid") == "dead"
    finally:
        agent.kill()
        agent.communicate()
        if kernel.poll() is None:
            kernel.kill()
            kernel.wait()
        if kernel.stdout is not None:
            kernel.stdout.close()


def test_hostile_values_in_the_launch_script_are_carried_not_run(tmp_path: Path) -> None:
    canary = tmp_path / "pwned"
    value = f"$(touch {canary}) `touch {canary}`; touch {canary}\n'\" end"
    setup = EnvironmentSetup.create(env={"NPR_HOSTILE": value}, setup=["true"])
    report = launch(tmp_path, "k-h", setup)
    try:
        assert report.done, report.other
        environ = Path(f"/proc/{report.pid}/environ").read_bytes().split(b"\0")
        assert f"NPR_HOSTILE={value}".encode() in environ
        cmdline = Path(f"/proc/{report.pid}/cmdline").read_bytes()
        assert value.encode() not in cmdline
        assert not canary.exists()
    finally:
        run_bash(kill_script(["k-h"]), tmp_path)


# --- the session relay, started by the launch script ----------------------------------


def launch_with_relay(home: Path, kernel_id: str, python: str, secret: bytes) -> LaunchReport:
    kdir = f"~/.nersc_provisioner/kernels/{kernel_id}"
    relay = RelayStart(
        python=python,
        program=relay_program(f"{kdir}/relay.json"),
        settings=RelaySettings(
            connection_file=f"{kdir}/connection.json", secret=secret, pid_file=f"{kdir}/pid"
        ).to_json(),
    )
    return launch(home, kernel_id, relay=relay)


def test_the_launch_script_starts_the_relay_and_a_client_reaches_the_kernel_through_it(
    tmp_path: Path,
) -> None:
    """The relay starts beside the kernel, through the kernel's wrapper, and reports its
    port; its secret is on no command line and its settings file is gone; a client of
    the Jupyter side's sockets runs a cell through it."""
    secret = os.urandom(32)
    report = launch_with_relay(tmp_path, "k-relay", sys.executable, secret)
    folder = tmp_path / "ipc"
    folder.mkdir(mode=0o700)
    local = LocalEnd(tcp_opener("127.0.0.1", report.relay_port), secret, ipc_dir=str(folder))
    kc = BlockingKernelClient()
    try:
        assert report.done, report.other
        assert report.relay_failure == ""
        assert report.relay_port > 0
        kernel_dir = tmp_path / ".nersc_provisioner" / "kernels" / "k-relay"
        relay_pid = int((kernel_dir / "relay.pid").read_text())
        assert not (kernel_dir / "relay.json").exists()  # read, then removed
        relay = psutil.Process(relay_pid)
        for proc in [relay, *relay.children(recursive=True)]:
            assert secret.hex() not in " ".join(proc.cmdline())
        local.start()
        assert local.wait_connected(10)
        kc.load_connection_info(
            {**local.connection_info(), "key": KEY, "signature_scheme": "hmac-sha256"}  # type: ignore[arg-type]
        )
        kc.start_channels()
        kc.wait_for_ready(timeout=30)
        reply = kc.execute_interactive("print('through the relay', 6 * 7)", timeout=30)
        assert reply["content"]["status"] == "ok"
    finally:
        kc.stop_channels()
        local.stop()
        run_bash(kill_script(["k-relay"]), tmp_path)


def test_without_a_python_for_the_relay_the_launch_says_why_and_the_kernel_runs(
    tmp_path: Path,
) -> None:
    """A relay that cannot start (here: no such Python) does not fail the launch: the
    report says why, with the end of the relay's log, and the kernel is up."""
    report = launch_with_relay(tmp_path, "k-norelay", "/nonexistent/python", os.urandom(32))
    try:
        assert report.done, report.other
        assert report.relay_port == 0
        assert "/nonexistent/python" in report.relay_failure
        assert psutil.pid_exists(report.pid)
        kernel_dir = tmp_path / ".nersc_provisioner" / "kernels" / "k-norelay"
        assert not (kernel_dir / "relay.json").exists()  # its secret is not left behind
    finally:
        run_bash(kill_script(["k-norelay"]), tmp_path)
