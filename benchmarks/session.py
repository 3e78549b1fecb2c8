"""What the session layer costs: a local kernel reached directly, and through it.

    .venv/bin/python benchmarks/session.py [--round-trips 200] [--megabytes 20] [--repeats 3]

Three ipykernels with CurveZMQ on this machine, started alike.  One is reached
directly (the baseline); the others through the session layer: the relay as a
subprocess (``python -`` with its program on stdin, as on a remote host), the local
end in this process, a plain TCP socket between them (no SSH: this is the layer's
own cost).  The local end's sockets use CurveZMQ in one row and IPC in a private
directory in the other (what the extra encryption on the Jupyter side costs).  The
rows take turns, block by block, so that drifts of a shared machine do not land on
one row.  Figures: the ``execute("pass")`` round trip (median, p95)
and IOPub throughput (a cell printing ``--megabytes`` MB, median of ``--repeats``).
Writes benchmarks/results/session.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import select
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import zmq
from bench import RESULTS, quantiles, throughput
from jupyter_client.asynchronous.client import AsyncKernelClient

from nersc_provisioner.session import LocalEnd, RelaySettings, relay_program, tcp_opener

PORTS = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")
DIRECT = "direct (CurveZMQ)"
SESSION = "session (CurveZMQ)"
SESSION_IPC = "session (IPC)"


def start_kernel(folder: Path) -> tuple[subprocess.Popen[bytes], dict[str, Any], Path]:
    public, secret = zmq.curve_keypair()
    info: dict[str, Any] = {
        "transport": "tcp",
        "ip": "127.0.0.1",
        **dict.fromkeys(PORTS, 0),
        "key": uuid.uuid4().hex,
        "signature_scheme": "hmac-sha256",
        "kernel_name": "",
        "curve_publickey": public.decode(),
        "curve_secretkey": secret.decode(),
    }
    path = folder / "kernel.json"
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "w") as out:
        json.dump(info, out)
    proc = subprocess.Popen(
        [sys.executable, "-m", "ipykernel_launcher", "-f", str(path)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            written = json.loads(path.read_text())
        except ValueError:
            written = {}
        if all(written.get(p) for p in PORTS):
            return proc, written, path
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("the kernel wrote no ports")


def start_relay(
    folder: Path, kernel: subprocess.Popen[bytes], path: Path, secret: bytes
) -> tuple[subprocess.Popen[str], int]:
    settings = RelaySettings(connection_file=str(path), secret=secret, kernel_pid=kernel.pid)
    settings_file = folder / "relay.json"
    with os.fdopen(os.open(settings_file, os.O_WRONLY | os.O_CREAT, 0o600), "w") as out:
        out.write(settings.to_json())
    relay = subprocess.Popen(
        [sys.executable, "-"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    if relay.stdin is None or relay.stdout is None:
        raise RuntimeError("no pipes to the relay")
    relay.stdin.write(relay_program(str(settings_file)))
    relay.stdin.close()
    ready, _, _ = select.select([relay.stdout], [], [], 30)
    line = relay.stdout.readline() if ready else ""
    match = re.fullmatch(r"NPR_RELAY_PORT (\d+)\n", line)
    if match is None:
        relay.kill()
        raise RuntimeError(f"the relay said {line!r}")
    return relay, int(match.group(1))


def through_session(
    folder: Path, procs: list[subprocess.Popen[Any]], locals_: list[LocalEnd], ipc: bool
) -> dict[str, Any]:
    """A kernel and its relay; a local end in front (CurveZMQ, or IPC in ``folder``)."""
    folder.mkdir(mode=0o700)
    remote, remote_info, path = start_kernel(folder)
    procs.append(remote)
    secret = os.urandom(32)
    relay, port = start_relay(folder, remote, path, secret)
    procs.append(relay)
    public, private = zmq.curve_keypair()
    opener = tcp_opener("127.0.0.1", port)
    if ipc:
        sockets = folder / "s"
        sockets.mkdir(mode=0o700)
        local = LocalEnd(opener, secret, ipc_dir=str(sockets))
    else:
        local = LocalEnd(opener, secret, curve_keys=(public, private))
    locals_.append(local)
    local.start()
    if not local.wait_connected(30):
        raise RuntimeError(f"no session: {local.stats()}")
    info = {
        **local.connection_info(),
        "key": remote_info["key"],
        "signature_scheme": "hmac-sha256",
    }
    if not ipc:
        info.update(curve_publickey=public.decode(), curve_secretkey=private.decode())
    return info


@contextmanager
def kernels() -> Iterator[dict[str, dict[str, Any]]]:
    """Connection info for each row's clients (one kernel per row)."""
    procs: list[subprocess.Popen[Any]] = []
    locals_: list[LocalEnd] = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            (Path(tmp) / "direct").mkdir()
            direct, direct_info, _ = start_kernel(Path(tmp) / "direct")
            procs.append(direct)
            yield {
                DIRECT: direct_info,
                SESSION: through_session(Path(tmp) / "curve", procs, locals_, ipc=False),
                SESSION_IPC: through_session(Path(tmp) / "ipc", procs, locals_, ipc=True),
            }
        finally:
            for local in locals_:
                local.stop()
            for proc in procs:
                proc.kill()
                proc.wait()


async def measure(
    infos: dict[str, dict[str, Any]], round_trips: int, megabytes: int, repeats: int
) -> dict[str, dict[str, Any]]:
    clients: dict[str, AsyncKernelClient] = {}
    for row, info in infos.items():
        kc = AsyncKernelClient()
        kc.load_connection_info(info)  # type: ignore[arg-type]
        kc.start_channels()
        await kc.wait_for_ready(timeout=60)
        clients[row] = kc
    rtt: dict[str, list[float]] = {row: [] for row in infos}
    rates: dict[str, list[float]] = {row: [] for row in infos}
    try:
        for kc in clients.values():  # warm up both paths
            for _ in range(5):
                await kc.execute_interactive("pass", timeout=30)
        rounds = max(1, min(10, round_trips))
        for index in range(rounds):
            block = round_trips // rounds + (1 if index < round_trips % rounds else 0)
            for row, kc in clients.items():
                for _ in range(block):
                    t0 = time.perf_counter()
                    await kc.execute_interactive("pass", timeout=30)
                    rtt[row].append((time.perf_counter() - t0) * 1000)
        for _ in range(repeats):
            for row, kc in clients.items():
                rates[row].append(await throughput(kc, megabytes))
    finally:
        for kc in clients.values():
            kc.stop_channels()
    return {
        row: {"round_trip_ms": quantiles(rtt[row]), "iopub_mb_s": sorted(rates[row])}
        for row in infos
    }


def report(results: dict[str, dict[str, Any]]) -> None:
    base = results[DIRECT]
    base_rate = sorted(base["iopub_mb_s"])[len(base["iopub_mb_s"]) // 2]
    print(
        f"{'row':<20}{'RTT median':>12}{'p95':>9}{'x median':>10}{'x p95':>8}"
        f"{'IOPub MB/s':>12}{'x':>7}"
    )
    for row, r in results.items():
        rate = sorted(r["iopub_mb_s"])[len(r["iopub_mb_s"]) // 2]
        rt = r["round_trip_ms"]
        print(
            f"{row:<20}{rt['median']:>9.2f} ms{rt['p95']:>6.2f} ms"
            f"{rt['median'] / base['round_trip_ms']['median']:>10.2f}"
            f"{rt['p95'] / base['round_trip_ms']['p95']:>8.2f}"
            f"{rate:>12.1f}{rate / base_rate:>7.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--round-trips", type=int, default=200, help="execute('pass') samples")
    parser.add_argument("--megabytes", type=int, default=20, help="IOPub: MB printed per cell")
    parser.add_argument("--repeats", type=int, default=3, help="IOPub: cells per row")
    args = parser.parse_args()
    with kernels() as infos:
        results = asyncio.run(measure(infos, args.round_trips, args.megabytes, args.repeats))
    report(results)
    RESULTS.mkdir(exist_ok=True)
    record = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": platform.node(),
        "cpus": os.cpu_count(),
        "args": vars(args),
        "results": results,
    }
    (RESULTS / "session.json").write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
