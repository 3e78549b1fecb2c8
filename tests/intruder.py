"""What a second, unprivileged user of a host runs against our kernels (the attack
tests): an IOPub subscriber and an execute_request sender, given a ZeroMQ endpoint
(``tcp://127.0.0.1:PORT`` or ``ipc://PATH``), and a cell that prints markers to catch."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from typing import Any

from tests.kernels import run_cell
from tests.rig import SSHRig

#: Prints SUBSCRIBED once it has connected, then counts what it reads for 4 s.  Those 4 s
#: are the bound of the negative check ("it reads nothing"): the kernel prints a marker
#: every 0.1 s for 6 s from after SUBSCRIBED (:func:`print_markers`), so the window lies
#: inside the printing, and every test that expects nothing has a control case
#: (transport_encryption disabled) in which this same window reads the markers.
SUBSCRIBER = """
import sys, time, zmq
url, marker, mode = sys.argv[1], sys.argv[2].encode(), sys.argv[3]
ctx = zmq.Context()
sock = ctx.socket(zmq.SUB)
sock.setsockopt(zmq.SUBSCRIBE, b"")
if mode == "guess-curve":  # a client key pair and a made-up server key
    sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
    sock.curve_serverkey = zmq.curve_keypair()[0]
sock.connect(url)
print("SUBSCRIBED", flush=True)
messages = seen = 0
deadline = time.monotonic() + 4
while time.monotonic() < deadline:
    if sock.poll(200):
        frames = sock.recv_multipart()
        messages += 1
        seen += any(marker in frame for frame in frames)
print("MESSAGES", messages, "MARKER", seen, flush=True)
ctx.destroy(linger=0)
"""

#: Sends one execute_request that would create the canary file, signed with the given key
#: ("" for none), and waits up to 3 s for a reply: its request has then reached the kernel,
#: or never will (its ZeroMQ context is destroyed with linger 0).
EXECUTOR = """
import hashlib, hmac, json, sys, time, uuid, zmq
url, canary, key = sys.argv[1], sys.argv[2], sys.argv[3].encode()
ctx = zmq.Context()
sock = ctx.socket(zmq.DEALER)
sock.connect(url)
header = {"msg_id": uuid.uuid4().hex, "session": uuid.uuid4().hex, "username": "x",
          "msg_type": "execute_request", "version": "5.3", "date": "2026-01-01T00:00:00Z"}
content = {"code": f"open({canary!r}, 'w').write('ran')", "silent": False,
           "store_history": False, "user_expressions": {}, "allow_stdin": False}
parts = [json.dumps(p).encode() for p in (header, {}, {}, content)]
sig = hmac.new(key, digestmod=hashlib.sha256)
for part in parts:
    sig.update(part)
signature = sig.hexdigest().encode() if key else b""
sock.send_multipart([b"<IDS|MSG>", signature, *parts])
print("REPLY", bool(sock.poll(3000)), flush=True)
# A request that never got through (no handshake) must not hold the exit: linger 0.
ctx.destroy(linger=0)
"""


def intruder_python(rig: SSHRig, *, on_remote_host: bool) -> list[str]:
    """The argv that runs the rig's Python as the intruder: on the remote login node
    (inside its network namespace, where a remote kernel's loopback ports are), or on
    this host (where nersc-local kernels and the tunnel's listeners are)."""
    argv = ["runuser", "-u", rig.intruder, "--", rig.remote_python]
    if on_remote_host:
        argv = ["ip", "netns", "exec", rig.netns, *argv]
    return argv


async def print_markers(kc: Any, marker: str) -> None:
    """Have the kernel print ``marker`` every 0.1 s for 6 s, in a thread (the cell returns)."""
    code = (
        "import threading, time\n"
        "def _talk():\n"
        "    for _ in range(60):\n"
        f"        print({marker!r}, flush=True); time.sleep(0.1)\n"
        "threading.Thread(target=_talk, daemon=True).start()\n"
    )
    await run_cell(kc, code)


async def read_iopub(
    python: Sequence[str], kc: Any, url: str, modes: Sequence[str]
) -> dict[str, tuple[int, int]]:
    """One :data:`SUBSCRIBER` per mode ("plain", "guess-curve"), run by ``python``
    (:func:`intruder_python`) against ``url``; once each has subscribed, the kernel
    prints markers.  (messages, markers) that each one read."""
    marker = f"MARKER-{uuid.uuid4().hex[:8]}"
    procs: list[asyncio.subprocess.Process] = []
    try:
        for mode in modes:
            argv = [*python, "-c", SUBSCRIBER, url, marker, mode]
            pipe = asyncio.subprocess.PIPE
            procs.append(
                await asyncio.create_subprocess_exec(*argv, stdout=pipe, stderr=pipe, cwd="/")
            )
        for proc in procs:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            if line.strip() != b"SUBSCRIBED":
                proc.kill()
                _, err = await proc.communicate()
                raise AssertionError(f"the subscriber did not start: {line!r} {err.decode()}")
        await print_markers(kc, marker)
        read = {}
        for mode, proc in zip(modes, procs, strict=True):
            out, err = await asyncio.wait_for(proc.communicate(), 30)
            assert proc.returncode == 0, err.decode()
            words = out.decode().split()
            read[mode] = (int(words[1]), int(words[3]))
        return read
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
