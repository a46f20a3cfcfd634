"""The shared data sets: where they live and how pairs are formed.

The data root comes from `--data-root`, else `PRIORREG_DATA`, else `../shared/data`
beside the checkout (the layout CI and developers use).
"""

from __future__ import annotations

import os
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent


def data_root(explicit: str | os.PathLike | None = None) -> Path:
    """The data root: `explicit`, else `$PRIORREG_DATA`, else `../shared/data` beside the repository."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("PRIORREG_DATA")
    if env:
        return Path(env)
    return _REPO.parent / "shared" / "data"
