"""Resolving a host through an ssh config file (paramiko's parser): pure parsing units."""

from __future__ import annotations

import os
from pathlib import Path

from nersc_provisioner.transports.ssh import resolve_target

CONFIG = """\
Host pm
  HostName perlmutter.nersc.gov
  User alice
  Port 2222
  IdentityFile ~/.ssh/nersc
  ProxyJump bastion1,carol@bastion2:2200
Host bastion1
  HostName b1.example.org
  User bob
Host viacmd
  HostName inner.example.org
  ProxyCommand nc -X connect %h %p
"""


def test_alias_with_multi_hop_proxyjump(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.write_text(CONFIG)
    target = resolve_target("pm", ssh_config=str(config))
    assert (target.hostname, target.user, target.port) == ("perlmutter.nersc.gov", "alice", 2222)
    assert target.identity_files == (os.path.expanduser("~/.ssh/nersc"),)
    assert [(j.hostname, j.user, j.port) for j in target.jumps] == [
        ("b1.example.org", "bob", 22),
        ("bastion2", "carol", 2200),
    ]
    assert target.known_hosts_name == "[perlmutter.nersc.gov]:2222"


def test_explicit_settings_win_and_fallback_key_is_last(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.write_text(CONFIG)
    target = resolve_target(
        "pm", user="dave", port=22, identity_file="/k", ssh_config=str(config),
        fallback_identity_file="/fallback",
    )  # fmt: skip
    assert (target.user, target.port, target.identity_files) == ("dave", 22, ("/k",))
    plain = resolve_target("elsewhere", ssh_config=str(config), fallback_identity_file="/fb")
    assert plain.identity_files == ("/fb",)
    assert plain.jumps == ()


def test_proxycommand_tokens_are_expanded(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.write_text(CONFIG)
    target = resolve_target("viacmd", ssh_config=str(config))
    assert target.proxy_command == "nc -X connect inner.example.org 22"


def test_missing_config_file_is_no_config(tmp_path: Path) -> None:
    target = resolve_target("host.example.org", user="u", ssh_config=str(tmp_path / "none"))
    assert (target.hostname, target.user, target.port) == ("host.example.org", "u", 22)
