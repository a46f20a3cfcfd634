"""What every registration method returns, and the one entry point that picks a method.

Methods live in `priorreg/methods/` (one file each); the CLI, the benchmarks and
the Slicer modules call `register()` and get a `RegistrationResult`, whose
field is in mm on the fixed grid (ARCHITECTURE.md's convention).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field as dc_field

from .volume import Volume


class Cancelled(Exception):
    """Raised inside a method when its `cancel` callback returns True; nothing is returned."""


@dataclass
class Progress:
    """One report from a running method: what the Slicer progress bar and the CLI show."""

    stage: str
    step: int
    total: int
    loss: float
    elapsed: float

    @property
    def remaining(self) -> float:
        """Estimated seconds left, assuming steps take equal time."""
        return self.elapsed / max(self.step, 1) * max(self.total - self.step, 0)


ProgressCallback = Callable[[Progress], None]


@dataclass
class RegistrationResult:
    field: Volume  # [3, K, J, I] LPS mm on the fixed grid, phi(x) = x + u(x)
    warped: Volume  # moving image resampled on the fixed grid
    method: str
    seconds: float
    warped_labels: Volume | None = None
    history: list[dict] = dc_field(default_factory=list)
    inverse_field: Volume | None = None  # fixed -> moving, on the moving grid, from methods that predict it

    @classmethod
    def from_field(
        cls, field: Volume, moving: Volume, method: str, seconds: float, moving_labels: Volume | None = None, history=None
    ) -> "RegistrationResult":
        """The result of a field: the moving image (linearly, whatever its dtype) and labels resampled through it."""
        from .spatial import resample

        warped_labels = resample(moving_labels, field, field) if moving_labels is not None else None
        return cls(field, resample(moving, field, field, mode="linear"), method, seconds, warped_labels, history or [])


class Monitor:
    """Times a run, forwards progress, and raises `Cancelled` when asked: one per registration."""

    def __init__(self, total: int, progress: ProgressCallback | None = None, cancel: Callable[[], bool] | None = None):
        self.total, self.progress, self.cancel = total, progress, cancel
        self.start = time.perf_counter()
        self.step = 0
        self.history: list[dict] = []

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def tick(self, stage: str, loss: float) -> None:
        if self.cancel is not None and self.cancel():
            raise Cancelled(f"cancelled at step {self.step} of {self.total}")
        self.step += 1
        self.history.append({"stage": stage, "step": self.step, "loss": loss})
        if self.progress is not None:
            self.progress(Progress(stage, self.step, self.total, loss, self.elapsed))


def register(fixed: Volume, moving: Volume, method: str = "iterative", **options) -> RegistrationResult:
    """Register `moving` to `fixed` with the named method; options go to that method."""
    from .methods import METHODS

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[method](fixed, moving, **options)
