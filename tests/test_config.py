"""Configuration: precedence, unknown keys, bad values, the environment."""

from __future__ import annotations

from pathlib import Path

import pytest
from jupyter_client.kernelspec import KernelSpec
from jupyter_client.manager import AsyncKernelManager
from jupyter_client.provisioning import KernelProvisionerFactory
from traitlets.config.loader import PyFileConfigLoader

from nersc_provisioner import ConfigError, NERSCLocalProvisioner
from nersc_provisioner.settings import environment_defaults


def test_defaults(jupyter_dirs: Path) -> None:
    p = NERSCLocalProvisioner()
    assert (p.modules, p.purge, p.module_init, p.setup, p.cwd) == ([], False, "auto", [], "")
    assert p.container == ""
    assert p.container_runtime == "shifter"
    assert p.launch_timeout == 60.0


def test_precedence_spec_over_config_file_over_environment(
    jupyter_dirs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NERSC_PROVISIONER_MODULES", "env-a, env-b")
    monkeypatch.setenv("NERSC_PROVISIONER_PURGE", "true")
    monkeypatch.setenv("NERSC_PROVISIONER_LAUNCH_TIMEOUT", "7")
    monkeypatch.setenv("NERSC_PROVISIONER_SETUP", "conda activate a\nexport B=1")
    config_file = tmp_path / "jupyter_server_config.py"
    config_file.write_text(
        "c.NERSCLocalProvisioner.modules = ['file-a']\n"
        "c.NERSCLocalProvisioner.launch_timeout = 9.0\n"
        "c.NERSCLocalProvisioner.cwd = '/from/file'\n"
    )
    config = PyFileConfigLoader(config_file.name, path=str(tmp_path)).load_config()
    km = AsyncKernelManager(config=config)
    spec = KernelSpec(
        argv=["python"],
        display_name="t",
        language="python",
        metadata={
            "kernel_provisioner": {
                "provisioner_name": "nersc-local",
                "config": {"modules": ["spec-a"]},
            }
        },
    )
    p = KernelProvisionerFactory.instance().create_provisioner_instance("k1", spec, parent=km)
    assert isinstance(p, NERSCLocalProvisioner)
    assert p.modules == ["spec-a"]  # kernel.json config
    assert p.launch_timeout == 9.0  # Jupyter config file
    assert p.cwd == "/from/file"  # Jupyter config file
    assert p.purge is True  # environment
    assert p.setup == ["conda activate a", "export B=1"]  # environment
    assert p.module_init == "auto"  # default


def test_unknown_key_names_it_and_lists_valid_ones(jupyter_dirs: Path) -> None:
    with pytest.raises(ConfigError) as info:
        NERSCLocalProvisioner(modlues=["python"])
    text = str(info.value)
    assert "'modlues'" in text
    for key in NERSCLocalProvisioner.config_keys():
        assert key in text


def test_unknown_key_fails_kernel_start(jupyter_dirs: Path) -> None:
    spec = KernelSpec(
        argv=["python"],
        display_name="t",
        metadata={
            "kernel_provisioner": {"provisioner_name": "nersc-local", "config": {"moduls": []}}
        },
    )
    with pytest.raises(ConfigError, match="moduls"):
        KernelProvisionerFactory.instance().create_provisioner_instance("k", spec, parent=None)


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("modules", [1], "modules"),
        ("module_init", "sometimes", "module_init"),
        ("container_runtime", "docker", "container_runtime"),
        ("launch_timeout", -1, "launch_timeout"),
        ("purge", "maybe", "purge"),
    ],
)
def test_bad_values_are_config_errors(
    jupyter_dirs: Path, key: str, value: object, fragment: str
) -> None:
    with pytest.raises(ConfigError, match=fragment):
        NERSCLocalProvisioner(**{key: value})


def test_bad_environment_value_names_the_variable(
    jupyter_dirs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NERSC_PROVISIONER_LAUNCH_TIMEOUT", "soon")
    with pytest.raises(ConfigError, match="NERSC_PROVISIONER_LAUNCH_TIMEOUT"):
        NERSCLocalProvisioner()


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("NERSC_PROVISIONER_LAUNCH_TIMEOUT", "-1"),
        ("NERSC_PROVISIONER_MODULE_INIT", "relative/path"),
        ("NERSC_PROVISIONER_CONTAINER_RUNTIME", "docker"),
    ],
)
def test_environment_values_are_validated_too(
    jupyter_dirs: Path, monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    key = variable.removeprefix("NERSC_PROVISIONER_").lower()
    with pytest.raises(ConfigError, match=key):
        NERSCLocalProvisioner()


def test_values_no_shell_can_carry_fail_at_construction(jupyter_dirs: Path) -> None:
    with pytest.raises(ConfigError, match="NUL"):
        NERSCLocalProvisioner(setup=["echo a\x00b"])
    with pytest.raises(ConfigError, match="container image"):
        NERSCLocalProvisioner(container="--privileged")


def test_environment_reads_only_what_is_set(
    jupyter_dirs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert environment_defaults() == {}
    monkeypatch.setenv("NERSC_PROVISIONER_MODULE_USE", "/a:/b")
    assert environment_defaults() == {"module_use": ["/a", "/b"]}


def test_systems_are_data_with_their_defaults(jupyter_dirs: Path) -> None:
    from nersc_provisioner.provisioners import NERSCCoriProvisioner, NERSCPerlmutterProvisioner

    assert NERSCCoriProvisioner().host == "cori.nersc.gov"
    assert NERSCPerlmutterProvisioner().host == "perlmutter.nersc.gov"
    assert NERSCPerlmutterProvisioner(host="login-alias").host == "login-alias"
    with pytest.raises(ConfigError, match="host"):
        NERSCPerlmutterProvisioner(host="-oProxyCommand=touch /tmp/pwned")


def test_remote_argv_keeps_python_for_the_remote_side(jupyter_dirs: Path) -> None:
    """jupyter_client's swap of `python` for its own interpreter must not reach the host."""
    import sys

    from nersc_provisioner.provisioners import NERSCPerlmutterProvisioner

    spec = KernelSpec(argv=[], display_name="t", language="python")
    argv = NERSCPerlmutterProvisioner(kernel_spec=spec).kernel_argv()
    assert argv == ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    assert sys.executable not in argv
    with_python = NERSCPerlmutterProvisioner(kernel_spec=spec, remote_python="/opt/py/bin/python")
    assert with_python.kernel_argv()[0] == "/opt/py/bin/python"
