"""Scoring a registration in an MRML scene: the function RegQualityScore's Logic delegates to.

Any registration can be scored, whichever tool made it, given in one of two ways:
(a) the fixed volume and a warped volume (the moving image already resampled, on any grid),
    with the transform node when there is one, for the statistics of its displacement field;
(b) the fixed volume, the moving volume and the transform node that aligns them (grid,
    linear, B-spline or composite, from PriorReg, Elastix, ANTs or by hand); the warped image
    is then made here by resampling the moving volume through the transform on the fixed grid.
The field is the transform exported on the fixed grid (`field_from_transform_node`: "from
parent", the resampling direction, with the LPS <-> RAS conversion), so its Jacobian and
plausibility are those of what the user's tool did. The backend's `priorreg.quality.quality_report`
scores the Volumes; the report becomes a table node (one row per metric) and, with a
transform, a Jacobian determinant map shown like the registration modules' maps.

As in logic.py: no Qt, `slicer` and torch imported inside functions, inputs checked before
anything is created and never modified, and on an error or cancel the scene's node list is
as it was.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..volume import Volume
from .logic import (
    JACOBIAN_LEVEL,
    JACOBIAN_WINDOW,
    _input_volume,
    _labels,
    _segment_pairs,
    check_inputs,
    jacobian_color_node,
    model_card,
    model_summary,
)
from .scene import resolve_scene, temporary_nodes
from .transforms import FIXED_VOLUME_ROLE, MOVING_VOLUME_ROLE, field_from_transform_node
from .volumes import node_from_volume

DEFAULT_MODEL = "airnet_mrus"  # AIR-net's critic (seed 001) with its calibration
PLAUSIBILITY_MODEL = "adversarial_mrus"  # seed 000's discriminator: is the field's local part plausible?
WARPED_VOLUME_ROLE = "warpedVolume"
TRANSFORM_ROLE = "transform"
VERDICT_COLORS = {"good": "#2e7d32", "check": "#e69500", "failed": "#c62828"}  # green, amber, red
TABLE_COLUMNS = {
    "metric": "name of the quality measure (as in priorreg score's JSON)",
    "value": "its value",
    "unit": "its unit",
    "meaning": "what it measures",
}

# Unit and meaning of each report entry, in table order; an entry the backend adds later comes last, bare.
METRICS = {
    "verdict": ("", "good, check or failed: from the TRE estimate and its thresholds, and the reasons below"),
    "tre_estimate_mm": ("mm", "target registration error estimated from the D-score (and the gland misfit, where the card says so; calibrated on validation patients)"),
    "tre_interval_low_mm": ("mm", "low end of the TRE estimate's interval (calibration residual percentiles)"),
    "tre_interval_high_mm": ("mm", "high end of the TRE estimate's interval"),
    "d_score": ("", "AIR-net critic's score of the pair (higher: better aligned)"),
    "critic_tre_estimate_mm": ("mm", "target registration error estimated from the D-score alone"),
    "reasons": ("", "checks outside the critic that decided the verdict ('; '-separated; empty: none)"),
    "gland_offset_mm": ("mm", "distance between the glands found in the fixed and warped images (gross misalignment)"),
    "gland_dice": ("", "Dice of the glands found in the fixed and warped images"),
    "gland_misfit_mm": ("mm", "RMS motion over the fixed gland of the rigid map that lays the warped gland onto it"),
    "folding_pct": ("%", "voxels where det J <= 0 (folding)"),
    "sdlogj": ("", "standard deviation of log det J"),
    "detj_mean": ("", "mean det J"),
    "detj_std": ("", "standard deviation of det J"),
    "plausibility": ("", "probability that the field's non-affine part looks like a simulated, biomechanically plausible one"),
    "inverse_consistency_mm": ("mm", "mean distance of a point from itself through the field and its inverse"),
    "dice_mean": ("", "mean Dice of the fixed and warped segments (paired by name)"),
    "seconds": ("s", "time the scoring took"),
}


@dataclass
class QualityOutputs:
    """The nodes one scoring added to the scene, and the report they show."""

    table: object  # vtkMRMLTableNode: one row per metric (metric, value, unit, meaning)
    jacobian: object | None  # vtkMRMLScalarVolumeNode: det J of the transform on the fixed grid, when one was given
    warped_volume: object | None  # way (b): the moving volume resampled through the transform, on the fixed grid
    report: dict  # priorreg.quality.quality_report's

    def nodes(self) -> list:
        """The created nodes (the shared Jacobian colour table is not one of them)."""
        return [node for node in (self.table, self.jacobian, self.warped_volume) if node is not None]


@dataclass
class _Inputs:
    fixed: Volume
    warped: Volume | None  # way (a)
    moving: Volume | None  # way (b)
    fixed_labels: Volume | None  # on the fixed grid
    other_labels: Volume | None  # (a): the warped segmentation on the fixed grid; (b): the moving one on the moving grid


# ------------------------------------------------------------------------------------- checks
def _check_transform(node, scene) -> None:
    if node is None:
        return
    if not node.IsA("vtkMRMLTransformNode"):
        raise ValueError(f"'{node.GetName()}' is a {node.GetClassName()}, not a transform node: select a transform")
    if node.GetScene() is not scene:
        raise ValueError(f"the transform '{node.GetName()}' is not in the scene")


def _one_sided(fixed_segmentation, other_segmentation, other: str) -> None:
    if (fixed_segmentation is None) != (other_segmentation is None):
        given = "fixed" if fixed_segmentation is not None else other
        raise ValueError(f"only the {given} segmentation was given: select segmentations for both the fixed and the {other} volume, or for neither")


def _check(scene, fixed_node, warped_node, moving_node, transform_node, fixed_segmentation, warped_segmentation, moving_segmentation) -> _Inputs:
    """The inputs as Volumes, or a `ValueError` a user can act on; nothing is created."""
    fixed = _input_volume(fixed_node, "fixed", scene)
    _check_transform(transform_node, scene)
    if warped_node is not None:
        if moving_node is not None:
            raise ValueError("both a warped and a moving volume were given: score a warped volume, or a moving volume with its transform")
        if moving_segmentation is not None:
            raise ValueError("a moving segmentation goes with a moving volume and its transform: with a warped volume, give the warped segmentation")
        warped = _input_volume(warped_node, "warped", scene)
        if warped_node is fixed_node:
            raise ValueError(f"'{fixed_node.GetName()}' is selected as both fixed and warped volume: select two volumes")
        _one_sided(fixed_segmentation, warped_segmentation, "warped")
        pairs = _segment_pairs(fixed_segmentation, warped_segmentation, None)
        if not pairs:
            return _Inputs(fixed, warped, None, None, None)
        fixed_labels = _labels(fixed_segmentation, [f for f, _ in pairs], fixed_node)
        return _Inputs(fixed, warped, None, fixed_labels, _labels(warped_segmentation, [w for _, w in pairs], fixed_node))

    if moving_node is None or transform_node is None:
        raise ValueError("nothing to score: select a warped volume, or a moving volume and the transform that aligns it to the fixed one")
    if warped_segmentation is not None:
        raise ValueError("a warped segmentation goes with a warped volume: with a moving volume and its transform, give the moving segmentation")
    if moving_node.GetParentTransformNode() is transform_node:
        raise ValueError(
            f"the moving volume '{moving_node.GetName()}' is under the transform '{transform_node.GetName()}' already: take it out "
            "from under the transform (the score applies it), or harden the transform and score it as the warped volume"
        )
    _one_sided(fixed_segmentation, moving_segmentation, "moving")
    inputs = check_inputs(fixed_node, moving_node, scene, fixed_segmentation, moving_segmentation)
    return _Inputs(inputs.fixed, None, inputs.moving, inputs.fixed_labels, inputs.moving_labels)


def _check_model(model, method: str, role: str) -> None:
    card = model_card(model)
    if card.get("method") != method:
        raise ValueError(f"model '{model}' is a {card.get('method')!r} model, not {role}")


def critic_summary(card: dict) -> str:
    """One line on a quality model for the module panel: its training, calibration and agreement with TRE."""
    parts = [model_summary(card)]
    calibration, validation = card.get("calibration"), card.get("validation") or {}
    parts.append(f"calibrated on {calibration.get('n', '?')} alignments of {calibration.get('fitted_on', '?')}" if calibration else "not calibrated: no TRE estimate")
    labels = (("spearman", "Spearman with TRE"), ("auroc", "AUROC for TRE > 5 mm"))
    labels += (("with_glands_spearman", "with the glands' misfit: Spearman"), ("with_glands_auroc", "AUROC"))
    parts += [f"{label} {validation[key]:.2f}" for key, label in labels if isinstance(validation.get(key), (int, float))]
    return "; ".join(parts)


# -------------------------------------------------------------------------------------- outputs
def _rows(report: dict) -> list[tuple[str, str, str, str]]:
    """(metric, value, unit, meaning) per report entry; numbers to 6 significant digits."""
    flat = {key: value for key, value in report.items() if key != "tre_interval_mm"}
    flat["tre_interval_low_mm"], flat["tre_interval_high_mm"] = report["tre_interval_mm"]
    flat["reasons"] = "; ".join(report["reasons"])
    order = [key for key in METRICS if key in flat] + [key for key in flat if key not in METRICS]
    rows = []
    for key in order:
        value = flat[key]
        unit, meaning = METRICS.get(key, ("", ""))
        rows.append((key, value if isinstance(value, str) else f"{value:.6g}", unit, meaning))
    return rows


def _report_table(scene, name: str, report: dict, references: dict):
    """A table node with one row per metric, all columns text; `references`: role -> node."""
    import vtk

    table = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    columns = {column: vtk.vtkStringArray() for column in TABLE_COLUMNS}
    for column, array in columns.items():
        array.SetName(column)
    for row in _rows(report):
        for array, text in zip(columns.values(), row):
            array.InsertNextValue(text.replace("\t", " "))  # Slicer's .tsv splits cells at tabs
    for column, array in columns.items():
        table.AddColumn(array)
        table.SetColumnDescription(column, TABLE_COLUMNS[column])
    for role, node in references.items():
        if node is not None:
            table.SetNodeReferenceID(role, node.GetID())
    return table


def verdict_text(report: dict) -> str:
    """What the panel's indicator says: the verdict, the TRE estimate with its interval, the reasons."""
    from ..quality import INTERVAL

    estimate, (low, high) = report["tre_estimate_mm"], report["tre_interval_mm"]
    if math.isfinite(estimate):
        line = f"{report['verdict']}: estimated TRE {estimate:.1f} mm ({INTERVAL[1] - INTERVAL[0]}%: {low:.1f} to {high:.1f})"
    else:
        line = f"{report['verdict']}: no TRE estimate"
    return "\n".join([line, *report["reasons"]])


def score_nodes(
    fixed_node,
    warped_node=None,
    moving_node=None,
    transform_node=None,
    fixed_segmentation=None,
    warped_segmentation=None,
    moving_segmentation=None,
    model=DEFAULT_MODEL,
    plausibility: str | None = PLAUSIBILITY_MODEL,
    device: str = "cpu",
    scene=None,
    progress=None,
    cancel=None,
    output_prefix: str | None = None,
) -> QualityOutputs:
    """Score the registration of a moving image onto `fixed_node` and add the report to the scene.

    Way (a): `warped_node` (any grid), and optionally `transform_node` for the field's
    statistics. Way (b): `moving_node` and `transform_node` (any transform node); the warped
    image is the moving one resampled through the transform on the fixed grid, added as a node.
    Segmentations (both or neither; segments paired by name) add the Dice overlap: the warped
    segmentation with (a), the moving one with (b), warped through the transform like the image.
    `model`: an AIR-net model name, `.safetensors` path or a loaded `priorreg.quality.QualityModel`;
    `plausibility`: the adversarial model whose discriminator judges the field, or None.
    `progress(Progress)` is called at each step, `cancel()` before each (True raises `Cancelled`).

    Raises `ValueError` for unusable inputs before anything is created; inputs are never
    modified; on any error or cancel every node this call added is removed.
    """
    from ..jacobian import jacobian_volume
    from ..quality import QualityModel, quality_report
    from ..registration import Monitor
    from ..spatial import resample

    if scene is None and fixed_node is not None:
        scene = fixed_node.GetScene()
    scene = resolve_scene(scene)
    inputs = _check(scene, fixed_node, warped_node, moving_node, transform_node, fixed_segmentation, warped_segmentation, moving_segmentation)
    if not isinstance(model, QualityModel):
        _check_model(model, "airnet", "an AIR-net critic (the quality score's model)")
        if plausibility:
            _check_model(plausibility, "adversarial", "an adversarial-registration model (its discriminator judges plausibility)")

    steps = Monitor(3 + (transform_node is not None) + (inputs.moving is not None), progress, cancel)
    steps.tick("loading the model", float("nan"))
    quality = model if isinstance(model, QualityModel) else QualityModel(model, plausibility, device)
    field = None
    if transform_node is not None:
        steps.tick("exporting the transform", float("nan"))
        field = field_from_transform_node(transform_node, fixed_node)
    warped, warped_labels = inputs.warped, inputs.other_labels
    if inputs.moving is not None:
        steps.tick("warping the moving volume", float("nan"))
        warped = resample(inputs.moving, field, field, mode="linear")  # as RegistrationResult.from_field
        warped_labels = resample(inputs.other_labels, field, field) if inputs.other_labels is not None else None
    steps.tick("scoring", float("nan"))
    report = quality_report(inputs.fixed, warped, field, fixed_labels=inputs.fixed_labels, warped_labels=warped_labels, model=quality)

    subject = warped_node.GetName() if warped_node is not None else f"{moving_node.GetName()} through {transform_node.GetName()}"
    prefix = output_prefix or subject
    steps.tick("outputs", float("nan"))
    with temporary_nodes(scene) as keep:
        warped_output = keep(node_from_volume(warped, f"{prefix} warped", scene)) if inputs.moving is not None else None
        jacobian = None
        if field is not None:
            colours = keep(jacobian_color_node(scene))
            jacobian = keep(
                node_from_volume(
                    jacobian_volume(field), f"{prefix} Jacobian", scene, color_node_id=colours.GetID(),
                    window=JACOBIAN_WINDOW, level=JACOBIAN_LEVEL,
                )
            )
        references = {
            FIXED_VOLUME_ROLE: fixed_node, WARPED_VOLUME_ROLE: warped_node or warped_output,
            MOVING_VOLUME_ROLE: moving_node, TRANSFORM_ROLE: transform_node,
        }
        table = keep(_report_table(scene, f"{prefix} quality", report, references))
    return QualityOutputs(table, jacobian, warped_output, report)
