"""The session protocol, without sockets: handshake, sequence numbers, the bound.

The cut tests drive the two real ends (:class:`Link` with the relay's and the
Jupyter side's settings) through a simulated stream that dies after every possible
number of bytes, at frame boundaries and inside frames, in either direction, and
check that every message arrives exactly once and in order once a new stream is up.
"""

from __future__ import annotations

import ast
import json
import os
import random
import sys
from pathlib import Path

import pytest

from nersc_provisioner.session import relay_source
from nersc_provisioner.session.protocol import (
    AUTH,
    HELLO,
    IOPUB,
    SHELL,
    AuthError,
    Delivery,
    DropReport,
    FrameReader,
    Handshake,
    Link,
    Notice,
    ProtocolError,
    Receiver,
    SendBuffer,
    decode_data,
    encode_data,
    encode_frame,
    message_type,
)
from nersc_provisioner.session.protocol import NOTICE as NOTICE_KIND

SECRET = b"s" * 32
L_ID, R_ID = b"L" * 16, b"R" * 16


def jupyter_parts(msg_type: str, text: str, parent_id: str = "p") -> list[bytes]:
    header = json.dumps({"msg_type": msg_type, "msg_id": text}).encode()
    parent = json.dumps({"msg_id": parent_id}).encode()
    content = json.dumps({"text": text}).encode()
    return [b"topic", b"<IDS|MSG>", b"sig", header, parent, b"{}", content]


# --- the handshake ---------------------------------------------------------------------


def shake(local_secret: bytes, relay_secret: bytes) -> tuple[Handshake, Handshake, bytes]:
    """Run both sides; returns them and what the relay sent before it verified."""
    local = Handshake(local_secret, initiator=True, instance=L_ID)
    relay = Handshake(relay_secret, initiator=False, instance=R_ID)
    relay_said = relay.feed(local.opening())
    local_said = local.feed(relay_said)
    relay.feed(local_said)
    return local, relay, relay_said


def test_both_sides_prove_the_secret() -> None:
    local, relay, _ = shake(SECRET, SECRET)
    assert local.done
    assert relay.done
    assert local.peer_instance == R_ID
    assert relay.peer_instance == L_ID


def test_a_relay_without_the_secret_is_refused_before_anything_is_sent() -> None:
    """Someone who bound the relay's port after it died gets our HELLO and no more."""
    local = Handshake(SECRET, initiator=True, instance=L_ID)
    fake = Handshake(b"x" * 32, initiator=False, instance=R_ID)
    with pytest.raises(AuthError):
        local.feed(fake.feed(local.opening()))
    assert not local.done


def test_a_client_without_the_secret_is_refused_and_told_nothing() -> None:
    relay = Handshake(SECRET, initiator=False, instance=R_ID)
    stranger = Handshake(b"x" * 32, initiator=True, instance=L_ID)
    said = relay.feed(stranger.opening())
    # What a stranger gets: the relay's HELLO (a nonce) and its AUTH over the nonces.
    frames = FrameReader().frames(said)
    assert [f.kind for f in frames] == [HELLO, AUTH]
    with pytest.raises(AuthError):
        stranger.feed(said)  # (the stranger cannot verify it either)
    with pytest.raises(AuthError):
        relay.feed(encode_frame(AUTH, os.urandom(32)))
    assert not relay.done


def test_the_relays_proof_cannot_be_reflected_back_to_it() -> None:
    relay = Handshake(SECRET, initiator=False, instance=R_ID)
    local = Handshake(SECRET, initiator=True, instance=L_ID)
    said = relay.feed(local.opening())
    relay_auth = FrameReader().frames(said)[1]
    with pytest.raises(AuthError):
        relay.feed(encode_frame(AUTH, relay_auth.body))


def test_before_authentication_only_small_hello_and_auth_frames_pass() -> None:
    relay = Handshake(SECRET, initiator=False, instance=R_ID)
    with pytest.raises(ProtocolError):
        relay.feed(encode_data(1, SHELL, [b"x"]))  # DATA before HELLO
    relay = Handshake(SECRET, initiator=False, instance=R_ID)
    with pytest.raises(ProtocolError):
        relay.feed(encode_frame(HELLO, b"\0" * 10_000))
    relay = Handshake(SECRET, initiator=False, instance=R_ID)
    with pytest.raises(ProtocolError):
        relay.feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")


def test_a_handshake_cut_anywhere_does_not_complete() -> None:
    opening = Handshake(SECRET, initiator=True, instance=L_ID).opening()
    for cut in range(len(opening)):
        relay = Handshake(SECRET, initiator=False, instance=R_ID)
        assert relay.feed(opening[:cut]) == b""
        assert not relay.done


# --- the sender's buffer and the receiver ---------------------------------------------


def test_duplicates_are_dropped_and_order_is_kept() -> None:
    receiver = Receiver()
    assert [receiver.accept(s) for s in (1, 2, 2, 1, 3, 5, 4, 6)] == [
        True,
        True,
        False,
        False,
        True,
        True,
        False,
        True,
    ]
    assert receiver.duplicates == 3


def test_acks_trim_the_buffer_and_a_rewind_resends_the_rest() -> None:
    buffer = SendBuffer()
    for i in range(5):
        buffer.push(SHELL, [b"m%d" % i])
    sent = buffer.take(1 << 20)
    assert [decode_data(w[5:]).seq for w in sent] == [1, 2, 3, 4, 5]
    size = buffer.nbytes
    assert buffer.ack(3) == 3
    assert len(buffer) == 2
    assert buffer.nbytes < size
    assert buffer.take(1 << 20) == []  # nothing unsent
    buffer.rewind()
    assert [decode_data(w[5:]).seq for w in buffer.take(1 << 20)] == [4, 5]
    assert buffer.ack(5) == 2
    assert len(buffer) == 0
    assert buffer.nbytes == 0


def rendered(report: DropReport) -> list[bytes]:
    text = json.dumps({"text": f"dropped {report.messages} ({report.size} bytes)"}).encode()
    header = b'{"msg_type": "stream"}'
    return [b"stream.stderr", b"<IDS|MSG>", b"", header, report.parent or b"", b"{}", text]


def test_the_bound_drops_the_oldest_unsent_output_and_leaves_one_notice() -> None:
    buffer = SendBuffer(limit=10_000, render=rendered)
    buffer.push(SHELL, [b"reply-0"])
    buffer.push(IOPUB, jupyter_parts("stream", "sent"), droppable=True)
    on_wire = buffer.take(1)  # two messages are on the wire: never dropped
    assert len(on_wire) == 1
    on_wire += buffer.take(1)
    buffer.push(IOPUB, jupyter_parts("status", "busy"))
    for i in range(40):
        buffer.push(IOPUB, jupyter_parts("stream", "x" * 500 + str(i), f"cell-{i}"), True)
        if i == 20:
            buffer.push(SHELL, [b"reply-1"])
    assert buffer.nbytes <= 10_000
    wires = buffer.take(1 << 20)
    messages = [decode_data(w[5:]) for w in wires]
    kinds = [(m.channel, bytes(m.parts[0])) for m in messages]
    # Replies and the status stay; one notice stands where the newest dropped was.
    assert kinds.count((SHELL, b"reply-1")) == 1
    assert kinds.count((IOPUB, b"topic")) == len(messages) - 2  # all but reply and notice
    assert kinds.count((IOPUB, b"stream.stderr")) == 1
    notice_at = kinds.index((IOPUB, b"stream.stderr"))
    kept = [json.loads(bytes(m.parts[6]))["text"] for m in messages[notice_at + 1 :]]
    assert kept[-1] == "x" * 500 + "39"  # the newest output is kept, the oldest went
    assert message_type(messages[0].parts) == "status"
    dropped = buffer.dropped_messages
    assert dropped == 40 - len(kept)
    assert buffer.notices == 1
    # The notice carries the newest dropped message's parent, and the seqs still rise.
    assert (
        bytes(messages[notice_at].parts[4])
        == json.dumps({"msg_id": f"cell-{dropped - 1}"}).encode()
    )
    seqs = [m.seq for m in messages]
    assert seqs == sorted(seqs)


def test_a_second_episode_gets_a_second_notice() -> None:
    buffer = SendBuffer(limit=5_000, render=rendered)
    for i in range(20):
        buffer.push(IOPUB, jupyter_parts("stream", "x" * 500 + str(i)), True)
    first = buffer.take(1 << 20)
    buffer.ack(decode_data(first[-1][5:]).seq)
    for i in range(20):
        buffer.push(IOPUB, jupyter_parts("stream", "y" * 500 + str(i)), True)
    second = buffer.take(1 << 20)
    notices = [w for w in first + second if b"stream.stderr" in w]
    assert len(notices) == 2
    assert buffer.notices == 2


def test_without_droppable_output_the_buffer_grows_past_the_bound() -> None:
    """Replies are never dropped, whatever the bound."""
    buffer = SendBuffer(limit=1_000, render=rendered)
    for i in range(10):
        buffer.push(SHELL, [b"r" * 500, b"%d" % i])
    assert len(buffer) == 10
    assert buffer.dropped_messages == 0


# --- two ends over a stream that is cut -------------------------------------------------


class Ends:
    """A relay-side and a Jupyter-side Link, and what each received."""

    def __init__(self) -> None:
        self.relay = Link(SendBuffer(), resume_on_ack=True)
        self.local = Link(SendBuffer(), resume_on_ack=False)
        self.at_local: list[bytes] = []
        self.at_relay: list[bytes] = []

    def connect(self) -> None:
        self.relay.begin(L_ID)
        self.local.begin(R_ID)

    def cut(self) -> None:
        self.relay.end()
        self.local.end()

    def pump(self, budget: dict[str, int] | None = None, up_first: bool = False) -> bool:
        """Move bytes both ways until nothing moves; with ``budget``, a direction
        ("down": relay to local, "up") carries only that many more bytes, then the
        stream dies (what was written after that is lost).  True if it was cut.
        ``up_first``: the Jupyter side writes before it reads (its resend then
        crosses the relay's resume ACK, and the relay sees duplicates)."""
        directions = [
            ("down", self.relay, self.local, self.at_local),
            ("up", self.local, self.relay, self.at_relay),
        ]
        if up_first:
            directions.reverse()
        while True:
            moved = False
            for name, src, dst, got in directions:
                view = src.pending()
                if not view:
                    continue
                moved = True
                if budget is not None and name in budget and budget[name] < len(view):
                    self._receive(dst, bytes(view[: budget[name]]), got)
                    self.cut()
                    return True
                if budget is not None and name in budget:
                    budget[name] -= len(view)
                data = bytes(view)
                src.wrote(len(view))
                self._receive(dst, data, got)
            if not moved:
                waiting = [end for end in (self.relay, self.local) if end.ack_waiting]
                if not waiting:
                    return False
                for end in waiting:  # the ACK timer fires
                    end.ack_soon()

    @staticmethod
    def _receive(dst: Link, data: bytes, got: list[bytes]) -> None:
        for event in dst.feed(data):
            assert isinstance(event, Delivery)
            got.append(bytes(event.parts[0]))


def stream_length(down: list[bytes], up: list[bytes], direction: str) -> int:
    ends = Ends()
    for m in down:
        ends.relay.send(IOPUB, [m])
    for m in up:
        ends.local.send(SHELL, [m])
    ends.connect()
    budget = {direction: 1 << 30}
    ends.pump(budget)
    return (1 << 30) - budget[direction]


@pytest.mark.parametrize("up_first", [False, True])
@pytest.mark.parametrize("direction", ["down", "up"])
def test_a_stream_cut_at_every_byte_loses_and_repeats_nothing(
    direction: str, up_first: bool
) -> None:
    down = [b"out-%d-" % i + b"x" * (i * 7 % 50) for i in range(12)]
    up = [b"req-%d-" % i + b"y" * (i * 5 % 40) for i in range(6)]
    total = stream_length(down, up, direction)
    assert total > 200
    for cut in range(total + 1):
        ends = Ends()
        # Half the messages are queued before the stream, half while it is up.
        for m in down[:6]:
            ends.relay.send(IOPUB, [m])
        for m in up[:3]:
            ends.local.send(SHELL, [m])
        ends.connect()
        for m in down[6:]:
            ends.relay.send(IOPUB, [m])
        for m in up[3:]:
            ends.local.send(SHELL, [m])
        ends.pump({direction: cut})
        ends.cut()
        ends.connect()
        assert not ends.pump(up_first=up_first)
        assert ends.at_local == down, f"cut after {cut} bytes"
        assert ends.at_relay == up, f"cut after {cut} bytes"
        assert len(ends.relay.buffer) == 0
        assert len(ends.local.buffer) == 0


def test_many_cuts_in_a_row_while_both_sides_keep_sending() -> None:
    rng = random.Random(13)  # noqa: S311 - a reproducible schedule of cuts
    ends = Ends()
    down, up = [], []
    cuts = 0
    ends.connect()
    for step in range(300):
        if rng.random() < 0.6:
            down.append(b"o%d" % step + b"z" * rng.randrange(0, 3000))
            ends.relay.send(IOPUB, [down[-1]])
        if rng.random() < 0.4:
            up.append(b"r%d" % step)
            ends.local.send(SHELL, [up[-1]])
        if rng.random() < 0.1:
            cuts += ends.pump({rng.choice(["down", "up"]): rng.randrange(0, 1500)})
            ends.cut()
            ends.connect()
            ends.pump(up_first=rng.random() < 0.5)
        elif rng.random() < 0.3:
            ends.pump()
    ends.pump()
    assert cuts >= 10  # (cuts in the middle of the traffic, not between)
    assert ends.at_local == down
    assert ends.at_relay == up


def test_a_new_peer_instance_starts_its_sequence_afresh() -> None:
    """A second Jupyter process (reattach) gets what is not acknowledged, and its own
    requests are not taken for duplicates of the first process's."""
    relay = Link(SendBuffer(), resume_on_ack=True)
    first = Link(SendBuffer(), resume_on_ack=False)
    relay.begin(L_ID)
    first.begin(R_ID)
    first.send(SHELL, [b"a"])
    first.send(SHELL, [b"b"])
    relay.feed(bytes(first.pending()))
    relay.send(IOPUB, [b"unseen"])
    relay.end()
    second = Link(SendBuffer(), resume_on_ack=False)
    assert relay.begin(b"N" * 16)  # a new instance
    second.begin(R_ID)
    second.send(SHELL, [b"c"])
    got = relay.feed(bytes(second.pending()))
    assert [bytes(e.parts[0]) for e in got if isinstance(e, Delivery)] == [b"c"]
    events = second.feed(bytes(relay.pending()))
    assert [bytes(e.parts[0]) for e in events if isinstance(e, Delivery)] == [b"unseen"]


def test_notices_and_pings_pass_outside_the_sequence() -> None:
    a, b = Link(SendBuffer(), resume_on_ack=False), Link(SendBuffer(), resume_on_ack=False)
    a.begin(R_ID)
    b.begin(L_ID)
    a.notice({"kernel": "exited"})
    a.ping(7)
    events = b.feed(bytes(a.pending()))
    assert events == [Notice({"kernel": "exited"})]
    b.feed(b"")
    a.feed(bytes(b.pending()))  # the PONG (and b's ACK)
    assert a.pongs == 1


def test_unknown_frames_in_a_session_are_refused() -> None:
    link = Link(SendBuffer(), resume_on_ack=False)
    link.begin(R_ID)
    with pytest.raises(ProtocolError):
        link.feed(encode_frame(HELLO, b""))


def test_what_is_shipped_to_the_remote_side_imports_only_the_standard_library_and_zmq() -> None:
    """protocol.py and relay.py travel as source: no other import may sneak in."""
    here = Path(__file__).resolve().parent.parent / "nersc_provisioner" / "session"
    tree = ast.parse(relay_source())
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "a relative import left in the shipped source"
            modules.add((node.module or "").split(".")[0])
    assert modules - sys.stdlib_module_names == {"zmq"}
    assert (here / "protocol.py").read_text() in relay_source()


def test_a_farewell_notice_is_written_only_between_frames() -> None:
    link = Link(SendBuffer(), resume_on_ack=False)
    link.begin(R_ID)
    link.send(SHELL, [b"x" * 1000])
    view = link.pending()
    link.wrote(len(view) - 10)  # a frame half written
    assert link.farewell({"session": "replaced"}) == b""
    link.wrote(10)
    said = link.farewell({"session": "replaced"})
    assert FrameReader().frames(said)[0].kind == NOTICE_KIND
