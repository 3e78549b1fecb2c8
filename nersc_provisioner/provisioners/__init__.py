"""Provisioners: the only code that knows jupyter_client."""

from .argv import DEFAULT_KERNEL_ARGV
from .local import NERSCLocalProvisioner
from .options import LaunchPlan, WrapperOptions
from .remote import NERSCCoriProvisioner, NERSCPerlmutterProvisioner, NERSCRemoteProvisioner

#: provisioner name (kernel.json ``provisioner_name``) -> class
PROVISIONERS: dict[str, type[WrapperOptions]] = {
    "nersc-local": NERSCLocalProvisioner,
    "nersc-cori": NERSCCoriProvisioner,
    "nersc-perlmutter": NERSCPerlmutterProvisioner,
}

__all__ = [
    "DEFAULT_KERNEL_ARGV",
    "PROVISIONERS",
    "LaunchPlan",
    "NERSCCoriProvisioner",
    "NERSCLocalProvisioner",
    "NERSCPerlmutterProvisioner",
    "NERSCRemoteProvisioner",
    "WrapperOptions",
]
