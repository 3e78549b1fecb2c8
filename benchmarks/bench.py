"""Benchmark: our provisioners against jupyter_client's local-provisioner, in one run.

    .venv/bin/python benchmarks/bench.py [--starts 5] [--round-trips 200] [--scale 1,10,50]

Rows: local-provisioner (the baseline), nersc-local without and with a module
wrapper, and nersc-cori against the test rig's sshd in its network namespace
(needs `scripts/test-rig up`; skipped with a note otherwise).  Prints a table
(median, p95, ratio to the baseline) and writes benchmarks/results/bench.json.
The scale part starts N kernels at once per provisioner and reports the total
start time, round trips under load, and this process's threads, open file
descriptors and RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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

import psutil
from jupyter_client.asynchronous.client import AsyncKernelClient
from jupyter_client.manager import AsyncKernelManager

ARGV = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
MODULEFILE = 'setenv("NERSC_BENCH_MODULE", "1")\n'
RESULTS = Path(__file__).parent / "results"
RIG = Path(os.environ.get("NERSC_RIG_DIR") or "/var/tmp/nersc-provisioner-rig") / "rig.json"


def rig_config() -> dict[str, Any] | None:
    """nersc-cori settings for the test rig's sshd, or None without the rig."""
    try:
        ssh = json.loads(RIG.read_text())["ssh"]
    except (OSError, KeyError, ValueError):
        return None
    return {
        "host": ssh["host"],
        "user": ssh["user"],
        "identity_file": ssh["identity_file"],
        "known_hosts": [ssh["known_hosts"]],
        "ssh_config": "/dev/null",
        "remote_python": ssh["remote_python"],
    }


def rig_has_compute_node() -> bool:
    """True if the rig's Slurm node can be reached by ssh (Slurm mode can be measured)."""
    try:
        return bool(json.loads(RIG.read_text())["slurm"].get("node_addr"))
    except (OSError, KeyError, ValueError):
        return False


def quantiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {"median": statistics.median(ordered), "p95": p95, "n": len(ordered)}


def write_spec(data_dir: Path, name: str, provisioner: str, config: dict[str, Any]) -> None:
    folder = data_dir / "kernels" / name
    folder.mkdir(parents=True, exist_ok=True)
    remote = provisioner in ("nersc-cori", "nersc-perlmutter")
    spec = {
        "argv": ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"]
        if remote
        else ARGV,
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


async def measure(
    name: str, starts: int, round_trips: int, repeats: int = 3, megabytes: int = 20
) -> dict[str, Any]:
    cold_s, start_s, shutdown_s = [], [], []
    for _ in range(starts):  # cold: no other kernel, so a remote start logs in first
        km, kc, elapsed = await started(name)
        cold_s.append(elapsed)
        kc.stop_channels()
        await km.shutdown_kernel()

    km, kc, _ = await started(name)  # held open: the starts below are warm
    try:
        for _ in range(starts):
            other, other_kc, elapsed = await started(name)
            start_s.append(elapsed)
            other_kc.stop_channels()
            shutdown_s.append(await timed(lambda other=other: other.shutdown_kernel()))
        rtt = []
        for _ in range(round_trips):
            rtt.append(await timed(lambda: kc.execute_interactive("pass", timeout=30)))
        mbps = [await throughput(kc, megabytes) for _ in range(repeats)]
        interrupt_s = [await interrupt_once(km, kc) for _ in range(repeats)]
        restart_s = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            await km.restart_kernel()
            await kc.wait_for_ready(timeout=60)
            restart_s.append(time.perf_counter() - t0)
    finally:
        kc.stop_channels()
        await km.shutdown_kernel()
    return {
        "start_cold_s": quantiles(cold_s),
        "start_s": quantiles(start_s),
        "round_trip_ms": quantiles([t * 1000 for t in rtt]),
        "iopub_MB_per_s": quantiles(mbps),
        "interrupt_ms": quantiles([t * 1000 for t in interrupt_s]),
        "restart_s": quantiles(restart_s),
        "shutdown_s": quantiles(shutdown_s),
    }


def kill_sshd_sessions() -> int:
    """Kill both halves of every session of the rig's login-node sshd: a TCP reset."""
    pidfile = Path(json.loads(RIG.read_text())["ssh"]["sshd_pidfile"])
    master = psutil.Process(int(pidfile.read_text()))
    sessions = [p for p in master.children(recursive=True) if p.name() == "sshd"]
    for proc in sessions:
        proc.kill()
    return len(sessions)


async def drop_recovery(name: str, repeats: int) -> dict[str, Any]:
    """From killing the sshd serving the connection to a cell's output, with a variable kept."""
    km, kc, _ = await started(name)
    samples, tries_total = [], 0
    try:
        await kc.execute_interactive("kept = 'kept'", timeout=30)
        conn = km.provisioner._conn  # type: ignore[union-attr]
        for _ in range(repeats):
            before = conn.reconnects
            kill_sshd_sessions()
            t0 = time.perf_counter()
            # A request written into the old TCP connection before the reset is noticed
            # (about 0.2 s) is lost for good (ZeroMQ does not resend), so the cell is
            # sent once the connection is back, as the fault tests do.
            while conn.reconnects == before and time.perf_counter() - t0 < 60:
                await asyncio.sleep(0.02)
            while True:  # a cell whose output is lost (late IOPub) is retried, and counted
                tries_total += 1
                out: list[str] = []

                def hook(msg: dict[str, Any], out: list[str] = out) -> None:
                    if msg["msg_type"] == "stream":
                        out.append(msg["content"]["text"])

                with contextlib.suppress(TimeoutError):
                    await kc.execute_interactive("print(kept)", timeout=5, output_hook=hook)
                if "".join(out).strip() == "kept":
                    break
                if time.perf_counter() - t0 > 60:
                    raise RuntimeError("no recovery within 60 s")
            samples.append(time.perf_counter() - t0)
            await asyncio.sleep(1)
    finally:
        kc.stop_channels()
        await km.shutdown_kernel()
    return {"drop_recovery_s": quantiles(samples), "tries": tries_total}


async def scale(name: str, count: int, calls: int = 20) -> dict[str, Any]:
    """``count`` kernels at once: start time, round trips under load, our own footprint."""
    me = psutil.Process()
    before = {
        "threads": me.num_threads(),
        "fds": me.num_fds(),
        "rss_mb": me.memory_info().rss / 1e6,
    }
    t0 = time.perf_counter()
    kernels = await asyncio.gather(*(started(name) for _ in range(count)))
    total_start = time.perf_counter() - t0
    rtt: list[float] = []

    async def ping(kc: AsyncKernelClient) -> None:
        for _ in range(calls):
            rtt.append(await timed(lambda: kc.execute_interactive("pass", timeout=60)))

    try:
        await asyncio.gather(*(ping(kc) for _, kc, _ in kernels))
        after = {
            "threads": me.num_threads(),
            "fds": me.num_fds(),
            "rss_mb": me.memory_info().rss / 1e6,
        }
    finally:
        for _, kc, _ in kernels:
            kc.stop_channels()
        await asyncio.gather(*(km.shutdown_kernel() for km, _, _ in kernels))
    return {
        "kernels": count,
        "total_start_s": total_start,
        "round_trip_ms": quantiles([t * 1000 for t in rtt]),
        "before": before,
        "after": after,
        "rss_per_kernel_mb": (after["rss_mb"] - before["rss_mb"]) / count,
    }


def scale_table(rows: dict[str, list[dict[str, Any]]]) -> str:
    lines = [
        f"{'provisioner':<22}{'kernels':>8}{'start s':>9}{'rtt med':>9}{'rtt p95':>9}"
        f"{'threads':>9}{'fds':>6}{'RSS MB':>8}{'MB/kernel':>11}"
    ]
    for label, runs in rows.items():
        for r in runs:
            lines.append(
                f"{label:<22}{r['kernels']:>8}{r['total_start_s']:>9.2f}"
                f"{r['round_trip_ms']['median']:>9.2f}{r['round_trip_ms']['p95']:>9.2f}"
                f"{r['after']['threads']:>9}{r['after']['fds']:>6}{r['after']['rss_mb']:>8.0f}"
                f"{r['rss_per_kernel_mb']:>11.2f}"
            )
    return "\n".join(lines)


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
        configs: dict[str, tuple[str, dict[str, Any]]] = {
            "local-provisioner": ("local-provisioner", {}),
            "nersc-local (direct)": ("nersc-local", {}),
            "nersc-local (module)": (
                "nersc-local",
                {"module_use": [str(modulefiles.parent)], "modules": ["nersc-bench/1.0"]},
            ),
        }
        remote = rig_config()
        if remote is None:
            print(f"no test rig ({RIG}): nersc-cori rows skipped", file=sys.stderr)
        else:
            configs["nersc-cori (rig sshd)"] = ("nersc-cori", remote)
            # The same without CurveZMQ on the kernel's sockets: what encryption costs.
            configs["nersc-cori (no CurveZMQ)"] = (
                "nersc-cori",
                {**remote, "transport_encryption": "disabled"},
            )
            if rig_has_compute_node():
                # A start includes sbatch and the queue wait; a restart is a new step
                # in the same job.  Each kernel holds its own job (1 CPU of the node's 2).
                configs["nersc-cori (Slurm job)"] = (
                    "nersc-cori",
                    {**remote, "slurm": {"time": "30"}},
                )
        results: dict[str, dict[str, Any]] = {}
        names = {}
        for index, (label, (provisioner, config)) in enumerate(configs.items()):
            names[label] = name = f"bench{index}"
            write_spec(data, name, provisioner, config)
            print(f"measuring {label} ...", file=sys.stderr)
            results[label] = await measure(
                name,
                args.starts,
                args.round_trips,
                repeats=1 if args.smoke else 3,
                megabytes=1 if args.smoke else 20,
            )
        recovery: dict[str, dict[str, Any]] = {}
        for label in ("nersc-cori (rig sshd)", "nersc-cori (Slurm job)"):
            if label in names:
                print(f"drop recovery: {label} ...", file=sys.stderr)
                recovery[label] = await drop_recovery(names[label], 1 if args.smoke else 5)
        scaling: dict[str, list[dict[str, Any]]] = {}
        for label in ("local-provisioner", "nersc-cori (rig sshd)"):
            if label not in names:
                continue
            for count in args.scale:
                print(f"scale: {count} x {label} ...", file=sys.stderr)
                scaling.setdefault(label, []).append(await scale(names[label], count))
    print(table(results))
    print()
    for label, figures in recovery.items():
        q = figures["drop_recovery_s"]
        print(
            f"drop recovery   {label:<26}{q['median']:>10.3f}{q['p95']:>10.3f}"
            f"   (n={q['n']}, cells tried {figures['tries']})"
        )
    print()
    print(scale_table(scaling))
    RESULTS.mkdir(exist_ok=True)
    target = RESULTS / ("bench-smoke.json" if args.smoke else "bench.json")
    out = {
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
        },
        "results": results,
        "drop_recovery": recovery,
        "scale": scaling,
    }
    target.write_text(json.dumps(out, indent=2))
    print(f"wrote {target}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--starts", type=int, default=5, help="kernel starts per provisioner")
    parser.add_argument("--round-trips", type=int, default=200, help="execute('pass') samples")
    parser.add_argument(
        "--scale",
        type=lambda text: [int(n) for n in text.split(",") if n],
        default=[1, 10, 50],
        help="kernel counts for the scale run, comma-separated (default 1,10,50)",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="one quick pass of every figure (CI runs this so the benchmark cannot rot; "
        "its numbers mean nothing): --starts 1 --round-trips 5 --scale 1, 1 MB output",
    )
    args = parser.parse_args()
    if args.smoke:
        args.starts, args.round_trips, args.scale = 1, 5, [1]
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
