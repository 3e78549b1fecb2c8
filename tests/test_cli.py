"""The install CLI, the reference kernel specs in entry_points/, and provisioner discovery."""

from __future__ import annotations

import errno
import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.provisioning import KernelProvisionerFactory

from nersc_provisioner import (
    PROVISIONERS,
    ConfigError,
    KernelSpecError,
    UnsafeValueError,
    build_kernel_spec,
    install_kernel_spec,
)
from nersc_provisioner.cli import main
from tests.commands import run_cli
from tests.rig import LmodRig

REPO = Path(__file__).resolve().parent.parent
ENTRY_POINTS = sorted(p for p in (REPO / "entry_points").iterdir() if p.is_dir())


def test_jupyter_lists_our_provisioner() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "jupyter", "kernelspec", "provisioners"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "nersc-local" in out
    assert "nersc_provisioner.provisioners.local:NERSCLocalProvisioner" in out


def test_help_explains_itself() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for word in ("install", "list", "show", "remove", "kernel-helper.sh", "examples:"):
        assert word in result.stdout
    install_help = run_cli("install", "--help").stdout
    flags = "--name --user --prefix --sys-prefix --env --module --purge --setup --container"
    for flag in [*flags.split(), "--provisioner", "--python", "--kernel-argv"]:
        assert flag in install_help


def test_install_list_show_remove_round_trip(jupyter_dirs: Path) -> None:
    result = run_cli(
        "install", "--user", "--name", "round-trip", "--setup", "export A=1",
        "--env", "MY_VAR", "my value", "--no-check", "--module", "python",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    folder = jupyter_dirs / "kernels" / "round-trip"
    spec = json.loads((folder / "kernel.json").read_text())
    assert set(spec) == {"argv", "display_name", "language", "env", "metadata"}
    assert spec["env"] == {"MY_VAR": "my value"}
    assert spec["metadata"]["kernel_provisioner"] == {
        "provisioner_name": "nersc-local",
        "config": {"modules": ["python"], "setup": ["export A=1"]},
    }

    listed = json.loads(run_cli("list", "--json").stdout)
    assert listed["round-trip"]["config"] == {"modules": ["python"], "setup": ["export A=1"]}
    assert "round-trip  (nersc-local)" in run_cli("list").stdout

    shown = run_cli("show", "round-trip")
    assert shown.returncode == 0, shown.stderr
    assert "module load python || npr_fail 91" in shown.stdout
    assert "eval 'export A=1'" in shown.stdout
    assert "MY_VAR=my value" in shown.stdout
    assert "-m ipykernel_launcher -f '{connection_file}'" in shown.stdout

    removed = run_cli("remove", "round-trip")
    assert removed.returncode == 0, removed.stderr
    assert not folder.exists()
    assert "round-trip" not in run_cli("list").stdout
    gone = run_cli("show", "round-trip")
    assert gone.returncode == 1
    assert "no kernel spec named 'round-trip'" in gone.stderr


def test_install_rejects_unknown_module(jupyter_dirs: Path, lmod_rig: LmodRig) -> None:
    lmod = lmod_rig
    result = run_cli(
        "install", "--user", "--name", "bad", "--module-use", str(lmod.modulepath),
        "--module", "nersc-test/1.0", "--module", "no-such-module",
    )  # fmt: skip
    assert result.returncode == 1
    assert "unknown module(s): no-such-module" in result.stderr
    assert "nersc-test" not in result.stderr.split("What to do")[0].replace("no-such", "")
    assert not (jupyter_dirs / "kernels" / "bad").exists()
    ok = run_cli(
        "install", "--user", "--name", "good", "--module-use", str(lmod.modulepath),
        "--module", "nersc-test/1.0",
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr


def test_permission_error_suggests_user(
    jupyter_dirs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def denied(self: KernelSpecManager, *args: object, **kwargs: object) -> str:
        raise PermissionError(errno.EACCES, "Permission denied", "/usr/local/share/jupyter")

    monkeypatch.setattr(KernelSpecManager, "install_kernel_spec", denied)
    with pytest.raises(KernelSpecError, match="--user"):
        install_kernel_spec(build_kernel_spec(), "x")


@pytest.mark.parametrize(
    "name", ["../escape", "a/b", "", "-rf", "a b", "$(touch /tmp/pwned)", "x;y", "a\nb"]
)
def test_hostile_kernel_names_are_rejected(jupyter_dirs: Path, name: str) -> None:
    with pytest.raises(UnsafeValueError, match="invalid kernel name"):
        install_kernel_spec(build_kernel_spec(), name)
    assert main(["install", "--user", f"--name={name}"]) == 1


def test_install_refuses_to_replace_a_foreign_spec(jupyter_dirs: Path) -> None:
    foreign = jupyter_dirs / "kernels" / "python3"
    foreign.mkdir(parents=True)
    (foreign / "kernel.json").write_text(json.dumps({"argv": ["python"], "display_name": "x"}))
    with pytest.raises(KernelSpecError, match="does not use nersc_provisioner"):
        install_kernel_spec(build_kernel_spec(), "python3", user=True)
    assert json.loads((foreign / "kernel.json").read_text())["display_name"] == "x"
    assert main(["install", "--user", "--prefix", "/tmp/x"]) == 1
    assert main(["install", "--prefix", "/proc/nersc-provisioner-test"]) == 1


def test_build_kernel_spec_validates() -> None:
    with pytest.raises(ConfigError, match="unknown key"):
        build_kernel_spec(config={"module": ["python"]})
    with pytest.raises(ConfigError, match="connection_file"):
        build_kernel_spec(argv=["python", "-m", "ipykernel_launcher"])
    with pytest.raises(ConfigError, match="unknown provisioner"):
        build_kernel_spec("nersc-nowhere")
    with pytest.raises(UnsafeValueError, match="environment variable name"):
        build_kernel_spec(env={"NOT VALID": "x"})


@pytest.mark.parametrize("folder", ENTRY_POINTS, ids=[p.name for p in ENTRY_POINTS])
def test_entry_point_is_what_install_writes(
    folder: Path, tmp_path: Path, jupyter_dirs: Path
) -> None:
    command = shlex.split((folder / "install-command.txt").read_text())
    assert command[:3] == ["python", "-m", "nersc_provisioner"]
    assert main([*command[3:], "--prefix", str(tmp_path)]) == 0
    written = tmp_path / "share" / "jupyter" / "kernels" / folder.name / "kernel.json"
    assert json.loads(written.read_text()) == json.loads((folder / "kernel.json").read_text())

    ksm = KernelSpecManager(kernel_dirs=[str(folder.parent)])
    spec = ksm.get_kernel_spec(folder.name)
    factory = KernelProvisionerFactory.instance()
    assert factory.is_provisioner_available(spec)
    provisioner = factory.create_provisioner_instance("k", spec, parent=None)
    name = spec.metadata["kernel_provisioner"]["provisioner_name"]
    assert type(provisioner) is PROVISIONERS[name]


def test_show_remote_spec_prints_the_launch_script_without_a_key(jupyter_dirs: Path) -> None:
    folder = REPO / "entry_points" / "nersc-perlmutter-login"
    command = shlex.split((folder / "install-command.txt").read_text())
    assert main([*command[3:], "--user"]) == 0
    shown = run_cli("show", "nersc-perlmutter-login")
    assert shown.returncode == 0, shown.stderr
    assert '"key": "<key>"' in shown.stdout
    assert "module load python" in shown.stdout
    assert 'wrapper.sh" 3 python -m ipykernel_launcher' in shown.stdout
    assert "run as: ssh perlmutter.nersc.gov bash --noprofile --norc -s" in shown.stdout


def test_data_path_flag(jupyter_dirs: Path) -> None:
    assert main(["install", "--user", "--name", "pm-direct", "--provisioner",
                 "nersc-perlmutter", "--data-path", "direct"]) == 0  # fmt: skip
    spec = json.loads((jupyter_dirs / "kernels" / "pm-direct" / "kernel.json").read_text())
    assert spec["metadata"]["kernel_provisioner"]["config"]["data_path"] == "direct"
    refused = run_cli("install", "--user", "--name", "local-direct", "--data-path", "direct")
    assert refused.returncode == 1
    assert "--data-path" in refused.stderr
    assert not (jupyter_dirs / "kernels" / "local-direct").exists()
    bad = run_cli("install", "--user", "--name", "x", "--provisioner", "nersc-cori",
                  "--data-path", "sideways")  # fmt: skip
    assert bad.returncode == 2
    assert "invalid choice" in bad.stderr
