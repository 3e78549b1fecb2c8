"""The SSH transport against the rig's real sshd in its network namespace."""

from __future__ import annotations

import base64
import socket
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import paramiko
import pytest

from nersc_provisioner.errors import (
    AuthenticationError,
    CertificateExpiredError,
    ChangedHostKeyError,
    SSHConnectError,
    UnknownHostKeyError,
)
from nersc_provisioner.transports.ssh import (
    SSHTarget,
    certificate_validity,
    connect,
    fingerprint,
    resolve_target,
)
from tests.rig import SSHRig, require_ssh

pytestmark = pytest.mark.rig


@pytest.fixture
def rig() -> SSHRig:
    return require_ssh()


def target_for(rig: SSHRig, **changes: object) -> SSHTarget:
    fields: dict[str, object] = {
        "alias": "rig",
        "hostname": rig.host,
        "port": rig.port,
        "user": rig.user,
        "identity_files": (str(rig.identity_file),),
        "known_hosts": (str(rig.known_hosts),),
    }
    fields.update(changes)
    return SSHTarget(**fields)  # type: ignore[arg-type]


def run(client: paramiko.SSHClient, command: str) -> str:
    _, stdout, _ = client.exec_command(command, timeout=20)
    return str(stdout.read().decode())


def sshd_log_lines(rig: SSHRig) -> list[str]:
    return (rig.sshd_pidfile.parent / "sshd.log").read_text().splitlines()


def wait_for_log(rig: SSHRig, start: int, text: str, timeout: float = 5.0) -> list[str]:
    """The sshd log lines after ``start``, once one containing ``text`` has appeared."""
    deadline = time.monotonic() + timeout
    while True:
        lines = sshd_log_lines(rig)[start:]
        if any(text in line for line in lines) or time.monotonic() > deadline:
            return lines
        time.sleep(0.1)


def rig_host_fingerprint(rig: SSHRig) -> str:
    host_key = rig.sshd_pidfile.parent / "ssh_host_ed25519_key.pub"
    key_type, blob = host_key.read_text().split()[:2]
    return fingerprint(paramiko.PKey.from_type_string(key_type, base64.b64decode(blob)))


def test_connects_into_the_namespace(rig: SSHRig) -> None:
    login = connect(target_for(rig))
    try:
        assert rig.host in run(login.client, "hostname -I").split()
        assert run(login.client, "id -un").strip() == rig.user
        # AES-GCM is preferred (no per-packet HMAC in Python); the socket has no Nagle delay.
        transport = login.client.get_transport()
        assert transport is not None
        assert transport.local_cipher == transport.remote_cipher == "aes128-gcm@openssh.com"
        sock = transport.sock
        assert isinstance(sock, socket.socket)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        login.close()


def test_ssh_config_is_honoured(rig: SSHRig, tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.write_text(
        f"Host login-alias\n  HostName {rig.host}\n  User {rig.user}\n  Port {rig.port}\n"
        f"  IdentityFile {rig.identity_file}\n  UserKnownHostsFile {rig.known_hosts}\n"
    )
    target = resolve_target("login-alias", ssh_config=str(config))
    assert (target.hostname, target.user, target.port) == (rig.host, rig.user, rig.port)
    assert target.identity_files == (str(rig.identity_file),)
    connect(target).close()


def test_unknown_host_key_is_refused_with_fingerprint(rig: SSHRig, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with pytest.raises(UnknownHostKeyError) as info:
        connect(target_for(rig, known_hosts=(str(empty),)))
    text = str(info.value)
    assert rig_host_fingerprint(rig) in text
    assert "ssh-keyscan" in text
    assert empty.read_text() == ""  # nothing was added


def test_changed_host_key_is_refused(rig: SSHRig, tmp_path: Path) -> None:
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    known = tmp_path / "known_hosts"
    known.write_text(f"{rig.host} {' '.join(Path(f'{other}.pub').read_text().split()[:2])}\n")
    with pytest.raises(ChangedHostKeyError) as info:
        connect(target_for(rig, known_hosts=(str(known),)))
    assert "CHANGED" in str(info.value)
    assert rig_host_fingerprint(rig) in str(info.value)
    assert f"ssh-keygen -f {known} -R" in str(info.value)


def test_wrong_key_fails_once(rig: SSHRig, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(wrong)], check=True)
    before = len(sshd_log_lines(rig))
    with pytest.raises(AuthenticationError) as info:
        connect(target_for(rig, identity_files=(str(wrong),), user="nerscuser"))
    assert "sshproxy.sh" in str(info.value)
    assert "Not retried" in str(info.value)
    new = wait_for_log(rig, before, "Connection closed by authenticating user")
    # One connection, one key offered, one refusal: no retry (sshd LogLevel VERBOSE).
    assert len([line for line in new if "closed by authenticating user" in line]) == 1, new
    assert len([line for line in new if line.startswith("Failed publickey")]) == 1, new


def test_wrong_user_fails(rig: SSHRig) -> None:
    with pytest.raises(AuthenticationError, match="no-such-user@"):
        connect(target_for(rig, user="no-such-user"))


def test_unreachable_host_is_a_connect_error(rig: SSHRig) -> None:
    with pytest.raises(SSHConnectError, match="cannot connect"):
        connect(target_for(rig, hostname="10.203.0.99", port=22))


def sign(rig: SSHRig, key: Path, validity: str) -> Path:
    subprocess.run(
        ["ssh-keygen", "-q", "-s", str(rig.ca_key), "-I", "test", "-n", rig.user,
         "-V", validity, f"{key}.pub"],
        check=True,
    )  # fmt: skip
    return Path(f"{key}-cert.pub")


def fresh_key(rig: SSHRig, tmp_path: Path) -> Path:
    """A key sshd knows only through the rig CA: not in authorized_keys."""
    key = tmp_path / "nersc"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return key


def test_valid_certificate_logs_in(rig: SSHRig, tmp_path: Path) -> None:
    key = fresh_key(rig, tmp_path)
    cert = sign(rig, key, "-5m:+1h")
    validity = certificate_validity(str(cert))
    assert validity.valid_after < datetime.now(timezone.utc) < validity.valid_before
    connect(target_for(rig, identity_files=(str(key),))).close()


def test_expired_certificate_is_reported_before_login(rig: SSHRig, tmp_path: Path) -> None:
    key = fresh_key(rig, tmp_path)
    sign(rig, key, "-2h:-1h")
    before = len(sshd_log_lines(rig))
    with pytest.raises(CertificateExpiredError) as info:
        connect(target_for(rig, identity_files=(str(key),)))
    text = str(info.value)
    assert "nersc-cert.pub" in text
    assert "sshproxy.sh" in text
    time.sleep(0.5)
    attempts = [line for line in sshd_log_lines(rig)[before:] if "publickey" in line]
    assert attempts == []  # no login was attempted


def test_proxy_command_is_used(rig: SSHRig, tmp_path: Path) -> None:
    relay = tmp_path / "relay.py"
    relay.write_text(
        "import socket, sys, threading\n"
        "s = socket.create_connection((sys.argv[1], int(sys.argv[2])))\n"
        "def up():\n"
        "    while (d := sys.stdin.buffer.read1(65536)):\n"
        "        s.sendall(d)\n"
        "threading.Thread(target=up, daemon=True).start()\n"
        "while (d := s.recv(65536)):\n"
        "    sys.stdout.buffer.write(d); sys.stdout.buffer.flush()\n"
    )
    marker = tmp_path / "used"
    command = f"sh -c 'touch {marker}; exec python3 {relay} {rig.host} {rig.port}'"
    login = connect(target_for(rig, proxy_command=command))
    try:
        assert run(login.client, "id -un").strip() == rig.user
    finally:
        login.close()
    assert marker.exists()


def test_no_key_at_all_is_named(
    rig: SSHRig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    with pytest.raises(AuthenticationError, match="no key to offer") as info:
        connect(target_for(rig, identity_files=(str(tmp_path / "missing"),)))
    assert "sshproxy.sh" in str(info.value)


def test_many_commands_at_once_share_one_connection(rig: SSHRig) -> None:
    """40 commands at once on one connection all run, once each: more sessions than
    sshd's MaxSessions are queued by us, and a refused session (sshd frees a slot a
    moment late) is retried, since nothing ran."""
    from concurrent.futures import ThreadPoolExecutor

    from nersc_provisioner.transports.connection import SSHConnection

    conn = SSHConnection(target_for(rig))
    conn.open()
    try:
        with ThreadPoolExecutor(max_workers=40) as pool:
            results = list(
                pool.map(
                    lambda n: conn.run_script(f"echo ran-{n}", timeout=30),
                    range(40),
                )
            )
    finally:
        conn.close()
    assert [code for code, _ in results] == [0] * 40
    assert [lines for _, lines in results] == [[f"ran-{n}"] for n in range(40)]
