#!/usr/bin/env python3
"""jupyter_client's own test suite, through each provisioner of ours (``make jc-suite``).

1. Fetch the sdist of the jupyter_client installed here (``pip download --no-binary
   :all: --no-deps jupyter_client==VERSION``), once, into a cache in this environment,
   keeping only its ``tests/`` and ``pyproject.toml`` (the installed package is tested,
   not the sdist's copy). The cache must be readable by the rig's user: the suite's own
   test kernels run from it on the remote host, which shares this filesystem.
2. Run its KernelManager, MultiKernelManager, restarter and client tests once per
   configuration, with ``tests/jupyter_client_suite/npr_jc_suite.py`` as a plugin: it
   writes a ``python3`` kernel spec naming our provisioner into each test's data
   directory, and routes the suite's other kernels the same way.
3. Print passed/skipped/failed/errors and the wall time per configuration; exit 1 if
   any test failed, erred or a run did not finish in time.

The rig (sshd, Slurm) must be up for nersc-cori and slurm; with CI=true a missing piece
fails the run. Runs are serialized, never parallel: they share the rig.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PLUGIN_DIR = REPO / "tests" / "jupyter_client_suite"
CONFIGS = ("nersc-local", "nersc-cori", "slurm")
#: The suite's files that start kernels through a kernel manager (docs/compatibility.md
#: says why these and not the others).
FILES = (
    "tests/test_kernelmanager.py",
    "tests/test_multikernelmanager.py",
    "tests/test_restarter.py",
    "tests/test_client.py",
)


#: Seconds tornado's gen_test allows a test of the suite (its ASYNC_TEST_TIMEOUT).
ASYNC_TEST_TIMEOUT = 30


def default_cache() -> Path:
    return Path(sys.prefix) / "share" / "nersc-provisioner" / "jupyter-client-suite"


def _readable_by_all(root: Path) -> None:
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)


def fetch_suite(version: str, cache: Path) -> Path:
    """The folder with the suite of jupyter_client ``version`` (downloaded if missing)."""
    target = cache / f"jupyter_client-{version}"
    if (target / "tests" / "conftest.py").is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:",
             "--no-deps", f"jupyter_client=={version}", "--dest", tmp],
            check=True,
        )  # fmt: skip
        (sdist,) = Path(tmp).glob("jupyter_client-*.tar.gz")
        unpacked = Path(tmp) / "suite"
        prefix = f"jupyter_client-{version}/"
        with tarfile.open(sdist) as tar:
            members = []
            for member in tar.getmembers():
                name = member.name.removeprefix(prefix)
                if name == "pyproject.toml" or name.startswith("tests/"):
                    member.name = name
                    members.append(member)
            tar.extractall(unpacked, members=members, filter="data")
        _readable_by_all(unpacked)
        unpacked.rename(target)
    return target


@dataclass
class Outcome:
    config: str
    passed: int = 0
    skipped: int = 0
    failed: int = 0
    errors: int = 0
    seconds: float = 0.0
    problem: str = ""


#: Seconds pytest may take to exit once its report is written. A test that failed
#: half-way can leave ZeroMQ sockets open, and pytest then hangs at exit terminating
#: their context (seen with jupyter_client 8.9.1).
EXIT_GRACE = 30.0


def _wait(proc: subprocess.Popen[bytes], report: Path, deadline: float) -> str:
    """Wait for pytest; kill its process group if it runs past ``deadline``, or hangs
    after writing its report. What went wrong ("" if nothing)."""
    while proc.poll() is None:
        now = time.monotonic()
        hung = report.is_file() and time.time() - report.stat().st_mtime > EXIT_GRACE
        if now > deadline or hung:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            if hung:
                return f"hung for {EXIT_GRACE:g} s after its report (killed)"
            return "did not finish in time (killed)"
        time.sleep(0.5)
    return ""


def run_config(name: str, suite: Path, timeout: float, extra: list[str]) -> Outcome:
    """One run of the suite through configuration ``name``; its counts."""
    outcome = Outcome(name)
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        command = [
            sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
            "-p", "no:asyncio",  # ours; the suite runs its coroutines with pytest_jupyter
            "-p", "npr_jc_suite", f"--npr-config={name}",
            "--color=no", "-q", f"--junitxml={report}", *extra, *FILES,
        ]  # fmt: skip
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PLUGIN_DIR), env.get("PYTHONPATH")]))
        # tornado's gen_test gives a whole test 5 s by default; a test of three lifecycles
        # of a kernel in a Slurm job takes about that on an idle rig.
        env.setdefault("ASYNC_TEST_TIMEOUT", str(ASYNC_TEST_TIMEOUT))
        print(f"\n=== jupyter_client suite through {name}: {' '.join(command[2:])}", flush=True)
        started = time.monotonic()
        proc = subprocess.Popen(command, cwd=suite, env=env, start_new_session=True)
        outcome.problem = _wait(proc, report, started + timeout)
        outcome.seconds = time.monotonic() - started
        if not outcome.problem and not report.is_file():
            outcome.problem = f"pytest exited with code {proc.returncode} before its report"
        if report.is_file():
            suite_node = ET.parse(report).getroot()  # noqa: S314 - pytest's own report
            if suite_node.tag == "testsuites":
                suite_node = suite_node[0]
            total = int(suite_node.get("tests", 0))
            outcome.failed = int(suite_node.get("failures", 0))
            outcome.errors = int(suite_node.get("errors", 0))
            outcome.skipped = int(suite_node.get("skipped", 0))
            outcome.passed = total - outcome.failed - outcome.errors - outcome.skipped
        if proc.returncode and not (outcome.problem or outcome.failed or outcome.errors):
            # e.g. processes of its kernels left behind (the plugin lists them)
            outcome.problem = f"pytest exited with code {proc.returncode}"
    return outcome


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--config", action="append", choices=CONFIGS, help="run only this one (repeatable)"
    )
    parser.add_argument("--cache-dir", type=Path, default=default_cache())
    parser.add_argument(
        "--timeout", type=float, default=900.0, help="seconds allowed per configuration"
    )
    parser.add_argument("pytest_args", nargs="*", help="more pytest arguments (after --)")
    args = parser.parse_args(argv)
    version = importlib.metadata.version("jupyter_client")
    suite = fetch_suite(version, args.cache_dir)
    outcomes = [
        run_config(name, suite, args.timeout, args.pytest_args) for name in args.config or CONFIGS
    ]
    print(f"\njupyter_client {version}'s suite ({', '.join(FILES)}) through our provisioners:")
    print(f"  {'config':<12} {'passed':>6} {'skipped':>7} {'failed':>6} {'errors':>6} {'wall':>7}")
    for o in outcomes:
        print(
            f"  {o.config:<12} {o.passed:>6} {o.skipped:>7} {o.failed:>6} {o.errors:>6} "
            f"{o.seconds:>6.0f}s" + (f"  {o.problem}" if o.problem else "")
        )
    bad = [o for o in outcomes if o.failed or o.errors or o.problem]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
