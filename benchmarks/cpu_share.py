"""Workloads to profile, and where the CPU time of each party goes.

    .venv/bin/python benchmarks/cpu_share.py throughput [--data-path tunnel|direct]
    .venv/bin/python benchmarks/cpu_share.py round-trips [--data-path ...]
    .venv/bin/python benchmarks/cpu_share.py scale --kernels 40

Needs the test rig (``scripts/test-rig up``).  ``throughput`` and ``round-trips``
run the same cells on a local-provisioner kernel and on a nersc-cori kernel, and
print the CPU seconds each party used while they ran: this process's main thread
(the Jupyter side: jupyter_client, pyzmq), this process's other threads (ours:
the forwarder, paramiko's transport thread, the SSH workers), the rig's sshd
processes, and the kernel.  ``scale`` starts N nersc-cori kernels and runs round
trips on all of them at once.

To see *where* in Python the time goes, run any of them under py-spy, e.g.:

    py-spy record --gil --threads --format raw -o /tmp/p.raw -- \\
        .venv/bin/python benchmarks/cpu_share.py throughput

(``--gil`` samples only the thread holding the interpreter lock, which is what
the Jupyter side's own work competes for.)  docs/performance.md quotes both.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
from bench import RIG, rig_config, scale, scale_table, started, throughput, write_spec
from jupyter_client.asynchronous.client import AsyncKernelClient
from jupyter_client.manager import AsyncKernelManager


def cpu_snapshot(kernel_pid: int) -> dict[str, float]:
    me = psutil.Process()
    threads = {t.id: t.user_time + t.system_time for t in me.threads()}
    pidfile = Path(json.loads(RIG.read_text())["ssh"]["sshd_pidfile"])
    master = psutil.Process(int(pidfile.read_text()))
    sshd = sum(
        sum(p.cpu_times()[:2]) for p in master.children(recursive=True) if p.name() == "sshd"
    )
    return {
        "jupyter main thread": threads.get(me.pid, 0.0),
        "our threads": sum(v for k, v in threads.items() if k != me.pid),
        "sshd": sshd,
        "kernel": sum(psutil.Process(kernel_pid).cpu_times()[:2]),
        "wall": time.perf_counter(),
    }


def kernel_pid(km: AsyncKernelManager) -> int:
    provisioner: Any = km.provisioner
    remote = getattr(provisioner, "remote", None)
    return int(remote.pid if remote is not None else provisioner.process.pid)


async def workload(kc: AsyncKernelClient, what: str) -> str:
    if what == "throughput":
        rates = [await throughput(kc, 20) for _ in range(4)]
        return f"{sum(rates) / len(rates):.1f} MB/s (mean of 4 x 20 MB)"
    t0 = time.perf_counter()
    for _ in range(400):
        await kc.execute_interactive("pass", timeout=30)
    return f"{(time.perf_counter() - t0) / 400 * 1000:.2f} ms per round trip (400)"


async def main_async(args: argparse.Namespace) -> None:
    config = rig_config()
    if config is None:
        sys.exit(f"no test rig ({RIG}): run scripts/test-rig up first")
    with tempfile.TemporaryDirectory(prefix="nersc-profile-") as tmp:
        data = Path(tmp)
        os.environ["JUPYTER_PATH"] = str(data)
        os.environ["JUPYTER_RUNTIME_DIR"] = str(data / "runtime")
        write_spec(data, "base", "local-provisioner", {})
        write_spec(data, "cori", "nersc-cori", {**config, "data_path": args.data_path})
        if args.what == "scale":
            print(scale_table({"nersc-cori": [await scale("cori", args.kernels, calls=40)]}))
            return
        for label, name in (
            ("local-provisioner", "base"),
            (f"nersc-cori {args.data_path}", "cori"),
        ):
            km, kc, _ = await started(name)
            try:
                await workload(kc, "round-trips")  # warm up
                before = cpu_snapshot(kernel_pid(km))
                figure = await workload(kc, args.what)
                after = cpu_snapshot(kernel_pid(km))
            finally:
                kc.stop_channels()
                await km.shutdown_kernel()
            used = {k: after[k] - before[k] for k in before}
            parts = ", ".join(f"{k} {v:.2f}" for k, v in used.items() if k != "wall")
            print(f"{label:<26} {figure}; CPU s: {parts}; wall {used['wall']:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("throughput", "round-trips", "scale"))
    parser.add_argument("--data-path", choices=("tunnel", "direct"), default="tunnel")
    parser.add_argument("--kernels", type=int, default=40, help="for scale")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
