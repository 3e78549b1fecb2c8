"""Shared fixtures: isolated Jupyter directories and real kernels."""

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
