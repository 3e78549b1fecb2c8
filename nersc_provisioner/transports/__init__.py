"""Transports: how to run a command and reach a process on a host.

Transports know nothing about Jupyter or Slurm.
"""

from .local import StatusPipe, reap_session, run_command

__all__ = ["StatusPipe", "reap_session", "run_command"]
