"""The test rig (scripts/test-rig) really provides what the other tests rely on."""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import paramiko
import pytest

from tests.kernels import poll_until
from tests.rig import JumpRig, LmodRig, SlurmRig, SSHRig, job_entries

pytestmark = pytest.mark.rig


# --- ssh: the "remote login node" in netns npr-remote -----------------------------


def open_client(
    host: str,
    port: int,
    user: str,
    key: Path,
    known_hosts: Path,
    sock: paramiko.Channel | None = None,
) -> paramiko.SSHClient:
    """Log in with ``key``, the host key pinned by ``known_hosts``; over ``sock`` if given."""
    client = paramiko.SSHClient()
    client.load_host_keys(str(known_hosts))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    try:
        client.connect(
            host,
            port=port,
            username=user,
            key_filename=str(key),
            look_for_keys=False,
            allow_agent=False,
            timeout=10,
            banner_timeout=10,
            auth_timeout=10,
            sock=sock,
        )
    except BaseException:
        client.close()
        raise
    return client


def connect(ssh: SSHRig, known_hosts: Path, key: Path | None = None) -> paramiko.SSHClient:
    return open_client(ssh.host, ssh.port, ssh.user, key or ssh.identity_file, known_hosts)


def run_remote(client: paramiko.SSHClient, command: str) -> str:
    _, stdout, stderr = client.exec_command(command, timeout=30)
    out = stdout.read().decode()
    status = stdout.channel.recv_exit_status()
    assert status == 0, f"{command!r} exited {status}: {stderr.read().decode()}"
    return out


def test_sshd_answers_inside_netns(ssh_rig: SSHRig) -> None:
    client = connect(ssh_rig, ssh_rig.known_hosts)
    with client:
        assert run_remote(client, "id -un").strip() == ssh_rig.user
        remote_addrs = run_remote(client, "hostname -I").split()
    assert ssh_rig.host in remote_addrs
    # It is a different network stack: the root namespace's addresses are not there.
    assert "10.203.0.1" not in remote_addrs


@pytest.fixture
def netns_listener(ssh_rig: SSHRig) -> Iterator[int]:
    """A TCP listener on 127.0.0.1:<port> inside the netns; yields the port."""
    with socket.socket() as probe:  # a port that is free in the root namespace
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    code = (
        "import socket, sys, time\n"
        "s = socket.socket(); s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen()\n"
        "print('ready', flush=True); time.sleep(60)\n"
    )
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ssh_rig.netns, sys.executable, "-c", code, str(port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready", "listener in the netns did not start"
        yield port
    finally:
        proc.kill()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


def test_netns_loopback_is_not_reachable_from_root_ns(ssh_rig: SSHRig, netns_listener: int) -> None:
    port = netns_listener
    inside = subprocess.run(
        ["ip", "netns", "exec", ssh_rig.netns, sys.executable, "-c",
         f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=5).close()"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert inside.returncode == 0, f"listener not reachable inside the netns: {inside.stderr}"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def make_key(directory: Path, name: str) -> Path:
    key = directory / name
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(key)],
        check=True,
        timeout=30,
    )
    return key


def test_unknown_host_key_is_rejected(ssh_rig: SSHRig, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with pytest.raises(paramiko.SSHException, match="not found in known_hosts"):
        connect(ssh_rig, empty)


def test_wrong_pinned_host_key_is_rejected(ssh_rig: SSHRig, tmp_path: Path) -> None:
    other = make_key(tmp_path, "other_host_key")
    pinned = tmp_path / "known_hosts"
    pubkey = " ".join(other.with_suffix(".pub").read_text().split()[:2])
    pinned.write_text(f"{ssh_rig.host} {pubkey}\n")
    with pytest.raises(paramiko.BadHostKeyException):
        connect(ssh_rig, pinned)


def test_user_certificate_signed_by_rig_ca_is_accepted(ssh_rig: SSHRig, tmp_path: Path) -> None:
    key = make_key(tmp_path, "id_cert_user")
    # Not in authorized_keys: the bare key is refused ...
    with pytest.raises(paramiko.AuthenticationException):
        connect(ssh_rig, ssh_rig.known_hosts, key=key)
    # ... and accepted once the rig's CA signs a short-lived certificate for it.
    subprocess.run(
        ["ssh-keygen", "-q", "-s", str(ssh_rig.ca_key), "-I", f"rig-test-{uuid.uuid4().hex}",
         "-n", ssh_rig.user, "-V", "-1m:+5m", str(key.with_suffix(".pub"))],
        check=True, timeout=30,
    )  # fmt: skip
    assert (tmp_path / "id_cert_user-cert.pub").is_file()
    with connect(ssh_rig, ssh_rig.known_hosts, key=key) as client:
        assert run_remote(client, "id -un").strip() == ssh_rig.user


# --- what the remote user runs: the rig python and the repo's modulefiles --------------


def remote_python_checks(client: paramiko.SSHClient, python: str) -> str:
    """Run ipykernel's launcher with the remote python; return ipykernel's version."""
    q = shlex.quote(python)
    help_text = run_remote(client, f"{q} -m ipykernel_launcher --help")
    assert "IPKernelApp.connection_file" in help_text, help_text[:500]
    version = run_remote(client, f"{q} -c 'import ipykernel; print(ipykernel.__version__)'")
    return version.strip()


def remote_module_load(client: paramiko.SSHClient, lmod: LmodRig, module: str) -> str:
    init, modulepath = shlex.quote(str(lmod.init)), shlex.quote(str(lmod.modulepath))
    return run_remote(
        client,
        f". {init}; module use {modulepath}; module load {shlex.quote(module)} || exit $?; "
        'echo "$NERSC_TEST_MODULE"',
    ).strip()


def test_remote_python_has_ipykernel(ssh_rig: SSHRig) -> None:
    assert ssh_rig.remote_python, "rig.json has no ssh.remote_python"
    with connect(ssh_rig, ssh_rig.known_hosts) as client:
        assert run_remote(client, "id -un").strip() == ssh_rig.user
        version = remote_python_checks(client, ssh_rig.remote_python)
    assert re.fullmatch(r"[0-9]+\.[0-9]+.*", version), version


def test_module_load_works_remotely(ssh_rig: SSHRig, lmod_rig: LmodRig) -> None:
    with connect(ssh_rig, ssh_rig.known_hosts) as client:
        assert remote_module_load(client, lmod_rig, "nersc-test/1.0") == "nersc-test-1.0"


# --- jump: npr-jump reachable from here, npr-inner only through it ------------------


def test_inner_host_is_not_reachable_from_root_ns(jump_rig: JumpRig) -> None:
    # The rig routes 10.203.0.0/16 "unreachable" in the root namespace (so that no packet for
    # it leaves the machine): expect "No route to host" at once, or at worst a timeout.
    started = time.monotonic()
    with pytest.raises(OSError) as info:  # noqa: PT011 - refused, unreachable or timed out
        socket.create_connection((jump_rig.inner_host, 22), timeout=2).close()
    assert time.monotonic() - started < 5, info.value
    # ... while from the jump host's namespace it answers.
    code = f"import socket; socket.create_connection(({jump_rig.inner_host!r}, 22), timeout=5)"
    inside = subprocess.run(
        ["ip", "netns", "exec", jump_rig.netns, sys.executable, "-c", code],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert inside.returncode == 0, f"inner sshd unreachable from {jump_rig.netns}: {inside.stderr}"


def test_ssh_proxyjump_reaches_inner_host(jump_rig: JumpRig, tmp_path: Path) -> None:
    # ssh passes -F, but not -i or -o, on to the ProxyJump hop: it reads these from the file.
    config = tmp_path / "ssh_config"
    config.write_text(
        "Host *\n"
        f"  IdentityFile {jump_rig.identity_file}\n"
        "  IdentitiesOnly yes\n"
        f"  UserKnownHostsFile {jump_rig.known_hosts}\n"
        "  GlobalKnownHostsFile /dev/null\n"
        "  StrictHostKeyChecking yes\n"
        "  BatchMode yes\n"
        "  ConnectTimeout 10\n"
    )
    result = subprocess.run(
        ["ssh", "-F", str(config), "-i", str(jump_rig.identity_file),
         "-o", f"UserKnownHostsFile={jump_rig.known_hosts}",
         "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes",
         "-J", f"{jump_rig.user}@{jump_rig.host}", f"{jump_rig.user}@{jump_rig.inner_host}",
         "hostname", "-I"],
        capture_output=True, text=True, timeout=60, check=False, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert jump_rig.inner_host in result.stdout.split()


def test_inner_host_has_remote_python_and_modules(
    jump_rig: JumpRig, ssh_rig: SSHRig, lmod_rig: LmodRig
) -> None:
    """Through the jump host with paramiko (direct-tcpip), as a ProxyJump transport would."""
    assert ssh_rig.remote_python, "rig.json has no ssh.remote_python"
    key, known = jump_rig.identity_file, jump_rig.known_hosts
    with open_client(jump_rig.host, jump_rig.port, jump_rig.user, key, known) as jump:
        transport = jump.get_transport()
        assert transport is not None
        channel = transport.open_channel(
            "direct-tcpip", (jump_rig.inner_host, 22), ("127.0.0.1", 0), timeout=10
        )
        with open_client(jump_rig.inner_host, 22, jump_rig.user, key, known, channel) as inner:
            assert jump_rig.inner_host in run_remote(inner, "hostname -I").split()
            version = remote_python_checks(inner, ssh_rig.remote_python)
            assert re.fullmatch(r"[0-9]+\.[0-9]+.*", version), version
            assert remote_module_load(inner, lmod_rig, "nersc-test/1.0") == "nersc-test-1.0"


# --- slurm ----------------------------------------------------------------------


def run(cmd: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def test_sbatch_job_runs_and_sees_its_job_id(slurm_rig: SlurmRig, tmp_path: Path) -> None:
    out = tmp_path / "job_id.txt"
    result = run(
        ["sbatch", "--wait", "--parsable", "-p", slurm_rig.partition, "-N1", "-t", "2",
         "-o", str(tmp_path / "slurm-%j.out"), "--wrap", f'echo "$SLURM_JOB_ID" > {out}'],
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    submitted = result.stdout.strip().split(";")[0]
    written = out.read_text().strip()
    assert re.fullmatch(r"[0-9]+", written), written
    assert written == submitted


def test_srun_runs_on_the_rig_node(slurm_rig: SlurmRig) -> None:
    result = run(["srun", "-p", slurm_rig.partition, "-N1", "-t", "1", "hostname"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == slurm_rig.node


def test_salloc_no_shell_then_scancel_leaves_queue_empty(slurm_rig: SlurmRig) -> None:
    name = f"npr-rig-{uuid.uuid4().hex[:8]}"
    result = run(["salloc", "--no-shell", "-p", slurm_rig.partition, "-N1", "-t", "5", "-J", name])
    assert result.returncode == 0, result.stderr
    match = re.search(r"Granted job allocation (\d+)", result.stderr)
    assert match, result.stderr
    job_id = match.group(1)
    try:
        assert [e.name for e in job_entries(job_id) if not e.is_step] == [name]
    finally:
        assert run(["scancel", job_id], timeout=30).returncode == 0
    assert poll_until(lambda: not job_entries(job_id), 20, step=0.5), job_entries(job_id)


# --- lmod -------------------------------------------------------------------------


def module_load(lmod: LmodRig, module: str) -> subprocess.CompletedProcess[str]:
    """`module load MODULE` in a clean bash; prints the test variables on success."""
    script = (
        '. "$1"; module use "$2"; module load "$3" || exit $?; '
        'printf "%s\\n%s\\n" "$NERSC_TEST_MODULE" "$NERSC_TEST_PATH"'
    )
    env = {k: os.environ[k] for k in ("PATH", "HOME", "USER", "LANG") if k in os.environ}
    return subprocess.run(
        ["bash", "--noprofile", "--norc", "-c", script, "_",
         str(lmod.init), str(lmod.modulepath), module],
        capture_output=True, text=True, timeout=60, env=env, check=False,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("module", "value", "path"),
    [
        ("nersc-test/1.0", "nersc-test-1.0", "/opt/nersc-test"),
        ("nersc-test/2.0", "nersc-test-2.0", "/opt/nersc-test-2.0"),
    ],
)
def test_module_load_sets_variables(lmod_rig: LmodRig, module: str, value: str, path: str) -> None:
    result = module_load(lmod_rig, module)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [value, path]


def test_broken_module_fails_with_its_message(lmod_rig: LmodRig) -> None:
    result = module_load(lmod_rig, "broken/1.0")
    assert result.returncode != 0
    assert result.stdout == ""
    # Lmod wraps its messages at the terminal width: compare with whitespace normalized.
    stderr = " ".join(result.stderr.split())
    assert "broken/1.0: this modulefile fails on purpose (test rig)" in stderr


def test_unknown_module_fails(lmod_rig: LmodRig) -> None:
    result = module_load(lmod_rig, "no-such-module")
    assert result.returncode != 0
    assert result.stdout == ""
    stderr = " ".join(result.stderr.split())
    assert 'The following module(s) are unknown: "no-such-module"' in stderr
