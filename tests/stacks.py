"""Which stack the tests run on: the newest, or the oldest pyproject.toml admits
(``make test-oldest``, pinned by ``.ci/oldest-stack.txt``)."""

from __future__ import annotations

import importlib.metadata

import jupyter_client
import pytest

JUPYTER_CLIENT = importlib.metadata.version("jupyter_client")

#: jupyter_client 8.10 or later gives a kernel's clients CurveZMQ keys (8.9.x has the
#: keys, but its KernelManager.client() hands them over as text).  Read from the
#: version number, not from the package's own check, so that the tests can hold that
#: check to it.
CURVE_STACK = tuple(jupyter_client.version_info[:2]) >= (8, 10)

#: For a test that asserts CurveZMQ on the Jupyter side.
needs_curve_stack = pytest.mark.skipif(
    not CURVE_STACK,
    reason=f"asserts CurveZMQ on the Jupyter side, which jupyter_client {JUPYTER_CLIENT} "
    "cannot do (8.10 or later can)",
)

IPYKERNEL = importlib.metadata.version("ipykernel")

#: ipykernel 7.3 or later encrypts with the CurveZMQ keys in its connection file; an
#: older one ignores them, and a CurveZMQ client of it never completes a handshake.
CURVE_IPYKERNEL = tuple(int(part) for part in IPYKERNEL.split(".")[:2]) >= (7, 3)

#: Why a test that starts this venv's ipykernel with CurveZMQ keys cannot run here.
NO_CURVE_IPYKERNEL = (
    f"starts this venv's ipykernel with CurveZMQ keys, which ipykernel {IPYKERNEL} "
    "ignores (7.3 or later encrypts)"
)
