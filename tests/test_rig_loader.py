"""tests/rig.py itself: loading rig.json and skipping (or failing on CI) when a piece is down.

These need no running rig: they point NERSC_RIG_DIR at a temporary directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.rig import Rig, SSHRig, require_rig, rig_dir


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
    assert rig.slurm is not None
    assert rig.slurm.partition == "p"


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


def test_unknown_piece_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown rig piece"):
        require_rig("kubernetes")
