"""Deep image prior registration (seed 003, Laves et al.): an untrained CNN as the regulariser.

No training data: for each pair, a randomly initialised 3D encoder-decoder
(`priorreg.nets.unet.UNet3D`, inside `DipNet`) maps noise to the
displacement field, and its weights are optimised with Adam on the image
similarity (the paper's choice is MAE). What regularises the field is the
structure of the network, not a penalty (`smooth_weight` adds an optional one).

Choices, following the paper where it says something:

- Input: `NOISE_CHANNELS` channels of noise z ~ N(0, 0.1^2) (std 0.1) with the
  field's spatial size, drawn afresh at every iteration, so the network has to
  produce a field that does not depend on the particular noise.
- `network` (`NETWORKS`): "paper" is seed 003's generator exactly, noise in and every
  weight ~ N(0, 0.01). "coords" (the default) adds three channels of voxel coordinates
  (-1 to 1 along each axis) to the noise and keeps PyTorch's default initialisation
  but for the output convolution, whose weights are ~ N(0, `OUTPUT_INIT_STD`).
  Why: z is redrawn at every step, so the paper's fully convolutional network sees no
  position but the zero padding at the volume's borders, and its field can only vary
  in space through those border effects; and N(0, 0.01) weights through a deep stack
  give a near-zero output whose gradients are near zero too, so the first ~150 steps
  change nothing. The coordinates give the network its position (as CoordConv does),
  the default initialisation keeps its activations alive, and the near-zero output
  layer still starts it at the identity. On the two OASIS brains at 1/4 with MAE and
  5 minutes: Dice 0.63 -> 0.72 (README, "oasis").
- Output: the network's 3 channels times `output_scale_mm` are the displacement
  `u` in mm (LPS) on the level's grid, `phi(x) = x + u(x)`. The scale only
  sets how fast Adam moves the field; 1 output unit = `output_scale_mm` mm.
- The returned field is the network's output averaged over 4 fresh noise
  draws (the trained network barely depends on z; the mean removes what is left).
- Coarse to fine, the simplest variant that works: one fresh network per level
  predicts a residual, `u = up(u_coarser) + scale * f_level(z)`, where
  `up(u_coarser)` is the previous level's field (frozen) sampled onto the finer
  grid. A fresh network starts at a near-zero residual, so every
  level starts where the previous one ended. (Feeding the coarse network finer
  noise would change its output, since its convolutions work in voxels.)
- `smooth_weight` (default 0.1) adds `regularizers.gradient_l2(u)`: a departure
  from the paper, which has no penalty. On 3D hippocampus pairs the plain network
  folded 6 to 24 % of voxels on some pairs (and at lr 3e-3 diverged on one);
  0.1 removed the folding and raised Dice. `lr` 1e-3 was chosen the same way
  (1e-2 diverges, 3e-3 diverged on one of six pairs).
- Each level stops after its steps, on a plateau (after a warm-up of `patience` steps,
  `patience` steps without a relative improvement of `min_delta` of the best moving average
  of the loss, which is noisy since z changes), or when its share of
  `max_seconds` (proportional to its steps) is used.
- Fixed and moving keep their own grids (the moving image is sampled through
  `u`, as in `iterative.py`); `init="centres"` adds a constant translation.
- Out of memory at a level: a warning, and the result of the coarser level is
  kept (or, at the first level, the level is tried at twice the factor).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .. import losses, regularizers
from ..nets.unet import UNet3D
from ..registration import Monitor, RegistrationResult
from ..spatial import Grid, field_volume, sample
from ..volume import Volume
from .common import PairData, check_schedule, initial_translation, pick_device

NOISE_CHANNELS = 8
NOISE_STD = 0.1
OUTPUT_INIT_STD = 1e-5
NETWORKS = ("coords", "paper")
MAX_FACTOR = 16


class DipNet(nn.Module):
    """Seed 003's generator (`coords=False`), or the same U-Net told where it is: see the module's docstring, `network`."""

    def __init__(self, coords: bool, channels: tuple):
        super().__init__()
        self.coords = coords
        self.unet = UNet3D(NOISE_CHANNELS + 3 * self.coords, 3, channels, init_std=None if self.coords else 0.01)
        if self.coords:
            nn.init.normal_(self.unet.out.weight, 0.0, OUTPUT_INIT_STD)
            nn.init.zeros_(self.unet.out.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.coords:
            axes = [torch.linspace(-1.0, 1.0, n, device=z.device, dtype=z.dtype) for n in z.shape[2:]]
            position = torch.stack(torch.meshgrid(*axes, indexing="ij"))[None].expand(len(z), -1, -1, -1, -1)
            z = torch.cat([z, position], dim=1)
        return self.unet(z)


def _is_oom(error: BaseException) -> bool:
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    return (oom is not None and isinstance(error, oom)) or "out of memory" in str(error).lower()


class Plateau:
    """Early stopping on a noisy loss (a fresh z every step): true once the loss's moving average has
    not improved on its best by a relative `min_delta` for `patience` steps in a row.

    The first `patience` steps are a warm-up that never stops the level: the loss can first rise
    while the network leaves its near-zero start.
    """

    def __init__(self, patience: int, min_delta: float):
        self.patience, self.min_delta = patience, min_delta
        self.steps, self.since_best = 0, 0
        self.best: float | None = None
        self.ema: float | None = None

    def reached(self, loss: float) -> bool:
        self.ema = loss if self.ema is None else 0.9 * self.ema + 0.1 * loss
        self.steps += 1
        if self.steps <= self.patience:
            return False
        if self.best is None or self.ema < self.best - self.min_delta * abs(self.best):
            self.best, self.since_best = self.ema, 0
            return False
        self.since_best += 1
        return self.since_best >= self.patience


def register_dip(
    fixed: Volume,
    moving: Volume,
    fixed_labels: Volume | None = None,
    moving_labels: Volume | None = None,
    similarity: str = "mae",
    label_weight: float = 1.0,
    label_sigmas_mm: tuple = losses.DICE_SIGMAS_MM,
    smooth_weight: float = 0.1,
    levels: tuple = (2, 1),
    steps: tuple = (200, 100),
    max_seconds: float | None = None,
    lr: float = 1e-3,
    output_scale_mm: float = 10.0,
    channels: tuple = (16, 32, 32, 32),
    network: str = "coords",
    patience: int = 100,
    min_delta: float = 1e-3,
    init: str = "geometry",
    device: str = "auto",
    seed: int = 0,
    progress=None,
    cancel=None,
) -> RegistrationResult:
    """Register `moving` to `fixed` with a per-pair optimised, randomly initialised CNN (seed 003).

    Labels (both or neither) add seed 000's multiscale Dice term with `label_weight`;
    never pass evaluation labels here. Deterministic for a given `seed` and device.
    """
    check_schedule(levels, steps, smooth_weight=smooth_weight, label_weight=label_weight)
    if network not in NETWORKS:
        raise ValueError(f"network: one of {', '.join(NETWORKS)}; got {network!r}")
    if max_seconds is not None and not max_seconds > 0:
        raise ValueError(f"max_seconds must be more than 0; got {max_seconds}")
    torch.manual_seed(seed)
    dev = pick_device(device)
    pair = PairData(
        fixed, moving, fixed_labels, moving_labels, similarity, dev, label_weight=label_weight,
        label_sigmas_mm=label_sigmas_mm,
    )
    fgrid, mgrid = pair.fgrid, pair.mgrid
    monitor = Monitor(sum(steps), progress, cancel)
    t0 = torch.as_tensor(initial_translation(fgrid, mgrid, init), dtype=torch.float32, device=dev)

    def loss_of(u, grid, images):
        loss = pair.loss(u, grid, images)
        return loss + smooth_weight * regularizers.gradient_l2(u, grid) if smooth_weight > 0 else loss

    def run_level(grid: Grid, factor: float, n: int, base: torch.Tensor, budget_end: float | None):
        images = pair.level(grid, factor)
        net = DipNet(network == "coords", channels).to(dev)
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        plateau = Plateau(patience, min_delta)
        for _ in range(n):
            z = NOISE_STD * torch.randn(1, NOISE_CHANNELS, *grid.shape, device=dev)
            opt.zero_grad()
            loss = loss_of(base + output_scale_mm * net(z), grid, images)
            loss.backward()
            opt.step()
            value = loss.item()
            monitor.tick(f"dip 1/{factor:g}", value)
            if budget_end is not None and monitor.elapsed >= budget_end:  # the user's budget binds in the warm-up too
                break
            if plateau.reached(value):
                break
        # The field: the network's output averaged over a few fresh noise draws (it hardly depends on z).
        with torch.no_grad():
            draws = [net(NOISE_STD * torch.randn(1, NOISE_CHANNELS, *grid.shape, device=dev)) for _ in range(4)]
            return base + output_scale_mm * torch.stack(draws).mean(0)

    u, prev = None, None
    done, level_index = 0, 0
    schedule = list(zip(levels, steps))
    while level_index < len(schedule):
        factor, n = schedule[level_index]
        grid = fgrid.scaled(factor)
        pts = grid.points(device=dev)[None]
        base = t0.view(1, 3, 1, 1, 1).expand(1, 3, *grid.shape) if u is None else sample(u, prev, pts, padding="border")
        budget_end = None if max_seconds is None else max_seconds * (done + n) / sum(steps)
        try:
            u, prev = run_level(grid, factor, n, base.contiguous(), budget_end), grid
        except (RuntimeError, MemoryError) as error:
            if not _is_oom(error):
                raise
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            if u is not None:
                warnings.warn(f"dip: out of memory at level 1/{factor:g} {grid.shape}; keeping the 1/{levels[level_index - 1]:g} result")
                break
            if factor * 2 > MAX_FACTOR:
                raise
            warnings.warn(f"dip: out of memory at level 1/{factor:g} {grid.shape}; trying 1/{factor * 2:g}")
            schedule[level_index] = (factor * 2, n)
            continue
        done += n
        level_index += 1

    with torch.no_grad():
        if not prev.matches(fgrid):
            u = sample(u, prev, fgrid.points(device=dev)[None], padding="border")
    return RegistrationResult.from_field(
        field_volume(u, fgrid), moving, "dip", monitor.elapsed, moving_labels, monitor.history
    )
