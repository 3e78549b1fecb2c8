"""The session protocol: frames, the handshake, sequence numbers and acknowledgements.

Pure standard library and no I/O: both ends use it, the Jupyter side (``local_end``)
and the remote relay, which receives this module's *source* on its stdin (see
:func:`nersc_provisioner.session.relay_source`).  Keep it importable by an older
Python on a cluster (3.8: annotations only through ``from __future__``, no runtime
``X | Y``, no ``match``).

A frame on the byte stream is ``length:u32 kind:u8 body``.  The kinds:

========  ====================================================================
HELLO     ``magic version:u8 role:u8 nonce:32 instance:16``, both ways, first
AUTH      ``HMAC-SHA256(secret, label | nonces | instances)``: proves the secret
DATA      ``seq:u64 channel:u8 n:u32 len:u32*n parts...``: one ZeroMQ message
ACK       ``seq:u64``: everything up to ``seq`` arrived (cumulative)
PING      ``token:u64``; PONG echoes it
NOTICE    a JSON object (kernel exited, output dropped); not sequenced
========  ====================================================================

The Jupyter side opens (it is the *initiator*); the relay answers its HELLO with its
own HELLO and AUTH, and sends nothing else until the initiator's AUTH verifies.  Each
AUTH covers both fresh nonces and a role label, so neither can be replayed or reflected.
After it, each side's first frame is an ACK of what it already has (its resume point);
the sender drops what that ACK covers and resends the rest, and the receiver drops any
DATA whose ``seq`` it has already seen.  Sequence numbers count per direction, over all
channels, so one stream keeps the order across channels too.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import struct
from collections import deque
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:  # only in annotations: an older Python on a cluster runs this source
    from collections.abc import Callable, Sequence

    Buffer = bytes | bytearray | memoryview
    NoticeRenderer = Callable[["DropReport"], Sequence[Buffer]]

VERSION = 1
MAGIC = b"NPRS"

# Frame kinds.
HELLO = 1
AUTH = 2
DATA = 3
ACK = 4
PING = 5
PONG = 6
NOTICE = 7

# Channels carried in DATA frames (the heartbeat is answered on the Jupyter side).
SHELL = 0
CONTROL = 1
STDIN = 2
IOPUB = 3
CHANNEL_NAMES = {SHELL: "shell", CONTROL: "control", STDIN: "stdin", IOPUB: "iopub"}
REQUEST_CHANNELS = (SHELL, CONTROL, STDIN)

ROLE_LOCAL = ord("L")
ROLE_RELAY = ord("R")

FRAME_HEADER = struct.Struct("!IB")
HELLO_BODY = struct.Struct("!4sBB32s16s")
U64 = struct.Struct("!Q")
DATA_HEAD = struct.Struct("!QBI")

#: Before authentication a peer may send only small frames.
MAX_HANDSHAKE_BODY = 256
#: One ZeroMQ message (all its parts) may not exceed this.
MAX_BODY = 2**31
#: Counted per buffered message on top of its bytes (the Python objects that hold it).
ENTRY_OVERHEAD = 128
#: Space reserved in the buffer for a notice not yet rendered.
NOTICE_RESERVE = 1024
#: Default bound of the relay's buffer of unacknowledged output.
DEFAULT_BUFFER_BYTES = 256 * 1024 * 1024

DELIMITER = b"<IDS|MSG>"
#: IOPub message types that may be dropped when the buffer is full.  Status, errors,
#: results, comms and the like are never dropped: a client waits for them.
DROPPABLE_TYPES = frozenset({"stream", "display_data", "update_display_data"})
_MSG_TYPE = re.compile(rb'"msg_type"\s*:\s*"([^"]*)"')


class ProtocolError(Exception):
    """The peer sent something this protocol does not allow."""


class AuthError(ProtocolError):
    """The peer does not know the session secret."""


class Frame(NamedTuple):
    kind: int
    body: memoryview


class Data(NamedTuple):
    seq: int
    channel: int
    parts: list[memoryview]


# --- encoding -------------------------------------------------------------------------


def encode_frame(kind: int, body: Buffer = b"") -> bytes:
    return FRAME_HEADER.pack(len(body), kind) + bytes(body)


def encode_data(seq: int, channel: int, parts: Sequence[Buffer]) -> bytes:
    """One DATA frame (header included), the parts copied once."""
    lengths = [len(memoryview(p)) for p in parts]
    n = len(lengths)
    head = struct.pack(f"!QBI{n}I", seq, channel, n, *lengths)
    total = len(head) + sum(lengths)
    if total > MAX_BODY:
        raise ProtocolError(f"a message of {total} bytes is larger than {MAX_BODY}")
    return b"".join([FRAME_HEADER.pack(total, DATA), head, *parts])


def decode_data(body: Buffer) -> Data:
    """A DATA frame's body; the parts are views into ``body`` (no copy)."""
    try:
        seq, channel, n = DATA_HEAD.unpack_from(body, 0)
        lengths = struct.unpack_from(f"!{n}I", body, DATA_HEAD.size)
    except struct.error as exc:
        raise ProtocolError(f"malformed DATA frame: {exc}") from None
    view = memoryview(body)
    pos = DATA_HEAD.size + 4 * n
    parts = []
    for length in lengths:
        parts.append(view[pos : pos + length])
        pos += length
    if pos != len(body) or channel not in CHANNEL_NAMES:
        raise ProtocolError("malformed DATA frame")
    return Data(seq, channel, parts)


def encode_u64(kind: int, value: int) -> bytes:
    return encode_frame(kind, U64.pack(value))


def decode_u64(body: Buffer) -> int:
    if len(body) != U64.size:
        raise ProtocolError("malformed ACK/PING/PONG frame")
    value: int = U64.unpack(body)[0]
    return value


def encode_notice(info: dict[str, Any]) -> bytes:
    return encode_frame(NOTICE, json.dumps(info, sort_keys=True).encode())


def decode_notice(body: Buffer) -> dict[str, Any]:
    try:
        info = json.loads(bytes(body).decode())
    except ValueError:
        raise ProtocolError("malformed NOTICE frame") from None
    if not isinstance(info, dict):
        raise ProtocolError("malformed NOTICE frame")
    return info


class FrameReader:
    """Cuts a byte stream into frames; refuses bodies over ``max_body``.

    A frame that lies within one chunk of what was read is a view into it (no copy);
    one that spans chunks is joined once."""

    def __init__(self, max_body: int = MAX_BODY) -> None:
        self.max_body = max_body
        self._chunks: deque[memoryview] = deque()
        self._size = 0

    def feed(self, data: Buffer) -> None:
        if len(data):
            self._chunks.append(memoryview(data).cast("B"))
            self._size += len(data)

    def next(self) -> Frame | None:
        """The next complete frame, or None until more bytes arrive."""
        if self._size < FRAME_HEADER.size:
            return None
        length, kind = FRAME_HEADER.unpack(self._peek(FRAME_HEADER.size))
        if length > self.max_body:
            raise ProtocolError(f"a frame of {length} bytes (at most {self.max_body} here)")
        if self._size < FRAME_HEADER.size + length:
            return None
        self._take(FRAME_HEADER.size)
        return Frame(kind, self._take(length))

    def _peek(self, count: int) -> bytes:
        head = self._chunks[0]
        if len(head) >= count:
            return bytes(head[:count])
        out = b""
        for chunk in self._chunks:
            out += bytes(chunk[: count - len(out)])
            if len(out) == count:
                break
        return out

    def _take(self, count: int) -> memoryview:
        if count == 0:
            return memoryview(b"")
        self._size -= count
        head = self._chunks[0]
        if len(head) >= count:
            if len(head) == count:
                self._chunks.popleft()
            else:
                self._chunks[0] = head[count:]
            return head[:count]
        parts = []
        while count:
            head = self._chunks.popleft()
            if len(head) > count:
                self._chunks.appendleft(head[count:])
                head = head[:count]
            parts.append(head)
            count -= len(head)
        return memoryview(b"".join(parts))

    def frames(self, data: Buffer = b"") -> list[Frame]:
        self.feed(data)
        found: list[Frame] = []
        while True:
            frame = self.next()
            if frame is None:
                return found
            found.append(frame)

    def remainder(self) -> bytes:
        """The bytes not yet cut into frames (handed on after a handshake)."""
        rest = b"".join(self._chunks)
        self._chunks.clear()
        self._size = 0
        return rest


# --- the handshake ----------------------------------------------------------------------


def auth_mac(secret: bytes, role: int, nonces: bytes, instances: bytes) -> bytes:
    """What a side of ``role`` proves: the label keeps the two directions apart."""
    label = b"npr-session/%d %c|" % (VERSION, role)
    return hmac.new(secret, label + nonces + instances, hashlib.sha256).digest()


class Handshake:
    """One side's HELLO/AUTH exchange over a fresh stream (no I/O).

    ``initiator`` (the Jupyter side) sends :meth:`opening` first.  :meth:`feed` takes
    what arrived and returns what to send; it raises :class:`AuthError` when the peer
    does not prove the secret, :class:`ProtocolError` for anything malformed.  Once
    :attr:`done`, :meth:`leftover` gives the bytes that followed the last frame.
    """

    def __init__(self, secret: bytes, *, initiator: bool, instance: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("the session secret must be at least 16 bytes")
        if len(instance) != 16:
            raise ValueError("an instance id is 16 bytes")
        self._secret = secret
        self.initiator = initiator
        self.role = ROLE_LOCAL if initiator else ROLE_RELAY
        self.instance = instance
        self._nonce = os.urandom(32)
        self._reader = FrameReader(MAX_HANDSHAKE_BODY)
        self._peer_nonce: bytes | None = None
        self.peer_instance: bytes | None = None
        self.done = False

    def opening(self) -> bytes:
        return self._hello() if self.initiator else b""

    def feed(self, data: Buffer) -> bytes:
        if self.done:
            raise ProtocolError("handshake already complete")
        self._reader.feed(data)
        out = b""
        while not self.done:
            frame = self._reader.next()
            if frame is None:
                break
            out += self._on_frame(frame)
        return out

    def leftover(self) -> bytes:
        return self._reader.remainder()

    def _hello(self) -> bytes:
        body = HELLO_BODY.pack(MAGIC, VERSION, self.role, self._nonce, self.instance)
        return encode_frame(HELLO, body)

    def _transcript(self) -> tuple[bytes, bytes]:
        peer_nonce, peer_instance = self._peer_nonce or b"", self.peer_instance or b""
        if self.initiator:
            return self._nonce + peer_nonce, self.instance + peer_instance
        return peer_nonce + self._nonce, peer_instance + self.instance

    def _on_frame(self, frame: Frame) -> bytes:
        if self._peer_nonce is None:
            if frame.kind != HELLO or len(frame.body) != HELLO_BODY.size:
                raise ProtocolError("the peer did not open with HELLO")
            magic, version, role, nonce, instance = HELLO_BODY.unpack(frame.body)
            if magic != MAGIC:
                raise ProtocolError("not a nersc_provisioner session")
            if version != VERSION:
                raise ProtocolError(f"protocol version {version}, expected {VERSION}")
            if role == self.role or role not in (ROLE_LOCAL, ROLE_RELAY):
                raise ProtocolError("the peer claims our own role")
            self._peer_nonce, self.peer_instance = nonce, instance
            if self.initiator:
                return b""
            nonces, instances = self._transcript()
            return self._hello() + encode_frame(
                AUTH, auth_mac(self._secret, self.role, nonces, instances)
            )
        if frame.kind != AUTH:
            raise ProtocolError("expected AUTH")
        nonces, instances = self._transcript()
        peer_role = ROLE_RELAY if self.initiator else ROLE_LOCAL
        expected = auth_mac(self._secret, peer_role, nonces, instances)
        if not hmac.compare_digest(expected, frame.body):
            raise AuthError("the peer does not know the session secret")
        self.done = True
        if self.initiator:
            return encode_frame(AUTH, auth_mac(self._secret, self.role, nonces, instances))
        return b""


# --- what is sent, what was received ---------------------------------------------------


def message_type(parts: Sequence[Buffer]) -> str:
    """A Jupyter message's ``msg_type`` from its header part ("" if not found)."""
    header = jupyter_part(parts, 1)
    if header is None:
        return ""
    found = _MSG_TYPE.search(header)
    return found.group(1).decode(errors="replace") if found else ""


def jupyter_part(parts: Sequence[Buffer], index: int) -> bytes | None:
    """Part ``index`` after the delimiter (0 signature, 1 header, 2 parent header, ...)."""
    for i, part in enumerate(parts):
        if len(part) == len(DELIMITER) and bytes(part) == DELIMITER:
            if i + 1 + index < len(parts):
                return bytes(parts[i + 1 + index])
            return None
    return None


class DropReport(NamedTuple):
    messages: int
    size: int
    #: The parent header (JSON bytes) of the newest dropped message.
    parent: bytes | None


class _Entry:
    __slots__ = ("channel", "droppable", "report", "seq", "wire")

    def __init__(self, seq: int, channel: int, wire: bytes, droppable: bool) -> None:
        self.seq = seq
        self.channel = channel
        self.wire = wire
        self.droppable = droppable
        self.report: DropReport | None = None  # a notice not yet rendered

    @property
    def size(self) -> int:
        return (NOTICE_RESERVE if self.report is not None else len(self.wire)) + ENTRY_OVERHEAD


class SendBuffer:
    """Messages sent and not yet acknowledged, in ``seq`` order, with a send cursor.

    ``limit`` (bytes, None for no bound): when the buffer holds more, the oldest
    *unsent* droppable message goes first (never a reply, never a status), and one
    notice takes the place of the newest dropped message; ``render`` turns it into
    the message's parts when it is sent (so the notice counts all that was dropped
    until then).  Messages already on the wire are never dropped: they may have
    arrived, and only their acknowledgement tells.
    """

    def __init__(self, limit: int | None = None, render: NoticeRenderer | None = None) -> None:
        self.limit = limit
        self.render = render
        self._entries: deque[_Entry] = deque()
        self._cursor = 0  # entries before it are on the wire
        self._bytes = 0
        self._next_seq = 1
        self._notice: _Entry | None = None
        self.dropped_messages = 0
        self.dropped_bytes = 0
        self.notices = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    @property
    def unsent(self) -> int:
        return len(self._entries) - self._cursor

    @property
    def last_seq(self) -> int:
        return self._next_seq - 1

    def push(self, channel: int, parts: Sequence[Buffer], droppable: bool = False) -> int:
        seq = self._next_seq
        self._next_seq += 1
        entry = _Entry(seq, channel, encode_data(seq, channel, parts), droppable)
        self._entries.append(entry)
        self._bytes += entry.size
        if self.limit is not None and self._bytes > self.limit:
            self._shed(self.limit)
        return seq

    def take(self, max_bytes: int) -> list[bytes]:
        """Wire frames not sent yet, oldest first, about ``max_bytes`` (at least one)."""
        out: list[bytes] = []
        size = 0
        while self._cursor < len(self._entries) and (not out or size < max_bytes):
            entry = self._entries[self._cursor]
            if entry.report is not None and not self._render(entry):
                del self._entries[self._cursor]  # no renderer: the gap stays silent
                self._bytes -= entry.size
                self._notice = None
                continue
            out.append(entry.wire)
            size += len(entry.wire)
            self._cursor += 1
        return out

    def ack(self, seq: int) -> int:
        """Forget what the peer has; returns how many messages that was."""
        removed = 0
        entries = self._entries
        while entries and entries[0].seq <= seq:
            entry = entries.popleft()
            if entry is self._notice:  # acknowledged before it was ever sent: a resume
                self._notice = None
            self._bytes -= entry.size
            removed += 1
        self._cursor = max(0, self._cursor - removed)
        return removed

    def rewind(self) -> None:
        """A new stream: everything not acknowledged is to be sent again."""
        self._cursor = 0

    def clear(self) -> int:
        """Forget everything (the peer is a new kernel); returns how many messages."""
        count = len(self._entries)
        self._entries.clear()
        self._cursor = 0
        self._bytes = 0
        self._notice = None
        return count

    def _shed(self, limit: int) -> None:
        entries = self._entries
        while self._bytes > limit:
            index = next(
                (
                    i
                    for i in range(self._cursor, len(entries))
                    if entries[i].droppable and entries[i].report is None
                ),
                None,
            )
            if index is None:
                return  # nothing left that may be dropped
            dropped = entries[index]
            payload = decode_data(dropped.wire[FRAME_HEADER.size :]).parts
            parent = jupyter_part(payload, 2)
            notice = self._notice
            if notice is None or notice.report is None:
                notice = _Entry(dropped.seq, IOPUB, b"", False)
                notice.report = DropReport(0, 0, None)
                self._bytes += notice.size
                self._notice = notice
            else:
                position = entries.index(notice, self._cursor, index)
                del entries[position]
                index -= 1
            # The notice moves to the newest dropped message's place (and seq).
            entries[index] = notice
            notice.seq = dropped.seq
            old = notice.report or DropReport(0, 0, None)
            size = sum(len(p) for p in payload)
            notice.report = DropReport(
                old.messages + 1, old.size + size, parent if parent is not None else old.parent
            )
            self._bytes -= dropped.size
            self.dropped_messages += 1
            self.dropped_bytes += size

    def _render(self, entry: _Entry) -> bool:
        report = entry.report
        parts = self.render(report) if self.render is not None and report is not None else None
        if not parts:
            return False
        self._bytes -= entry.size
        entry.report = None
        entry.wire = encode_data(entry.seq, IOPUB, parts)
        self._bytes += entry.size
        self._notice = None
        self.notices += 1
        return True


class Receiver:
    """The receiving side of one direction: in order, each ``seq`` once."""

    def __init__(self) -> None:
        self.last = 0
        self.duplicates = 0

    def accept(self, seq: int) -> bool:
        if seq <= self.last:
            self.duplicates += 1
            return False
        self.last = seq
        return True

    def reset(self) -> None:
        self.last = 0


# --- one end of the session, across streams --------------------------------------------


class Delivery(NamedTuple):
    """A message from the peer, delivered once and in order."""

    channel: int
    parts: list[memoryview]


class Notice(NamedTuple):
    info: dict[str, Any]


#: Messages are taken from the buffer onto the wire this much at a time, so that what
#: is not yet on the wire stays in the buffer (where the bound may drop it).
WIRE_CHUNK = 256 * 1024
#: Writes smaller than this are joined with the next ones.
COALESCE = 64 * 1024
#: An ACK goes out at once after this much (or a resume, a duplicate, a PING);
#: otherwise it waits up to ACK_DELAY seconds (the I/O loop's timer, see
#: :meth:`Link.ack_soon`), so that one ACK covers a burst and wakes the peer once.
ACK_EVERY_BYTES = 1024 * 1024
ACK_EVERY_MESSAGES = 64
ACK_DELAY = 0.02


class Link:
    """What one end does on a stream once it is authenticated (no I/O).

    The I/O loop calls :meth:`begin` with each new authenticated stream, :meth:`feed`
    with what it reads, writes what :meth:`pending` gives and reports it with
    :meth:`wrote`, and calls :meth:`end` when the stream dies.  The buffer and the
    receiver outlive the streams; that is what makes a reconnect lossless.

    ``resume_on_ack``: after :meth:`begin`, send no DATA until the peer's first ACK
    says where to resume (the relay: its buffer may be large).  Without it, everything
    not acknowledged is sent again at once and the peer drops what it already has
    (the Jupyter side: a few requests at most).
    """

    def __init__(self, buffer: SendBuffer, *, resume_on_ack: bool) -> None:
        self.buffer = buffer
        self.receiver = Receiver()
        self.resume_on_ack = resume_on_ack
        self.peer_instance: bytes | None = None
        self.up = False
        self.streams = 0
        self.pongs = 0
        self._awaiting_resume = False
        self._reader = FrameReader()
        self._queue: deque[memoryview] = deque()
        self._control: list[bytes] = []
        self._ack_due = False  # something arrived that the peer does not know we have
        self._ack_now = False  # ... and the ACK goes out with the next write
        self._unacked_bytes = 0
        self._unacked_messages = 0
        self._mid_frame = False

    def begin(self, peer_instance: bytes) -> bool:
        """A new authenticated stream; True if the peer is another instance than before
        (a new relay, or a new Jupyter process): its sequence numbers start afresh."""
        fresh = peer_instance != self.peer_instance
        if fresh:
            self.receiver.reset()
            self.peer_instance = peer_instance
        self.up = True
        self.streams += 1
        self._reader = FrameReader()
        self._queue.clear()
        self._control.clear()
        self._mid_frame = False
        self.buffer.rewind()
        self._awaiting_resume = self.resume_on_ack
        self._ack_due = self._ack_now = True  # the first frame: where the peer resumes
        return fresh

    def end(self) -> None:
        self.up = False
        self._queue.clear()
        self._control.clear()

    def feed(self, data: Buffer) -> list[Delivery | Notice]:
        """Frames from the peer: the new messages and notices, in order."""
        self._reader.feed(data)
        events: list[Delivery | Notice] = []
        while True:
            frame = self._reader.next()
            if frame is None:
                return events
            kind = frame.kind
            if kind == DATA:
                message = decode_data(frame.body)
                self._ack_due = True
                self._unacked_bytes += len(frame.body)
                self._unacked_messages += 1
                if self.receiver.accept(message.seq):
                    events.append(Delivery(message.channel, message.parts))
                else:
                    self._ack_now = True  # the peer resends what we have: tell it now
                if (
                    self._unacked_bytes >= ACK_EVERY_BYTES
                    or self._unacked_messages >= ACK_EVERY_MESSAGES
                ):
                    self._ack_now = True
            elif kind == ACK:
                self.buffer.ack(decode_u64(frame.body))
                self._awaiting_resume = False
            elif kind == PING:
                self._control.append(encode_u64(PONG, decode_u64(frame.body)))
                self._ack_now = self._ack_due
            elif kind == PONG:
                self.pongs += 1
            elif kind == NOTICE:
                events.append(Notice(decode_notice(frame.body)))
            else:
                raise ProtocolError(f"unexpected frame kind {kind} in a session")

    def send(self, channel: int, parts: Sequence[Buffer], droppable: bool = False) -> int:
        """Queue a message for the peer (kept until acknowledged); its ``seq``."""
        return self.buffer.push(channel, parts, droppable)

    def notice(self, info: dict[str, Any]) -> None:
        if self.up:
            self._control.append(encode_notice(info))

    def ping(self, token: int) -> None:
        if self.up:
            self._control.append(encode_u64(PING, token))

    def pending(self) -> memoryview:
        """The bytes to write next (empty: nothing to write)."""
        if not self.up:
            return memoryview(b"")
        if not self._queue:
            self._fill()
            if not self._queue:
                return memoryview(b"")
        queue = self._queue
        if len(queue[0]) < COALESCE and len(queue) > 1:
            joined: list[memoryview] = []
            size = 0
            while queue and size < WIRE_CHUNK and (not joined or len(queue[0]) < COALESCE):
                part = queue.popleft()
                joined.append(part)
                size += len(part)
            queue.appendleft(memoryview(b"".join(joined)))
        return queue[0]

    def wrote(self, count: int) -> None:
        """``count`` bytes of what :meth:`pending` gave were written."""
        head = self._queue[0]
        if count >= len(head):
            self._queue.popleft()
            self._mid_frame = False
        else:
            self._queue[0] = head[count:]
            self._mid_frame = True

    def farewell(self, info: dict[str, Any]) -> bytes:
        """A last NOTICE to write before the stream is closed, if the stream is between
        frames (b"" if a frame is half written: the notice would corrupt it)."""
        return b"" if self._mid_frame else encode_notice(info)

    @property
    def ack_waiting(self) -> bool:
        """An ACK waits for :meth:`ack_soon` (the I/O loop calls it ACK_DELAY later)."""
        return self._ack_due and not self._ack_now

    def ack_soon(self) -> None:
        self._ack_now = self._ack_due

    @property
    def idle(self) -> bool:
        """Nothing to write, and all we sent is acknowledged."""
        return not self._queue and not self._control and not self._ack_now and not self.buffer

    def _fill(self) -> None:
        if self._ack_now:
            self._control.append(encode_u64(ACK, self.receiver.last))
            self._ack_due = self._ack_now = False
            self._unacked_bytes = self._unacked_messages = 0
        self._queue.extend(memoryview(frame) for frame in self._control)
        self._control.clear()
        if not self._awaiting_resume:
            self._queue.extend(memoryview(wire) for wire in self.buffer.take(WIRE_CHUNK))
