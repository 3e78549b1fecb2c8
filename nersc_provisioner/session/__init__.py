"""The session layer: nothing lost when the connection to a remote kernel drops.

* :mod:`.protocol`: frames, handshake, sequence numbers, acknowledgements, the
  bounded buffer (pure, shipped to the remote side as source);
* :mod:`.relay`: the remote end, beside the kernel (run as ``python -``, its text
  from :func:`relay_program`);
* :mod:`.local_end`: the Jupyter end, five local sockets and the stream to the relay.

Not yet used by the provisioners.
"""

from __future__ import annotations

from .local_end import DEFAULT_HB_GRACE, LocalEnd, SessionStats, tcp_opener
from .relay import RelaySettings
from .source import relay_program, relay_source

__all__ = [
    "DEFAULT_HB_GRACE",
    "LocalEnd",
    "RelaySettings",
    "SessionStats",
    "relay_program",
    "relay_source",
    "tcp_opener",
]
