"""``python -m nersc_provisioner``."""

from .cli import main

raise SystemExit(main())
