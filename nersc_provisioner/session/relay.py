"""The relay: the remote kernel's only client, and the remote end of the session.

It runs beside the kernel, with the kernel's own Python (pyzmq is there, because
ipykernel needs it), fed its program on stdin: ``python - < program``, where the
program is :func:`nersc_provisioner.session.relay_program`'s text (this module after
:mod:`.protocol`, and a last line that calls :func:`main` with the path of its settings
file).  Nothing is installed on the host and no secret is on a command line: the
settings (the relay secret among them) are in a file of mode 0600, which the relay
reads and removes.

What it does:

* connects to the kernel as its only client: DEALER sockets to shell, control and
  stdin, all three with one routing id (ipykernel sends ``input_request`` to the
  shell request's identities), the clients' identities forwarded as routing frames;
  SUB to IOPub, everything subscribed; a CurveZMQ client with a keypair of its own
  when the connection file carries ``curve_publickey``;
* proves its IOPub subscription before it says where it listens (a
  ``kernel_info_request`` of its own, answered on IOPub), so no request can reach the
  kernel before its output has a subscriber;
* listens on 127.0.0.1, port chosen by the system, printed as ``NPR_RELAY_PORT N``;
  one authenticated session at a time (a newer one replaces it; a connection that
  fails the handshake is closed and changes nothing);
* buffers every message until the Jupyter side acknowledges it, within
  ``buffer_bytes``; past that, the oldest unsent output (``stream``, ``display_data``)
  is dropped and one IOPub ``stream`` message on stderr, signed with the kernel's key
  and parented to the dropped output's request, says how much;
* follows the kernel's PID: when the kernel has ended, it delivers what is left,
  tells the Jupyter side, and exits (after ``exit_linger`` seconds at most).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import signal
import socket
import stat
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, TextIO

import zmq

# npr: package imports (relay_source() leaves these lines out: protocol's source comes first)
from .protocol import (
    ACK_DELAY,
    CONTROL,
    DEFAULT_BUFFER_BYTES,
    DROPPABLE_TYPES,
    IOPUB,
    REQUEST_CHANNELS,
    SHELL,
    STDIN,
    AuthError,
    Delivery,
    DropReport,
    Handshake,
    Link,
    ProtocolError,
    SendBuffer,
    jupyter_part,
    message_type,
)

# npr: end of package imports

log = logging.getLogger("nersc_provisioner.relay")

PORT_NAMES = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")
KERNEL_CHANNELS = ((SHELL, "shell_port"), (CONTROL, "control_port"), (STDIN, "stdin_port"))
PROBE_IDENT = b"npr-relay-probe"
#: How often the kernel's PID is checked.
CHECK_EVERY = 0.2
#: Unauthenticated connections: at most this many at once, each for at most this long.
MAX_PENDING = 8
HANDSHAKE_TIMEOUT = 10.0
#: After the kernel ended, its last messages are still read for this long.
AFTER_EXIT_DRAIN = 0.3
READ_SIZE = 256 * 1024


class RelayError(Exception):
    """The relay cannot start (its message is printed as ``NPR_RELAY_FAIL ...``)."""


@dataclass(frozen=True)
class RelaySettings:
    """What the relay is told, through its 0600 settings file (JSON)."""

    connection_file: str
    secret: bytes = field(repr=False)
    buffer_bytes: int = DEFAULT_BUFFER_BYTES
    #: The kernel's PID and its start time (``/proc/PID/stat`` field 22, against a
    #: reused PID); or ``pid_file``, a file holding ``PID START`` (the launch script's).
    kernel_pid: int = 0
    kernel_start: str = ""
    pid_file: str = ""
    exit_linger: float = 60.0
    startup_timeout: float = 30.0

    def to_json(self) -> str:
        data = {
            "connection_file": self.connection_file,
            "secret": self.secret.hex(),
            "buffer_bytes": self.buffer_bytes,
            "kernel_pid": self.kernel_pid,
            "kernel_start": self.kernel_start,
            "pid_file": self.pid_file,
            "exit_linger": self.exit_linger,
            "startup_timeout": self.startup_timeout,
        }
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> RelaySettings:
        try:
            data = json.loads(text)
            settings = cls(
                connection_file=os.path.expanduser(str(data["connection_file"])),
                secret=bytes.fromhex(str(data["secret"])),
                buffer_bytes=int(data.get("buffer_bytes", DEFAULT_BUFFER_BYTES)),
                kernel_pid=int(data.get("kernel_pid", 0)),
                kernel_start=str(data.get("kernel_start", "")),
                pid_file=os.path.expanduser(str(data.get("pid_file", ""))),
                exit_linger=float(data.get("exit_linger", 60.0)),
                startup_timeout=float(data.get("startup_timeout", 30.0)),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise RelayError(f"bad settings: {exc.__class__.__name__}: {exc}") from None
        if len(settings.secret) < 16:
            raise RelayError("bad settings: the secret must be at least 16 bytes")
        if not settings.kernel_pid and not settings.pid_file:
            raise RelayError("bad settings: neither kernel_pid nor pid_file")
        return settings


def read_settings(path: str, remove: bool = True) -> RelaySettings:
    """The settings in ``path``, which must be this user's and closed to others."""
    path = os.path.expanduser(path)
    try:
        info = os.lstat(path)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
            raise RelayError(f"{path} is not a file of this user")
        if info.st_mode & 0o077:
            raise RelayError(f"{path} is open to others (mode {info.st_mode & 0o777:o})")
        with open(path) as handle:
            text = handle.read()
    except OSError as exc:
        raise RelayError(f"cannot read {path}: {exc.strerror}") from None
    finally:
        if remove:
            with contextlib.suppress(OSError):
                os.unlink(path)
    return RelaySettings.from_json(text)


# --- the kernel ------------------------------------------------------------------------


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after ``(comm)`` (state first), or None."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            text = handle.read()
    except OSError:
        return None
    return text[text.rfind(")") + 2 :].split()


class KernelProcess:
    """The kernel's process, followed by PID (and start time, against reuse)."""

    def __init__(self, pid: int, start: str = "") -> None:
        self.pid = pid
        self.start = start

    @classmethod
    def from_settings(cls, settings: RelaySettings, deadline: float) -> KernelProcess:
        if settings.kernel_pid:
            return cls(settings.kernel_pid, settings.kernel_start)
        while True:
            with contextlib.suppress(OSError, ValueError):
                with open(settings.pid_file) as handle:
                    words = handle.read().split()
                if words:
                    return cls(int(words[0]), words[1] if len(words) > 1 else "")
            if time.monotonic() > deadline:
                raise RelayError(f"no kernel PID in {settings.pid_file}")
            time.sleep(0.05)

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return False  # another user's process: the PID was reused
        fields = _proc_stat(self.pid)
        if fields is None:
            return not os.path.isdir("/proc/self")  # no /proc here: kill() must do
        if fields[0] in ("Z", "X"):
            return False
        return not (self.start and len(fields) > 19 and fields[19] != self.start)


def read_connection(path: str, deadline: float) -> dict[str, Any]:
    """The kernel's connection info, once it holds all five ports."""
    while True:
        with contextlib.suppress(OSError, ValueError):
            with open(path) as handle:
                info = json.load(handle)
            if isinstance(info, dict) and all(int(info.get(n) or 0) > 0 for n in PORT_NAMES):
                return info
        if time.monotonic() > deadline:
            raise RelayError(f"no kernel ports in {path}")
        time.sleep(0.05)


def endpoint(info: dict[str, Any], name: str) -> str:
    if info.get("transport", "tcp") == "ipc":
        return f"ipc://{info['ip']}-{info[name]}"
    return f"tcp://{info.get('ip', '127.0.0.1')}:{info[name]}"


class Signer:
    """Builds messages signed with the kernel's key, as a Jupyter session does."""

    def __init__(self, info: dict[str, Any]) -> None:
        self.key = str(info.get("key", "")).encode()
        scheme = str(info.get("signature_scheme", "hmac-sha256"))
        self.digest = scheme.split("-", 1)[1] if "-" in scheme else "sha256"
        hashlib.new(self.digest)  # an unknown scheme fails here, at start
        self.session = uuid.uuid4().hex

    def message(
        self, msg_type: str, content: dict[str, Any], parent: bytes = b"{}", topic: bytes = b""
    ) -> tuple[str, list[bytes]]:
        """(msg_id, parts), with ``topic`` as the routing part if given."""
        msg_id = uuid.uuid4().hex
        header = {
            "msg_id": msg_id,
            "msg_type": msg_type,
            "username": "nersc_provisioner",
            "session": self.session,
            "date": datetime.now(timezone.utc).isoformat(),
            "version": "5.3",
        }
        body = [
            json.dumps(header).encode(),
            parent,
            b"{}",
            json.dumps(content).encode(),
        ]
        signature = b""
        if self.key:
            mac = hmac.new(self.key, digestmod=self.digest)
            for part in body:
                mac.update(part)
            signature = mac.hexdigest().encode()
        return msg_id, [*([topic] if topic else []), b"<IDS|MSG>", signature, *body]


def human_size(count: float) -> str:
    if count < 1024:
        return f"{count:.0f} bytes"
    for unit in ("KiB", "MiB", "GiB"):
        count /= 1024
        if count < 1024 or unit == "GiB":
            break
    return f"{count:.1f} {unit}"


def drop_notice_text(report: DropReport, limit: int, host: str) -> str:
    return (
        f"[nersc_provisioner] {report.messages} output messages "
        f"({human_size(report.size)}) were dropped here: Jupyter was disconnected, or "
        f"too slow for this output, and the kernel's output buffer on {host} keeps at "
        f"most {human_size(limit)}.\n"
    )


# --- the relay ---------------------------------------------------------------------------


class _Pending:
    """A connection still in its handshake."""

    def __init__(self, sock: socket.socket, handshake: Handshake, deadline: float) -> None:
        self.sock = sock
        self.handshake = handshake
        self.deadline = deadline


class Relay:
    """One kernel's relay: its sockets to the kernel, its listener, its session."""

    def __init__(
        self,
        settings: RelaySettings,
        info: dict[str, Any],
        process: KernelProcess,
        out: TextIO | None = None,
    ) -> None:
        self.settings = settings
        self.info = info
        self.process = process
        self.out = out if out is not None else sys.stdout
        self.signer = Signer(info)
        self.host = socket.gethostname()
        self.instance = os.urandom(16)
        self.buffer = SendBuffer(settings.buffer_bytes, self._render_notice)
        self.link = Link(self.buffer, resume_on_ack=True)
        self.context = zmq.Context()
        self.kernel: dict[int, zmq.Socket[bytes]] = {}
        self.poller = zmq.Poller()
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.port = 0
        self.session: socket.socket | None = None
        self._want_write = False
        self.pending: dict[int, _Pending] = {}
        self.probe_ids: list[bytes] = []
        self.dead_at: float | None = None
        self.ack_at: float | None = None
        self.stopping = False

    # --- start ---------------------------------------------------------------------

    def connect_kernel(self) -> None:
        identity = b"npr-relay-" + self.instance.hex().encode()
        server_key = self.info.get("curve_publickey")
        for channel, name in (*KERNEL_CHANNELS, (IOPUB, "iopub_port")):
            kind = zmq.SUB if channel == IOPUB else zmq.DEALER
            sock: zmq.Socket[bytes] = self.context.socket(kind)
            sock.linger = 0
            if channel == IOPUB:
                sock.rcvhwm = 0  # take everything the kernel publishes; the buffer bounds it
                sock.setsockopt(zmq.SUBSCRIBE, b"")
            else:
                sock.sndhwm = 0
                sock.routing_id = identity  # one identity: stdin replies route like shell's
            if server_key:
                public, secret = zmq.curve_keypair()
                sock.curve_publickey, sock.curve_secretkey = public, secret
                sock.curve_serverkey = str(server_key).encode()
            sock.connect(endpoint(self.info, name))
            self.kernel[channel] = sock

    def probe_subscription(self, deadline: float) -> bool:
        """Send kernel_info_requests until one's ``idle`` arrives on IOPub: from then on
        every message the kernel publishes reaches us.  Their replies are not forwarded."""
        iopub, shell = self.kernel[IOPUB], self.kernel[SHELL]
        resend_at = 0.0
        while time.monotonic() < deadline:
            if time.monotonic() >= resend_at:
                msg_id, parts = self.signer.message("kernel_info_request", {})
                self.probe_ids.append(msg_id.encode())
                shell.send_multipart([PROBE_IDENT, *parts])
                resend_at = time.monotonic() + 1.0
            if not iopub.poll(100):
                continue
            parts = iopub.recv_multipart()
            parent = jupyter_part(parts, 2) or b""
            idle = message_type(parts) == "status" and b'"idle"' in (jupyter_part(parts, 4) or b"")
            if idle and any(msg_id in parent for msg_id in self.probe_ids):
                return True
        log.warning("the kernel did not answer on IOPub in time; going on")
        return False

    def listen(self) -> None:
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self.poller.register(self.listener.fileno(), zmq.POLLIN)
        for sock in self.kernel.values():
            self.poller.register(sock, zmq.POLLIN)

    # --- the loop ------------------------------------------------------------------

    def run(self) -> int:
        self.out.write(f"NPR_RELAY_PORT {self.port}\n")
        self.out.flush()
        next_check = 0.0
        try:
            while True:
                now = time.monotonic()
                if now >= next_check:
                    self._check_kernel(now)
                    next_check = now + CHECK_EVERY
                if self._finished(now):
                    return 0
                self._expire_handshakes(now)
                if self.ack_at is not None and now >= self.ack_at:
                    self.ack_at = None
                    self.link.ack_soon()
                self._flush()  # (what came in last time round, and an ACK due)
                wait = min(next_check, self.ack_at or next_check) - now
                for target, events in self.poller.poll(max(1, int(wait * 1000) + 1)):
                    self._on_ready(target, events)
                if self.ack_at is None and self.link.ack_waiting:
                    self.ack_at = time.monotonic() + ACK_DELAY
        finally:
            self.close()

    def _on_ready(self, target: Any, events: int) -> None:
        if isinstance(target, zmq.Socket):
            channel = next(c for c, s in self.kernel.items() if s is target)
            self._from_kernel(channel, target)
        elif target == self.listener.fileno():
            self._accept()
        elif self.session is not None and target == self.session.fileno():
            if events & zmq.POLLIN:
                self._from_session(self.session)
        elif target in self.pending:
            self._handshake(self.pending[target])

    def _check_kernel(self, now: float) -> None:
        if self.dead_at is None and not self.process.alive():
            self.dead_at = now
            log.info("kernel %d has ended", self.process.pid)
            self.link.notice({"kernel": "exited"})

    def _finished(self, now: float) -> bool:
        if self.stopping:
            return True
        if self.dead_at is None or now - self.dead_at < AFTER_EXIT_DRAIN:
            return False
        delivered = self.session is not None and self.link.up and self.link.idle
        return delivered or now - self.dead_at > self.settings.exit_linger

    def _from_kernel(self, channel: int, sock: zmq.Socket[bytes]) -> None:
        for count in range(1, 1001):
            if count % 32 == 0 and self.session is not None:
                self._flush()  # a burst goes out as it comes: only what waits may be dropped
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            parts = [frame.buffer for frame in frames]
            if channel == SHELL and bytes(parts[0]) == PROBE_IDENT:
                continue  # the reply to our own probe
            droppable = False
            if channel == IOPUB:
                parent = jupyter_part(parts, 2) or b""
                if any(msg_id in parent for msg_id in self.probe_ids):
                    continue
                droppable = message_type(parts) in DROPPABLE_TYPES
            try:
                self.link.send(channel, parts, droppable)
            except ProtocolError as exc:  # over 2 GiB: it cannot be framed
                log.warning("a message from the kernel was not forwarded: %s", exc)

    def _render_notice(self, report: DropReport) -> list[bytes]:
        text = drop_notice_text(report, self.settings.buffer_bytes, self.host)
        log.warning("%s", text.strip())
        self.link.notice({"dropped": {"messages": report.messages, "bytes": report.size}})
        content = {"name": "stderr", "text": text}
        _, parts = self.signer.message(
            "stream", content, parent=report.parent or b"{}", topic=b"stream.stderr"
        )
        return parts

    # --- connections -----------------------------------------------------------------

    def _accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except OSError:
            return
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if len(self.pending) >= MAX_PENDING:
            oldest = min(self.pending.values(), key=lambda p: p.deadline)
            self._close_pending(oldest, "too many connections in their handshake")
        handshake = Handshake(self.settings.secret, initiator=False, instance=self.instance)
        pending = _Pending(sock, handshake, time.monotonic() + HANDSHAKE_TIMEOUT)
        self.pending[sock.fileno()] = pending
        self.poller.register(sock.fileno(), zmq.POLLIN)

    def _handshake(self, pending: _Pending) -> None:
        try:
            data = pending.sock.recv(4096)
            if not data:
                self._close_pending(pending, "")
                return
            reply = pending.handshake.feed(data)
            if reply and pending.sock.send(reply) != len(reply):
                raise OSError("a handshake reply did not fit the socket")
        except AuthError:
            self._close_pending(pending, "refused a connection that failed authentication")
            return
        except (ProtocolError, OSError) as exc:
            self._close_pending(pending, f"refused a connection: {exc}")
            return
        if pending.handshake.done:
            self._promote(pending)

    def _promote(self, pending: _Pending) -> None:
        del self.pending[pending.sock.fileno()]
        if self.session is not None:
            log.info("a new session replaces the current one")
            farewell = self.link.farewell({"session": "replaced"})  # it steps aside
            with contextlib.suppress(OSError):
                self.session.send(farewell)
            self._drop_session()
        self.session = pending.sock
        self._want_write = False
        peer = pending.handshake.peer_instance or b""
        fresh = self.link.begin(peer)
        log.info("session %d from %s Jupyter side", self.link.streams, "a new" if fresh else "the")
        if self.dead_at is not None:
            self.link.notice({"kernel": "exited"})
        leftover = pending.handshake.leftover()
        if leftover:
            self._deliver(self.link.feed(leftover))

    def _from_session(self, sock: socket.socket) -> None:
        for _ in range(16):
            try:
                data = sock.recv(READ_SIZE)
            except BlockingIOError:
                return
            except OSError as exc:
                log.info("session lost: %s", exc)
                self._drop_session()
                return
            if not data:
                log.info("session closed by the Jupyter side")
                self._drop_session()
                return
            try:
                self._deliver(self.link.feed(data))
            except ProtocolError as exc:
                log.warning("session dropped: %s", exc)
                self._drop_session()
                return

    def _deliver(self, events: list[Any]) -> None:
        for event in events:
            if isinstance(event, Delivery) and event.channel in REQUEST_CHANNELS:
                self.kernel[event.channel].send_multipart(event.parts, copy=False)

    def _flush(self) -> None:
        sock = self.session
        want_write = False
        while sock is not None:
            view = self.link.pending()
            if not view:
                break
            try:
                sent = sock.send(view)
            except BlockingIOError:
                want_write = True
                break
            except OSError as exc:
                log.info("session lost while sending: %s", exc)
                self._drop_session()
                return
            self.link.wrote(sent)
        if sock is not None and want_write != self._want_write:
            flags = zmq.POLLIN | (zmq.POLLOUT if want_write else 0)
            self.poller.modify(sock.fileno(), flags)
            self._want_write = want_write

    def _drop_session(self) -> None:
        sock, self.session = self.session, None
        self.link.end()
        if sock is not None:
            with contextlib.suppress(KeyError, zmq.ZMQError):
                self.poller.unregister(sock.fileno())
            sock.close()

    def _close_pending(self, pending: _Pending, why: str) -> None:
        if why:
            log.warning("%s", why)
        self.pending.pop(pending.sock.fileno(), None)
        with contextlib.suppress(KeyError, zmq.ZMQError):
            self.poller.unregister(pending.sock.fileno())
        pending.sock.close()

    def _expire_handshakes(self, now: float) -> None:
        for pending in [p for p in self.pending.values() if p.deadline < now]:
            self._close_pending(pending, "a connection did not complete its handshake in time")

    def close(self) -> None:
        if self.session is not None:
            with contextlib.suppress(OSError):
                self.session.shutdown(socket.SHUT_WR)
            self._drop_session()
        for pending in list(self.pending.values()):
            self._close_pending(pending, "")
        self.listener.close()
        for sock in self.kernel.values():
            sock.close(linger=0)
        self.context.term()


def main(settings_file: str) -> int:
    """The relay's entry point: read the settings, connect, probe, listen, run."""
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="%(asctime)s relay: %(message)s"
    )
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # an interrupt of the kernel's group
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the SSH session that started us ends
    relay: Relay | None = None
    try:
        settings = read_settings(settings_file)
        deadline = time.monotonic() + settings.startup_timeout
        process = KernelProcess.from_settings(settings, deadline)
        info = read_connection(settings.connection_file, deadline)
        relay = Relay(settings, info, process)
        relay.connect_kernel()
        relay.probe_subscription(deadline)
        relay.listen()
    except (RelayError, OSError, zmq.ZMQError) as exc:
        print(f"NPR_RELAY_FAIL {exc}", flush=True)
        if relay is not None:
            relay.close()
        return 2

    def stop(signum: int, frame: Any) -> None:
        if relay is not None:
            relay.stopping = True

    signal.signal(signal.SIGTERM, stop)
    try:
        return relay.run()
    except Exception:
        log.exception("the relay failed")
        return 1
