"""Start many local kernels at once, several times: how many start, and why any fail.

    .venv/bin/python benchmarks/port_race.py [--kernels 50] [--runs 3]

jupyter_client's LocalProvisioner picks free ports, releases them, and writes
them into the connection file; the kernel binds them a moment later.  In between,
any other socket on the host (an outgoing connection's ephemeral port, another
kernel's) can take one, and that kernel fails with "Address already in use".
``nersc-local`` lets the kernel bind ports of its own choosing (CurveZMQ) or uses
IPC names in a private directory, so the race does not exist.  Each run starts
``--kernels`` kernels of each provisioner at once, in turns, and counts.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import started, write_spec

ROWS: dict[str, tuple[str, dict[str, Any]]] = {
    "local-provisioner": ("local-provisioner", {}),
    "nersc-local": ("nersc-local", {}),
}


def reason(failure: BaseException) -> str:
    text = str(failure)
    if "Address already in use" in text:
        return "Address already in use"
    return f"{type(failure).__name__}: {text.splitlines()[0] if text else ''}"[:120]


async def one_run(name: str, count: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    outcomes = await asyncio.gather(*(started(name) for _ in range(count)), return_exceptions=True)
    elapsed = time.perf_counter() - t0
    kernels = [k for k in outcomes if not isinstance(k, BaseException)]
    failures = collections.Counter(reason(k) for k in outcomes if isinstance(k, BaseException))
    for _, kc, _ in kernels:
        kc.stop_channels()
    await asyncio.gather(*(km.shutdown_kernel() for km, _, _ in kernels), return_exceptions=True)
    return {"started": len(kernels), "of": count, "seconds": elapsed, "failures": failures}


async def main_async(args: argparse.Namespace) -> None:
    results: dict[str, list[dict[str, Any]]] = {label: [] for label in ROWS}
    with tempfile.TemporaryDirectory(prefix="nersc-race-") as tmp:
        os.environ["JUPYTER_PATH"] = tmp
        os.environ["JUPYTER_RUNTIME_DIR"] = str(Path(tmp) / "runtime")
        names = {}
        for index, (label, (provisioner, config)) in enumerate(ROWS.items()):
            names[label] = f"race{index}"
            write_spec(Path(tmp), names[label], provisioner, config)
        for run in range(1, args.runs + 1):
            for label, name in names.items():
                print(f"run {run}: {args.kernels} x {label} ...", file=sys.stderr)
                results[label].append(await one_run(name, args.kernels))
    print(f"{'provisioner':<20}" + "".join(f"{'run ' + str(i + 1):>14}" for i in range(args.runs)))
    for label, runs in results.items():
        cells = "".join(f"{r['started']:>6}/{r['of']:<3}{r['seconds']:>4.0f}s" for r in runs)
        print(f"{label:<20}{cells}")
    for label, runs in results.items():
        for index, r in enumerate(runs, start=1):
            for why, n in r["failures"].items():
                print(f"  {label} run {index}: {n} failed: {why}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    k: [{**r, "failures": dict(r["failures"])} for r in v]
                    for k, v in results.items()
                },
                indent=2,
            )
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kernels", type=int, default=50, help="kernels started at once (50)")
    parser.add_argument("--runs", type=int, default=3, help="runs per provisioner (3)")
    parser.add_argument("--json", default="", help="also write the counts to this file")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
