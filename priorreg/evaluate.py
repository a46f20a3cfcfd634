"""Metrics of a registration on a pair, and whole-task evaluations, in ARCHITECTURE.md's JSON format.

Labels are never given to the method here: the method sees images only (unless
a caller says otherwise), and this module warps the moving labels through the
returned field to score it. MR-US labels are 4D (channel 0 gland, 1.. landmarks:
gland Dice/HD95 and landmark TRE); other data sets have integer label maps
(Dice per structure, HD95). `brain_t1t2` pairs come with their true field
(`known_deformations`): end-point error and RMSE against the truly warped moving image.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Sequence

import numpy as np
import SimpleITK as sitk
import torch

from . import __version__, data, known_deformations, metrics
from .jacobian import jacobian_stats
from .methods.common import normalise_intensity
from .registration import register
from .spatial import Grid, resample
from .volume import Volume

# task -> (pairs loader, compare intensities: only for same-modality pairs)
TASKS: dict[str, tuple[Callable, bool]] = {
    "mrus_prostate": (lambda root, n, seed: data.mrus_pairs(root), False),
    "hippocampus": (lambda root, n, seed: data.hippocampus_pairs(root, n=n, seed=seed), True),
    "oasis": (lambda root, n, seed: data.oasis_pairs(root), True),
    # Multimodal (T1 -> T2, FLAIR): no intensity comparison with the fixed image, but with the
    # moving image warped by the known field. `n` deformations per set is always enough for the
    # first `n` pairs; on seed 002's grid size at most (`EVAL_MAX_VOXELS`).
    "brain_t1t2": (
        lambda root, n, seed: known_deformations.known_deformation_pairs(
            root, n=2 if n is None else max(n, 1), seed=seed, max_voxels=known_deformations.EVAL_MAX_VOXELS
        ),
        False,
    ),
    # The same pairs with no deformation at all (the true field is zero): what a method moves
    # here is false motion, the floor of its end-point error on `brain_t1t2`.
    "brain_t1t2_undeformed": (
        lambda root, n, seed: known_deformations.known_deformation_pairs(
            root, n=1, seed=seed, max_voxels=known_deformations.EVAL_MAX_VOXELS, magnitudes=known_deformations.UNDEFORMED
        ),
        False,
    ),
}
KNOWN_FIELD_TASKS = ("brain_t1t2", "brain_t1t2_undeformed")  # pairs whose true field is known: split by set


def pair_metrics(
    field: Volume,
    fixed: Volume,
    moving: Volume,
    fixed_labels: Volume | None = None,
    moving_labels: Volume | None = None,
    intensity: bool = False,
) -> dict:
    """Every metric that applies to this pair, as a flat dict of numbers (and lists per landmark)."""
    grid = Grid.of(fixed)
    out = {k: float(v) for k, v in jacobian_stats(field).items()}
    if intensity:
        # Subjects come with unrelated raw scales (hippocampus crops span 1e2 to 1e5): compare
        # intensities after the methods' robust [0, 1] scaling, so SSIM and RMSE mean the same everywhere.
        scaled = moving.with_array(normalise_intensity(moving.array))
        warped = resample(scaled, grid, field, mode="linear").array.astype(np.float64)
        reference = normalise_intensity(fixed.array).astype(np.float64)
        out["ssim"] = metrics.ssim(reference, warped, data_range=1.0)
        out["rmse"] = metrics.rmse(reference, warped)
    if fixed_labels is None or moving_labels is None:
        return out
    if fixed_labels.array.ndim == 4:  # MR-US: gland + landmarks
        fixed_gland = data.binary_channels(fixed_labels).channel(0)
        warped_gland = resample(data.binary_channels(moving_labels).channel(0), grid, field)
        out["dice_mean"] = metrics.dice(fixed_gland, warped_gland, labels=[1])[1]
        out["hd95_mm"] = metrics.hd95(fixed_gland, warped_gland)
        tre = metrics.landmark_tre(field, fixed_labels, moving_labels)
        out["tre_mm"] = [float(x) for x in tre["per_landmark"]]
        out["tre_rms_mm"] = tre["rms"]
    else:
        warped_labels = resample(moving_labels, grid, field, mode="nearest")
        per_label = metrics.dice(fixed_labels, warped_labels)
        labels = [k for k, v in per_label.items() if np.isfinite(v)]
        out["dice_mean"] = float(np.mean([per_label[k] for k in labels]))
        out["hd95_mm"] = float(np.nanmean([metrics.hd95(fixed_labels, warped_labels, label=k) for k in labels]))
    return out


def known_field_metrics(field: Volume, true_field: Volume, moving: Volume, mask: Volume) -> dict:
    """`epe_mm`, `epe_median_mm` over `mask`, and `rmse` of the warped moving image against the truth.

    The truth is the moving image warped by `true_field`, through the same robust [0, 1] scaling
    and the same linear resampling as the estimate (so the true field scores exactly 0), over
    the whole fixed grid as for the other tasks' RMSE.
    """
    grid = Grid.of(true_field)
    out = known_deformations.end_point_error(field, true_field, mask)
    scaled = moving.with_array(normalise_intensity(moving.array))
    warped = resample(scaled, grid, field, mode="linear").array.astype(np.float64)
    truth = resample(scaled, grid, true_field, mode="linear").array.astype(np.float64)
    out["rmse"] = metrics.rmse(truth, warped)
    return out


def summarise(pairs: list[dict]) -> dict:
    """ARCHITECTURE.md's summary names, over all pairs (TRE pooled over every landmark)."""
    s: dict[str, float] = {"n_pairs": len(pairs)}
    tre = np.array([t for p in pairs for t in p.get("tre_mm", []) if np.isfinite(t)])
    if tre.size:
        s["tre_median_mm"] = float(np.median(tre))
        s["tre_iqr_low_mm"], s["tre_iqr_high_mm"] = (float(x) for x in np.percentile(tre, [25, 75]))
        s["tre_rms_mm"] = float(np.sqrt(np.mean(tre**2)))
    dice = np.array([p["dice_mean"] for p in pairs if "dice_mean" in p])
    if dice.size:
        s["dice_mean"] = float(dice.mean())
        s["dice30"] = float(np.sort(dice)[: max(1, int(np.ceil(0.3 * dice.size)))].mean())
    for key in ("hd95_mm", "sdlogj", "folding_pct", "detj_mean", "detj_std", "ssim", "rmse", "epe_mm", "epe_median_mm", "seconds"):
        values = [p[key] for p in pairs if key in p and np.isfinite(p[key])]
        if values:
            s["seconds_per_pair" if key == "seconds" else key] = float(np.mean(values))
    return s


def versions() -> dict:
    return {
        "priorreg": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "SimpleITK": sitk.Version_VersionString(),
    }


def evaluate_task(
    task: str,
    method: str,
    root=None,
    n_pairs: int | None = None,
    split: str = "all",
    seed: int = 0,
    options: dict | None = None,
    on_pair: Callable[[int, int, dict], None] | None = None,
    registrar: Callable[..., Volume] | None = None,
    label_channels: list[int] | None = None,
    label_roles: Sequence[str] = ("fixed", "moving"),
) -> dict:
    """Register every pair of `task` (or a seeded sample of `n_pairs`) and score it.

    `registrar(fixed, moving) -> field` replaces PriorReg's own `method` (the
    benchmarks pass peers such as ANTs or elastix through here, so every tool
    is scored by the same code on the same pairs). `label_channels`: the method is
    also given those channels of each pair's expert labels to align (e.g. the MR-US
    gland, 0): a label-driven reference to compare methods with, recorded in the report.
    `label_roles` limits that to one image's labels (`("moving",)`: the MR planning contour
    of a fusion biopsy, the ultrasound gland left to the method; only `glands` takes one).
    """
    if not label_roles or set(label_roles) - {"fixed", "moving"}:
        raise ValueError(f"label_roles: 'fixed' and/or 'moving', got {list(label_roles)}")
    if registrar is None:

        def registrar(fixed, moving, **labels):
            return register(fixed, moving, method=method, **(options or {}), **labels).field

    if n_pairs is not None and n_pairs < 1:
        raise ValueError(f"n_pairs: 1 or more, got {n_pairs}")
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; available: {', '.join(sorted(TASKS))}")
    loader, intensity = TASKS[task]
    if task in KNOWN_FIELD_TASKS and split not in ("all", *known_deformations.SPLIT):
        raise ValueError(
            f"split {split!r}: task {task} splits its three sets into {known_deformations.SPLIT} "
            "(no validation set); use 'all', 'train' or 'test'"
        )
    if task == "hippocampus" and split != "all":
        # Split the subjects first and pair within the split (the trainer's cut, `split_groups`),
        # rather than dropping the sampled pairs that straddle two splits.
        subjects = data.split_groups(data.hippocampus_subjects(root), seed=seed)[split]
        pairs = data.hippocampus_pairs(root, n=n_pairs, seed=seed, subjects=subjects)
    elif task in KNOWN_FIELD_TASKS:
        pairs = [p for p in loader(root, n_pairs, seed) if split == "all" or p.group in known_deformations.SPLIT[split]]
    else:
        pairs = loader(root, n_pairs, seed)
        if split != "all":
            pairs = data.split_by_patient(pairs, seed=seed)[split]
    if n_pairs is not None and task != "hippocampus":
        pairs = pairs[:n_pairs]
    if not pairs:
        raise ValueError(f"task {task}, split {split}: no pairs to evaluate under {root}")
    results = []
    for index, pair in enumerate(pairs):
        v = pair.load()
        driving = {}
        if label_channels is not None:
            driving = {f"{r}_labels": data.select_channels(getattr(v, f"{r}_labels"), label_channels) for r in label_roles}
            if any(labels is None for labels in driving.values()):
                raise ValueError(f"label_channels: pair {pair.id} of task {task} has no labels to drive the registration")
        start = time.perf_counter()
        field = registrar(v.fixed, v.moving, **driving)
        seconds = time.perf_counter() - start
        row = {"id": pair.id, "fixed": pair.fixed.name, "moving": pair.moving.name, "seconds": seconds}
        row.update(pair_metrics(field, v.fixed, v.moving, v.fixed_labels, v.moving_labels, intensity))
        if isinstance(v, known_deformations.KnownPairVolumes):
            row.update(known_field_metrics(field, v.true_field, v.moving, v.mask))
        results.append(row)
        if on_pair is not None:
            on_pair(index, len(pairs), row)
    return {
        "task": task,
        "method": method,
        "model": None,
        "data_root": str(data.data_root(root)),
        "device": "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name(),
        "versions": versions(),
        "options": options or {},
        "label_channels": label_channels,  # expert labels the method was given (None: images only)
        "label_roles": list(label_roles) if label_channels is not None else None,  # whose expert labels
        "split": split,
        "pairs": results,
        "summary": summarise(results),
    }
