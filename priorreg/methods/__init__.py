"""Registration methods, one file each; `METHODS` maps the CLI's `--method` names to them."""

from .iterative import register_iterative

METHODS = {"iterative": register_iterative}
