"""The main job on an embedded default, with no cluster: ``make demo``.

Writes a kernel spec that loads a module through the generated wrapper, starts
the kernel with jupyter_client's AsyncKernelManager, runs a cell, and prints
the result and the timings.  Everything goes into a temporary directory.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

MODULEFILE = """\
-- the demo's own module: what `module load nersc-demo/1.0` changes
setenv("NERSC_DEMO_GREETING", "hello from module nersc-demo/1.0")
prepend_path("NERSC_DEMO_PATH", "/opt/nersc-demo")
"""

CELL = """\
import os, sys
print(os.environ["NERSC_DEMO_GREETING"])
print("python", sys.version.split()[0], "pid", os.getpid())
6 * 7
"""


async def demo(workdir: Path) -> None:
    os.environ["JUPYTER_PATH"] = str(workdir / "share" / "jupyter")
    os.environ["JUPYTER_RUNTIME_DIR"] = str(workdir / "runtime")

    from jupyter_client.manager import AsyncKernelManager

    from nersc_provisioner import build_kernel_spec, install_kernel_spec, launch_plan

    modulefiles = workdir / "modulefiles"
    (modulefiles / "nersc-demo").mkdir(parents=True)
    (modulefiles / "nersc-demo" / "1.0.lua").write_text(MODULEFILE)

    t0 = time.perf_counter()
    spec = build_kernel_spec(
        "nersc-local",
        config={"module_use": [str(modulefiles)], "modules": ["nersc-demo/1.0"]},
        argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        display_name="NERSC demo (module wrapper)",
    )
    folder = install_kernel_spec(spec, "nersc-demo", prefix=str(workdir))
    t_install = time.perf_counter() - t0
    print(f"== kernel spec written to {folder}/kernel.json:")
    print(Path(folder, "kernel.json").read_text())
    print("== the wrapper the provisioner generates at launch:")
    print(launch_plan("nersc-demo").script)

    km = AsyncKernelManager(kernel_name="nersc-demo")
    t0 = time.perf_counter()
    await km.start_kernel()
    kc = km.client()
    kc.start_channels()
    await kc.wait_for_ready(timeout=60)
    t_start = time.perf_counter() - t0
    if km.transport == "ipc":
        sockets = f"IPC sockets in a private directory ({os.path.dirname(km.ip)}, mode 0700)"
    elif getattr(km, "curve_publickey", None) is not None:  # None before jupyter_client 8.9
        sockets = f"127.0.0.1 ports {km.shell_port}.. with CurveZMQ encryption"
    else:
        sockets = f"127.0.0.1 ports {km.shell_port}.. WITHOUT encryption"

    printed: list[str] = []
    result: list[str] = []

    def collect(msg: dict[str, object]) -> None:
        content = msg["content"]
        if not isinstance(content, dict):
            return
        if msg["msg_type"] == "stream":
            printed.append(content["text"])
        elif msg["msg_type"] == "execute_result":
            result.append(content["data"]["text/plain"])

    t0 = time.perf_counter()
    reply = await kc.execute_interactive(CELL, timeout=60, output_hook=collect)
    t_cell = time.perf_counter() - t0

    t0 = time.perf_counter()
    kc.stop_channels()
    await km.shutdown_kernel()
    t_shutdown = time.perf_counter() - t0

    print(f"== the kernel's sockets: {sockets}")
    print("== the cell:")
    print(CELL)
    print("== printed by the kernel:")
    print("".join(printed), end="")
    print(f"== result: {''.join(result)}   (status: {reply['content']['status']})")
    print("== timings:")
    print(
        json.dumps(
            {
                "install_kernel_spec_s": round(t_install, 3),
                "start_to_kernel_info_s": round(t_start, 3),
                "cell_round_trip_s": round(t_cell, 3),
                "shutdown_s": round(t_shutdown, 3),
            },
            indent=2,
        )
    )
    if reply["content"]["status"] != "ok" or "hello from module" not in "".join(printed):
        raise SystemExit("demo failed: the cell did not see the module's variable")


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="nersc-demo-") as tmp:
        asyncio.run(demo(Path(tmp)))


if __name__ == "__main__":
    main()
