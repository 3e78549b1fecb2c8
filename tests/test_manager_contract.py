"""What jupyter_client's own test suite asks of a provisioner, where ours once failed it.

``scripts/jupyter-client-suite`` runs that suite through our provisioners; each test here
pins one bug it found, against a real kernel (and the rig's sshd for the remote ones):

* a blocking ``KernelManager.client()`` of a remote kernel (jupyter_client 8.9.x gives its
  clients CurveZMQ keys as text, which they refuse with a TraitError);
* a child forked from a process that already has a remote kernel (the pool of SSH threads
  and connections came along without their threads, and the child's start hung);
* a restart of a local CurveZMQ kernel (jupyter_client read the connection file while the
  kernel was rewriting it: "Expecting value: line 1 column 1").
"""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.connection
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from jupyter_client import KernelManager

from nersc_provisioner.provisioners.encryption import clients_take_curve_keys

TIMEOUT = 60


def write_spec(
    data_dir: Path, name: str, provisioner: str, config: dict[str, Any], **spec: Any
) -> None:
    folder = data_dir / "kernels" / name
    folder.mkdir(parents=True, exist_ok=True)
    body = {
        "argv": ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": name,
        "language": "python",
        **spec,
    }
    body.setdefault("metadata", {})["kernel_provisioner"] = {
        "provisioner_name": provisioner,
        "config": config,
    }
    (folder / "kernel.json").write_text(json.dumps(body))


def blocking_cell(km: KernelManager, code: str) -> str:
    """Run ``code`` through a blocking client of ``km``; what it printed."""
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=TIMEOUT)
        out: list[str] = []

        def hook(msg: dict[str, Any]) -> None:
            if msg["msg_type"] == "stream":
                out.append(msg["content"]["text"])

        reply = kc.execute_interactive(code, timeout=TIMEOUT, output_hook=hook)
        assert reply["content"]["status"] == "ok", reply["content"]
        return "".join(out)
    finally:
        kc.stop_channels()


def test_which_jupyter_client_gives_clients_curve_keys() -> None:
    assert not clients_take_curve_keys("8.6.3")
    assert not clients_take_curve_keys("8.9.0")
    assert not clients_take_curve_keys("8.9.1")
    assert clients_take_curve_keys("8.10.0")
    assert clients_take_curve_keys("8.10.1rc0")
    assert clients_take_curve_keys("9.0.0")


@pytest.mark.kernel
@pytest.mark.rig
def test_blocking_client_of_a_remote_kernel_runs_a_cell(
    jupyter_dirs: Path, remote_config: dict[str, Any]
) -> None:
    write_spec(jupyter_dirs, "cori", "nersc-cori", remote_config)
    km = KernelManager(kernel_name="cori")
    km.start_kernel()
    try:
        assert blocking_cell(km, "print(6 * 7)") == "42\n"
        # Encrypted where jupyter_client can carry the keys to its clients; else plain.
        assert (getattr(km, "curve_publickey", None) is not None) == clients_take_curve_keys()
    finally:
        km.shutdown_kernel(now=True)


def _child_lifecycle(kernel_name: str, result: multiprocessing.connection.Connection) -> None:
    """In the forked child: a remote kernel of its own, one cell, a shutdown."""
    km = KernelManager(kernel_name=kernel_name)
    km.start_kernel()
    try:
        result.send(blocking_cell(km, "print('child', 6 * 7)"))
    finally:
        km.shutdown_kernel(now=True)


@pytest.mark.kernel
@pytest.mark.rig
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_child_starts_a_remote_kernel_of_its_own(
    jupyter_dirs: Path, remote_config: dict[str, Any]
) -> None:
    write_spec(jupyter_dirs, "cori", "nersc-cori", remote_config)
    km = KernelManager(kernel_name="cori")
    km.start_kernel()  # this process now has an SSH connection and worker threads
    try:
        assert blocking_cell(km, "print('parent')") == "parent\n"
        context = multiprocessing.get_context("fork")
        receive, send = context.Pipe(duplex=False)
        child = context.Process(target=_child_lifecycle, args=("cori", send))
        child.start()
        child.join(2 * TIMEOUT)
        if child.is_alive():
            child.kill()
            child.join()
            pytest.fail(f"the forked child's kernel start hung for {2 * TIMEOUT} s")
        assert child.exitcode == 0
        assert receive.poll()
        assert receive.recv() == "child 42\n"
        # The parent's connection was not touched by the child.
        assert blocking_cell(km, "print('parent again')") == "parent again\n"
    finally:
        km.shutdown_kernel(now=True)


#: A kernel that, like ipykernel 7.3+, binds CurveZMQ sockets on the ports its connection
#: file names (or its own, for ports 0), and then writes the file back as a new file that
#: stays empty for half a second (ipykernel's write is the same, only faster).
SLOW_WRITER = textwrap.dedent(
    """
    import json, os, sys, time, zmq
    path = sys.argv[sys.argv.index("-f") + 1]
    info = json.load(open(path))
    context = zmq.Context()
    sockets = []
    for name in ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port"):
        sock = context.socket(zmq.ROUTER)
        sockets.append(sock)
        sock.curve_secretkey = info["curve_secretkey"].encode()
        sock.curve_publickey = info["curve_publickey"].encode()
        sock.curve_server = True
        if info[name]:
            sock.bind("tcp://127.0.0.1:%d" % info[name])
        else:
            info[name] = sock.bind_to_random_port("tcp://127.0.0.1")
    os.unlink(path)
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    time.sleep(0.5)
    os.write(fd, json.dumps(info).encode())
    os.close(fd)
    time.sleep(600)
    """
)


@pytest.mark.kernel
@pytest.mark.skipif(
    not clients_take_curve_keys(),
    reason="a CurveZMQ kernel's rewrite: this jupyter_client gives no kernel CurveZMQ keys",
)
async def test_restart_waits_for_the_kernels_own_connection_file(
    jupyter_dirs: Path, tmp_path: Path
) -> None:
    from jupyter_client.manager import AsyncKernelManager

    script = tmp_path / "slow_writer.py"
    script.write_text(SLOW_WRITER)
    write_spec(
        jupyter_dirs,
        "slow",
        "nersc-local",
        {"setup": ["export NPR_SLOW=1"]},
        argv=[sys.executable, str(script), "-f", "{connection_file}"],
        metadata={"supported_encryption": ["curve"]},
    )
    km = AsyncKernelManager(kernel_name="slow")
    await km.start_kernel()
    try:
        ports = json.loads(Path(km.connection_file).read_text())["shell_port"]
        # The restart keeps the ports; the kernel rewrites the file after it binds them.
        # jupyter_client reads the file as soon as the start returns: it must be whole.
        await km.restart_kernel(now=True)
        assert json.loads(Path(km.connection_file).read_text())["shell_port"] == ports
        assert km.curve_publickey is not None
    finally:
        await km.shutdown_kernel(now=True)
