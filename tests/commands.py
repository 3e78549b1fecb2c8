"""Running the project's CLI as a user would: a separate process."""

from __future__ import annotations

import os
import subprocess
import sys


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``python -m nersc_provisioner ARGS`` with this process's environment."""
    return subprocess.run(
        [sys.executable, "-m", "nersc_provisioner", *args],
        capture_output=True,
        text=True,
        env=dict(os.environ),
        timeout=timeout,
        check=False,
    )
