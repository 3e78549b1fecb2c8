"""tests/rig.py itself: loading rig.json and skipping (or failing on CI) when a piece is down.

These need no running rig: they point NERSC_RIG_DIR at a temporary directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.rig import PIECES, JumpRig, Rig, SSHRig, require_rig, rig_dir


def write_rig_json(directory: Path, **entries: object) -> None:
    (directory / "rig.json").write_text(json.dumps(entries))


SSH_ENTRY = {
    "netns": "npr-remote",
    "host": "10.203.0.2",
    "port": 22,
    "user": "nerscuser",
    "identity_file": "/nonexistent/id_ed25519",
    "known_hosts": "/nonexistent/known_hosts",
    "ca_key": "/nonexistent/ca",
    "sshd_pidfile": "/nonexistent/sshd.pid",
    "sshd_config": "/nonexistent/sshd_config",
}

JUMP_ENTRY = {
    "netns": "npr-jump",
    "host": "10.203.1.2",
    "port": 22,
    "sshd_pidfile": "/nonexistent/jump-sshd.pid",
    "inner_netns": "npr-inner",
    "inner_host": "10.203.2.2",
    "inner_sshd_pidfile": "/nonexistent/inner-sshd.pid",
}


def test_rig_dir_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NERSC_RIG_DIR", str(tmp_path))
    assert rig_dir() == tmp_path
    monkeypatch.delenv("NERSC_RIG_DIR")
    assert rig_dir() == Path("/var/tmp/nersc-provisioner-rig")


def test_load_parses_entries(tmp_path: Path) -> None:
    write_rig_json(tmp_path, ssh=SSH_ENTRY, slurm={"conf": "/c", "partition": "p", "node": "n"})
    rig = Rig.load(tmp_path)
    assert rig.lmod is None
    assert rig.ssh == SSHRig(
        netns="npr-remote",
        host="10.203.0.2",
        port=22,
        user="nerscuser",
        identity_file=Path("/nonexistent/id_ed25519"),
        known_hosts=Path("/nonexistent/known_hosts"),
        ca_key=Path("/nonexistent/ca"),
        sshd_pidfile=Path("/nonexistent/sshd.pid"),
        sshd_config=Path("/nonexistent/sshd_config"),
    )
    assert rig.jump is None
    assert rig.slurm is not None
    assert rig.slurm.partition == "p"


def test_load_parses_remote_python_and_jump(tmp_path: Path) -> None:
    ssh = {**SSH_ENTRY, "remote_python": "/opt/nersc-rig-python/bin/python"}
    write_rig_json(tmp_path, ssh=ssh, jump=JUMP_ENTRY)
    rig = Rig.load(tmp_path)
    assert rig.ssh is not None
    assert rig.ssh.remote_python == "/opt/nersc-rig-python/bin/python"
    assert rig.jump == JumpRig(
        netns="npr-jump",
        host="10.203.1.2",
        port=22,
        sshd_pidfile=Path("/nonexistent/jump-sshd.pid"),
        inner_netns="npr-inner",
        inner_host="10.203.2.2",
        inner_sshd_pidfile=Path("/nonexistent/inner-sshd.pid"),
        user="nerscuser",  # these three come from the "ssh" entry
        identity_file=Path("/nonexistent/id_ed25519"),
        known_hosts=Path("/nonexistent/known_hosts"),
    )


def test_remote_python_is_empty_when_rig_json_predates_it(tmp_path: Path) -> None:
    write_rig_json(tmp_path, ssh=SSH_ENTRY)
    rig = Rig.load(tmp_path)
    assert rig.ssh is not None
    assert rig.ssh.remote_python == ""


def test_jump_without_ssh_entry_is_malformed(tmp_path: Path) -> None:
    write_rig_json(tmp_path, jump=JUMP_ENTRY)
    with pytest.raises(ValueError, match="malformed"):
        Rig.load(tmp_path)


def test_load_rejects_malformed_entry(tmp_path: Path) -> None:
    write_rig_json(tmp_path, ssh={"host": "10.203.0.2"})
    with pytest.raises(ValueError, match="malformed"):
        Rig.load(tmp_path)


@pytest.mark.parametrize("ci", ["", "true"])
@pytest.mark.parametrize(
    ("entries", "piece", "reason"),
    [
        (None, "ssh", "rig.json"),
        ({"slurm": {"conf": "/c", "partition": "p", "node": "n"}}, "ssh", "no 'ssh' entry"),
        ({"ssh": SSH_ENTRY}, "ssh", "sshd is not running"),
        ({"lmod": {"init": "/nonexistent/init", "modulepath": "/"}}, "lmod", "Lmod init"),
        ({"ssh": SSH_ENTRY}, "jump", "no 'jump' entry"),
        ({"ssh": SSH_ENTRY, "jump": JUMP_ENTRY}, "jump", "jump-sshd.pid"),
    ],
)
def test_unavailable_piece_skips_or_fails_on_ci(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    ci: str,
    entries: dict[str, object] | None,
    piece: str,
    reason: str,
) -> None:
    monkeypatch.setenv("NERSC_RIG_DIR", str(tmp_path))
    monkeypatch.setenv("CI", ci)
    if entries is not None:
        write_rig_json(tmp_path, **entries)
    expected = pytest.fail.Exception if ci == "true" else pytest.skip.Exception
    with pytest.raises(expected) as info:
        require_rig(piece)
    message = str(info.value)
    assert reason in message
    assert "scripts/test-rig up" in message


def test_pieces() -> None:
    assert PIECES == ("lmod", "ssh", "jump", "slurm", "compute-node")


def test_unknown_piece_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown rig piece"):
        require_rig("kubernetes")
