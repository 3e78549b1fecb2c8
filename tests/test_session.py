"""The session layer end to end, on this machine: a real ipykernel, the relay as a
real subprocess fed its program on stdin (as the remote side will run it), the local
end in this process, and between them a TCP proxy that the test cuts with a reset.

Jupyter's own clients (``BlockingKernelClient``, ``AsyncKernelClient``) connect to the
local end's sockets, with CurveZMQ, and see every reply and every line of output
exactly once, on the first try, across the cuts.  No sshd is needed: the stream that
``open_stream()`` returns here is a plain socket through the proxy; over SSH it will
be a ``direct-tcpip`` channel.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import zmq
from jupyter_client.asynchronous.client import AsyncKernelClient
from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.session import Session

from nersc_provisioner.session import LocalEnd, RelaySettings, relay_program, tcp_opener
from nersc_provisioner.session.protocol import (
    AUTH,
    HELLO,
    SHELL,
    AuthError,
    FrameReader,
    Handshake,
    encode_data,
    encode_frame,
)
from tests.stacks import CURVE_IPYKERNEL, NO_CURVE_IPYKERNEL, needs_curve_stack

pytestmark = [pytest.mark.kernel]

PORTS = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")
NOTICE = "[nersc_provisioner]"


# --- the parts ----------------------------------------------------------------------------


@dataclass
class Kernel:
    proc: subprocess.Popen[bytes]
    info: dict[str, Any]
    path: Path


def start_kernel(tmp: Path, key: str = "") -> Kernel:
    """ipykernel with CurveZMQ on ports it picks, as the launch script starts it."""
    if not CURVE_IPYKERNEL:  # the oldest stack (make test-oldest)
        pytest.skip(NO_CURVE_IPYKERNEL)
    tmp.mkdir(exist_ok=True)
    public, secret = zmq.curve_keypair()
    info: dict[str, Any] = {
        "transport": "tcp",
        "ip": "127.0.0.1",
        **dict.fromkeys(PORTS, 0),
        "key": key or uuid.uuid4().hex,
        "signature_scheme": "hmac-sha256",
        "kernel_name": "",
        "curve_publickey": public.decode(),
        "curve_secretkey": secret.decode(),
    }
    path = tmp / "kernel.json"
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "w") as out:
        json.dump(info, out)
    log = (tmp / "kernel.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ipykernel_launcher", "-f", str(path)],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(ValueError):
            written = json.loads(path.read_text())
            if all(written.get(p) for p in PORTS):
                return Kernel(proc, written, path)
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"the kernel wrote no ports: {(tmp / 'kernel.log').read_text()}")


@dataclass
class Relay:
    proc: subprocess.Popen[str]
    port: int
    settings_file: Path
    log: Path


def start_relay(kernel: Kernel, tmp: Path, secret: bytes, buffer_bytes: int) -> Relay:
    """The relay as the remote side runs it: ``python -`` with its program on stdin,
    its settings in a 0600 file."""
    settings = RelaySettings(
        connection_file=str(kernel.path),
        secret=secret,
        buffer_bytes=buffer_bytes,
        kernel_pid=kernel.proc.pid,
        exit_linger=5.0,
    )
    settings_file = tmp / "relay.json"
    with os.fdopen(os.open(settings_file, os.O_WRONLY | os.O_CREAT, 0o600), "w") as out:
        out.write(settings.to_json())
    log = tmp / "relay.log"
    with log.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            start_new_session=True,
        )
    assert proc.stdin is not None
    assert proc.stdout is not None
    proc.stdin.write(relay_program(str(settings_file)))
    proc.stdin.close()
    ready, _, _ = select.select([proc.stdout], [], [], 30)
    line = proc.stdout.readline() if ready else ""
    match = re.fullmatch(r"NPR_RELAY_PORT (\d+)\n", line)
    if match is None:
        proc.kill()
        raise AssertionError(f"relay said {line!r}; its log: {log.read_text()}")
    return Relay(proc, int(match.group(1)), settings_file, log)


def reset(sock: socket.socket) -> None:
    """Close with a TCP reset, as a dead SSH connection ends."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@dataclass(eq=False)
class _Pair:
    client: socket.socket
    upstream: socket.socket
    cut: bool = False
    done: threading.Event = field(default_factory=threading.Event)


class Proxy:
    """A TCP proxy to the relay that the test can cut: both sides reset at once, and
    ``open_stream()`` says the link is down until :meth:`restore`."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.down = False
        self.closed = False
        self.pairs: list[_Pair] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def open_stream(self) -> socket.socket | None:
        if self.down:
            return None
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def cut(self) -> None:
        with self.lock:
            self.down = True
            pairs = list(self.pairs)
            for pair in pairs:
                pair.cut = True
        for pair in pairs:
            assert pair.done.wait(5)

    def restore(self) -> None:
        self.down = False

    def close(self) -> None:
        self.closed = True
        self.cut()
        self.listener.close()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.down:
                reset(client)
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target))
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pair = _Pair(client, upstream)
            with self.lock:
                self.pairs.append(pair)
            threading.Thread(target=self._pump, args=(pair,), daemon=True).start()

    def _pump(self, pair: _Pair) -> None:
        ends = {pair.client: pair.upstream, pair.upstream: pair.client}
        try:
            while not pair.cut:
                readable, _, _ = select.select(list(ends), [], [], 0.02)
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        pair.cut = True
                        break
                    ends[sock].sendall(data)
        except OSError:
            pass
        reset(pair.client)
        reset(pair.upstream)
        with self.lock:
            self.pairs.remove(pair)
        pair.done.set()


@dataclass
class Session_:
    kernel: Kernel
    relay: Relay
    proxy: Proxy
    local: LocalEnd
    secret: bytes
    info: dict[str, Any]  # what a client of the local end is given
    clients: list[Any] = field(default_factory=list)
    #: More of each, made by a test (a restart, a reattach): cleaned up with the rest.
    others: list[Kernel | Relay | Proxy | LocalEnd] = field(default_factory=list)

    def client(self) -> BlockingKernelClient:
        kc = BlockingKernelClient()
        kc.load_connection_info(self.info)  # type: ignore[arg-type]
        kc.start_channels()
        self.clients.append(kc)
        kc.wait_for_ready(timeout=30)
        return kc

    def curve_client_socket(self, kind: int, port: str, context: zmq.Context[Any]) -> Any:
        sock = context.socket(kind)
        sock.linger = 0
        public = self.info["curve_publickey"].encode()
        sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
        sock.curve_serverkey = public
        sock.connect(f"tcp://127.0.0.1:{self.info[port]}")
        return sock


SessionFactory = Callable[..., Session_]


@pytest.fixture
def session(tmp_path: Path) -> Iterator[SessionFactory]:
    made: list[Session_] = []

    def make(buffer_bytes: int = 256 * 1024 * 1024, hb_grace: float = 60.0) -> Session_:
        kernel = start_kernel(tmp_path / f"kernel-{len(made)}")
        secret = os.urandom(32)
        relay = start_relay(kernel, kernel.path.parent, secret, buffer_bytes)
        proxy = Proxy(relay.port)
        public, private = zmq.curve_keypair()
        local = LocalEnd(proxy.open_stream, secret, curve_keys=(public, private), hb_grace=hb_grace)
        local.start()
        info = {
            **local.connection_info(),
            "key": kernel.info["key"],
            "signature_scheme": kernel.info["signature_scheme"],
            "curve_publickey": public.decode(),
            "curve_secretkey": private.decode(),
        }
        made.append(Session_(kernel, relay, proxy, local, secret, info))
        assert local.wait_connected(10), local.stats()
        return made[-1]

    yield make
    for s in made:
        for kc in s.clients:
            with contextlib.suppress(Exception):
                kc.stop_channels()
        parts = [s.local, s.proxy, s.relay, s.kernel, *s.others]
        for part in parts:
            if isinstance(part, LocalEnd):
                part.stop()
            elif isinstance(part, Proxy):
                part.close()
        for part in parts:
            if isinstance(part, Relay | Kernel):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(part.proc.pid, signal.SIGKILL)
                part.proc.wait(10)
                if isinstance(part, Relay) and part.proc.stdout is not None:
                    part.proc.stdout.close()


def collect(
    kc: BlockingKernelClient,
    msg_id: str,
    timeout: float = 30,
    on_message: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """The IOPub messages of request ``msg_id``, up to its ``idle``."""
    deadline = time.monotonic() + timeout
    found = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"no idle for {msg_id} within {timeout} s: {found[-3:]}")
        try:
            msg = kc.get_iopub_msg(timeout=remaining)
        except queue.Empty:
            continue
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        found.append(msg)
        if on_message is not None:
            on_message(msg)
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            return found


def stdout_of(messages: list[dict[str, Any]]) -> str:
    return "".join(
        m["content"]["text"]
        for m in messages
        if m["msg_type"] == "stream" and m["content"]["name"] == "stdout"
    )


def reply_to(kc: BlockingKernelClient, msg_id: str, timeout: float = 10) -> dict[str, Any]:
    reply: dict[str, Any] = kc.get_shell_msg(timeout=timeout)
    assert reply["parent_header"]["msg_id"] == msg_id
    return reply


def wait_for_file(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


# --- the tests ----------------------------------------------------------------------------


def test_the_relay_runs_from_stdin_with_no_secret_on_its_command_line(
    session: SessionFactory,
) -> None:
    s = session()
    cmdline = Path(f"/proc/{s.relay.proc.pid}/cmdline").read_bytes()
    assert cmdline.split(b"\0")[1:] == [b"-", b""]
    environ = Path(f"/proc/{s.relay.proc.pid}/environ").read_bytes()
    for secret in (s.secret.hex().encode(), s.kernel.info["key"].encode()):
        assert secret not in cmdline
        assert secret not in environ
    assert not s.relay.settings_file.exists()  # read, then removed
    kc = s.client()
    msg_id = kc.execute("print('hello through the relay')")
    assert stdout_of(collect(kc, msg_id)) == "hello through the relay\n"
    assert reply_to(kc, msg_id)["content"]["status"] == "ok"


def test_forty_lines_with_a_cut_in_the_middle_arrive_once_in_order(
    session: SessionFactory,
) -> None:
    s = session()
    kc = s.client()
    code = (
        "import time\nfor i in range(40):\n    print(f'line {i}', flush=True)\n    time.sleep(0.05)"
    )
    msg_id = kc.execute(code)
    seen = ""

    def cut_at_line_19(msg: dict[str, Any]) -> None:
        nonlocal seen
        if msg["msg_type"] == "stream":
            seen += msg["content"]["text"]
            if "line 19\n" in seen and not s.proxy.down and s.local.stats().sessions == 1:
                s.proxy.cut()  # while the kernel prints on
                time.sleep(0.3)
                s.proxy.restore()

    messages = collect(kc, msg_id, on_message=cut_at_line_19)
    assert stdout_of(messages) == "".join(f"line {i}\n" for i in range(40))
    assert reply_to(kc, msg_id)["content"]["status"] == "ok"
    assert s.local.stats().sessions == 2  # the cut happened, and one reconnect


async def test_a_cell_run_while_the_link_is_down_is_answered_once_it_is_back(
    session: SessionFactory,
) -> None:
    s = session()
    kc = AsyncKernelClient()
    kc.load_connection_info(s.info)  # type: ignore[arg-type]
    kc.start_channels()
    s.clients.append(kc)
    await kc.wait_for_ready(timeout=30)
    s.proxy.cut()
    msg_id = kc.execute("n = globals().get('n', 0) + 1\nprint('ran', n)")
    with pytest.raises(queue.Empty):
        await kc.get_shell_msg(timeout=1.0)  # held while the link is down
    assert s.local.stats().unacknowledged == 1
    back = time.monotonic()
    s.proxy.restore()
    reply = await kc.get_shell_msg(timeout=10)
    answered_after = time.monotonic() - back
    assert reply["parent_header"]["msg_id"] == msg_id
    assert reply["content"]["status"] == "ok"
    assert answered_after < 1.0, answered_after
    out = ""
    while "ran" not in out:
        msg = await kc.get_iopub_msg(timeout=5)
        if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "stream":
            out += msg["content"]["text"]
    assert out == "ran 1\n"
    check = await kc.execute_interactive("print(n)", timeout=10, output_hook=lambda m: None)
    assert check["content"]["status"] == "ok"
    user = await kc.execute_interactive("assert n == 1", timeout=10)
    assert user["content"]["status"] == "ok"  # it ran exactly once


def test_the_heartbeat_is_answered_during_a_short_cut_and_not_after_the_grace(
    session: SessionFactory,
) -> None:
    s = session(hb_grace=2.0)
    context: zmq.Context[Any] = zmq.Context()

    def beats() -> bool:
        sock = s.curve_client_socket(zmq.REQ, "hb_port", context)
        try:
            sock.send(b"ping")
            return bool(sock.poll(500)) and sock.recv() == b"ping"
        finally:
            sock.close(linger=0)

    try:
        assert beats()
        s.proxy.cut()
        cut_at = time.monotonic()
        time.sleep(0.5)
        assert beats()  # 0.5 s into the cut: within the grace
        time.sleep(max(0.0, cut_at + 2.5 - time.monotonic()))
        assert not beats()  # past the grace
        s.proxy.restore()
        assert s.local.wait_connected(5)
        assert beats()
    finally:
        context.destroy(linger=0)


def test_output_made_while_disconnected_is_replayed(
    session: SessionFactory, tmp_path: Path
) -> None:
    s = session()
    kc = s.client()
    done = tmp_path / "done"
    code = (
        "import time\nprint('start', flush=True)\ntime.sleep(0.5)\n"
        "for i in range(200):\n    print(f'late {i}', flush=True)\n"
        f"open({str(done)!r}, 'w').close()\nprint('end')"
    )
    msg_id = kc.execute(code)

    def cut_after_start(msg: dict[str, Any]) -> None:
        if msg["msg_type"] == "stream" and "start" in msg["content"]["text"]:
            s.proxy.cut()
            wait_for_file(done, 30)  # the kernel has printed everything, to no one
            time.sleep(0.2)
            s.proxy.restore()

    messages = collect(kc, msg_id, on_message=cut_after_start)
    expected = "start\n" + "".join(f"late {i}\n" for i in range(200)) + "end\n"
    assert stdout_of(messages) == expected
    assert reply_to(kc, msg_id)["content"]["status"] == "ok"
    assert s.local.stats().sessions == 2


def test_past_the_bound_the_oldest_output_goes_and_one_notice_says_how_much(
    session: SessionFactory, tmp_path: Path
) -> None:
    s = session(buffer_bytes=64 * 1024)
    kc = s.client()
    done = tmp_path / "done"
    code = (
        "import time\nprint('start', flush=True)\ntime.sleep(0.5)\n"
        "import sys\nfor i in range(2000):\n"  # one whole line per message
        "    sys.stdout.write(f'late {i:04d} ' + 'x' * 80 + '\\n'); sys.stdout.flush()\n"
        f"open({str(done)!r}, 'w').close()\nprint('end')"
    )
    msg_id = kc.execute(code)

    def cut_after_start(msg: dict[str, Any]) -> None:
        if msg["msg_type"] == "stream" and "start" in msg["content"]["text"]:
            s.proxy.cut()
            wait_for_file(done, 60)
            time.sleep(0.2)
            s.proxy.restore()

    messages = collect(kc, msg_id, on_message=cut_after_start)
    notices = [
        m
        for m in messages
        if m["msg_type"] == "stream"
        and m["content"]["name"] == "stderr"
        and NOTICE in m["content"]["text"]
    ]
    assert len(notices) == 1, [m["content"] for m in notices]
    text = notices[0]["content"]["text"]
    match = re.search(r"(\d+) output messages \(([\d.]+ [KMG]iB|\d+ bytes)\) were dropped", text)
    assert match, text
    assert "64.0 KiB" in text  # the bound
    dropped = int(match.group(1))
    lines = [f"late {i:04d} {'x' * 80}\n" for i in range(2000)]
    # The oldest output went, exactly as many messages as the notice says; the rest is
    # there, in order, once.
    assert stdout_of(messages) == "start\n" + "".join(lines[dropped:]) + "end\n"
    assert 0 < dropped < 2000
    assert s.local.stats().dropped_messages == dropped
    assert reply_to(kc, msg_id)["content"]["status"] == "ok"
    after = kc.execute("print('still alive')")
    assert stdout_of(collect(kc, after)) == "still alive\n"


def read_until_closed(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return data
            data += chunk
    return data


def test_a_stranger_on_the_relays_port_gets_nothing_and_runs_nothing(
    session: SessionFactory, tmp_path: Path
) -> None:
    """Another user of the remote host who connects to the relay's port: with a signed
    request (say, the kernel's key leaked) but without the session secret."""
    s = session()
    kc = s.client()
    marker = tmp_path / "ran"
    signer = Session(key=s.kernel.info["key"].encode(), signature_scheme="hmac-sha256")
    request = signer.msg("execute_request", {"code": f"open({str(marker)!r}, 'w').close()"})
    evil = encode_data(1, SHELL, signer.serialize(request, ident=[b"stranger"]))

    # 1. A request with no handshake at all: closed, nothing said.
    with socket.create_connection(("127.0.0.1", s.relay.port)) as sock:
        sock.sendall(evil)
        assert read_until_closed(sock, 5) == b""

    # 2. A handshake without the secret, held open while a cell prints.
    stranger = Handshake(os.urandom(32), initiator=True, instance=os.urandom(16))
    with socket.create_connection(("127.0.0.1", s.relay.port)) as sock:
        sock.sendall(stranger.opening())
        msg_id = kc.execute("print('for the owner only')")
        assert stdout_of(collect(kc, msg_id)) == "for the owner only\n"
        sock.settimeout(2)
        said = sock.recv(65536)
        with pytest.raises(AuthError):
            stranger.feed(said)
        assert [f.kind for f in FrameReader().frames(said)] == [HELLO, AUTH]
        sock.sendall(encode_frame(AUTH, os.urandom(32)) + evil)
        assert read_until_closed(sock, 5) == b""  # nothing more, then closed

    # The owner's session was not replaced; the kernel ran nothing of the stranger's.
    msg_id = kc.execute("print('after')")
    assert stdout_of(collect(kc, msg_id)) == "after\n"
    assert not marker.exists()
    assert s.local.stats().sessions == 1
    assert "failed authentication" in s.relay.log.read_text()


@needs_curve_stack  # its client takes CurveZMQ keys
def test_the_local_end_tells_an_impostor_relay_nothing() -> None:
    """Someone who bound the relay's port after the relay died gets our HELLO only:
    no request, no resume point."""
    server = socket.create_server(("127.0.0.1", 0))
    received = bytearray()
    impostor_done = threading.Event()

    def impostor() -> None:
        conn, _ = server.accept()
        with conn:
            fake = Handshake(os.urandom(32), initiator=False, instance=os.urandom(16))
            conn.sendall(fake.feed(conn.recv(4096)))
            received.extend(read_until_closed(conn, 5))
        impostor_done.set()

    threading.Thread(target=impostor, daemon=True).start()
    public, private = zmq.curve_keypair()
    link_up = threading.Event()  # down until our request waits in the local end
    to_impostor = tcp_opener("127.0.0.1", server.getsockname()[1])
    local = LocalEnd(
        lambda: to_impostor() if link_up.is_set() else None,
        os.urandom(32),
        curve_keys=(public, private),
    )
    local.start()
    kc = BlockingKernelClient()
    kc.load_connection_info(
        {  # type: ignore[arg-type]
            **local.connection_info(),
            "key": "k",
            "curve_publickey": public.decode(),
            "curve_secretkey": private.decode(),
        }
    )
    kc.start_channels()
    try:
        kc.execute("print('secret work')")
        deadline = time.monotonic() + 10
        while local.stats().unacknowledged == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert local.stats().unacknowledged == 1
        link_up.set()
        assert impostor_done.wait(10)
        deadline = time.monotonic() + 5  # the local end's thread counts the refusal
        while local.stats().auth_failures == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert local.stats().auth_failures >= 1
        assert not local.connected
        assert bytes(received) == b""  # after its HELLO, the local end said nothing
        assert local.stats().unacknowledged == 1  # the request stays for the real relay
    finally:
        kc.stop_channels()
        local.stop()
        server.close()


def test_input_requests_reach_the_client_that_ran_the_cell(session: SessionFactory) -> None:
    s = session()
    kc = s.client()
    msg_id = kc.execute("x = input('name? ')\nprint('hello', x)", allow_stdin=True)
    request = kc.get_stdin_msg(timeout=10)
    assert request["content"]["prompt"] == "name? "
    kc.input("relay")
    assert "hello relay\n" in stdout_of(collect(kc, msg_id))
    assert reply_to(kc, msg_id)["content"]["status"] == "ok"


def test_when_the_kernel_ends_the_relay_says_so_and_exits(session: SessionFactory) -> None:
    s = session()
    kc = s.client()
    msg_id = kc.execute("print('last words')")
    assert stdout_of(collect(kc, msg_id)) == "last words\n"
    os.killpg(s.kernel.proc.pid, signal.SIGKILL)  # (left a zombie: not reaped here)
    assert s.relay.proc.wait(10) == 0
    deadline = time.monotonic() + 5  # the relay's last notice, read by the local end's thread
    while not s.local.stats().kernel_exited and time.monotonic() < deadline:
        time.sleep(0.02)
    stats = s.local.stats()
    assert stats.kernel_exited
    assert not stats.heartbeat_answered
    assert f"kernel {s.kernel.proc.pid} has ended" in s.relay.log.read_text()


def test_a_second_jupyter_process_reattaches_and_gets_the_rest_of_the_output(
    session: SessionFactory, tmp_path: Path
) -> None:
    """The first Jupyter side dies mid-cell; a new one (new sockets, here IPC) connects
    to the same relay and its client gets the output made in between, once."""
    s = session()
    kc = s.client()
    done = tmp_path / "done"
    code = (
        "import time\nprint('start', flush=True)\ntime.sleep(1.0)\n"
        "for i in range(50):\n    print(f'rest {i}', flush=True)\n"
        f"open({str(done)!r}, 'w').close()"
    )
    msg_id = kc.execute(code)
    while "start" not in kc.get_iopub_msg(timeout=10)["content"].get("text", ""):
        pass
    time.sleep(0.2)  # (its ACK has gone out)
    s.proxy.cut()  # the first Jupyter process dies: its connection is reset
    s.local.stop()
    wait_for_file(done, 30)
    s.proxy.restore()
    folder = tmp_path / "ipc"
    folder.mkdir(mode=0o700)
    second = LocalEnd(s.proxy.open_stream, s.secret, ipc_dir=str(folder))
    s.others.append(second)
    second.start()
    assert second.wait_connected(10)
    kc2 = BlockingKernelClient()
    kc2.load_connection_info(
        {**second.connection_info(), "key": s.info["key"], "signature_scheme": "hmac-sha256"}  # type: ignore[arg-type]
    )
    kc2.start_channels()  # (no wait_for_ready: it would flush IOPub)
    s.clients.append(kc2)
    messages = collect(kc2, msg_id)  # held until kc2 subscribed, then published
    assert stdout_of(messages) == "".join(f"rest {i}\n" for i in range(50))
    check = kc2.execute("print('same kernel', 'time' in dir())")
    assert stdout_of(collect(kc2, check)) == "same kernel True\n"


def test_a_restarted_kernel_is_reached_through_its_new_relay_on_the_same_ports(
    session: SessionFactory, tmp_path: Path
) -> None:
    s = session()
    kc = s.client()
    ports = s.local.ports
    first = kc.execute("x = 1")
    collect(kc, first)
    assert reply_to(kc, first)["content"]["status"] == "ok"
    os.killpg(s.kernel.proc.pid, signal.SIGKILL)  # the old kernel ends; its relay too
    assert s.relay.proc.wait(10) == 0
    kernel = start_kernel(tmp_path / "restarted", key=s.info["key"])
    secret = os.urandom(32)
    relay = start_relay(kernel, kernel.path.parent, secret, 256 * 1024 * 1024)
    proxy = Proxy(relay.port)
    s.others += [kernel, relay, proxy]
    s.local.new_relay(proxy.open_stream, secret)
    msg_id = kc.execute("print('fresh' if 'x' not in dir() else 'old')")
    assert stdout_of(collect(kc, msg_id)) == "fresh\n"
    assert reply_to(kc, msg_id)["content"]["status"] == "ok"
    assert s.local.ports == ports
    assert not s.local.stats().kernel_exited


def test_ipc_sockets_removed_at_a_restart_are_bound_again(tmp_path: Path) -> None:
    """jupyter_client removes a kernel's IPC files at every restart; the local end's
    sockets outlive the kernel, so they are bound again at the same paths."""
    folder = tmp_path / "ipc"
    folder.mkdir(mode=0o700)
    local = LocalEnd(lambda: None, os.urandom(32), ipc_dir=str(folder))
    local.start()
    try:
        info = local.connection_info()
        paths = [Path(f"{info['ip']}-{info[name]}") for name in PORTS]
        assert all(p.exists() for p in paths)
        for p in paths:
            p.unlink()
        local.restore_endpoints()
        assert all(p.exists() for p in paths)
        context: zmq.Context[Any] = zmq.Context()
        try:  # the heartbeat answers there (within the grace, as no relay was reached)
            sock = context.socket(zmq.REQ)
            sock.connect(f"ipc://{info['ip']}-{info['hb_port']}")
            sock.send(b"ping")
            assert sock.poll(2000)
            assert sock.recv() == b"ping"
            sock.close(linger=0)
        finally:
            context.destroy(linger=0)
    finally:
        local.stop()


def test_sockets_open_to_other_users_are_refused(tmp_path: Path) -> None:
    open_dir = tmp_path / "open"
    open_dir.mkdir(mode=0o755)
    with pytest.raises(PermissionError, match="open to others"):
        LocalEnd(lambda: None, os.urandom(32), ipc_dir=str(open_dir)).start()
    with pytest.raises(ValueError, match="curve_keys"):
        LocalEnd(lambda: None, os.urandom(32)).start()  # plain TCP: never


def test_a_newer_jupyter_side_takes_the_session_over_and_the_older_steps_aside(
    session: SessionFactory, tmp_path: Path
) -> None:
    """Two Jupyter processes attached to one kernel do not fight over its relay."""
    s = session()
    folder = tmp_path / "ipc"
    folder.mkdir(mode=0o700)
    second = LocalEnd(s.proxy.open_stream, s.secret, ipc_dir=str(folder))
    s.others.append(second)
    second.start()
    assert second.wait_connected(10)
    deadline = time.monotonic() + 5  # the relay's farewell, read by the first's thread
    while not s.local.stats().replaced and time.monotonic() < deadline:
        time.sleep(0.02)
    assert s.local.stats().replaced
    time.sleep(1.0)  # it does not come back for the session
    assert not s.local.connected
    assert second.connected
    assert second.stats().sessions == 1
    kc = BlockingKernelClient()
    kc.load_connection_info(
        {**second.connection_info(), "key": s.info["key"], "signature_scheme": "hmac-sha256"}  # type: ignore[arg-type]
    )
    kc.start_channels()
    s.clients.append(kc)
    kc.wait_for_ready(timeout=30)
    msg_id = kc.execute("print('second')")
    assert stdout_of(collect(kc, msg_id)) == "second\n"
