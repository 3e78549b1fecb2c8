"""The pure parts of a local kernel's socket protection: which ways are tried, what the
connection file says for each, and the private directory's rules."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from nersc_provisioner.provisioners.local_sockets import (
    Protection,
    connection_for,
    protection_attempts,
    writes_back_ports,
)
from nersc_provisioner.transports.local_sockets import (
    MAX_SOCKET_PATH,
    check_private_dir,
    ipc_connection,
    kernel_ports,
    make_private_dir,
    write_private_json,
)

WRITTEN = {
    "shell_port": 5001, "iopub_port": 5002, "stdin_port": 5003, "control_port": 5004,
    "hb_port": 5005, "ip": "127.0.0.1", "transport": "tcp", "key": "k",
    "signature_scheme": "hmac-sha256", "kernel_name": "x",
    "curve_publickey": "old", "curve_secretkey": "old",
}  # fmt: skip
IPYKERNEL = ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"]


def test_attempts_by_policy() -> None:
    both = [Protection.CURVE, Protection.IPC]
    assert protection_attempts("auto", self_binding=True, curve_keys=True) == [
        *both,
        Protection.PLAIN,
    ]
    assert protection_attempts("required", self_binding=True, curve_keys=True) == both
    assert protection_attempts("disabled", self_binding=True, curve_keys=True) == [Protection.PLAIN]
    # A kernel that may not write its ports back (IRkernel, IJulia) starts on IPC.
    assert protection_attempts("auto", self_binding=False, curve_keys=True) == [
        Protection.IPC,
        Protection.PLAIN,
    ]
    # A kernel manager that cannot carry CurveZMQ keys (jupyter_client < 8.10): no CURVE.
    assert protection_attempts("required", self_binding=True, curve_keys=False) == [Protection.IPC]
    # A restart goes straight to what worked.
    assert protection_attempts(
        "auto", self_binding=True, curve_keys=True, remembered=Protection.IPC
    ) == [Protection.IPC]


def test_which_kernels_bind_their_own_ports() -> None:
    assert writes_back_ports(IPYKERNEL, {})
    assert writes_back_ports(["/opt/julia", "kernel.jl", "{connection_file}"], {
        "supported_encryption": ["curve"]
    })  # fmt: skip
    assert not writes_back_ports(["R", "--slave", "-e", "IRkernel::main()"], {})


def test_connection_file_for_each_way(tmp_path: Path) -> None:
    keys = (b"P" * 40, b"S" * 40)
    curve = connection_for(Protection.CURVE, WRITTEN, curve_keys=keys, socket_dir=None,
                           tcp_ports=None, self_binding=True)  # fmt: skip
    assert [curve[n] for n in ("shell_port", "hb_port")] == [0, 0]  # the kernel chooses
    assert curve["curve_publickey"] == "P" * 40
    assert (curve["transport"], curve["ip"], curve["key"]) == ("tcp", "127.0.0.1", "k")
    ipc = connection_for(Protection.IPC, WRITTEN, curve_keys=None, socket_dir=str(tmp_path),
                         tcp_ports=None, self_binding=True)  # fmt: skip
    assert ipc["transport"] == "ipc"
    assert ipc["ip"] == f"{tmp_path}/k"
    assert [ipc[n] for n in ("shell_port", "iopub_port", "hb_port")] == [1, 2, 5]
    assert "curve_publickey" not in ipc
    plain = connection_for(Protection.PLAIN, WRITTEN, curve_keys=None, socket_dir=None,
                           tcp_ports=None, self_binding=False)  # fmt: skip
    assert plain["shell_port"] == 5001  # jupyter_client's choice, for a kernel that needs it
    assert "curve_secretkey" not in plain
    again = connection_for(Protection.CURVE, WRITTEN, curve_keys=keys, socket_dir=None,
                           tcp_ports={"shell_port": 7001}, self_binding=True)  # fmt: skip
    assert again["shell_port"] == 7001  # a restart asks for the ports it had


def test_private_dir_is_0700_and_short(tmp_path: Path) -> None:
    parent = tmp_path / "runtime"
    parent.mkdir(mode=0o700)
    made = make_private_dir((str(parent),))
    assert Path(made).parent == parent
    assert stat.S_IMODE(os.stat(made).st_mode) == 0o700
    check_private_dir(made)
    assert len(ipc_connection(made)["ip"] + "-5") <= MAX_SOCKET_PATH


def test_a_parent_too_long_or_open_to_others_is_passed_over(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 100)
    deep.mkdir(mode=0o700)
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    made = make_private_dir((str(deep), str(shared)))
    assert not made.startswith((str(deep), str(shared)))
    assert len(ipc_connection(made)["ip"] + "-5") <= MAX_SOCKET_PATH
    check_private_dir(made)
    os.rmdir(made)


def test_a_directory_open_to_others_is_refused(tmp_path: Path) -> None:
    opened = tmp_path / "open"
    opened.mkdir()
    opened.chmod(0o755)
    with pytest.raises(PermissionError, match="open to others"):
        check_private_dir(str(opened))


def test_connection_file_is_0600_and_ports_are_read_back(tmp_path: Path) -> None:
    path = str(tmp_path / "kernel.json")
    write_private_json(path, {**WRITTEN, "shell_port": 0})
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert kernel_ports(path) is None  # not all written back yet
    write_private_json(path, WRITTEN)
    assert kernel_ports(path) == {n: WRITTEN[n] for n in (
        "shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")}  # fmt: skip
    Path(path).write_text('{"shell_port": ')  # caught half-written
    assert kernel_ports(path) is None
