"""Benchmark: nersc-local against jupyter_client's local-provisioner, in the same run.

    .venv/bin/python benchmarks/bench_local.py [--starts 5] [--round-trips 200]

Prints a table (median and p95, and the ratio to the local-provisioner
baseline) and writes benchmarks/results/local.json.  Needs Lmod for the
module-wrapper row (`scripts/ensure-lmod`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from jupyter_client.asynchronous.client import AsyncKernelClient
from jupyter_client.manager import AsyncKernelManager

ARGV = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
MODULEFILE = 'setenv("NERSC_BENCH_MODULE", "1")\n'
RESULTS = Path(__file__).parent / "results"


def quantiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {"median": statistics.median(ordered), "p95": p95, "n": len(ordered)}


def write_spec(data_dir: Path, name: str, provisioner: str, config: dict[str, Any]) -> None:
    folder = data_dir / "kernels" / name
    folder.mkdir(parents=True, exist_ok=True)
    spec = {
        "argv": ARGV,
        "display_name": name,
        "language": "python",
        "metadata": {"kernel_provisioner": {"provisioner_name": provisioner, "config": config}},
    }
    (folder / "kernel.json").write_text(json.dumps(spec))


async def started(name: str) -> tuple[AsyncKernelManager, AsyncKernelClient, float]:
    km = AsyncKernelManager(kernel_name=name)
    t0 = time.perf_counter()
    await km.start_kernel()
    kc = km.client()
    kc.start_channels()
    await kc.wait_for_ready(timeout=60)
    return km, kc, time.perf_counter() - t0


async def timed(action: Callable[[], Awaitable[Any]]) -> float:
    t0 = time.perf_counter()
    await action()
    return time.perf_counter() - t0


async def interrupt_once(km: AsyncKernelManager, kc: AsyncKernelClient) -> float:
    msg_id = kc.execute("import time; time.sleep(60)")
    while True:  # wait until the kernel is busy with the cell
        msg = await kc.get_iopub_msg(timeout=10)
        if msg["msg_type"] == "execute_input":
            break
    await asyncio.sleep(0.2)
    t0 = time.perf_counter()
    await km.interrupt_kernel()
    while True:
        reply = await kc.get_shell_msg(timeout=10)
        if reply["parent_header"].get("msg_id") == msg_id:
            break
    elapsed = time.perf_counter() - t0
    if reply["content"].get("ename") != "KeyboardInterrupt":
        raise RuntimeError(f"interrupt did not interrupt: {reply['content']}")
    return elapsed


async def throughput(kc: AsyncKernelClient, megabytes: int = 20) -> float:
    code = f"import sys\nfor _ in range({megabytes * 16}): sys.stdout.write('x' * 65535 + '\\n')"
    received = 0

    def count(msg: dict[str, Any]) -> None:
        nonlocal received
        if msg["msg_type"] == "stream":
            received += len(msg["content"]["text"])

    t0 = time.perf_counter()
    await kc.execute_interactive(code, timeout=120, output_hook=count)
    elapsed = time.perf_counter() - t0
    return received / 1e6 / elapsed


async def measure(name: str, starts: int, round_trips: int) -> dict[str, Any]:
    start_s, shutdown_s = [], []
    for _ in range(starts):
        km, kc, elapsed = await started(name)
        start_s.append(elapsed)
        kc.stop_channels()
        shutdown_s.append(await timed(lambda km=km: km.shutdown_kernel()))

    km, kc, _ = await started(name)
    try:
        rtt = []
        for _ in range(round_trips):
            rtt.append(await timed(lambda: kc.execute_interactive("pass", timeout=30)))
        mbps = [await throughput(kc) for _ in range(3)]
        interrupt_s = [await interrupt_once(km, kc) for _ in range(3)]
        restart_s = []
        for _ in range(3):
            t0 = time.perf_counter()
            await km.restart_kernel()
            await kc.wait_for_ready(timeout=60)
            restart_s.append(time.perf_counter() - t0)
    finally:
        kc.stop_channels()
        await km.shutdown_kernel()
    return {
        "start_s": quantiles(start_s),
        "round_trip_ms": quantiles([t * 1000 for t in rtt]),
        "iopub_MB_per_s": quantiles(mbps),
        "interrupt_ms": quantiles([t * 1000 for t in interrupt_s]),
        "restart_s": quantiles(restart_s),
        "shutdown_s": quantiles(shutdown_s),
    }


def table(results: dict[str, dict[str, Any]]) -> str:
    base = results["local-provisioner"]
    rows = [f"{'figure':<16}{'provisioner':<26}{'median':>10}{'p95':>10}{'vs baseline':>14}"]
    for figure in base:
        for name, figures in results.items():
            q = figures[figure]
            ratio = q["median"] / base[figure]["median"]
            rows.append(
                f"{figure:<16}{name:<26}{q['median']:>10.3f}{q['p95']:>10.3f}{ratio:>13.2f}x"
            )
    return "\n".join(rows)


async def main_async(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="nersc-bench-") as tmp:
        data = Path(tmp)
        os.environ["JUPYTER_PATH"] = str(data)
        os.environ["JUPYTER_RUNTIME_DIR"] = str(data / "runtime")
        modulefiles = data / "modulefiles" / "nersc-bench"
        modulefiles.mkdir(parents=True)
        (modulefiles / "1.0.lua").write_text(MODULEFILE)
        configs = {
            "local-provisioner": ("local-provisioner", {}),
            "nersc-local (direct)": ("nersc-local", {}),
            "nersc-local (module)": (
                "nersc-local",
                {"module_use": [str(modulefiles.parent)], "modules": ["nersc-bench/1.0"]},
            ),
        }
        results: dict[str, dict[str, Any]] = {}
        for index, (label, (provisioner, config)) in enumerate(configs.items()):
            name = f"bench{index}"
            write_spec(data, name, provisioner, config)
            print(f"measuring {label} ...", file=sys.stderr)
            results[label] = await measure(name, args.starts, args.round_trips)
    print(table(results))
    RESULTS.mkdir(exist_ok=True)
    out = {
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
        },
        "results": results,
    }
    (RESULTS / "local.json").write_text(json.dumps(out, indent=2))
    print(f"wrote {RESULTS / 'local.json'}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--starts", type=int, default=5, help="kernel starts per provisioner")
    parser.add_argument("--round-trips", type=int, default=200, help="execute('pass') samples")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
