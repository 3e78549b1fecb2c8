"""Shared fixtures: isolated Jupyter directories, real kernels, and the test rig.

The rig fixtures skip the test when their piece of the rig is down, or fail it when
``CI=true`` (see tests/rig.py).  Each is function-scoped on purpose: a test may stop and
restart a piece (sshd, slurmctld), and the next one checks it again.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.manager import AsyncKernelManager

from tests.kernels import shutdown_quietly
from tests.rig import (
    JumpRig,
    LmodRig,
    Rig,
    SlurmRig,
    SSHRig,
    login_config,
    require_compute_node,
    require_jump,
    require_lmod,
    require_slurm,
    require_ssh,
)

PYTHON_ARGV = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]


@pytest.fixture
def jupyter_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Jupyter data, config and runtime directories of the test's own."""
    data = tmp_path / "jupyter-data"
    (data / "kernels").mkdir(parents=True)
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(data))
    monkeypatch.setenv("JUPYTER_PATH", str(data))
    monkeypatch.setenv("JUPYTER_CONFIG_DIR", str(tmp_path / "jupyter-config"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "jupyter-runtime"))
    for name in list(os.environ):
        if name.startswith("NERSC_PROVISIONER_"):
            monkeypatch.delenv(name)
    return data


KernelFactory = Callable[..., Any]


@pytest.fixture
async def start_kernel(jupyter_dirs: Path) -> AsyncIterator[KernelFactory]:
    """Write a kernel spec and start it through AsyncKernelManager; shut all down after."""
    managers: list[AsyncKernelManager] = []

    async def start(
        config: dict[str, Any],
        *,
        name: str = "under-test",
        argv: list[str] | None = None,
        env: dict[str, str] | None = None,
        provisioner: str = "nersc-local",
        created: Callable[[AsyncKernelManager], None] | None = None,
    ) -> AsyncKernelManager:
        spec: dict[str, Any] = {
            "display_name": name,
            "language": "python",
            "metadata": {"kernel_provisioner": {"provisioner_name": provisioner, "config": config}},
        }
        if argv is not None:
            spec["argv"] = argv
        if env:
            spec["env"] = env
        folder = jupyter_dirs / "kernels" / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "kernel.json").write_text(json.dumps(spec))
        runtime = Path(os.environ["JUPYTER_RUNTIME_DIR"])
        runtime.mkdir(parents=True, exist_ok=True)
        connection_file = runtime / f"kernel-{uuid.uuid4()}.json"
        km = AsyncKernelManager(kernel_name=name, connection_file=str(connection_file))
        managers.append(km)
        if created is not None:  # the test may act on the manager while it starts
            created(km)
        await km.start_kernel()
        return km

    yield start
    for km in managers:
        await shutdown_quietly(km)


# --- the test rig (scripts/test-rig) ----------------------------------------------------


@pytest.fixture
def ssh_rig() -> SSHRig:
    """The remote login node: sshd in netns npr-remote."""
    return require_ssh()


@pytest.fixture
def jump_rig() -> JumpRig:
    """The jump host, and the host only it reaches."""
    return require_jump()


@pytest.fixture
def lmod_rig() -> LmodRig:
    """Lmod with the repo's tests/modulefiles."""
    return require_lmod()


@pytest.fixture
def slurm_rig() -> SlurmRig:
    """The one-node Slurm cluster."""
    return require_slurm()


@pytest.fixture
def compute_node_rig() -> Rig:
    """Slurm, the login node, and the job's node reachable by ssh from it."""
    return require_compute_node()


@pytest.fixture
def intruder_rig(ssh_rig: SSHRig) -> SSHRig:
    """The login node, with its second unprivileged user (the attack tests)."""
    if not ssh_rig.intruder or not ssh_rig.remote_python:
        pytest.fail("rig.json has no ssh.intruder/remote_python; run scripts/test-rig up")
    return ssh_rig


@pytest.fixture
def remote_config(ssh_rig: SSHRig) -> dict[str, Any]:
    """nersc-cori settings that reach the rig's login node."""
    return login_config(ssh_rig)


@pytest.fixture
def slurm_config(compute_node_rig: Rig) -> dict[str, Any]:
    """nersc-cori settings for a kernel in a 10-minute Slurm job, through the login node."""
    assert compute_node_rig.ssh is not None
    return {**login_config(compute_node_rig.ssh), "slurm": {"time": "10"}}
