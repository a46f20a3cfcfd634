"""Render tier: real Slicer slice views, rendered offscreen, show what `display_outputs` promises.

The views are trame-slicer's `SliceView`s made by its `DirectViewFactory` on the slicer-core
wheel: Slicer's own `vtkMRMLSliceLogic` reslices and blends the layers of the MRML scene and its
displayable managers (`vtkMRMLTransformsDisplayableManager2D` for the grid) draw into a VTK
render window, offscreen (EGL or OSMesa on Linux without a display). Nothing here re-draws a
view: numpy only computes the references the pixels are compared with.

One real MR-US pair (the first test-split pair of the shared data, as the MRML tier uses) is
registered once with the shipped model "adversarial_mrus" through `register_nodes`, and shown
with `display_outputs`; then

- overlay: fixed background, warped foreground: opacity 0 renders the fixed volume alone,
  opacity 1 the warped volume alone, 0.5 their per-pixel mean, and each of them matches the
  volume resampled independently at the view's pixels (slice node XYToRAS);
- grid: the transform display node's grid adds thin lines exactly where the fixed-space grid
  at the display node's spacing lands once warped by the transform (and not where a grid of
  another spacing would);
- Jacobian: the Jacobian map as background shows det J ~ 1 near white, det J > 1 red,
  det J < 1 blue and folding (det J <= 0) in the folding colour, at known voxels and over the
  whole slice.

Every rendering is kept as a PNG in `Testing/artifacts/<test>/` (CI artifacts).
`PRIORREG_UPDATE_SCREENSHOTS=1` also copies overlay.png, grid.png and jacobian.png into
`Resources/Screenshots/` (the extension's CMakeLists and the README show them); otherwise the
tests never write into the source tree.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
    # Headless: render through EGL (OSMesa as VTK's own fallback) instead of trying X first.
    os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")

slicer = pytest.importorskip("slicer")
pytest.importorskip("trame_slicer", reason="the render tier needs trame-slicer: pip install -e .[test]")
import vtk  # noqa: E402  (slicer-core brings vtk)
from scipy import ndimage  # noqa: E402
from slicer.util import arrayFromVTKMatrix  # noqa: E402
from vtk.util.numpy_support import vtk_to_numpy  # noqa: E402

from priorreg.slicer import display_outputs, register_nodes  # noqa: E402
from priorreg.slicer.logic import FOLDING_RGB  # noqa: E402
from priorreg.slicer.sample import mrus_test_pair  # noqa: E402

MODEL = "adversarial_mrus"
ADVERSARIAL = {"model": MODEL, "device": "cpu"}  # what AdversarialRegistrationLogic.register passes
SIZE = 512  # view width and height in pixels
SCREENSHOTS = Path(__file__).resolve().parents[2] / "Resources" / "Screenshots"


# ------------------------------------------------------------------------------------ the views
_PROBE = """
import vtk
window = vtk.vtkRenderWindow()
window.SetOffScreenRendering(1)
window.SetSize(8, 8)
renderer = vtk.vtkRenderer()
renderer.SetBackground(1, 0, 0)
window.AddRenderer(renderer)
window.Render()
grab = vtk.vtkWindowToImageFilter()
grab.SetInput(window)
grab.Update()
print(window.GetClassName(), grab.GetOutput().GetScalarComponentAsDouble(4, 4, 0, 0))
"""


def offscreen_rendering_problem() -> str | None:
    """Why VTK cannot render offscreen here, or None; in a child process, as VTK crashes without OpenGL."""
    try:
        probe = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return "a test rendering timed out"
    if probe.returncode != 0:
        lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in probe.stderr.splitlines() if line.strip()]
        return f"a test rendering exited with {probe.returncode}" + (f": {lines[-1]}" if lines else "")
    words = probe.stdout.split()
    if not words or words[-1] != "255.0":
        return f"a test rendering came back wrong: {probe.stdout.strip()!r}"
    return None


@pytest.fixture(scope="module")
def shown(shared_data):
    """One registration shown in an offscreen axial slice view: SimpleNamespace(view, pair, outputs, ...)."""
    from priorreg.models import available_models

    if MODEL not in available_models():
        pytest.fail(f"model {MODEL!r} not found: it ships in Resources/Models with its .json card")
    try:
        from trame_slicer.core import SlicerApp
        from trame_slicer.views import DirectViewFactory, NoScheduleRendering, ViewLayoutDefinition
    except ImportError as error:
        pytest.skip(f"trame-slicer cannot be imported ({error}): pip install -e .[test]")
    problem = offscreen_rendering_problem()
    if problem:
        pytest.skip(f"VTK cannot render offscreen here ({problem}): install Mesa's EGL (Debian: libegl1 libgl1-mesa-dri) or OSMesa, or run with a display")

    app = SlicerApp()
    app.view_manager.register_factory(DirectViewFactory(do_render_offscreen=True))
    view = app.view_manager.create_view(ViewLayoutDefinition.axial_view())
    view.set_scheduled_render(NoScheduleRendering())  # render only when a test asks: one render per image
    view.render_window().SetSize(SIZE, SIZE)
    view.update_size(SIZE, SIZE)

    pair = mrus_test_pair(app.scene, shared_data)
    for segmentation in (pair.fixed_segmentation, pair.moving_segmentation):
        segmentation.GetDisplayNode().SetVisibility(False)  # the pixels under test are the volumes' and the grid's
    outputs = register_nodes(pair.fixed, pair.moving, "adversarial", ADVERSARIAL, scene=app.scene)
    display_outputs(outputs, pair.fixed, opacity=0.5)
    view.fit_view_to_content()  # what slicer.util.resetSliceViews does in Slicer
    layers = (view.get_background_volume_id(), view.get_foreground_volume_id(), view.get_foreground_opacity())
    yield SimpleNamespace(app=app, view=view, slice_node=view.get_view_node(), pair=pair, outputs=outputs, layers=layers)
    view.finalize()


def show(shown, background, foreground=None, opacity=0.0, grid=False) -> None:
    """Set the view's layers (as the slice controller would) and the grid's visibility."""
    shown.view.set_background_volume_id(background.GetID())
    shown.view.set_foreground_volume_id(foreground.GetID() if foreground is not None else None)
    shown.view.set_foreground_opacity(opacity)
    shown.outputs.transform.GetDisplayNode().SetVisibility(grid)


def render(view) -> np.ndarray:
    """The view's pixels as (y, x, RGB) uint8; row y is the slice view's XY coordinate y (bottom row 0)."""
    view.render()
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(view.render_window())
    grab.SetInputBufferTypeToRGB()
    grab.ReadFrontBufferOff()
    grab.Update()
    image = grab.GetOutput()
    width, height, _ = image.GetDimensions()
    return vtk_to_numpy(image.GetPointData().GetScalars()).reshape(height, width, 3).copy()


def save(image: np.ndarray, folder: Path, name: str, screenshot: bool = False) -> Path:
    from PIL import Image

    path = folder / name
    Image.fromarray(image[::-1]).save(path)  # PNG rows run top to bottom
    if screenshot and os.environ.get("PRIORREG_UPDATE_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, SCREENSHOTS / name)
    return path


# --------------------------------------------------------------------------------- geometry
def matrix(get) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    get(m)
    return arrayFromVTKMatrix(m)


def pixel_ras(slice_node) -> np.ndarray:
    """RAS of every view pixel (y, x, 3): pixel (x, y) shows the slice at XY (x, y, 0)."""
    xy_to_ras = arrayFromVTKMatrix(slice_node.GetXYToRAS())
    width, height, _ = slice_node.GetDimensions()
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    xy = np.stack([x, y, np.zeros_like(x), np.ones_like(x)], axis=-1)
    return (xy @ xy_to_ras.T)[..., :3]


def ras_to_xy(slice_node, ras: np.ndarray) -> np.ndarray:
    """XY view coordinates (..., 2) of RAS points (..., 3)."""
    rasxy = np.linalg.inv(arrayFromVTKMatrix(slice_node.GetXYToRAS()))
    homogeneous = np.concatenate([ras, np.ones(ras.shape[:-1] + (1,))], axis=-1)
    return (homogeneous @ rasxy.T)[..., :2]


def resample_at(node, ras: np.ndarray) -> np.ndarray:
    """The node's voxel values at RAS points (trilinear, as Slicer's slice views); NaN outside its grid."""
    array = slicer.util.arrayFromVolume(node).astype(np.float64)  # (k, j, i)
    ras_to_ijk = np.linalg.inv(matrix(node.GetIJKToRASMatrix))
    ijk = ras @ ras_to_ijk[:3, :3].T + ras_to_ijk[:3, 3]
    kji = np.moveaxis(ijk[..., ::-1], -1, 0)
    values = ndimage.map_coordinates(array, kji.reshape(3, -1), order=1, mode="nearest").reshape(ijk.shape[:-1])
    inside = np.all((ijk >= -0.5) & (ijk <= np.array(array.shape[::-1]) - 0.5), axis=-1)
    return np.where(inside, values, np.nan)


def window_level_grey(node, values: np.ndarray) -> np.ndarray:
    """Grey levels 0..255 of voxel values through the node's window/level (Slicer's grey colour table)."""
    display = node.GetDisplayNode()
    low = display.GetLevel() - display.GetWindow() / 2
    return np.clip((values - low) / display.GetWindow(), 0.0, 1.0) * 255.0


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


# ---------------------------------------------------------------------------------- overlay
def test_overlay_blends_fixed_and_warped(shown, artifacts_dir):
    """Fixed background, warped foreground: opacity 0 / 1 / 0.5 show fixed / warped / their mean."""
    fixed, warped, view = shown.pair.fixed, shown.outputs.warped_volume, shown.view
    assert shown.layers == (fixed.GetID(), warped.GetID(), 0.5), "display_outputs: fixed behind, warped in front at 0.5"
    images = {}
    for name, layers in {
        "fixed_only": (fixed, None, 0.0),
        "warped_only": (warped, None, 0.0),
        "opacity_0": (fixed, warped, 0.0),
        "opacity_1": (fixed, warped, 1.0),
        "overlay": (fixed, warped, 0.5),
    }.items():
        show(shown, *layers)
        images[name] = render(view).astype(np.float64)
        save(images[name].astype(np.uint8), artifacts_dir, f"{name}.png", screenshot=name == "overlay")

    ras = pixel_ras(shown.slice_node)
    expected_fixed = window_level_grey(fixed, resample_at(fixed, ras))
    expected_warped = window_level_grey(warped, resample_at(warped, ras))
    inside = ~np.isnan(expected_fixed) & ~np.isnan(expected_warped)
    assert inside.mean() > 0.5, "the fitted view should be mostly covered by the fixed volume"

    overlay, fixed_image, warped_image = images["overlay"], images["opacity_0"], images["opacity_1"]
    assert overlay[inside].std() > 20, "the overlay is blank"
    # Grey volumes render grey: R = G = B.
    for image in images.values():
        assert np.abs(image[..., 0] - image[..., 2]).max() <= 1
    # The layers: opacity 0 is the fixed volume alone, opacity 1 the warped volume alone.
    assert np.abs(fixed_image - images["fixed_only"]).max() <= 1
    assert np.abs(warped_image[inside] - images["warped_only"][inside]).max() <= 1
    assert np.abs(fixed_image - warped_image)[inside].mean() > 10, "fixed and warped slices look alike: the blend test would be vacuous"
    # Each layer is its volume, resampled at the view's pixels (Slicer interpolates linearly too).
    grey_fixed, grey_warped, grey_overlay = fixed_image[..., 0], warped_image[..., 0], overlay[..., 0]
    assert correlation(grey_fixed[inside], expected_fixed[inside]) > 0.98
    assert correlation(grey_warped[inside], expected_warped[inside]) > 0.98
    assert np.median(np.abs(grey_fixed[inside] - expected_fixed[inside])) <= 2
    # Opacity 0.5: the per-pixel mean of the two layers, and like both of them.
    blend_error = np.abs(overlay - (fixed_image + warped_image) / 2)
    assert np.mean(blend_error <= 1.5) > 0.99 and blend_error.max() <= 3
    assert correlation(grey_overlay[inside], expected_fixed[inside]) > 0.5
    assert correlation(grey_overlay[inside], expected_warped[inside]) > 0.5
    between = (grey_overlay >= np.minimum(grey_fixed, grey_warped) - 1) & (grey_overlay <= np.maximum(grey_fixed, grey_warped) + 1)
    assert between.all()


# ------------------------------------------------------------------------------------- grid
def expected_grid(shown, spacing_mm: float) -> np.ndarray:
    """View pixels (y, x) on the lines of a fixed-space grid of `spacing_mm` warped by the transform.

    The grid is Slicer's transform grid of a slice view: points `spacing / subdivision` apart
    (subdivision = spacing / the display node's grid resolution) centred on the slice's field
    of view, each moved by the transform's in-plane displacement (`GetTransformToWorld`, what
    the grid shows), joined by straight segments along every `subdivision`-th row and column.
    """
    display, slice_node = shown.outputs.transform.GetDisplayNode(), shown.slice_node
    subdivision = max(1, int(np.floor(spacing_mm / display.GetGridResolutionMm() + 0.5)))
    step = spacing_mm / subdivision
    fov, origin = np.array(slice_node.GetFieldOfView()[:2]), np.array(slice_node.GetXYZOrigin()[:2])
    count = (np.floor(fov / (step * subdivision)) * subdivision).astype(int)
    offset = (fov - count * step) / 2 - fov / 2 + origin
    j, i = np.mgrid[0 : count[1] + 1, 0 : count[0] + 1].astype(np.float64)
    in_slice = np.stack([offset[0] + i * step, offset[1] + j * step, np.zeros_like(i), np.ones_like(i)], axis=-1)
    slice_to_ras = arrayFromVTKMatrix(slice_node.GetSliceToRAS())
    points = (in_slice @ slice_to_ras.T)[..., :3]

    to_world = vtk.vtkGeneralTransform()
    shown.outputs.transform.GetTransformToWorld(to_world)
    moved = np.array([to_world.TransformPoint(*p) for p in points.reshape(-1, 3)]).reshape(points.shape)
    normal = slice_to_ras[:3, 2] / np.linalg.norm(slice_to_ras[:3, 2])
    displacement = moved - points
    drawn = ras_to_xy(slice_node, points + displacement - (displacement @ normal)[..., None] * normal)

    segments = [(drawn[r, :-1], drawn[r, 1:]) for r in range(0, count[1] + 1, subdivision)]
    segments += [(drawn[:-1, c], drawn[1:, c]) for c in range(0, count[0] + 1, subdivision)]
    starts = np.concatenate([s for s, _ in segments])
    ends = np.concatenate([e for _, e in segments])
    t = np.linspace(0.0, 1.0, 4 * int(np.ceil(np.abs(ends - starts).max())) + 2)
    samples = np.rint(starts[:, None] + t[None, :, None] * (ends - starts)[:, None]).astype(int).reshape(-1, 2)
    width, height, _ = slice_node.GetDimensions()
    keep = (samples[:, 0] >= 0) & (samples[:, 0] < width) & (samples[:, 1] >= 0) & (samples[:, 1] < height)
    mask = np.zeros((height, width), bool)
    mask[samples[keep, 1], samples[keep, 0]] = True
    return mask


def agreement(drawn: np.ndarray, expected: np.ndarray, tolerance_px: float = 1.5) -> tuple[float, float]:
    """(share of drawn pixels near an expected line, share of expected line pixels near a drawn one)."""
    to_expected = ndimage.distance_transform_edt(~expected)
    to_drawn = ndimage.distance_transform_edt(~drawn)
    return float(np.mean(to_expected[drawn] <= tolerance_px)), float(np.mean(to_drawn[expected] <= tolerance_px))


def test_grid_lines_follow_the_warped_grid(shown, artifacts_dir):
    """The transform's grid adds thin lines where the grid of its spacing lands, warped."""
    fixed, warped, view = shown.pair.fixed, shown.outputs.warped_volume, shown.view
    display = shown.outputs.transform.GetDisplayNode()
    assert display.GetVisualizationMode() == slicer.vtkMRMLTransformDisplayNode.VIS_MODE_GRID
    assert display.GetVisibility2D()

    show(shown, fixed, warped, 0.5, grid=False)
    plain = render(view).astype(np.int32)
    show(shown, fixed, warped, 0.5, grid=True)
    with_grid = render(view)
    save(with_grid, artifacts_dir, "grid.png", screenshot=True)
    changed = np.abs(with_grid.astype(np.int32) - plain).sum(axis=-1) > 24
    save((changed * 255).astype(np.uint8)[..., None].repeat(3, axis=-1), artifacts_dir, "grid_difference.png")

    spacing = display.GetGridSpacingMm()
    expected = expected_grid(shown, spacing)
    assert expected.sum() > 1000
    # Thin lines: about as many changed pixels as expected line pixels (line width 1, antialiased).
    assert 0.5 * expected.sum() < changed.sum() < 3 * expected.sum()
    precision, recall = agreement(changed, expected)
    assert precision > 0.9 and recall > 0.85, (precision, recall)
    # The period is the display node's spacing: grids 25% finer or coarser do not match.
    for other in (0.75 * spacing, 1.25 * spacing):
        other_precision, _ = agreement(changed, expected_grid(shown, other))
        assert other_precision < precision - 0.25, (other, other_precision, precision)


# --------------------------------------------------------------------------------- Jacobian
def lut_rgb(node, values: np.ndarray) -> np.ndarray:
    """Colours 0..255 of values through the node's window/level and colour table (Slicer's mapping)."""
    display = node.GetDisplayNode()
    table = display.GetColorNode()
    colours = np.array([_rgba(table, n)[:3] for n in range(table.GetNumberOfColors())])
    low, width = display.GetLevel() - display.GetWindow() / 2, display.GetWindow()
    index = np.clip(np.floor((values - low) / width * len(colours)), 0, len(colours) - 1).astype(int)
    return colours[index] * 255.0


def _rgba(table, n: int) -> list[float]:
    rgba = [0.0] * 4
    table.GetColor(n, rgba)
    return rgba


def test_jacobian_colours(shown, artifacts_dir):
    """det J ~ 1 near white, > 1 red, < 1 blue, <= 0 in the folding colour."""
    jacobian, view, slice_node = shown.outputs.jacobian, shown.view, shown.slice_node
    det = slicer.util.arrayFromVolume(jacobian)  # (k, j, i)
    categories = {
        "neutral": np.abs(det - 1) < 0.05,
        "growing": det > 1.2,
        # Not 0 < det J < 0.01: the colour table's first entry, the folding colour, spans
        # det J in [0, window / 256) = [0, 0.0078), so such voxels show as folding.
        "shrinking": (det > 0.01) & (det < 0.8),
        "folding": det <= 0,
    }
    # A registration need not keep volume anywhere (the shipped model shrinks this pair's MR by
    # about 0.76 overall), so the table's centre is checked on the table itself, and rendered
    # pixels on every kind of voxel the registration has.
    neutral = lut_rgb(jacobian, np.array([1.0]))[0]
    assert neutral.min() > 240 and np.ptp(neutral) < 10, neutral
    assert any(mask.any() for mask in categories.values()), "no voxel with a distinctive colour"
    # Axial planes of voxels: the one richest in the rarest colour (with folding if one can be),
    # then, for any kind of voxel it lacks, the plane with the most of that kind.
    per_plane = {name: mask.sum(axis=(1, 2)) for name, mask in categories.items()}
    present = [name for name in ("neutral", "growing", "shrinking") if categories[name].any()]
    score = np.minimum.reduce([per_plane[name] for name in present]) if present else per_plane["folding"]
    folds = per_plane["folding"] > 0
    if (folds & (score > 0)).any():
        score = np.where(folds, score, -1)
    planes = [int(np.argmax(score))]
    for name in categories:
        if per_plane[name].any() and not any(per_plane[name][k] for k in planes):
            planes.append(int(np.argmax(per_plane[name])))

    display, ijk_to_ras = jacobian.GetDisplayNode(), matrix(jacobian.GetIJKToRASMatrix)
    normal = arrayFromVTKMatrix(slice_node.GetSliceToRAS())[:3, 2]
    k_axis = ijk_to_ras[:3, 2] / np.linalg.norm(ijk_to_ras[:3, 2])
    assert abs(abs(k_axis @ normal) - 1) < 1e-6, "the Jacobian's k axis is not the axial view's normal: planes of voxels are not slices"
    width, height, _ = slice_node.GetDimensions()
    folding_rgb = np.array(FOLDING_RGB) * 255
    offset = view.get_slice_value()
    checked = dict.fromkeys(categories, 0)
    try:
        show(shown, jacobian)
        for k in planes:
            view.set_slice_value(float((ijk_to_ras @ np.array([0.0, 0.0, k, 1.0]))[:3] @ normal))
            interpolated = render(view).astype(np.float64)
            save(interpolated.astype(np.uint8), artifacts_dir, f"jacobian_plane{k}.png")
            if k == planes[0]:
                save(interpolated.astype(np.uint8), artifacts_dir, "jacobian.png", screenshot=True)
            display.SetInterpolate(False)
            try:
                nearest = render(view).astype(np.float64)
            finally:
                display.SetInterpolate(True)
            save(nearest.astype(np.uint8), artifacts_dir, f"jacobian_plane{k}_nearest.png")

            # Known voxels of plane k: without interpolation, the pixel nearest each voxel centre shows its colour.
            for name, mask in categories.items():
                j, i = np.nonzero(mask[k])
                centres = np.stack([i, j, np.full_like(i, k), np.ones_like(i)], axis=-1).astype(np.float64) @ ijk_to_ras.T
                xy = np.rint(ras_to_xy(slice_node, centres[:, :3])).astype(int)
                on_view = (xy[:, 0] >= 0) & (xy[:, 0] < width) & (xy[:, 1] >= 0) & (xy[:, 1] < height)
                rgb = nearest[xy[on_view, 1], xy[on_view, 0]]
                checked[name] += len(rgb)
                if not len(rgb):
                    continue
                assert np.abs(rgb - lut_rgb(jacobian, det[k, j[on_view], i[on_view]])).max() <= 3, name
                r, g, b = rgb[:, 0], rgb[:, 1], rgb[:, 2]
                if name == "neutral":
                    assert (rgb.min(axis=1) > 200).all() and (np.abs(r - b) < 30).all()
                elif name == "growing":  # det J 1.2 is (234, 199, 205)
                    assert (r > b + 20).all() and (r > g + 20).all()
                elif name == "shrinking":  # det J 0.8 is (209, 213, 236)
                    assert (b > r + 15).all() and (b > g + 15).all()
                else:
                    assert np.abs(rgb - folding_rgb).max() <= 3

            # The whole slice as Slicer shows it: det J interpolated linearly, then the colour table.
            values = resample_at(jacobian, pixel_ras(slice_node))
            inside = ~np.isnan(values)
            close = np.abs(interpolated - lut_rgb(jacobian, np.nan_to_num(values))).max(axis=-1) <= 12
            assert close[inside].mean() > 0.97
            # not blank: coloured (not the black background) and varying with det J
            assert interpolated[inside].mean() > 100 and interpolated[inside].std() > 5, "the Jacobian map is blank"
    finally:
        view.set_slice_value(offset)
    assert all(checked[name] for name in categories if categories[name].any()), checked


# ------------------------------------------------------------------------------ screenshots
@pytest.mark.parametrize("name", ["overlay.png", "grid.png", "jacobian.png"])
def test_screenshots_are_in_resources(name):
    """The extension's screenshots (CMakeLists' EXTENSION_SCREENSHOTURLS, the README) are renderings of this tier."""
    from PIL import Image

    path = SCREENSHOTS / name
    assert path.is_file(), f"{path} is missing: run PRIORREG_UPDATE_SCREENSHOTS=1 pytest Testing/render"
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (SIZE, SIZE)
        assert np.asarray(image.convert("RGB")).std() > 20
