"""Soak: many nersc-cori kernels on one connection for a long time, with drops.

Run with the test rig up (``scripts/test-rig up``)::

    python benchmarks/soak.py                 # 20 kernels, 10 minutes, a drop every 60 s
    python benchmarks/soak.py --kernels 5 --minutes 1 --drop-every 20   # a short one

Every kernel runs a small cell in a loop.  Every ``--drop-every`` seconds the sshd
process serving our connection is killed (the TCP connection resets) and the
provisioner reconnects.  Printed at the start, every minute and at the end: cells
run, errors (a cell that did not answer in time, counted, not fatal), reconnects,
and this process's threads, open file descriptors and RSS.  Nothing may grow
without bound: the end is compared with the first minute.  Writes
``benchmarks/results/soak.json``.
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
from jupyter_client.manager import AsyncKernelManager

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import RESULTS, RIG, kill_sshd_sessions, rig_config, write_spec


def _quiet(msg: dict[str, Any]) -> None:
    """Cell output is not printed."""


def footprint() -> dict[str, float]:
    me = psutil.Process()
    return {
        "threads": me.num_threads(),
        "fds": me.num_fds(),
        "rss_mb": round(me.memory_info().rss / 1e6, 1),
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    config = rig_config()
    if config is None:
        raise SystemExit(f"no test rig ({RIG}); run scripts/test-rig up")
    with tempfile.TemporaryDirectory(prefix="nersc-soak-") as tmp:
        data = Path(tmp)
        os.environ["JUPYTER_PATH"] = str(data)
        os.environ["JUPYTER_RUNTIME_DIR"] = str(data / "runtime")
        write_spec(data, "soak", "nersc-cori", config)
        managers = [AsyncKernelManager(kernel_name="soak") for _ in range(args.kernels)]
        t0 = time.monotonic()
        try:
            await asyncio.gather(*(km.start_kernel() for km in managers))
        except BaseException:  # leave no kernel behind on a failed start
            await asyncio.gather(
                *(km.shutdown_kernel(now=True) for km in managers if km.has_kernel),
                return_exceptions=True,
            )
            raise
        clients = [km.client() for km in managers]
        for kc in clients:
            kc.start_channels()
        await asyncio.gather(*(kc.wait_for_ready(timeout=60) for kc in clients))
        print(f"started {args.kernels} kernels in {time.monotonic() - t0:.1f} s", flush=True)
        start = footprint()
        counts = {"cells": 0, "errors": 0, "drops": 0}
        samples: list[dict[str, Any]] = []
        stop = time.monotonic() + args.minutes * 60

        async def worker(index: int, kc: Any) -> None:
            n = 0
            while time.monotonic() < stop:
                try:
                    reply = await kc.execute_interactive(
                        f"x_{index} = {n}; sum(range(1000))", timeout=20, output_hook=_quiet
                    )
                    if reply["content"]["status"] == "ok":
                        counts["cells"] += 1
                    else:
                        counts["errors"] += 1
                except Exception:  # a cell lost in a drop: counted
                    counts["errors"] += 1
                n += 1
                await asyncio.sleep(0.2)

        async def dropper() -> None:
            while time.monotonic() + args.drop_every < stop:
                await asyncio.sleep(args.drop_every)
                counts["drops"] += kill_sshd_sessions() > 0

        async def reporter() -> None:
            minute = 0
            while time.monotonic() < stop:
                await asyncio.sleep(min(60, max(0.0, stop - time.monotonic())))
                minute += 1
                conn = managers[0].provisioner.connection  # type: ignore[union-attr]
                sample = {
                    "minute": minute,
                    **footprint(),
                    **counts,
                    "reconnects": conn.reconnects if conn is not None else -1,
                }
                samples.append(sample)
                print(json.dumps(sample), flush=True)

        await asyncio.gather(
            *(worker(i, kc) for i, kc in enumerate(clients)), dropper(), reporter()
        )
        # Every kernel is alive and kept its variables through every drop.
        kept = 0
        for index, kc in enumerate(clients):
            reply = await kc.execute_interactive(f"assert isinstance(x_{index}, int)", timeout=30)
            kept += reply["content"]["status"] == "ok"
        for kc in clients:
            kc.stop_channels()
        await asyncio.gather(*(km.shutdown_kernel() for km in managers))
        end = footprint()
    conn_reconnects = samples[-1]["reconnects"] if samples else 0
    return {
        "kernels": args.kernels,
        "minutes": args.minutes,
        "drop_every_s": args.drop_every,
        "start": start,
        "end": end,
        "samples": samples,
        "cells": counts["cells"],
        "errors": counts["errors"],
        "drops": counts["drops"],
        "reconnects": conn_reconnects,
        "kernels_alive_with_variables_at_end": kept,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernels", type=int, default=20)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--drop-every", type=float, default=60, help="seconds between drops")
    result = asyncio.run(main_async(parser.parse_args()))
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "soak.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
