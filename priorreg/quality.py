"""How much to trust a registration: the quality report of any registered pair.

For a fixed image and a warped moving image on any grid (from PriorReg, elastix, ANTs, by
hand), and the displacement field when there is one, the report holds:
- `d_score`: AIR-net's critic score of the pair (seed 001; higher is better aligned);
- `critic_tre_estimate_mm`: the D-score through a monotone calibration fitted on validation
  patients (isotonic regression of landmark TRE on the score, stored in the critic's model card);
- `tre_estimate_mm` with an 80% interval (the calibration's residual quantiles): the critic's
  estimate; where the card holds a `gland_calibration` (opt-in: `priorreg calibrate --glands`), the
  critic's estimate blended with the gland misfit (below) through that second isotonic calibration.
  The shipped card has none: the blend ranked the validation samples better (Spearman -0.71
  against -0.53) and the test samples worse (-0.58 against -0.64), as each pair's segmenters
  disagree by a few mm of their own (README, "AIR-net");
- `verdict`: "good", "check" or "failed", from the estimate and the card's thresholds, and
  `reasons` when a check outside the critic decided it (an empty or constant warped image,
  a warped image that misses the fixed field of view, folding);
- with a field: Jacobian statistics, and the adversarial-regularization discriminator's
  plausibility of its local part (seed 000's prior: the probability that the non-affine
  part of the field looks like a simulated, biomechanically plausible one);
- `gland_offset_mm`, `gland_dice` and `gland_misfit_mm`: where the gland segmenters of `--method
  glands` find the gland in the fixed image and in the warped one, and how far the rigid map that
  lays one onto the other moves the gland (`gland_misfit`). The critic learned "aligned" from pairs within
  +-25 degrees and +-5 mm of good alignments and cannot see a gross misalignment (it called all
  18 centred test pairs, median TRE 10.1 mm, "good"); glands far apart can (a reason, and the
  verdict check or failed by the same mm thresholds; `gross_misalignments` measures it). It cannot
  judge a registration driven by these same segmenters' outlines (`glands`): their glands agree
  by construction;
- with the inverse field: inverse consistency (mm); with labels: their Dice overlap.

`evaluate_quality` measures all of this against known errors: on every MR-US pair of a
split, perturbed alignments of known TRE around the label-driven reference alignment
(`priorreg.reference`) are scored, and Spearman correlation, AUROC for TRE > 5 mm and the
estimate's error are reported, beside the same agreement figures of Mattes mutual information
(the similarity a classical tool would report) on the same samples. `calibrate` fits the calibration the same way.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from scipy.optimize import isotonic_regression
from scipy.stats import rankdata, spearmanr

from . import data, metrics
from .evaluate import pair_metrics, versions
from .files import atomic_write
from .jacobian import jacobian_stats
from .methods import airnet as air
from .methods.adversarial import LoadedModel, frame_centres, normalise_field
from .methods.glands import LoadedGlands
from .reference import cached_reference, reference_field
from .registration import register
from .spatial import Grid, field_tensor, field_volume, resample, sample
from .volume import Volume

VERDICTS = ("good", "check", "failed")
THRESHOLDS_MM = {"good": 4.0, "failed": 7.0}  # estimate <= good: good; > failed: failed; else check
TRE_THRESHOLD_MM = 5.0  # what AUROC detects: the clinically relevant targeting error for MR-TRUS biopsy
INTERVAL = (10, 90)  # percentiles of the calibration residuals: an 80% interval
MIN_OVERLAP = 0.5  # the warped image must cover this fraction of the fixed field of view


# --------------------------------------------------------------------------------- agreement
def agreement(scores, tre, threshold: float = TRE_THRESHOLD_MM) -> dict:
    """How well scores rank errors: Spearman(score, TRE) (negative is right) and AUROC of -score for TRE > threshold."""
    s, t = np.asarray(scores, float), np.asarray(tre, float)
    ok = np.isfinite(s) & np.isfinite(t)
    s, t = s[ok], t[ok]
    bad = t > threshold
    if bad.all() or not bad.any():
        auroc = float("nan")
    else:  # Mann-Whitney: the chance a bad alignment scores below a good one
        ranks = rankdata(-s)
        auroc = (ranks[bad].sum() - bad.sum() * (bad.sum() + 1) / 2) / (bad.sum() * (~bad).sum())
    varied = len(s) > 2 and np.ptp(s) > 0 and np.ptp(t) > 0
    return {"spearman": float(spearmanr(s, t).statistic) if varied else float("nan"), "auroc": float(auroc)}


# ------------------------------------------------------------------------------- calibration
def fit_calibration(scores, tre, increasing: bool = False) -> dict:
    """Isotonic TRE of a score (non-increasing: the D-score; increasing: a mm evidence), and residual
    quantiles for the interval."""
    s, t = np.asarray(scores, float), np.asarray(tre, float)
    order = np.argsort(s)
    fitted = isotonic_regression(t[order], increasing=increasing).x
    residual = t[order] - fitted
    low, high = np.percentile(residual, INTERVAL)
    return {
        "score": s[order].tolist(),
        "tre_mm": fitted.tolist(),
        "interval_mm": [float(low), float(high)],
        "n": len(s),
        "fitted_on": "validation patients",
    }


def gland_evidence(critic_tre_mm, misfit_mm, weight: float):
    """The mm evidence the gland calibration maps to TRE: the critic's estimate and the glands' misfit, blended."""
    return (1 - weight) * np.asarray(critic_tre_mm, float) + weight * np.asarray(misfit_mm, float)


def fit_gland_calibration(critic_tre_mm, misfit_mm, tre) -> dict:
    """The blend of the critic's estimate and the gland misfit that ranks `tre` best (weight in steps of 0.1,
    chosen on these samples: validation patients), then the isotonic TRE of that evidence."""
    c, m, t = (np.asarray(x, float) for x in (critic_tre_mm, misfit_mm, tre))
    ok = np.isfinite(c) & np.isfinite(m) & np.isfinite(t)
    weights = np.round(np.linspace(0, 1, 11), 1)
    ranked = [spearmanr(gland_evidence(c[ok], m[ok], w), t[ok]).statistic for w in weights]
    weight = float(weights[int(np.nanargmax(ranked))])
    return {"weight": weight, **fit_calibration(gland_evidence(c[ok], m[ok], weight), t[ok], increasing=True)}


def gland_estimate(gland_calibration: dict, critic_tre_mm: float, misfit_mm: float) -> tuple[float, float, float]:
    """The report's TRE (mm) and interval where the card holds a gland calibration: the critic's estimate and
    the glands' misfit, blended, through that calibration."""
    evidence = float(gland_evidence(critic_tre_mm, misfit_mm, gland_calibration["weight"]))
    return estimate_tre(gland_calibration, evidence)


def estimate_tre(calibration: dict, score: float) -> tuple[float, float, float]:
    """The calibrated TRE (mm) of a score (the D-score, or the gland calibration's evidence) and its 80%
    interval (never below 0)."""
    est = float(np.interp(score, calibration["score"], calibration["tre_mm"]))
    low, high = calibration["interval_mm"]
    return est, max(0.0, est + low), est + high


def verdict(estimate_mm: float, thresholds: dict = THRESHOLDS_MM) -> str:
    if estimate_mm <= thresholds["good"]:
        return "good"
    return "failed" if estimate_mm > thresholds["failed"] else "check"


# ------------------------------------------------------------------------------------ scoring
class QualityModel:
    """The critic (and calibration) of an AIR-net model, and optionally seed 000's discriminator."""

    def __init__(self, model="airnet_mrus", plausibility="adversarial_mrus", device: str = "cpu", glands="glands_mrus"):
        self.airnet = air.LoadedAirNet.load(model, device)
        self.glands = LoadedGlands.load(glands, device) if glands else None
        self.calibration = self.airnet.card.get("calibration")
        self.gland_calibration = self.airnet.card.get("gland_calibration") if self.glands is not None else None
        self.thresholds = self.airnet.card.get("thresholds_mm", THRESHOLDS_MM)
        self.adversarial = None
        if plausibility:
            loaded = LoadedModel.load(plausibility, device)
            self.adversarial = loaded if loaded.disc is not None else None

    def d_score(self, fixed: Volume, warped: Volume) -> float:
        f, w = air.on_fixed_frame(fixed, warped, self.airnet.frame)
        return float(self.airnet.score(f, w)[0])

    def plausibility(self, field: Volume) -> float:
        """Seed 000's discriminator on the field's local (non-affine) part, in its model frame: P(simulated)."""
        model = self.adversarial
        fg = Grid.of(field)
        grid = model.frame.physical(fg.center, fg.direction)
        pts = grid.points(torch.float64)
        u = sample(field_tensor(field, torch.float64), fg, pts[None], padding="border")[0]  # [3, K, J, I] LPS
        u = torch.einsum("ba,bkji->akji", torch.as_tensor(fg.direction), u)  # model axes
        x = model.frame.canonical().points(torch.float64).reshape(-1, 3)
        design = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
        y = u.reshape(3, -1).T
        affine_part = design @ torch.linalg.lstsq(design, y).solution
        local = (y - affine_part).T.reshape(1, *u.shape).float()
        with torch.no_grad():
            logit = model.disc(normalise_field(local.to(model.device), model.card["field_norm"]))
        return float(torch.sigmoid(logit).item())


def _image_checks(warped: Volume, on_fixed: np.ndarray, fixed: Volume) -> list[str]:
    """Problems no score should be asked about: an empty or constant warped image (`on_fixed`: its
    values on the fixed grid), no overlap."""
    reasons = []
    if not np.any(on_fixed):
        reasons.append("the warped image is empty (all zero) on the fixed grid")
    elif float(on_fixed.std()) < 1e-6 * max(1.0, float(np.abs(on_fixed).max())):
        reasons.append("the warped image is constant on the fixed grid")
    else:
        inside = resample(warped.with_array(np.ones(warped.array.shape, np.float32)), fixed).array
        if float(inside.mean()) < MIN_OVERLAP:
            reasons.append(f"the warped image covers only {100 * inside.mean():.0f}% of the fixed field of view")
    return reasons


NO_GLAND = {"gland_offset_mm": float("nan"), "gland_dice": 0.0, "gland_misfit_mm": float("nan")}  # what `gland_agreement` says without one


def gland_misfit(fixed_gland: Volume, warped_gland: Volume, steps: int = 80) -> float:
    """How far the warped gland lies from the fixed one (mm): the RMS, over the fixed gland, of the motion of
    the rigid map that best lays the warped gland probability onto the fixed one (least squares, Adam
    from the centroids' offset). Both `[1, ...]` on one grid; NaN when either shows no gland.

    The centroids' offset alone misses a rotation about the gland; this is the images' own view of the
    error that `known_error_samples` calls the gland error, with the segmenters' error on top."""
    grid = Grid.of(fixed_gland)
    if not grid.matches(warped_gland):
        raise ValueError("gland_misfit: both glands must lie on one grid")
    every = (slice(None, None, 2),) * 3  # every other voxel each way: an eighth of the cost, the same fit
    points = torch.as_tensor(grid.physical_points()[every].reshape(-1, 3))
    f = torch.as_tensor(fixed_gland.array[0][every].reshape(-1), dtype=torch.float64)
    w = torch.as_tensor(warped_gland.array, dtype=torch.float64)[None]
    inside, found = f >= 0.5, torch.as_tensor(warped_gland.array[0][every].reshape(-1) >= 0.5)
    if not (inside.any() and found.any()):
        return float("nan")
    centre = points[inside].mean(0)
    angles = torch.zeros(1, 3, dtype=torch.float64, requires_grad=True)  # degrees, about the fixed gland's centre
    shift = (points[found].mean(0) - centre).clone().requires_grad_(True)

    def mapped():
        return (points - centre) @ air.rotation_matrix(angles)[0].T + centre + shift

    optimiser = torch.optim.Adam([{"params": [angles], "lr": 1.0}, {"params": [shift], "lr": 0.5}])
    for step in range(steps):
        if step == steps // 2:
            for group in optimiser.param_groups:
                group["lr"] *= 0.2
        optimiser.zero_grad()
        loss = (sample(w, grid, mapped()[None])[0, 0] - f).square().mean()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        return float((mapped() - points)[inside].square().sum(1).mean().sqrt())


def gland_agreement(glands: LoadedGlands, fixed: Volume, warped: Volume, fixed_gland: Volume | None = None) -> dict:
    """The gland found in `fixed` and in `warped` (on the fixed grid), compared on the fixed segmenter's
    frame: the distance of their centroids (mm, NaN when one image shows none), their Dice and
    `gland_misfit`. `fixed_gland`: the fixed image's `frame_probability` when already known."""
    f = glands.frame_probability(fixed, "fixed") if fixed_gland is None else fixed_gland
    w = resample(glands.frame_probability(warped, "moving"), f, mode="linear")
    fm, wm = f.array[0] >= 0.5, w.array[0] >= 0.5
    if not (fm.any() and wm.any()):
        return dict(NO_GLAND)
    points = Grid.of(f).physical_points()
    offset = np.linalg.norm(points[wm].mean(0) - points[fm].mean(0))
    return {
        "gland_offset_mm": float(offset),
        "gland_dice": float(2 * (fm & wm).sum() / (fm.sum() + wm.sum())),
        "gland_misfit_mm": gland_misfit(f, w),
    }


def _gland_check(glands: LoadedGlands, fixed: Volume, on_fixed: Volume, thresholds: dict) -> tuple[dict, str | None, bool]:
    """`gland_agreement` of the pair (`on_fixed`: the warped image on the fixed grid), the reason it gives
    (None: none) and whether that fails the pair."""
    try:
        found = gland_agreement(glands, fixed, on_fixed)
    except ValueError as error:  # e.g. a constant fixed image: no gland to look for
        return dict(NO_GLAND), f"the gland check could not run: {error}", False
    offset = found["gland_offset_mm"]
    if not np.isfinite(offset):
        return found, "no gland found in one of the images: the gland check could not run", False
    if offset > thresholds["good"]:
        return found, f"the glands found in the two images lie {offset:.1f} mm apart", offset > thresholds["failed"]
    return found, None, False


def inverse_consistency(field: Volume, inverse: Volume) -> float:
    """Mean |phi_inv(phi(x)) - x| (mm) over the fixed grid; `inverse` lies on the moving grid."""
    fg = Grid.of(field)
    pts = fg.points(torch.float64).reshape(-1, 3)
    mapped = pts + sample(field_tensor(field, torch.float64), fg, pts[None], padding="border")[0].T
    back = mapped + sample(field_tensor(inverse, torch.float64), Grid.of(inverse), mapped[None], padding="border")[0].T
    return float((back - pts).norm(dim=1).mean())


def label_overlap(fixed_labels: Volume, warped_labels: Volume) -> float:
    """Mean Dice of the labels (4D channels thresholded at 0.5, or an integer map)."""
    if fixed_labels.array.ndim == 4:
        f, w = data.binary_channels(fixed_labels).array, data.binary_channels(warped_labels).array
        values = [metrics.dice(f[c], w[c], labels=[1])[1] for c in range(f.shape[0])]
    else:
        values = list(metrics.dice(fixed_labels.array, warped_labels.array).values())
    values = [v for v in values if np.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")


def quality_report(
    fixed: Volume,
    warped: Volume,
    field: Volume | None = None,
    inverse_field: Volume | None = None,
    fixed_labels: Volume | None = None,
    warped_labels: Volume | None = None,
    model: QualityModel | str = "airnet_mrus",
) -> dict:
    """The quality report of one registered pair (see the module docstring); a flat JSON-able dict."""
    start = time.perf_counter()
    q = model if isinstance(model, QualityModel) else QualityModel(model)
    if field is not None and not Grid.of(field).matches(fixed):
        raise ValueError("the displacement field must lie on the fixed image's grid")
    on_fixed = resample(warped.with_array(warped.array.astype(np.float32)), fixed)
    report: dict = {"d_score": q.d_score(fixed, warped), "reasons": _image_checks(warped, on_fixed.array, fixed)}
    failed = bool(report["reasons"])  # the images themselves: nothing to align
    if q.glands is not None and not failed:
        found, reason, failed = _gland_check(q.glands, fixed, on_fixed, q.thresholds)
        report.update(found)
        report["reasons"] += [reason] if reason else []
    if q.calibration:
        est, low, high = estimate_tre(q.calibration, report["d_score"])
        report.update(critic_tre_estimate_mm=est)
        misfit = report.get("gland_misfit_mm", float("nan"))
        if q.gland_calibration and np.isfinite(misfit):  # the critic and the glands together
            est, low, high = gland_estimate(q.gland_calibration, est, misfit)
        report.update(tre_estimate_mm=est, tre_interval_mm=[low, high], verdict=verdict(est, q.thresholds))
    else:
        report.update(critic_tre_estimate_mm=float("nan"), tre_estimate_mm=float("nan"), tre_interval_mm=[float("nan")] * 2, verdict="check")
        report["reasons"].append("the critic's model card has no calibration: no TRE estimate")
    if field is not None:
        report.update(jacobian_stats(field))
        if report["folding_pct"] > 0:
            report["reasons"].append(f"the field folds ({report['folding_pct']:.2f}% of voxels have det J <= 0)")
        if q.adversarial is not None:
            report["plausibility"] = q.plausibility(field)
    if inverse_field is not None and field is not None:
        report["inverse_consistency_mm"] = inverse_consistency(field, inverse_field)
    if fixed_labels is not None and warped_labels is not None:
        report["dice_mean"] = label_overlap(fixed_labels, warped_labels)
    if failed:
        report["verdict"] = "failed"
    elif report["reasons"] and report["verdict"] == "good":
        report["verdict"] = "check"
    report["seconds"] = time.perf_counter() - start
    return report


# ------------------------------------------------------------------------ known-error samples
def perturbed_field(fixed: Volume, moving: Volume, reference: Volume, matrix: torch.Tensor, frame, init: str) -> Volume:
    """Field on the fixed grid of `reference o P`, with `P` a `[3, 4]` map in the model frame's coordinates."""
    fg = Grid.of(fixed)
    cf, _ = frame_centres(fg, Grid.of(moving), init)
    d = torch.as_tensor(fg.direction)
    c = torch.as_tensor(cf)
    pts = fg.points(torch.float64).reshape(-1, 3)
    m = matrix.double()
    q = ((pts - c) @ d) @ m[:, :3].T + m[:, 3]  # model coordinates, through P
    q = q @ d.T + c  # back to LPS
    u_ref = sample(field_tensor(reference, torch.float64), fg, q[None], padding="border")[0].T
    u = (q + u_ref - pts).T.reshape(1, 3, *fg.shape)
    return field_volume(u, fg)


def known_error_samples(pair: data.Pair, model: air.LoadedAirNet, per_pair: int, seed: int):
    """`per_pair` perturbations of the pair's reference alignment: (pair volumes, field, warped, TRE rms mm,
    gland error mm) each.

    The gland error is the RMS over the fixed gland of how far the perturbed alignment moves each
    point from the reference one: all that the images can show of the error. The landmark TRE adds
    where the few landmarks lie and the reference's own error at them, which no score of the images
    can see; how well the gland error itself ranks the TRE bounds what any quality score can reach.
    """
    v = pair.load()
    frame, init = model.frame, model.card["preprocessing"]["init"]
    ref = reference_field(v.fixed, v.moving, cached_reference(pair, frame, init), frame, init)
    gland = v.fixed_labels.array[0] > 0.5
    p = model.card["perturbation"]
    g = torch.Generator().manual_seed(seed)
    params = air.random_perturbations(g, per_pair, "rigid", p["rotation_deg"], p["translation_mm"])
    for matrix in air.transform_matrix(params, "rigid"):
        field = perturbed_field(v.fixed, v.moving, ref, matrix, frame, init)
        tre = metrics.landmark_tre(field, v.fixed_labels, v.moving_labels)["rms"]
        gland_error = float(np.sqrt(np.square(field.array - ref.array).sum(0)[gland].mean())) if gland.any() else float("nan")
        yield v, field, resample(v.moving, v.fixed, field, mode="linear"), tre, gland_error


def mutual_information(fixed: Volume, warped: Volume) -> float:
    """Mattes mutual information (SimpleITK, 50 bins) of two images on one grid: the classical peer of the D-score."""
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(50)
    method.SetInitialTransform(sitk.Transform(3, sitk.sitkIdentity))
    method.SetInterpolator(sitk.sitkLinear)
    f = sitk.Cast(fixed.to_sitk(), sitk.sitkFloat32)
    w = sitk.Cast(warped.with_array(warped.array.astype(np.float32)).to_sitk(), sitk.sitkFloat32)
    return -method.MetricEvaluate(f, w)  # SimpleITK minimises minus MI


def _score_pairs(pairs, q: QualityModel, per_pair: int, seed: int, on_pair=None) -> list[dict]:
    """Each known-error sample's TRE and scores: the D-score, mutual information and, with `q.glands`,
    `gland_agreement` (the fixed gland segmented once per pair)."""
    rows = []
    for index, pair in enumerate(pairs):
        fixed_gland = None
        for k, (v, _, warped, tre, gland_error) in enumerate(known_error_samples(pair, q.airnet, per_pair, seed + index)):
            row = {
                "id": pair.id, "sample": k, "tre_mm": tre, "gland_error_mm": gland_error,
                "d_score": q.d_score(v.fixed, warped), "mutual_information": mutual_information(v.fixed, warped),
            }  # fmt: skip
            if q.glands is not None:
                if fixed_gland is None:
                    fixed_gland = q.glands.frame_probability(v.fixed, "fixed")
                row.update(gland_agreement(q.glands, v.fixed, warped, fixed_gland))
            rows.append(row)
        if on_pair is not None:
            on_pair(index, len(pairs), rows[-1])
    return rows


def calibrate(model_path, pairs, per_pair: int = 40, seed: int = 1, glands=None) -> dict:
    """Fit the D-score calibration on `pairs` (validation patients) and write it into the model's card; with
    `glands` (segmenters, e.g. "glands_mrus"), also the calibration of the critic's estimate blended with
    the gland misfit (`gland_calibration`), which the report then uses."""
    q = QualityModel(model_path, plausibility=None, glands=glands)
    rows = _score_pairs(pairs, q, per_pair, seed)
    scores, tre = [r["d_score"] for r in rows], [r["tre_mm"] for r in rows]
    calibration = {**fit_calibration(scores, tre), "pairs": [p.id for p in pairs], "per_pair": per_pair, "seed": seed}
    card_path = Path(model_path).with_suffix(".json")
    card = json.loads(card_path.read_text())
    card.update(calibration=calibration, thresholds_mm=THRESHOLDS_MM, validation=agreement(scores, tre))
    card.pop("gland_calibration", None)
    if glands:
        critic, misfit = [estimate_tre(calibration, s)[0] for s in scores], [r["gland_misfit_mm"] for r in rows]
        fit = fit_gland_calibration(critic, misfit, tre)
        card["gland_calibration"] = {**fit, "glands": str(glands), "pairs": calibration["pairs"], "per_pair": per_pair, "seed": seed}
        evidence = gland_evidence(critic, misfit, fit["weight"])
        card["validation"].update({f"with_glands_{k}": v for k, v in agreement(-evidence, tre).items()})
    atomic_write(card_path, lambda tmp: Path(tmp).write_text(json.dumps(card, indent=2) + "\n"))
    return calibration


def evaluate_quality(
    root=None, split: str = "test", per_pair: int = 20, seed: int = 100, model="airnet_mrus", on_pair=None, n_pairs: int | None = None
) -> dict:
    """Score known-error alignments of every MR-US pair of `split` (or its first `n_pairs`): agreement and calibration."""
    if (n_pairs is not None and n_pairs < 1) or per_pair < 1:
        raise ValueError(f"n_pairs and per_pair: 1 or more, got {n_pairs} and {per_pair}")
    q = QualityModel(model, plausibility=None)
    pairs = data.mrus_pairs(root)
    if split != "all":
        pairs = data.split_by_patient(pairs)[split]
    pairs = pairs[:n_pairs]
    rows = _score_pairs(pairs, q, per_pair, seed, on_pair)
    tre = np.array([r["tre_mm"] for r in rows])
    scores = np.array([r["d_score"] for r in rows])
    summary = {"n_pairs": len(pairs), "n_samples": len(rows), **agreement(scores, tre)}
    peer = agreement([r["mutual_information"] for r in rows], tre)
    summary.update(mi_spearman=peer["spearman"], mi_auroc=peer["auroc"])
    # A judge that knew each alignment's gland error exactly (minus it, as a score): the bound on the ranking
    # and, with a calibration fitted on these same samples (optimistic), on the mm estimate.
    judge = np.array([-r["gland_error_mm"] for r in rows])
    ok = np.isfinite(judge) & np.isfinite(tre)
    oracle = agreement(judge, tre)
    fit = fit_calibration(judge[ok], tre[ok])
    oracle_err = np.abs(np.array([estimate_tre(fit, s)[0] for s in judge[ok]]) - tre[ok])
    summary.update(
        gland_error_spearman=oracle["spearman"],
        gland_error_auroc=oracle["auroc"],
        gland_error_within_1_5mm=float(np.mean(oracle_err <= 1.5)),
    )
    if q.calibration:
        est = np.array([estimate_tre(q.calibration, s)[0] for s in scores])
        for r, e in zip(rows, est):
            r["tre_estimate_mm"] = float(e)
        err = np.abs(est - tre)
        summary.update(
            calibration_mae_mm=float(np.mean(err)),
            within_1_5mm=float(np.mean(err <= 1.5)),
            verdict_good_tre_max_mm=float(tre[est <= q.thresholds["good"]].max()) if (est <= q.thresholds["good"]).any() else float("nan"),
        )
        summary.update(_with_glands(rows, est, tre, q))
    gross = gross_misalignments(pairs, q)
    for alignment in ("reference", "centres", "identity"):
        chosen = [r for r in gross if r["alignment"] == alignment]
        summary[f"{alignment}_tre_median_mm"] = float(np.median([r["tre_mm"] for r in chosen]))
        for key in ("verdict", "critic_verdict"):
            summary[f"{alignment}_{key}s"] = {v: sum(r[key] == v for r in chosen) for v in ("good", "check", "failed")}
    return {
        "task": "quality",
        "method": "airnet critic",
        "model": str(q.airnet.path),
        "data_root": str(data.data_root(root)),
        "device": "cpu",
        "versions": versions(),
        "split": split,
        "options": {"per_pair": per_pair, "seed": seed, "n_pairs": n_pairs, "perturbation": q.airnet.card["perturbation"]},
        "pairs": rows,
        "gross": gross,
        "summary": summary,
    }


def _with_glands(rows: list[dict], critic_estimate: np.ndarray, tre: np.ndarray, q: QualityModel) -> dict:
    """The gland misfit's own agreement with TRE; with a `gland_calibration`, the report's estimate on the
    known-error samples (the critic's blended with the misfit): its agreement with TRE and its error."""
    if q.glands is None:
        return {}
    misfit = np.array([r.get("gland_misfit_mm", np.nan) for r in rows])
    found = np.isfinite(misfit)
    alone = agreement(-misfit[found], tre[found])
    summary = {"gland_misfit_spearman": alone["spearman"], "gland_misfit_auroc": alone["auroc"], "gland_found_fraction": float(found.mean())}
    cal = q.gland_calibration
    if cal is None:
        return summary
    est = critic_estimate.copy()  # where no gland is found, the report falls back to the critic's estimate
    est[found] = [gland_estimate(cal, c, m)[0] for c, m in zip(critic_estimate[found], misfit[found])]
    for r, e in zip(rows, est):
        r["report_tre_estimate_mm"] = float(e)
    err = np.abs(est - tre)
    return {
        **summary,
        **{f"report_{k}": v for k, v in agreement(-est, tre).items()},
        "report_calibration_mae_mm": float(np.mean(err)),
        "report_within_1_5mm": float(np.mean(err <= 1.5)),
        "gland_weight": cal["weight"],
    }


def gross_misalignments(pairs, q: QualityModel) -> list[dict]:
    """The full report's verdict, and the critic's alone, on each pair's reference alignment and on two
    gross misalignments users meet: the centred fields of view (`centres`) and the headers as they are
    (`identity`), far outside the +-25 degrees and +-5 mm the critic learned from."""
    frame, init = q.airnet.frame, q.airnet.card["preprocessing"]["init"]
    rows = []
    for pair in pairs:
        v = pair.load()
        fields = {"reference": reference_field(v.fixed, v.moving, cached_reference(pair, frame, init), frame, init)}
        fields.update((m, register(v.fixed, v.moving, method=m).field) for m in ("centres", "identity"))
        for alignment, field in fields.items():
            report = quality_report(v.fixed, resample(v.moving, v.fixed, field), model=q)
            rows.append({
                "id": pair.id, "alignment": alignment,
                "tre_mm": pair_metrics(field, v.fixed, v.moving, v.fixed_labels, v.moving_labels)["tre_rms_mm"],
                "verdict": report["verdict"], "critic_verdict": verdict(report["critic_tre_estimate_mm"], q.thresholds),
                "gland_offset_mm": report.get("gland_offset_mm", float("nan")),
                "gland_misfit_mm": report.get("gland_misfit_mm", float("nan")), "tre_estimate_mm": report["tre_estimate_mm"],
            })  # fmt: skip
    return rows
