"""AIR-net (seed 001, Yan et al. 2018): a generator regresses a rigid or affine transform, a
Wasserstein critic scores alignment; the critic's score is PriorReg's quality D-score.

Pairs are seen in the adversarial method's model frame (`ModelFrame`: 3 mm voxels centred on
the fixed field of view; the moving frame centred by the `centres` initialisation). Images
enter the frame *raw* (zero outside their field of view, as any tool's warped image is) and
are standardised per sample over the frame afterwards (`standardise`), so that a warped
image given by a user and one made in training look alike to the networks.

Training (section 2.2), per pair: the reference alignment `ref` (`priorreg.reference`, fitted
to the expert labels) is perturbed by a random transform `P` (rotations within +-25 degrees,
translations within +-5 mm, each scaled by one uniform factor so that small errors are as
common as large ones); the generator sees `(fixed, moving o ref o P)` and estimates `P`'s
parameters; its correction warps the moving image by `ref o P o P_hat^-1`. The critic scores
`(fixed, moving o ref)` as real and corrected pairs as fake. PriorReg adds to the fakes the
uncorrected perturbed pairs (so the score ranks misalignment over the whole range users meet,
not only the generator's residual) and trivial impostors (an empty or constant warped image,
the fixed image pasted as warped, the two modalities swapped), so that none of them can score
as aligned. Critic: weight clipping at 0.01 (the paper) or a gradient penalty (Gulrajani et
al.), two critic updates per generator update. Generator loss: `-D(corrected)` plus the
perturbation loss, the squared Euclidean distance between estimated and true parameters,
each parameter divided by its perturbation range so that degrees and millimetres weigh alike.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..models import load_model, restore
from ..nets.airnet import AirNet
from ..registration import Monitor, RegistrationResult
from ..spatial import Grid, affine_to_field, resample, sample
from ..volume import Volume
from .adversarial import ModelFrame, frame_centres, points_through, to_fixed_grid
from .common import pick_device

TRANSFORMS = {"rigid": 6, "affine": 12}
CRITICS = ("clip", "gp")
IMPOSTORS = ("empty", "constant", "fixed_as_warped", "swapped")


# ------------------------------------------------------------------------------ transforms
def rotation_matrix(angles_deg: torch.Tensor) -> torch.Tensor:
    """`[B, 3]` angles about x, y, z (degrees) -> `[B, 3, 3]` rotations `Rz Ry Rx`."""
    a = torch.deg2rad(angles_deg)
    c, s = torch.cos(a), torch.sin(a)
    one, zero = torch.ones_like(c[:, 0]), torch.zeros_like(c[:, 0])
    rx = torch.stack([one, zero, zero, zero, c[:, 0], -s[:, 0], zero, s[:, 0], c[:, 0]], 1).view(-1, 3, 3)
    ry = torch.stack([c[:, 1], zero, s[:, 1], zero, one, zero, -s[:, 1], zero, c[:, 1]], 1).view(-1, 3, 3)
    rz = torch.stack([c[:, 2], -s[:, 2], zero, s[:, 2], c[:, 2], zero, zero, zero, one], 1).view(-1, 3, 3)
    return rz @ ry @ rx


def transform_matrix(params: torch.Tensor, kind: str) -> torch.Tensor:
    """Parameters -> `[B, 3, 4]` maps `x -> A x + t` in model coordinates (about the frame centre).

    rigid: 3 angles (degrees) then 3 translations (mm); affine: `A - I` row-major, then `t` (mm).
    """
    if kind == "rigid":
        return torch.cat([rotation_matrix(params[:, :3]), params[:, 3:, None]], dim=2)
    eye = torch.eye(3, dtype=params.dtype, device=params.device)
    return torch.cat([eye + params[:, :9].view(-1, 3, 3), params[:, 9:, None]], dim=2)


def parameter_scale(kind: str, rotation_deg: float, translation_mm: float) -> torch.Tensor:
    """Each parameter's perturbation range: what the perturbation loss divides by."""
    if kind == "rigid":
        return torch.tensor([rotation_deg] * 3 + [translation_mm] * 3)
    return torch.tensor([math.sin(math.radians(rotation_deg))] * 9 + [translation_mm] * 3)


def random_perturbations(g: torch.Generator, n: int, kind: str, rotation_deg: float, translation_mm: float) -> torch.Tensor:
    """`[n, P]` rigid perturbations (as `kind` parameters): uniform within the ranges, times one U(0, 1) factor."""
    factor = torch.rand(n, 1, generator=g)
    rigid = (torch.rand(n, 6, generator=g) * 2 - 1) * factor * torch.tensor([rotation_deg] * 3 + [translation_mm] * 3)
    if kind == "rigid":
        return rigid
    m = transform_matrix(rigid, "rigid")
    return torch.cat([(m[:, :, :3] - torch.eye(3)).flatten(1), m[:, :, 3]], dim=1)


def invert(m: torch.Tensor) -> torch.Tensor:
    """Inverse of `[B, 3, 4]` maps."""
    a_inv = torch.linalg.inv(m[:, :, :3])
    return torch.cat([a_inv, -(a_inv @ m[:, :, 3:])], dim=2)


def then(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """The map `x -> second(first(x))` of two `[B, 3, 4]` maps."""
    a = second[:, :, :3] @ first[:, :, :3]
    return torch.cat([a, second[:, :, :3] @ first[:, :, 3:] + second[:, :, 3:]], dim=2)


# ----------------------------------------------------------------------------- images in the frame
def standardise(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Zero mean, unit variance per sample over the frame (a constant image becomes zeros)."""
    flat = x.flatten(1)
    mean, std = flat.mean(1), flat.std(1)
    shape = (-1,) + (1,) * (x.dim() - 1)
    return (x - mean.view(shape)) / std.clamp_min(eps).view(shape) * (std > eps).view(shape)


def frame_images(fixed: Volume, moving: Volume, frame: ModelFrame, init: str) -> tuple[np.ndarray, np.ndarray]:
    """Raw fixed and moving images on the fixed and (larger) moving model frames, `[1, K, J, I]` each."""
    fg, mg = Grid.of(fixed), Grid.of(moving)
    cf, cm = frame_centres(fg, mg, init)
    f = resample(fixed.with_array(fixed.array.astype(np.float32)), frame.physical(cf, fg.direction))
    m = resample(moving.with_array(moving.array.astype(np.float32)), frame.physical(cm, fg.direction, moving=True))
    return f.array[None], m.array[None]


def on_fixed_frame(fixed: Volume, warped: Volume, frame: ModelFrame) -> tuple[torch.Tensor, torch.Tensor]:
    """A registered pair (warped image on any grid) as the critic sees it: `[1, 1, K, J, I]` each, standardised."""
    fg = Grid.of(fixed)
    grid = frame.physical(fg.center, fg.direction)
    f = resample(fixed.with_array(fixed.array.astype(np.float32)), grid).array
    w = resample(warped.with_array(warped.array.astype(np.float32)), grid).array
    return standardise(torch.as_tensor(f)[None, None]), standardise(torch.as_tensor(w)[None, None])


def candidate_points(ref_field: torch.Tensor, matrix: torch.Tensor, fcan: Grid, points: torch.Tensor) -> torch.Tensor:
    """Moving-frame points of `ref o matrix` at `points` (`[B, ..., 3]` or shared `[..., 3]`)."""
    q = points_through(matrix, points)
    flat = q.reshape(q.shape[0], -1, 3)
    return (flat + sample(ref_field, fcan, flat, padding="border").transpose(1, 2)).reshape(q.shape)


def candidate_tre(ref_field: torch.Tensor, matrix: torch.Tensor, fcan: Grid, fixed_points, moving_points) -> torch.Tensor:
    """RMS landmark error (mm) of `ref o matrix` for each of `B` samples of one pair."""
    fp = torch.as_tensor(fixed_points, dtype=matrix.dtype, device=matrix.device)
    mp = torch.as_tensor(moving_points, dtype=matrix.dtype, device=matrix.device)
    if len(fp) == 0:
        return torch.full((matrix.shape[0],), float("nan"))
    mapped = candidate_points(ref_field.expand(matrix.shape[0], -1, -1, -1, -1), matrix, fcan, fp[None].expand(matrix.shape[0], -1, -1))
    return (mapped - mp).norm(dim=-1).square().mean(-1).sqrt()


def impostor(kind: str, fixed: torch.Tensor, aligned: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A trivial pair that must never score as aligned: returns (fixed input, warped input), standardised."""
    if kind == "empty":
        return fixed, torch.zeros_like(aligned)
    if kind == "constant":
        return fixed, standardise(torch.full_like(aligned, 7.0))
    if kind == "fixed_as_warped":
        return fixed, fixed
    if kind == "swapped":
        return aligned, fixed
    raise ValueError(f"impostor must be one of {IMPOSTORS}, got {kind!r}")


# ----------------------------------------------------------------------------------------- losses
def critic_loss(critic, real: tuple, fake: tuple, mode: str, gp_weight: float = 10.0, gp_fakes: str = "corrected"):
    """Wasserstein critic loss `E D(fake) - E D(real)` (+ gradient penalty in mode "gp").

    The penalty is taken between real pairs and the first fakes (`gp_fakes="corrected"`: the
    generator's, as WGAN-GP does) or fakes drawn from all of them (`"all"`: perturbed pairs and
    impostors too, so that the critic stays Lipschitz where they lie).
    Returns the loss and the critic's outputs `[B]` on the real and the fake pairs.
    """
    d_real, d_fake = critic(*real)[:, 0], critic(*fake)[:, 0]
    loss = d_fake.mean() - d_real.mean()
    if mode == "gp":
        n = min(real[0].shape[0], fake[0].shape[0])
        pick = torch.randperm(fake[0].shape[0], device=fake[0].device)[:n] if gp_fakes == "all" else torch.arange(n)
        eps = torch.rand(n, 1, 1, 1, 1, device=real[0].device)
        mixed = [(eps * r[:n] + (1 - eps) * f[pick]).requires_grad_(True) for r, f in zip(real, fake)]
        grads = torch.autograd.grad(critic(*mixed).sum(), mixed, create_graph=True)
        norm = torch.cat([g.flatten(1) for g in grads], 1).norm(dim=1)
        loss = loss + gp_weight * (norm - 1).square().mean()
    return loss, d_real, d_fake


def error_regression_loss(scores: torch.Tensor, tre_mm: torch.Tensor) -> torch.Tensor:
    """PriorReg's optional critic term (`critic.tre_weight`): D-scores of known-error pairs regressed
    onto minus their landmark TRE in mm, so that one score means one error on every patient."""
    ok = torch.isfinite(tre_mm)
    return (scores[ok] + tre_mm[ok]).square().mean() if ok.any() else scores.new_zeros(())


def ranking_loss(scores: torch.Tensor, tre_mm: torch.Tensor, margin_mm: float = 1.0) -> torch.Tensor:
    """PriorReg's optional critic term (`critic.rank_weight`): of two known-error pairs whose landmark
    TRE differs by more than `margin_mm`, the worse must score lower (pairwise logistic loss, as RankNet).

    The Wasserstein term only tells aligned pairs from misaligned ones; nothing in it orders the
    misaligned ones by how far off they are, which is what a quality score is for. Scale-free, so
    it does not fight that term as the regression onto millimetres did (`airnet_mrus_gp_tre`
    diverged). The margin keeps landmark noise from ordering near-equal errors.
    """
    ok = torch.isfinite(tre_mm)
    s, t = scores[ok], tre_mm[ok]
    worse = (t[:, None] - t[None, :]) > margin_mm  # [i, j]: sample i is worse aligned than sample j
    if not worse.any():
        return scores.new_zeros(())
    return torch.nn.functional.softplus(s[:, None] - s[None, :])[worse].mean()


def clip_weights(critic, clip: float) -> None:
    with torch.no_grad():
        for p in critic.parameters():
            p.clamp_(-clip, clip)


def perturbation_loss(estimate: torch.Tensor, truth: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distance between parameter vectors, each parameter over its range."""
    return ((estimate - truth) / scale.to(estimate)).square().sum(1).mean()


# ------------------------------------------------------------------------------------- the model
def build_networks(card: dict) -> tuple[AirNet, AirNet]:
    arch = card["architecture"]
    shape = tuple(card["frame"]["shape"])
    generator = AirNet(shape, TRANSFORMS[arch["transform"]], arch["width"], arch["dims"])
    critic = AirNet(shape, 1, arch["width"], arch["dims"])
    torch.nn.init.zeros_(generator.head[-1].weight)  # the identity transform before training
    torch.nn.init.zeros_(generator.head[-1].bias)
    return generator, critic


def model_card(frame: ModelFrame, width: int, dims: int, transform: str, init: str, perturbation: dict) -> dict:
    """The card fields inference and scoring need; training adds data, command, calibration, metrics."""
    return {
        "method": "airnet",
        "architecture": {"name": "AirNet", "width": width, "dims": dims, "transform": transform},
        "frame": {"shape": list(frame.shape), "spacing": frame.spacing, "margin": frame.margin},
        "preprocessing": {"intensity": "raw into the frame, then zero mean, unit variance over the frame", "init": init},
        "perturbation": perturbation,
    }


class LoadedAirNet:
    """AIR-net's generator and critic with their card, on a device."""

    def __init__(self, generator: AirNet, critic: AirNet, card: dict, device, path=None):
        self.generator, self.critic, self.card, self.device, self.path = generator, critic, card, torch.device(device), path
        f = card["frame"]
        self.frame = ModelFrame(tuple(f["shape"]), f["spacing"], f["margin"])
        self.kind = card["architecture"]["transform"]

    @classmethod
    def load(cls, model="airnet_mrus", device: str = "auto") -> LoadedAirNet:
        tensors, card, path = load_model(model, method="airnet")
        generator, critic = build_networks(card)
        dev = pick_device(device)
        return cls(restore(generator, tensors, "generator", dev), restore(critic, tensors, "critic", dev), card, dev, path)

    def score(self, fixed: torch.Tensor, warped: torch.Tensor) -> torch.Tensor:
        """Critic D-scores `[B]` of standardised frame pairs (higher: better aligned)."""
        with torch.no_grad():
            return self.critic(fixed.to(self.device), warped.to(self.device))[:, 0].cpu()


def register_airnet(
    fixed: Volume,
    moving: Volume,
    model="airnet_mrus",
    device: str = "auto",
    init: str | None = None,
    passes: int = 1,
    progress=None,
    cancel=None,
    loaded: LoadedAirNet | None = None,
) -> RegistrationResult:
    """Register with AIR-net's generator: estimate the misalignment, undo it; `passes` times.

    The generator was trained on misalignments within its card's perturbation ranges around
    a good alignment; repeated passes let it correct larger ones a step at a time.
    """
    if passes < 1:
        raise ValueError(f"passes must be at least 1, got {passes}")
    monitor = Monitor(passes, progress, cancel)
    net = loaded or LoadedAirNet.load(model, device)
    init = init or net.card["preprocessing"]["init"]
    fg, mg = Grid.of(fixed), Grid.of(moving)
    cf, cm = frame_centres(fg, mg, init)
    f_arr, m_arr = frame_images(fixed, moving, net.frame, init)
    dev = net.device
    f_in = standardise(torch.as_tensor(f_arr, device=dev)[None])
    m_frame = torch.as_tensor(m_arr, device=dev)[None]
    fcan, mcan = net.frame.canonical(), net.frame.canonical(moving=True)
    pts = fcan.points(device=dev)
    matrix = torch.eye(3, 4, device=dev)[None]
    with torch.no_grad():
        for _ in range(passes):
            warped = standardise(sample(m_frame, mcan, points_through(matrix, pts)))
            estimate = transform_matrix(net.generator(f_in, warped), net.kind)
            matrix = then(invert(estimate), matrix)  # x -> matrix(estimate^-1(x))
            monitor.tick("airnet", float("nan"))
        u = affine_to_field(matrix, fcan)
    field = to_fixed_grid(u, fg, net.frame.physical(cf, fg.direction), cf, cm)
    return RegistrationResult.from_field(field, moving, "airnet", monitor.elapsed, history=monitor.history)
