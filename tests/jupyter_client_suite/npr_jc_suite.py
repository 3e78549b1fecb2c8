"""pytest plugin: jupyter_client's own test suite, with its kernels started through ours.

``scripts/jupyter-client-suite`` runs the tests/ folder of jupyter_client's sdist (the
version installed here) with ``-p npr_jc_suite --npr-config NAME``. For every test:

* the native ``python3`` spec is replaced: ``kernels/python3/kernel.json`` is written into
  the data directory jupyter_client's fixtures (``jp_environ``) made for the test, where
  it is found before ipykernel's own; its ``metadata.kernel_provisioner`` names ours;
* the other specs the suite writes for itself during a test (``signaltest``,
  ``problemtest``, ``echo``, ``bad``) get the same ``metadata.kernel_provisioner`` when
  they are read; for a remote configuration their ``argv[0]`` (this process's Python,
  a path the remote host does not have) becomes ``python``, which the provisioner
  turns into the host's ``remote_python``, and their ``env`` gets a ``PYTHONPATH`` with
  the suite's folder and the echo kernel (the remote host shares this filesystem);
* each kernel manager's provisioner is recorded; one that is not ours is an error of
  the test, so no test passes on jupyter_client's own provisioner by mistake.

Tests that cannot pass through a provisioner of ours, by design, are skipped with the
reason (:data:`SKIPPED`); tests left out of the run are in :data:`EXCLUDED`. Both are
listed, with the same reasons, in docs/compatibility.md.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
CONFIGS = ("nersc-local", "nersc-cori", "slurm")

# --------------------------------------------------------------------------------------
# What is left out, and why. Keys are test ids as pytest prints them, relative to the
# sdist's root; an id without "[...]" covers each of its parametrizations.

_DESIGN_FAIL_FAST = (
    "the kernel exits before it opens its sockets, so our start fails at once with its "
    "exit code and stderr (by design: the reason is shown, not a restart loop); "
    "jupyter_client's own provisioner returns from the start and leaves the death to the "
    "restarter, which this test counts on"
)
_DESIGN_TRANSPORT = (
    "asks the manager for transport ipc at ip 'test' (socket files test-1..5 in the "
    "working directory) and checks that the connection info says so; our provisioners "
    "choose where the kernel listens, so other users cannot reach it (CurveZMQ on "
    "127.0.0.1, else IPC in a private 0700 directory; remote: the tunnel's listeners), "
    "and tell the manager"
)

#: Skipped in one configuration (a reason each); everything else must pass.
SKIPPED: dict[str, dict[str, str]] = {
    name: {
        "tests/test_restarter.py::test_restarter_gives_up": _DESIGN_FAIL_FAST,
        "tests/test_restarter.py::test_async_restarter_gives_up": _DESIGN_FAIL_FAST,
        "tests/test_multikernelmanager.py::TestKernelManager::test_ipc_cinfo": _DESIGN_TRANSPORT,
        "tests/test_multikernelmanager.py::TestAsyncKernelManager::test_ipc_cinfo": (
            _DESIGN_TRANSPORT
        ),
    }
    for name in CONFIGS
}

#: Skipped too where jupyter_client gives kernels no CurveZMQ keys (before 8.10), in
#: every configuration.
SKIPPED_WITHOUT_CURVE: dict[str, str] = {
    "tests/test_multikernelmanager.py::TestAsyncKernelManager::test_tcp_cinfo": (
        "checks that the connection info says transport tcp on localhost; without CurveZMQ "
        "(this jupyter_client cannot give its clients the keys) our kernels listen on IPC "
        "sockets in a private 0700 directory (nersc-local), or the tunnel's listeners are "
        "Unix sockets in one (remote), so that other users cannot reach them"
    ),
}

_IPC_TWIN = (
    "the [ipc] twin of a [tcp] test: our provisioners choose the transport themselves, "
    "the same for both, so it repeats the [tcp] run"
)
_BLOCKING_TWIN = (
    "the blocking twin of an asynchronous test that runs: the same provisioner calls, "
    "through jupyter_client's run_sync (blocking managers and clients stay covered by "
    "TestKernelManager::test_lifecycle, TestParallel::test_start_parallel_thread_kernels, "
    "the multikernel test_tcp_lifecycle and test_stream_on_recv, TestKernelClient::"
    "test_execute_interactive and the sync restarter test)"
)
_REQUEST = (
    "one more request type on the shell channel, carried like execute's (each such test "
    "starts a kernel of its own for one request)"
)
_SEQUENCE = (
    "three lifecycles of one kernel in a row: test_multikernelmanager.py::"
    "TestAsyncKernelManager::test_start_sequence_tcp_kernels does the same"
)

#: Not run at all, in every configuration, to keep the run short (a reason each):
#: what they would add is already covered by a test that runs.
EXCLUDED: dict[str, str] = {
    # tests/test_kernelmanager.py
    "tests/test_kernelmanager.py::*[ipc]": _IPC_TWIN,
    "tests/test_kernelmanager.py::*-ipc]": _IPC_TWIN,
    "tests/test_kernelmanager.py::TestKernelManagerShutDownGracefully::"
    "test_signal_kernel_subprocesses": _BLOCKING_TWIN,
    "tests/test_kernelmanager.py::TestKernelManager::test_signal_kernel_subprocesses": (
        _BLOCKING_TWIN
    ),
    "tests/test_kernelmanager.py::TestKernelManager::test_start_new_kernel": (
        "start_new_kernel with the signaltest kernel: the start that test_templated_kspec_env "
        "makes too (which also checks the spec's env)"
    ),
    "tests/test_kernelmanager.py::TestAsyncKernelManager::test_start_new_async_kernel": (
        "start_new_async_kernel with the signaltest kernel: the start that "
        "test_templated_kspec_env makes too (which also checks the spec's env)"
    ),
    "tests/test_kernelmanager.py::TestAsyncKernelManager::test_lifecycle[AsyncKMSubclass-tcp]": (
        "the lifecycle through the recording subclass: the same provisioner calls as "
        "[AsyncKernelManager-tcp]; test_subclass_callables checks their counts"
    ),
    "tests/test_kernelmanager.py::TestParallel::test_start_sequence_kernels": _SEQUENCE,
    "tests/test_kernelmanager.py::TestParallel::test_start_sequence_process_kernels": (
        "a kernel started in a forked worker process: test_multikernelmanager.py::"
        "TestAsyncKernelManager::test_start_parallel_process_kernels does the same"
    ),
    # tests/test_multikernelmanager.py
    "tests/test_multikernelmanager.py::TestKernelManager::test_ipc_lifecycle": _IPC_TWIN,
    "tests/test_multikernelmanager.py::TestKernelManager::test_start_sequence_ipc_kernels": (
        _IPC_TWIN
    ),
    "tests/test_multikernelmanager.py::TestAsyncKernelManager::test_ipc_lifecycle": _IPC_TWIN,
    "tests/test_multikernelmanager.py::TestAsyncKernelManager::"
    "test_start_sequence_ipc_kernels": _IPC_TWIN,
    **{
        f"tests/test_multikernelmanager.py::TestKernelManager::{name}": _BLOCKING_TWIN
        for name in (
            "test_tcp_lifecycle_with_kernel_id",
            "test_shutdown_all",
            "test_tcp_cinfo",
            "test_start_sequence_tcp_kernels",
            "test_start_parallel_thread_kernels",
            "test_subclass_callables",
        )
    },
    # tests/test_restarter.py
    "tests/test_restarter.py::*[ipc]": _IPC_TWIN,
    # tests/test_client.py
    **{
        f"tests/test_client.py::{cls}::{name}": _REQUEST
        for cls, names in (
            ("TestKernelClient", ("history", "inspect", "complete", "kernel_info", "comm_info")),
            (
                "TestAsyncKernelClient",
                ("history", "inspect", "complete", "is_complete", "kernel_info", "comm_info"),
            ),
            ("TestThreadedKernelClient", ("history", "inspect", "complete", "comm_info")),
        )
        for name in (f"test_{n}" for n in names)
    },
    **{
        f"tests/test_client.py::{cls}::{name}": (
            "a shutdown request on the control channel: TestAsyncKernelClient::test_shutdown "
            "sends one and checks its reply"
        )
        for cls in ("TestKernelClient", "TestThreadedKernelClient")
        for name in ("test_shutdown", "test_shutdown_id")
    },
    "tests/test_client.py::TestAsyncKernelClient::test_shutdown_id": (
        "a shutdown request on the control channel: test_shutdown sends one and checks its reply"
    ),
    "tests/test_client.py::TestThreadedKernelClient::test_execute_interactive": (
        "skipped by the suite itself ('Not supported'), after its setUp has started a kernel"
    ),
}

# --------------------------------------------------------------------------------------


def _load_rig() -> Any:
    """tests/rig.py of this repo (the suite's own ``tests`` package hides ours)."""
    spec = importlib.util.spec_from_file_location("npr_rig", REPO / "tests" / "rig.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["npr_rig"] = module
    spec.loader.exec_module(module)
    return module


rig = _load_rig()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--npr-config",
        choices=CONFIGS,
        required=True,
        help="which provisioner of ours starts the suite's kernels",
    )


def _matches(nodeid: str, key: str) -> bool:
    """A key is a test id; without "[...]", every parametrization of it; with one "*",
    every id that starts with what precedes it and ends with what follows it."""
    if "*" in key:
        head, tail = key.split("*", 1)
        return nodeid.startswith(head) and nodeid.endswith(tail)
    return nodeid == key or ("[" not in key and nodeid.split("[", 1)[0] == key)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    from nersc_provisioner.provisioners.encryption import clients_take_curve_keys

    name = config.getoption("--npr-config")
    skipped = dict(SKIPPED[name])
    if not clients_take_curve_keys():
        skipped.update(SKIPPED_WITHOUT_CURVE)
    kept, dropped = [], []
    for item in items:
        if any(_matches(item.nodeid, key) for key in EXCLUDED):
            dropped.append(item)
            continue
        kept.append(item)
        for key, reason in skipped.items():
            if _matches(item.nodeid, key):
                item.add_marker(pytest.mark.skip(reason=f"{name}: {reason}"))
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = kept


def _remote_path(root: Path) -> str:
    """PYTHONPATH for the suite's own kernels on the remote host: the suite's folder
    (``tests.signalkernel``, ``tests.problemkernel``) and pytest_jupyter's echo kernel
    (alone: the package itself imports pytest, which the remote Python lacks)."""
    import pytest_jupyter

    echo = root / "npr-remote-path" / "pytest_jupyter"
    if not (echo / "echo_kernel.py").is_file():
        echo.mkdir(parents=True, exist_ok=True)
        (echo / "__init__.py").write_text("")
        source = Path(pytest_jupyter.__file__).parent / "echo_kernel.py"
        shutil.copyfile(source, echo / "echo_kernel.py")
        for path in (echo.parent, echo, echo / "__init__.py", echo / "echo_kernel.py"):
            path.chmod(0o755 if path.is_dir() else 0o644)  # the rig's user reads them
    return f"{echo.parent}:{root}"


def _provisioner(name: str, root: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """kernel.json's ``metadata.kernel_provisioner`` for configuration ``name``, and the
    ``env`` the suite's own kernels need there."""
    if name == "nersc-local":
        config = {"setup": ["export NPR_SUITE=1"]}
        return {"provisioner_name": "nersc-local", "config": config}, {}
    ssh = rig.require_ssh()
    config = rig.login_config(ssh)
    if name == "slurm":
        rig.require_compute_node()
        config["slurm"] = {"time": "10"}
    return {"provisioner_name": "nersc-cori", "config": config}, {"PYTHONPATH": _remote_path(root)}


def _ours(provisioner: Any) -> bool:
    return type(provisioner).__module__.startswith("nersc_provisioner.")


@pytest.fixture(autouse=True)
def npr_kernels(
    request: pytest.FixtureRequest,
    jp_environ: None,
    jp_kernel_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[None]:
    """The suite's kernels, through the provisioner of ``--npr-config``."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.provisioning.factory import KernelProvisionerFactory

    name = request.config.getoption("--npr-config")
    metadata, remote_env = _provisioner(name, request.config.rootpath)
    native = Path(jp_kernel_dir) / "python3"
    native.mkdir(parents=True, exist_ok=True)
    spec = {
        "argv": ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (ipykernel)",
        "language": "python",
        "metadata": {"debugger": True, "kernel_provisioner": metadata},
    }
    (native / "kernel.json").write_text(json.dumps(spec, indent=1))

    get_kernel_spec: Callable[..., Any] = KernelSpecManager.get_kernel_spec

    def routed(self: KernelSpecManager, kernel_name: str) -> Any:
        found = get_kernel_spec(self, kernel_name)
        if "kernel_provisioner" not in found.metadata:
            found.metadata = {**found.metadata, "kernel_provisioner": metadata}
            if remote_env and found.argv and found.argv[0] == sys.executable:
                found.argv = ["python", *found.argv[1:]]
                found.env = {**found.env, **remote_env}
        return found

    monkeypatch.setattr(KernelSpecManager, "get_kernel_spec", routed)

    made: list[Any] = []
    create: Callable[..., Any] = KernelProvisionerFactory.create_provisioner_instance

    def recorded(self: Any, kernel_id: str, kernel_spec: Any, parent: Any) -> Any:
        provisioner = create(self, kernel_id, kernel_spec, parent)
        made.append(provisioner)
        KERNEL_IDS.add(kernel_id)
        return provisioner

    monkeypatch.setattr(KernelProvisionerFactory, "create_provisioner_instance", recorded)
    yield
    STARTED[request.node.nodeid] = len(made)
    foreign = [type(p).__name__ for p in made if not _ours(p)]
    assert not foreign, f"kernels started through a provisioner not ours: {foreign}"


#: test id -> how many kernel managers got a provisioner (of ours) in it.
STARTED: dict[str, int] = {}
#: The id of every kernel started: each names its connection file, so its processes.
KERNEL_IDS: set[str] = set()
#: How long the kernels' processes may take to go, once the last test has ended.
LEFTOVER_GRACE = 15.0


def leftovers() -> list[str]:
    """Command lines of processes (any user: the rig's hosts share this PID namespace)
    that still belong to a kernel the suite started: kernels, wrappers, watchdogs."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        if proc.info["status"] == psutil.STATUS_ZOMBIE or proc.pid == os.getpid():
            continue
        line = " ".join(proc.info["cmdline"] or ())
        if any(kernel_id in line for kernel_id in KERNEL_IDS):
            found.append(f"{proc.pid}: {line[:200]}")
    return found


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """No kernel outlives the suite: what a shutdown leaves behind makes the run fail."""
    import time

    deadline = time.monotonic() + LEFTOVER_GRACE
    found = leftovers()
    while found and time.monotonic() < deadline:
        time.sleep(0.5)
        found = leftovers()
    LEFTOVERS[:] = found
    if found:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


LEFTOVERS: list[str] = []


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    reached = sum(1 for n in STARTED.values() if n)
    terminalreporter.write_line(
        f"npr-jc-suite {config.getoption('--npr-config')}: {reached} tests started kernels "
        f"through it ({sum(STARTED.values())} kernel managers); "
        f"{len(STARTED) - reached} started none; "
        f"{len(LEFTOVERS)} processes of its kernels left behind (waited up to "
        f"{LEFTOVER_GRACE:g} s)"
    )
    for line in LEFTOVERS:
        terminalreporter.write_line(f"npr-jc-suite: left behind: {line}")
