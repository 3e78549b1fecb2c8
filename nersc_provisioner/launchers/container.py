"""Container runtimes as NERSC documents them: Shifter and podman-hpc."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ConfigError

RUNTIMES = ("shifter", "podman-hpc")


@dataclass(frozen=True)
class ContainerSpec:
    """A container image and the runtime that runs the kernel inside it."""

    image: str
    runtime: str = "shifter"
    args: tuple[str, ...] = ()
    # Host directories that must be visible inside the container at the same
    # path (the connection file's directory, the working directory).
    mounts: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise ConfigError(
                f"unknown container_runtime {self.runtime!r}",
                hint=f"use one of: {', '.join(RUNTIMES)}",
            )
        if not self.image or self.image.startswith("-"):
            raise ConfigError(
                f"invalid container image {self.image!r}",
                hint="give an image name such as docker:continuumio/anaconda3:latest",
            )


def container_prefix(spec: ContainerSpec) -> list[str]:
    """The argv that precedes the kernel command to run it inside ``spec``.

    Shifter mounts $HOME and the global file systems itself; podman-hpc needs
    host networking (the kernel binds the host's loopback) and explicit mounts.
    """
    if spec.runtime == "shifter":
        return ["shifter", f"--image={spec.image}", *spec.args]
    mounts: list[str] = []
    for path in spec.mounts:
        mounts += ["-v", f"{path}:{path}"]
    return ["podman-hpc", "run", "--rm", "--net", "host", *mounts, *spec.args, spec.image]
