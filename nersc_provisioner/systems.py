"""The HPC systems we know, as data: each named provisioner is one row."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class System:
    """Defaults for one system's login nodes."""

    name: str
    host: str
    #: NERSC's sshproxy.sh writes ~/.ssh/nersc with ~/.ssh/nersc-cert.pub beside it.
    identity_file: str = ""
    description: str = ""


SYSTEMS: dict[str, System] = {
    "nersc-cori": System(
        name="cori",
        host="cori.nersc.gov",
        identity_file="~/.ssh/nersc",
        description="Cori (Cray XC40, Haswell and KNL; retired 2023)",
    ),
    "nersc-perlmutter": System(
        name="perlmutter",
        host="perlmutter.nersc.gov",
        identity_file="~/.ssh/nersc",
        description="Perlmutter (HPE Cray EX, CPU and GPU nodes)",
    ),
}
