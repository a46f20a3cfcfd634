"""One registration in an MRML scene: the function every PriorReg module's Logic delegates to.

The modules (AdversarialRegistration, DeepImagePriorReg) differ only in the method and its
options; what surrounds the method is here, once: checking the inputs before anything is
created, turning the backend's `RegistrationResult` into nodes (warped volume on the fixed
grid, grid transform, Jacobian determinant map, warped segmentation, metrics table), leaving
the scene as it was on cancel or error, and showing the result in the slice views.

No Qt, and `slicer` is imported inside functions, as in the rest of the bridge: this runs in
Slicer's GUI, in `Slicer --no-main-window` scripts and on the slicer-core wheel alike. torch
is imported only when a registration runs, so a module panel loads in a Slicer where torch is
not installed yet.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass

import numpy as np

from ..volume import Volume
from .scene import resolve_scene, temporary_nodes
from .segmentations import labels_from_segmentation, segmentation_from_labels
from .transforms import transform_node_from_field
from .volumes import node_from_volume, volume_from_node

# DICOM modality codes of (fixed, moving) images in each training data set a model card can name.
TASK_MODALITIES = {"mrus_prostate": ("US", "MR"), "hippocampus": ("MR", "MR"), "oasis": ("MR", "MR"), "brain_t1t2": ("MR", "MR")}

# The Jacobian map's display: det J from 0 to 2 spans the colour table, so 1 (volume kept) is its centre
# and the first entry (det J <= 0, folding) gets a colour of its own.
JACOBIAN_COLOR_NAME = "PriorReg Jacobian determinant"
JACOBIAN_WINDOW, JACOBIAN_LEVEL = 2.0, 1.0
JACOBIAN_COLORS = 256
FOLDING_RGB = (1.0, 0.9, 0.0)  # yellow: apart from both ends of the blue-white-red scale
_SHRINK_RGB, _KEEP_RGB, _GROW_RGB = np.array([0.23, 0.30, 0.75]), np.array([0.97, 0.97, 0.97]), np.array([0.71, 0.02, 0.15])

# Model-card methods of the trained networks the registration panel offers (the card says which to run;
# `models.FINETUNED` says which of them can be fine-tuned on the pair at hand).
REGISTRATION_NETWORKS = ("adversarial", "symmetric", "glands", "segreg", "deformgan")

# Passed by register_nodes itself, never through `options`.
_RESERVED_OPTIONS = ("fixed_labels", "moving_labels", "progress", "cancel")


@dataclass
class RegistrationOutputs:
    """The nodes one registration added to the scene, and the backend result they were made from."""

    warped_volume: object  # vtkMRMLScalarVolumeNode: the moving volume resampled on the fixed grid
    transform: object  # vtkMRMLGridTransformNode: fixed -> moving ("from parent"), usable on any node
    jacobian: object  # vtkMRMLScalarVolumeNode: det J of the transform on the fixed grid
    metrics: object  # vtkMRMLTableNode: one row (method, seconds, Jacobian statistics, Dice per segment)
    warped_segmentation: object | None  # vtkMRMLSegmentationNode on the fixed grid, when segmentations were given
    result: object  # priorreg.registration.RegistrationResult
    quality: dict | None = None  # priorreg.quality.quality_report of the result, when a quality model was given

    def nodes(self) -> list:
        """The created nodes (the shared Jacobian colour table is not one of them)."""
        created = (self.warped_volume, self.transform, self.jacobian, self.metrics, self.warped_segmentation)
        return [node for node in created if node is not None]


@dataclass
class _Inputs:
    fixed: Volume
    moving: Volume
    fixed_labels: Volume | None
    moving_labels: Volume | None
    segment_pairs: list  # [(fixed segment ID, moving segment ID)]; label value n + 1 is pair n


# ------------------------------------------------------------------------------------- checks
def _input_volume(node, role: str, scene) -> Volume:
    if node is None:
        raise ValueError(f"no {role} volume: select one")
    name = node.GetName()
    if not node.IsA("vtkMRMLScalarVolumeNode") or node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise ValueError(f"the {role} volume must be a scalar volume; '{name}' is a {node.GetClassName()}")
    if node.GetScene() is not scene:
        raise ValueError(f"the {role} volume '{name}' is not in the scene")
    volume = volume_from_node(node)
    if 1 in volume.shape:
        size = " x ".join(str(n) for n in volume.shape[::-1])
        raise ValueError(f"the {role} volume '{name}' is 2D ({size} voxels): PriorReg registers 3D volumes")
    return volume


def _segment_names(segmentation_node) -> dict[str, str]:
    segmentation = segmentation_node.GetSegmentation()
    ids = [segmentation.GetNthSegmentID(n) for n in range(segmentation.GetNumberOfSegments())]
    return {segment_id: segmentation.GetSegment(segment_id).GetName() for segment_id in ids}


def _segment_pairs(fixed_segmentation, moving_segmentation, segment_ids) -> list[tuple[str, str]]:
    """Corresponding (fixed, moving) segment IDs: `segment_ids`, else the segments named alike."""
    if (fixed_segmentation is None) != (moving_segmentation is None):
        given = "fixed" if fixed_segmentation is not None else "moving"
        raise ValueError(f"only the {given} segmentation was given: select segmentations for both volumes, or for neither")
    if fixed_segmentation is None:
        if segment_ids:
            raise ValueError("segment_ids were given without segmentations")
        return []
    for node in (fixed_segmentation, moving_segmentation):
        if not node.IsA("vtkMRMLSegmentationNode"):
            raise ValueError(f"'{node.GetName()}' is a {node.GetClassName()}, not a segmentation")
        if node.GetSegmentation().GetNumberOfSegments() == 0:
            raise ValueError(f"segmentation '{node.GetName()}' is empty: it has no segments")
    if segment_ids is not None:
        return [(s, s) if isinstance(s, str) else tuple(s) for s in segment_ids]
    fixed_names, moving_names = _segment_names(fixed_segmentation), _segment_names(moving_segmentation)
    moving_by_name = {name: segment_id for segment_id, name in moving_names.items()}
    pairs = [(fid, moving_by_name[name]) for fid, name in fixed_names.items() if name in moving_by_name]
    if not pairs:
        raise ValueError(
            f"segmentations '{fixed_segmentation.GetName()}' and '{moving_segmentation.GetName()}' share no segment "
            f"name (fixed: {sorted(fixed_names.values())}, moving: {sorted(moving_names.values())}): name "
            "corresponding segments alike, or pass segment_ids"
        )
    return pairs


def _labels(segmentation_node, ids: list[str], volume_node) -> Volume:
    """Labels 1..n of segments `ids` on the volume node's grid; every segment must keep a voxel."""
    labels = labels_from_segmentation(segmentation_node, volume_node, ids)
    names = _segment_names(segmentation_node)
    for value, segment_id in enumerate(ids, start=1):
        if not np.any(labels.array == value):
            raise ValueError(
                f"segment '{names[segment_id]}' of '{segmentation_node.GetName()}' has no voxel on the grid of "
                f"'{volume_node.GetName()}' (empty, outside it, or covered by a later segment)"
            )
    return labels


def check_inputs(fixed_node, moving_node, scene, fixed_segmentation=None, moving_segmentation=None, segment_ids=None) -> _Inputs:
    """The registration's inputs as Volumes, or a `ValueError` a user can act on; nothing is created."""
    fixed = _input_volume(fixed_node, "fixed", scene)
    moving = _input_volume(moving_node, "moving", scene)
    if fixed_node is moving_node:
        raise ValueError(f"'{fixed_node.GetName()}' is selected as both fixed and moving volume: select two volumes")
    pairs = _segment_pairs(fixed_segmentation, moving_segmentation, segment_ids)
    if not pairs:
        return _Inputs(fixed, moving, None, None, [])
    fixed_labels = _labels(fixed_segmentation, [f for f, _ in pairs], fixed_node)
    moving_labels = _labels(moving_segmentation, [m for _, m in pairs], moving_node)
    return _Inputs(fixed, moving, fixed_labels, moving_labels, pairs)


def node_modality(node) -> str | None:
    """The DICOM modality ("MR", "US", "CT", ...) Slicer's DICOM import recorded for a volume, else None."""
    import slicer

    scene = node.GetScene()
    hierarchy = scene.GetFirstNodeByClass("vtkMRMLSubjectHierarchyNode") if scene is not None else None
    item = hierarchy.GetItemByDataNode(node) if hierarchy is not None else 0
    if not item:
        return None
    attribute = slicer.vtkMRMLSubjectHierarchyConstants.GetDICOMSeriesModalityAttributeName()
    return hierarchy.GetItemAttribute(item, attribute) or None


def model_card(model) -> dict:
    """The card of a model (a shipped name or a `.safetensors` path); `ValueError` if there is none."""
    from ..models import resolve_model

    try:
        path = resolve_model(model)
    except FileNotFoundError as error:
        raise ValueError(str(error)) from None
    card = path.with_suffix(".json")
    if not card.is_file():
        raise ValueError(f"model {path}: its model card {card.name} is missing")
    return json.loads(card.read_text())


def registration_models() -> dict[str, dict]:
    """The trained registration networks found (shipped, $PRIORREG_MODELS): `{name: card}`."""
    from ..models import available_models

    return {name: card for name, card in available_models().items() if card.get("method") in REGISTRATION_NETWORKS}


def model_task(card: dict) -> str | None:
    """The data set a model was trained on (its training config's `data.task`)."""
    return card.get("training", {}).get("config", {}).get("data", {}).get("task")


def matching_critic(card: dict) -> str | None:
    """A quality critic (AIR-net model) trained on the same data set as the model of `card`, or None.

    A critic only knows the image pairs it was trained on: an MR-TRUS critic has nothing to say
    about two brain MRs, so a result is scored only where such a critic exists.
    """
    from ..models import available_models

    task = model_task(card)
    critics = [n for n, c in available_models().items() if c.get("method") == "airnet" and model_task(c) == task]
    return critics[0] if task and critics else None


def check_model(model, fixed_node, moving_node, method: str = "adversarial") -> dict:
    """The card of a `method` model, or a `ValueError` saying why it does not fit the pair.

    Volumes carry their modality only when they came from DICOM; elsewhere the check is the
    user's (the module panel shows what the model was trained on).
    """
    card = model_card(model)
    if card.get("method") != method:
        raise ValueError(f"model '{model}' is a {card.get('method')!r} model, not a {method!r} one")
    training = card.get("training", {})
    task = model_task(card)
    expected = TASK_MODALITIES.get(task)
    if expected is None:
        return card
    for role, node, want in (("fixed", fixed_node, expected[0]), ("moving", moving_node, expected[1])):
        have = node_modality(node)
        if have is not None and have.upper() != want:
            raise ValueError(
                f"model '{model}' was trained on {training.get('data', task)}, {expected[0]} fixed and {expected[1]} "
                f"moving images; the {role} volume '{node.GetName()}' is {have}: choose a model trained for this pair"
            )
    return card


def model_summary(card: dict) -> str:
    """One line on what a model was trained on and how it did, for the module panel."""
    training = card.get("training", {})
    members = card.get("architecture", {}).get("members", 1)  # an ensemble's networks, their outputs averaged
    what = "network" if members == 1 else f"networks ({members}, averaged)"
    parts = [f"{card.get('method', '?')} {what} trained on {training.get('data', 'unknown data')}"]
    for key, what in (("train_pairs", "training pairs"), ("train_subjects", "training subjects")):
        if training.get(key):
            parts.append(f"{len(training[key])} {what}")
    final = training.get("final_log") or {}
    segmenter = card.get("method") == "segreg"  # its validation Dice is its outlines', not a registration's
    scores = [
        f"{label} {final[key]:{fmt}}"
        for key, label, fmt in (
            ("val_dice", "validation segmentation Dice" if segmenter else "validation Dice", ".2f"),
            ("val_tre_median_mm", "median TRE (mm)", ".1f"),
            ("val_epe_mm", "validation end-point error (mm)", ".1f"),
            ("val_dice_fixed", "validation gland Dice, fixed", ".2f"),
            ("val_dice_moving", "moving", ".2f"),
        )
        if isinstance(final.get(key), (int, float))
    ]
    return "; ".join(parts + scores)


def _check_options(method: str, options: dict, inputs: _Inputs) -> None:
    from ..methods import METHODS

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; available: {', '.join(sorted(METHODS))}")
    reserved = sorted(set(options) & set(_RESERVED_OPTIONS))
    if reserved:
        raise ValueError(f"{', '.join(reserved)}: given by register_nodes itself (segmentations, progress, cancel), not as options")
    accepted = inspect.signature(METHODS[method]).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())  # the baselines ignore options
    unknown = sorted(set(options) - set(accepted))
    if unknown and not takes_any:
        raise ValueError(f"method {method!r} has no option {', '.join(unknown)}; it accepts {', '.join(accepted)}")
    if options.get("device") == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' was chosen but no CUDA GPU is available here: choose 'auto' or 'cpu'")
    if method == "adversarial" and options.get("finetune_steps") and inputs.fixed_labels is None and options.get("similarity") is None:
        raise ValueError("fine-tuning on this pair needs fixed and moving segmentations (or an image similarity)")


def _default_option(method: str, name: str):
    from ..methods import METHODS

    return inspect.signature(METHODS[method]).parameters[name].default


# -------------------------------------------------------------------------------------- outputs
def _jacobian_rgb(det: float) -> tuple[float, float, float]:
    """Blue (shrinking) - white (det 1) - red (growing); folding in its own colour."""
    if det <= 0:
        return FOLDING_RGB
    t = float(np.clip(det - JACOBIAN_LEVEL, -1.0, 1.0))
    end = _SHRINK_RGB if t < 0 else _GROW_RGB
    return tuple(float(c) for c in _KEEP_RGB + abs(t) * (end - _KEEP_RGB))


def jacobian_color_node(scene):
    """The scene's Jacobian colour table, created once per scene and shared by every result.

    With the Jacobian map's window/level (2, 1), entry `n` shows det J = `2 n / (N - 1)`:
    entry 0 holds det J <= 0 (folding), the middle entries det J near 1.
    """
    existing = scene.GetFirstNodeByName(JACOBIAN_COLOR_NAME)
    if existing is not None and existing.IsA("vtkMRMLColorTableNode"):
        return existing
    node = scene.AddNewNodeByClass("vtkMRMLColorTableNode", JACOBIAN_COLOR_NAME)
    node.SetTypeToUser()
    node.SetNumberOfColors(JACOBIAN_COLORS)
    low = JACOBIAN_LEVEL - JACOBIAN_WINDOW / 2
    for index in range(JACOBIAN_COLORS):
        det = low + JACOBIAN_WINDOW * index / (JACOBIAN_COLORS - 1)
        name = "folding (det J <= 0)" if index == 0 else f"det J {det:.3f}"
        node.SetColor(index, name, *_jacobian_rgb(det), 1.0)
    return node


def _options_text(options: dict) -> str:
    """`key=value; ...`: Slicer's table files (.tsv) drop double quotes and split cells at tabs."""
    text = "; ".join(f"{key}={value}" for key, value in sorted(options.items()))
    return text.replace('"', "'").replace("\t", " ")


def _metrics_table(scene, name: str, rows: list[tuple[str, object, str, str]]):
    """A one-row table node: (column, value, unit, description) per column; strings stay strings."""
    import vtk

    table = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    for column, value, unit, description in rows:
        array = vtk.vtkStringArray() if isinstance(value, str) else vtk.vtkDoubleArray()
        array.SetName(column)
        array.InsertNextValue(value if isinstance(value, str) else float(value))
        table.AddColumn(array)
        table.SetColumnDescription(column, description)
        if unit:
            table.SetColumnUnitLabel(column, unit)
    return table


def _warped_segmentation(scene, labels: Volume, moving_segmentation, moving_ids: list[str], name: str):
    """The warped labels as a segmentation with the moving segments' names and colours (None if all left the grid)."""
    if not labels.array.any():
        return None
    node = segmentation_from_labels(labels, name, scene)
    segmentation, source = node.GetSegmentation(), moving_segmentation.GetSegmentation()
    for n in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(n)
        original = source.GetSegment(moving_ids[segment.GetLabelValue() - 1])
        segment.SetName(original.GetName())
        segment.SetColor(original.GetColor())
    return node


# Rows the quality report adds to a registration's metrics table.
QUALITY_ROWS = {
    "verdict": ("", "quality verdict: good, check or failed (priorreg.quality; the critic's model card has the thresholds)"),
    "tre_estimate_mm": ("mm", "target registration error estimated by the quality critic"),
    "d_score": ("", "AIR-net critic's score of the fixed and warped pair (higher: better aligned)"),
    "plausibility": ("", "probability that the field's non-affine part looks biomechanically plausible"),
}


def _output_nodes(scene, result, fixed_node, moving_node, inputs, moving_segmentation, options, prefix, steps, quality=None):
    """Every output node, created in `temporary_nodes` so that a failure or cancel leaves none behind."""
    from .. import metrics
    from ..jacobian import jacobian_stats, jacobian_volume
    from ..spatial import resample

    with temporary_nodes(scene) as keep:
        steps.tick("outputs: warped volume", float("nan"))
        warped = keep(node_from_volume(result.warped, f"{prefix} warped", scene))
        steps.tick("outputs: transform", float("nan"))
        transform = keep(
            transform_node_from_field(result.field, f"{prefix} transform", scene, fixed_node=fixed_node, moving_node=moving_node)
        )
        steps.tick("outputs: Jacobian", float("nan"))
        colours = keep(jacobian_color_node(scene))
        jacobian = keep(
            node_from_volume(
                jacobian_volume(result.field), f"{prefix} Jacobian", scene, color_node_id=colours.GetID(),
                window=JACOBIAN_WINDOW, level=JACOBIAN_LEVEL,
            )
        )
        rows = [
            ("method", result.method, "", "registration method"),
            ("options", _options_text(options), "", "options given to the method"),
            ("seconds", result.seconds, "s", "time the method took (loading and registration)"),
        ]
        descriptions = {
            "folding_pct": ("%", "voxels where det J <= 0 (folding)"),
            "sdlogj": ("", "standard deviation of log det J"),
            "detj_mean": ("", "mean det J"),
            "detj_std": ("", "standard deviation of det J"),
        }
        rows += [(key, value, *descriptions[key]) for key, value in jacobian_stats(result.field).items()]
        segmentation = None
        if inputs.fixed_labels is not None:
            steps.tick("outputs: segmentation", float("nan"))
            moving_ids = [m for _, m in inputs.segment_pairs]
            # Methods that ignore labels (the baselines) return none: warp them through the field as the others do.
            warped_labels = result.warped_labels
            if warped_labels is None:
                warped_labels = resample(inputs.moving_labels, result.field, result.field)
            segmentation = _warped_segmentation(scene, warped_labels, moving_segmentation, moving_ids, f"{prefix} segmentation")
            if segmentation is not None:
                keep(segmentation)
            values = range(1, len(inputs.segment_pairs) + 1)
            dice = metrics.dice(inputs.fixed_labels, warped_labels, labels=values)
            names = _segment_names(moving_segmentation)
            rows.append(("dice_mean", float(np.mean(list(dice.values()))), "", "mean Dice of the fixed and warped segments"))
            rows += [(f"dice {names[m]}", dice[v], "", f"Dice of fixed and warped '{names[m]}'") for v, (_, m) in zip(values, inputs.segment_pairs)]
        if quality is not None:
            rows += [(key, quality[key], *QUALITY_ROWS[key]) for key in QUALITY_ROWS if key in quality]
        steps.tick("outputs: metrics", float("nan"))
        table = keep(_metrics_table(scene, f"{prefix} metrics", rows))
    return RegistrationOutputs(warped, transform, jacobian, table, segmentation, result, quality)


def register_nodes(
    fixed_node,
    moving_node,
    method: str,
    options: dict | None = None,
    fixed_segmentation=None,
    moving_segmentation=None,
    segment_ids=None,
    scene=None,
    progress=None,
    cancel=None,
    output_prefix: str | None = None,
    quality_model: str | None = None,
) -> RegistrationOutputs:
    """Register `moving_node` to `fixed_node` with a `priorreg` method and add the results to the scene.

    `options` go to the method (`priorreg.methods.METHODS[method]`), for example `model` and
    `device` for "adversarial", `similarity`, `levels` and `steps` for "dip". Segmentations
    (both or neither) are paired by segment name, or by `segment_ids` (IDs present in both,
    or `(fixed ID, moving ID)` pairs); the method receives them as labels, and the outputs
    gain a warped segmentation and Dice per segment. `progress(Progress)` is called at every
    step of the method and of the output creation, `cancel()` before each; when it returns
    True, `Cancelled` is raised.

    With `quality_model` (an AIR-net model name or file, e.g. "airnet_mrus"), the result is
    scored (`priorreg.quality.quality_report`: verdict, estimated TRE, D-score, plausibility)
    and the report goes into `outputs.quality` and the metrics table.

    The inputs are checked before anything is created (`ValueError` with a message for the
    user) and never modified. On `Cancelled` or any error, every node this call added is
    removed and the exception propagates, so the scene's node list is as it was.
    """
    from ..methods import METHODS
    from ..registration import Monitor, register

    options = dict(options or {})
    if scene is None and fixed_node is not None:
        scene = fixed_node.GetScene()
    scene = resolve_scene(scene)
    inputs = check_inputs(fixed_node, moving_node, scene, fixed_segmentation, moving_segmentation, segment_ids)
    _check_options(method, options, inputs)
    accepted = inspect.signature(METHODS[method]).parameters
    if "model" in accepted:
        check_model(options.get("model", _default_option(method, "model")), fixed_node, moving_node, method)
    if quality_model is not None:
        model_card(quality_model)  # a missing critic is an input error, found before the registration runs

    # Methods that take labels are driven by the segmentations; for the others they are only warped and scored.
    labels = {"fixed_labels": inputs.fixed_labels, "moving_labels": inputs.moving_labels} if "moving_labels" in accepted else {}
    result = register(inputs.fixed, inputs.moving, method, progress=progress, cancel=cancel, **labels, **options)
    quality = None
    if quality_model is not None:
        from ..quality import QualityModel, quality_report

        device = "cpu" if options.get("device", "auto") == "auto" else options["device"]
        quality = quality_report(
            inputs.fixed, result.warped, result.field, result.inverse_field, model=QualityModel(quality_model, device=device)
        )
    prefix = output_prefix or f"{moving_node.GetName()} {method}"
    steps = Monitor(5 if inputs.fixed_labels is not None else 4, progress, cancel)
    return _output_nodes(scene, result, fixed_node, moving_node, inputs, moving_segmentation, options, prefix, steps, quality)


# -------------------------------------------------------------------------------------- display
def set_foreground_opacity(scene, opacity: float) -> None:
    """Opacity of the foreground layer (the warped volume) in every slice view."""
    composites = scene.GetNodesByClass("vtkMRMLSliceCompositeNode")
    for n in range(composites.GetNumberOfItems()):
        composites.GetItemAsObject(n).SetForegroundOpacity(opacity)


def display_outputs(outputs: RegistrationOutputs, fixed_node, opacity: float = 0.5) -> None:
    """Show a result: fixed volume behind the warped one (at `opacity`) and the deformation grid.

    Slice composite nodes exist where there are slice views (Slicer's layout creates them);
    the grid is set on the transform's display node, visible in slice views, over the fixed
    volume. Where a layout manager exists the views are also fitted to the volumes.
    """
    import slicer

    scene = fixed_node.GetScene()
    composites = scene.GetNodesByClass("vtkMRMLSliceCompositeNode")
    for n in range(composites.GetNumberOfItems()):
        composite = composites.GetItemAsObject(n)
        composite.SetBackgroundVolumeID(fixed_node.GetID())
        composite.SetForegroundVolumeID(outputs.warped_volume.GetID())
    set_foreground_opacity(scene, opacity)

    transform = outputs.transform
    if transform.GetDisplayNode() is None:
        transform.CreateDefaultDisplayNodes()
    display = transform.GetDisplayNode()
    display.SetVisualizationMode(slicer.vtkMRMLTransformDisplayNode.VIS_MODE_GRID)
    display.SetAndObserveRegionNode(fixed_node)
    extent = np.array(fixed_node.GetImageData().GetDimensions()) * np.array(fixed_node.GetSpacing())
    display.SetGridSpacingMm(max(1.0, round(float(extent.max()) / 12.0)))  # about 12 grid lines across
    display.SetVisibility(True)
    display.SetVisibility2D(True)
    display.SetVisibility3D(False)

    app = getattr(slicer, "app", None)
    if app is not None and app.layoutManager() is not None:
        slicer.util.resetSliceViews()


def parse_schedule(levels: str, steps: str) -> tuple[tuple[float, ...], tuple[int, ...]]:
    """A coarse-to-fine schedule typed in a panel ("4, 2, 1" and "200, 100, 50"), or a `ValueError`.

    Level `f` optimises on the fixed grid downsampled `f` times (1 = full resolution) for
    the matching number of steps.
    """

    def numbers(text: str, kind, what: str, minimum) -> tuple:
        try:
            values = tuple(kind(part) for part in text.replace(";", ",").split(",") if part.strip())
        except ValueError:
            raise ValueError(f"{what} must be numbers separated by commas, got {text!r}") from None
        if not values or min(values) < minimum:
            raise ValueError(f"{what} must be one or more numbers >= {minimum}, got {text!r}")
        return values

    level_values = numbers(levels, float, "resolution levels", 1)
    step_values = numbers(steps, int, "iterations per level", 1)
    if len(level_values) != len(step_values):
        raise ValueError(f"{len(level_values)} resolution levels but {len(step_values)} iteration counts: give one count per level")
    return level_values, step_values
