"""Real clients, unchanged, reach protected ``nersc-local`` kernels.

Jupyter Server (its REST API and the websocket a notebook page uses) and nbclient
(what papermill runs) take the CurveZMQ keys, or the IPC socket paths, from the
connection information the provisioner returns.  Nothing here configures them.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.websocket import websocket_connect

from tests.conftest import PYTHON_ARGV
from tests.kernels import DROPPING_SHIM, wait_until
from tests.stacks import needs_curve_stack

pytestmark = [pytest.mark.kernel]

SPECS = {
    "curve": PYTHON_ARGV,  # ipykernel 7.4 (6.29.5 on the oldest stack: IPC)
    "ipc": [sys.executable, "-c", DROPPING_SHIM, "-f", "{connection_file}"],  # no CurveZMQ
}

KINDS = [pytest.param("curve", marks=needs_curve_stack), "ipc"]


def write_specs(jupyter_dirs: Path) -> None:
    for name, argv in SPECS.items():
        folder = jupyter_dirs / "kernels" / name
        folder.mkdir(parents=True, exist_ok=True)
        spec = {
            "argv": argv,
            "display_name": name,
            "language": "python",
            "metadata": {"kernel_provisioner": {"provisioner_name": "nersc-local", "config": {}}},
        }
        (folder / "kernel.json").write_text(json.dumps(spec))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, url: str, token: str, runtime: Path) -> None:
        self.url, self.token, self.runtime = url, token, runtime

    async def request(self, method: str, path: str, body: Any = None) -> Any:
        response = await AsyncHTTPClient().fetch(
            HTTPRequest(
                f"{self.url}{path}",
                method=method,
                headers={"Authorization": f"token {self.token}"},
                body=None if body is None else json.dumps(body),
                allow_nonstandard_methods=True,
            )
        )
        return json.loads(response.body) if response.body else None


@pytest.fixture
async def server(jupyter_dirs: Path, tmp_path: Path) -> AsyncIterator[Server]:
    """A real Jupyter Server with our kernel specs, on a free loopback port."""
    write_specs(jupyter_dirs)
    port, token = free_port(), uuid.uuid4().hex
    log = (tmp_path / "server.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "jupyter_server", "--no-browser", "--allow-root",
         f"--ServerApp.port={port}", "--ServerApp.port_retries=0", "--ServerApp.ip=127.0.0.1",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={tmp_path}"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
    )  # fmt: skip
    srv = Server(f"http://127.0.0.1:{port}", token, Path(os.environ["JUPYTER_RUNTIME_DIR"]))

    async def answers() -> bool:
        """The server answers (or has died: no use waiting)."""
        if process.poll() is not None:
            return True
        try:
            await srv.request("GET", "/api/status")
        except (ConnectionError, OSError):
            return False
        return True

    try:
        # No event says the server listens: it logs "is running at" before it binds
        # (jupyter_server 2.21 binds in its event loop's first callback).
        answered = await wait_until(answers, 60, step=0.1)
        if not answered or process.poll() is not None:
            pytest.fail(f"Jupyter Server did not answer: {(tmp_path / 'server.log').read_text()}")
        yield srv
    finally:
        process.terminate()
        process.wait(30)
        log.close()


def execute_request(code: str) -> tuple[str, dict[str, Any]]:
    msg_id = uuid.uuid4().hex
    return msg_id, {
        "header": {"msg_id": msg_id, "msg_type": "execute_request", "username": "test",
                   "session": uuid.uuid4().hex, "version": "5.3", "date": ""},
        "parent_header": {},
        "metadata": {},
        "content": {"code": code, "silent": False, "store_history": False,
                    "user_expressions": {}, "allow_stdin": False},
        "channel": "shell",
        "buffers": [],
    }  # fmt: skip


@pytest.mark.parametrize("kind", KINDS)
async def test_jupyter_server_rest_and_websocket(server: Server, kind: str) -> None:
    kernel = await server.request("POST", "/api/kernels", {"name": kind})
    kernel_id = kernel["id"]
    try:
        info = json.loads((server.runtime / f"kernel-{kernel_id}.json").read_text())
        if kind == "curve":
            assert info["transport"] == "tcp"
            assert info["curve_publickey"]
        else:
            assert info["transport"] == "ipc"
            assert "curve_publickey" not in info
        ws = await websocket_connect(
            HTTPRequest(
                f"{server.url.replace('http', 'ws')}/api/kernels/{kernel_id}/channels",
                headers={"Authorization": f"token {server.token}"},
            )
        )
        msg_id, request = execute_request("print('via the websocket', 6 * 7)")
        await ws.write_message(json.dumps(request))
        printed, reply = "", None
        while reply is None or not printed:
            raw = await asyncio.wait_for(ws.read_message(), 60)
            assert raw is not None, "the websocket closed"
            msg = json.loads(raw)
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "stream":
                printed += msg["content"]["text"]
            elif msg["msg_type"] == "execute_reply":
                reply = msg["content"]
        assert reply["status"] == "ok"
        assert printed == "via the websocket 42\n"
        ws.close()
        listed = await server.request("GET", f"/api/kernels/{kernel_id}")
        assert listed["execution_state"] in ("idle", "busy")
    finally:
        await server.request("DELETE", f"/api/kernels/{kernel_id}")


@pytest.mark.parametrize("kind", KINDS)
async def test_nbclient_runs_a_notebook(jupyter_dirs: Path, kind: str) -> None:
    write_specs(jupyter_dirs)
    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_code_cell("import os\nprint('from nbclient', 2 + 3)"))
    client = NotebookClient(nb, kernel_name=kind, timeout=60)
    seen: dict[str, Any] = {}

    def on_cell_start(**kwargs: Any) -> None:  # the kernel is running by then
        km = client.km
        seen.update(transport=km.transport, curve=getattr(km, "curve_publickey", None) is not None)

    client.on_cell_start = on_cell_start
    await client.async_execute()
    outputs = nb.cells[0].outputs
    assert [o["text"] for o in outputs if o["output_type"] == "stream"] == ["from nbclient 5\n"]
    assert seen == {"transport": "tcp" if kind == "curve" else "ipc", "curve": kind == "curve"}
