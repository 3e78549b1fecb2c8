"""Where does the data path's cost come from?  Three ways to reach one remote kernel.

    .venv/bin/python benchmarks/datapath.py [--repeats 5] [--round-trips 200]

Needs the test rig (``scripts/test-rig up``) and root (it starts a kernel in the
rig's network namespace as the rig user).  In one run, taking turns, it measures
IOPub throughput (a cell printing 20 MB) and the ``execute("pass")`` round trip of:

* ``local-provisioner``: jupyter_client's own, a local kernel (the baseline);
* ``nersc-cori tunnel``: our provisioner against the rig's sshd (paramiko forwarder);
* ``openssh -L``: OpenSSH's client forwarding the same remote kernel's ports (a
  C forwarder in its own process, no PTY session, so Nagle stays on at sshd);
* ``direct + CurveZMQ``: a kernel bound to the rig host's own address with
  CurveZMQ keys, reached with no SSH in the data path at all;
* ``direct, no encryption``: the same without CurveZMQ (a measurement only: what
  encryption of any kind costs on this machine; never a mode to run kernels in).

It exists to explain issue 6's throughput target (see docs/performance.md); it is
not part of ``bench.py``'s table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import zmq
from bench import RESULTS, RIG, quantiles, rig_config, started, throughput, write_spec
from jupyter_client.asynchronous.client import AsyncKernelClient

PORTS = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def ready_client(info: dict[str, Any]) -> AsyncKernelClient:
    client = AsyncKernelClient()
    client.load_connection_info(info)  # type: ignore[arg-type]
    client.start_channels()
    await client.wait_for_ready(timeout=60)
    return client


def openssh_forward(
    config: dict[str, Any], remote_ports: dict[str, int]
) -> tuple[subprocess.Popen[bytes], dict[str, int]]:
    local = {name: free_port() for name in remote_ports}
    argv = [
        "ssh", "-N", "-F", "/dev/null",
        "-o", "BatchMode=yes",
        "-o", "StrictHostKeyChecking=yes",
        "-o", f"UserKnownHostsFile={config['known_hosts'][0]}",
        "-o", "ExitOnForwardFailure=yes",
        "-i", config["identity_file"],
    ]  # fmt: skip
    for name, port in remote_ports.items():
        argv += ["-L", f"127.0.0.1:{local[name]}:127.0.0.1:{port}"]
    argv.append(f"{config['user']}@{config['host']}")
    return subprocess.Popen(argv), local


def direct_kernel(
    workdir: Path, config: dict[str, Any], curve: bool
) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    """A kernel in the rig's namespace, bound to its address, with or without CurveZMQ."""
    rig = json.loads(RIG.read_text())["ssh"]
    public, secret = zmq.curve_keypair()
    keys = {"curve_publickey": public.decode(), "curve_secretkey": secret.decode()}
    info: dict[str, Any] = {
        **{name: free_port() for name in PORTS},  # free here is as good a guess as any
        "ip": config["host"],
        "transport": "tcp",
        "key": os.urandom(16).hex(),
        "signature_scheme": "hmac-sha256",
        **(keys if curve else {}),
    }
    workdir.chmod(0o755)
    connection = workdir / f"direct-{'curve' if curve else 'plain'}.json"
    connection.write_text(json.dumps(info))
    connection.chmod(0o600)
    shutil.chown(connection, config["user"])
    proc = subprocess.Popen(
        ["ip", "netns", "exec", rig["netns"], "runuser", "-u", config["user"], "--",
         config["remote_python"], "-m", "ipykernel_launcher", "-f", str(connection)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    return proc, {**info, "key": info["key"].encode()}


async def main_async(args: argparse.Namespace) -> None:
    config = rig_config()
    if config is None:
        sys.exit(f"no test rig ({RIG}): run scripts/test-rig up first")
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="nersc-datapath-") as tmp:
        data = Path(tmp)
        os.environ["JUPYTER_PATH"] = str(data)
        os.environ["JUPYTER_RUNTIME_DIR"] = str(data / "runtime")
        write_spec(data, "base", "local-provisioner", {})
        write_spec(data, "cori", "nersc-cori", config)
        base_km, base_kc, _ = await started("base")
        cori_km, cori_kc, _ = await started("cori")
        clients: dict[str, AsyncKernelClient] = {
            "local-provisioner": base_kc,
            "nersc-cori tunnel": cori_kc,
        }
        try:
            remote = cori_km.provisioner.remote  # type: ignore[union-attr]
            proc, local_ports = openssh_forward(config, dict(remote.ports))
            procs.append(proc)
            # (ZeroMQ retries until ssh has logged in and listens; ready_client waits.)
            info = {**cori_km.get_connection_info(), **local_ports}
            clients["openssh -L (same kernel)"] = await ready_client(info)
            for curve, label in ((True, "direct + CurveZMQ"), (False, "direct, no encryption")):
                proc, info = direct_kernel(data, config, curve)
                procs.append(proc)
                clients[label] = await ready_client(info)
            mbps: dict[str, list[float]] = {label: [] for label in clients}
            rtt: dict[str, list[float]] = {label: [] for label in clients}
            for _ in range(args.repeats):
                for label, kc in clients.items():
                    mbps[label].append(await throughput(kc, 20))
            rounds = 5
            for _ in range(rounds):
                for label, kc in clients.items():
                    for _ in range(args.round_trips // rounds):
                        t0 = time.perf_counter()
                        await kc.execute_interactive("pass", timeout=60)
                        rtt[label].append((time.perf_counter() - t0) * 1000)
        finally:
            for kc in clients.values():
                kc.stop_channels()
            for proc in procs:
                proc.terminate()
                proc.wait(timeout=10)
            await cori_km.shutdown_kernel()
            await base_km.shutdown_kernel()
    base_mbps = statistics.median(mbps["local-provisioner"])
    base_rtt = statistics.median(rtt["local-provisioner"])
    print(f"{'data path':<28}{'MB/s':>8}{'ratio':>8}{'rtt ms':>9}{'p95':>8}{'ratio':>8}")
    out = {}
    for label in clients:
        m, r = quantiles(mbps[label]), quantiles(rtt[label])
        out[label] = {"iopub_MB_per_s": m, "round_trip_ms": r}
        print(
            f"{label:<28}{m['median']:>8.1f}{m['median'] / base_mbps:>8.2f}"
            f"{r['median']:>9.2f}{r['p95']:>8.2f}{r['median'] / base_rtt:>8.2f}"
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "datapath.json").write_text(json.dumps(out, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="20 MB cells per data path")
    parser.add_argument("--round-trips", type=int, default=200, help="execute('pass') samples")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
