"""What a second, unprivileged user of a host runs against our kernels (the attack
tests): an IOPub subscriber and an execute_request sender, given a ZeroMQ endpoint
(``tcp://127.0.0.1:PORT`` or ``ipc://PATH``), and a cell that prints markers to catch."""

from __future__ import annotations

from typing import Any

from tests.kernels import run_cell

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


async def print_markers(kc: Any, marker: str) -> None:
    code = (
        "import threading, time\n"
        "def _talk():\n"
        "    for _ in range(60):\n"
        f"        print({marker!r}, flush=True); time.sleep(0.1)\n"
        "threading.Thread(target=_talk, daemon=True).start()\n"
    )
    await run_cell(kc, code)
