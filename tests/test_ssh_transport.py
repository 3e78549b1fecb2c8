"""The SSH transport against the rig's real sshd in its network namespace."""

from __future__ import annotations

import base64
import re
import socket
import subprocess
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
from tests.kernels import poll_until
from tests.rig import SSHRig

pytestmark = pytest.mark.rig


def target_for(ssh_rig: SSHRig, **changes: object) -> SSHTarget:
    fields: dict[str, object] = {
        "alias": "rig",
        "hostname": ssh_rig.host,
        "port": ssh_rig.port,
        "user": ssh_rig.user,
        "identity_files": (str(ssh_rig.identity_file),),
        "known_hosts": (str(ssh_rig.known_hosts),),
    }
    fields.update(changes)
    return SSHTarget(**fields)  # type: ignore[arg-type]


def run(client: paramiko.SSHClient, command: str) -> str:
    _, stdout, _ = client.exec_command(command, timeout=20)
    return str(stdout.read().decode())


def sshd_log_lines(ssh_rig: SSHRig) -> list[str]:
    return (ssh_rig.sshd_pidfile.parent / "sshd.log").read_text().splitlines()


def wait_for_log(ssh_rig: SSHRig, start: int, text: str, timeout: float = 5.0) -> list[str]:
    """The sshd log lines after ``start``, once one containing ``text`` has appeared."""
    poll_until(lambda: any(text in line for line in sshd_log_lines(ssh_rig)[start:]), timeout, 0.1)
    return sshd_log_lines(ssh_rig)[start:]


#: sshd's (LogLevel VERBOSE) first and last line about a connection, with its client port.
OPENED = re.compile(r"^Connection from \S+ port (\d+) ")
CLOSED = re.compile(
    r"(?:Connection closed by|Closing connection to|Disconnected from)\b.* port (\d+)"
)


def connections_ended(lines: list[str]) -> bool:
    """True if ``lines`` show a connection, and the end of every connection they show."""
    opened = {m[1] for line in lines if (m := OPENED.match(line))}
    closed = {m[1] for line in lines if (m := CLOSED.search(line))}
    return bool(opened) and opened <= closed


def rig_host_fingerprint(ssh_rig: SSHRig) -> str:
    host_key = ssh_rig.sshd_pidfile.parent / "ssh_host_ed25519_key.pub"
    key_type, blob = host_key.read_text().split()[:2]
    return fingerprint(paramiko.PKey.from_type_string(key_type, base64.b64decode(blob)))


def test_connects_into_the_namespace(ssh_rig: SSHRig) -> None:
    login = connect(target_for(ssh_rig))
    try:
        assert ssh_rig.host in run(login.client, "hostname -I").split()
        assert run(login.client, "id -un").strip() == ssh_rig.user
        # AES-GCM is preferred (no per-packet HMAC in Python); the socket has no Nagle delay.
        transport = login.client.get_transport()
        assert transport is not None
        assert transport.local_cipher == transport.remote_cipher == "aes128-gcm@openssh.com"
        sock = transport.sock
        assert isinstance(sock, socket.socket)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        login.close()


def test_ssh_config_is_honoured(ssh_rig: SSHRig, tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.write_text(
        f"Host login-alias\n  HostName {ssh_rig.host}\n  User {ssh_rig.user}\n"
        f"  Port {ssh_rig.port}\n"
        f"  IdentityFile {ssh_rig.identity_file}\n  UserKnownHostsFile {ssh_rig.known_hosts}\n"
    )
    target = resolve_target("login-alias", ssh_config=str(config))
    assert (target.hostname, target.user, target.port) == (ssh_rig.host, ssh_rig.user, ssh_rig.port)
    assert target.identity_files == (str(ssh_rig.identity_file),)
    connect(target).close()


def test_unknown_host_key_is_refused_with_fingerprint(ssh_rig: SSHRig, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with pytest.raises(UnknownHostKeyError) as info:
        connect(target_for(ssh_rig, known_hosts=(str(empty),)))
    text = str(info.value)
    assert rig_host_fingerprint(ssh_rig) in text
    assert "ssh-keyscan" in text
    assert empty.read_text() == ""  # nothing was added


def test_changed_host_key_is_refused(ssh_rig: SSHRig, tmp_path: Path) -> None:
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    known = tmp_path / "known_hosts"
    known.write_text(f"{ssh_rig.host} {' '.join(Path(f'{other}.pub').read_text().split()[:2])}\n")
    with pytest.raises(ChangedHostKeyError) as info:
        connect(target_for(ssh_rig, known_hosts=(str(known),)))
    assert "CHANGED" in str(info.value)
    assert rig_host_fingerprint(ssh_rig) in str(info.value)
    assert f"ssh-keygen -f {known} -R" in str(info.value)


def test_wrong_key_fails_once(ssh_rig: SSHRig, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(wrong)], check=True)
    before = len(sshd_log_lines(ssh_rig))
    with pytest.raises(AuthenticationError) as info:
        connect(target_for(ssh_rig, identity_files=(str(wrong),), user="nerscuser"))
    assert "sshproxy.sh" in str(info.value)
    assert "Not retried" in str(info.value)
    new = wait_for_log(ssh_rig, before, "Connection closed by authenticating user")
    # One connection, one key offered, one refusal: no retry (sshd LogLevel VERBOSE).
    assert len([line for line in new if "closed by authenticating user" in line]) == 1, new
    assert len([line for line in new if line.startswith("Failed publickey")]) == 1, new


def test_wrong_user_fails(ssh_rig: SSHRig) -> None:
    with pytest.raises(AuthenticationError, match="no-such-user@"):
        connect(target_for(ssh_rig, user="no-such-user"))


def test_unreachable_host_is_a_connect_error(ssh_rig: SSHRig) -> None:
    with pytest.raises(SSHConnectError, match="cannot connect"):
        connect(target_for(ssh_rig, hostname="10.203.0.99", port=22))


def sign(ssh_rig: SSHRig, key: Path, validity: str) -> Path:
    subprocess.run(
        ["ssh-keygen", "-q", "-s", str(ssh_rig.ca_key), "-I", "test", "-n", ssh_rig.user,
         "-V", validity, f"{key}.pub"],
        check=True,
    )  # fmt: skip
    return Path(f"{key}-cert.pub")


def fresh_key(ssh_rig: SSHRig, tmp_path: Path) -> Path:
    """A key sshd knows only through the rig CA: not in authorized_keys."""
    key = tmp_path / "nersc"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return key


def test_valid_certificate_logs_in(ssh_rig: SSHRig, tmp_path: Path) -> None:
    key = fresh_key(ssh_rig, tmp_path)
    cert = sign(ssh_rig, key, "-5m:+1h")
    validity = certificate_validity(str(cert))
    assert validity.valid_after < datetime.now(timezone.utc) < validity.valid_before
    connect(target_for(ssh_rig, identity_files=(str(key),))).close()


def test_expired_certificate_is_reported_before_login(ssh_rig: SSHRig, tmp_path: Path) -> None:
    key = fresh_key(ssh_rig, tmp_path)
    sign(ssh_rig, key, "-2h:-1h")
    before = len(sshd_log_lines(ssh_rig))
    with pytest.raises(CertificateExpiredError) as info:
        connect(target_for(ssh_rig, identity_files=(str(key),)))
    text = str(info.value)
    assert "nersc-cert.pub" in text
    assert "sshproxy.sh" in text
    # The certificate is read once the TCP connection is made, before any key is offered.
    # sshd has logged the end of that connection: nothing more can come of it.
    assert poll_until(lambda: connections_ended(sshd_log_lines(ssh_rig)[before:]), 10, 0.1)
    attempts = [line for line in sshd_log_lines(ssh_rig)[before:] if "publickey" in line]
    assert attempts == []  # no login was attempted


def test_proxy_command_is_used(ssh_rig: SSHRig, tmp_path: Path) -> None:
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
    command = f"sh -c 'touch {marker}; exec python3 {relay} {ssh_rig.host} {ssh_rig.port}'"
    login = connect(target_for(ssh_rig, proxy_command=command))
    try:
        assert run(login.client, "id -un").strip() == ssh_rig.user
    finally:
        login.close()
    assert marker.exists()


def test_no_key_at_all_is_named(
    ssh_rig: SSHRig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    with pytest.raises(AuthenticationError, match="no key to offer") as info:
        connect(target_for(ssh_rig, identity_files=(str(tmp_path / "missing"),)))
    assert "sshproxy.sh" in str(info.value)


def test_many_commands_at_once_share_one_connection(ssh_rig: SSHRig) -> None:
    """40 commands at once on one connection all run, once each: more sessions than
    sshd's MaxSessions are queued by us, and a refused session (sshd frees a slot a
    moment late) is retried, since nothing ran."""
    from concurrent.futures import ThreadPoolExecutor

    from nersc_provisioner.transports.connection import SSHConnection

    conn = SSHConnection(target_for(ssh_rig))
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
