"""The ZMTP greeting probe against real libzmq sockets (no rig needed)."""

from __future__ import annotations

import socket

import pytest
import zmq

from nersc_provisioner.transports.zmtp import parse_mechanism, read_mechanism


@pytest.mark.parametrize("curve", [True, False])
def test_probe_reads_the_mechanism_a_socket_announces(curve: bool) -> None:
    ctx = zmq.Context()
    server = ctx.socket(zmq.ROUTER)
    try:
        if curve:
            server.curve_server = True
            server.curve_secretkey = zmq.curve_keypair()[1]
        port = server.bind_to_random_port("tcp://127.0.0.1")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            assert read_mechanism(sock) == ("CURVE" if curve else "NULL")
    finally:
        server.close(linger=0)
        ctx.term()


def test_a_non_zmtp_peer_gives_no_mechanism() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        with socket.create_connection(listener.getsockname(), timeout=5) as sock:
            peer, _ = listener.accept()
            with peer:
                peer.sendall(b"SSH-2.0-OpenSSH_9.2\r\n" + b"x" * 40)
                assert read_mechanism(sock, timeout=1) == ""
    assert parse_mechanism(b"") == ""
    assert parse_mechanism(b"\xff" + b"\x00" * 8 + b"\x7f\x02" + b"\x00" * 53) == ""  # ZMTP 2
