"""Provisioners: the only code that knows jupyter_client."""

from .local import DEFAULT_KERNEL_ARGV, LaunchPlan, NERSCLocalProvisioner
from .options import WrapperOptions

#: provisioner name (kernel.json ``provisioner_name``) -> class
PROVISIONERS: dict[str, type[WrapperOptions]] = {
    "nersc-local": NERSCLocalProvisioner,
}

__all__ = [
    "DEFAULT_KERNEL_ARGV",
    "PROVISIONERS",
    "LaunchPlan",
    "NERSCLocalProvisioner",
    "WrapperOptions",
]
