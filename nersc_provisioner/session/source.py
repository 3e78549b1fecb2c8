"""The relay's program, as text for ``python -`` on the remote host.

:func:`relay_source` is :mod:`.protocol`'s source followed by :mod:`.relay`'s, without
the relay's package imports (the names are already defined above them).  The text is
built from the installed files, so what runs remotely is what the tests ran here.
"""

from __future__ import annotations

import functools
from pathlib import Path

HERE = Path(__file__).resolve().parent
BEGIN_IMPORTS = "# npr: package imports"
END_IMPORTS = "# npr: end of package imports"
FUTURE = "from __future__ import annotations\n"


@functools.lru_cache(maxsize=1)
def relay_source() -> str:
    """The relay's code: defines ``main(settings_file)``; runs nothing by itself."""
    protocol = (HERE / "protocol.py").read_text()
    relay = (HERE / "relay.py").read_text()
    begin, end = relay.index(BEGIN_IMPORTS), relay.index(END_IMPORTS)
    relay = relay[:begin] + relay[end + len(END_IMPORTS) :].lstrip("\n")
    if FUTURE not in relay:
        raise RuntimeError("relay.py must use postponed annotations")
    relay = relay.replace(FUTURE, "", 1)
    return f"{protocol}\n\n# --- relay.py ---\n\n{relay}"


def relay_program(settings_file: str) -> str:
    """The whole text to send to ``python -``: the relay, then a call of ``main`` with
    the path of its settings file (``~`` expanded there; the path is no secret, the
    file's content is, and it is mode 0600)."""
    if "\0" in settings_file or "\n" in settings_file:
        raise ValueError("the settings file's path holds a NUL or a newline")
    call = f"if __name__ == '__main__':\n    sys.exit(main({settings_file!r}))\n"
    return f"{relay_source()}\n\n{call}"
