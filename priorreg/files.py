"""Atomic file writes: a failed or killed write never leaves a partial or changed file behind.

Volumes, model files and simulation sidecars all go through `atomic_write`: the content is
written to a hidden temporary file in the target's folder, made readable by others (mkstemp
creates 0600), then renamed over the target.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], suffix: str = "") -> Path:
    """Call `write(temporary_path)`, then move the result to `path`; on any error nothing changes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=suffix, dir=path.parent, prefix=".priorreg-")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
