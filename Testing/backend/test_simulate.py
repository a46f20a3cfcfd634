"""The biomechanical simulator: physics of the FE solve, the sampled fields, and the batch driver.

One scenario (seed 0: an 8.9 mm anterior probe push with balloon inflation) is solved on a
coarse mesh once per module; the field tests sample it onto a real TRUS label grid. Each
solve takes 1-2 s on one core.
"""

import dataclasses
import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from priorreg import Volume, data
from priorreg.jacobian import jacobian_determinant

try:  # the gmsh wheel links the system's X11/GL client libraries (libGLU, libXft, libXcursor, ...)
    import gmsh  # noqa: F401
except (ImportError, OSError) as error:
    pytest.skip(f"gmsh (the simulator's mesher) cannot load here: {error}", allow_module_level=True)

from priorreg.simulate import cli as sim_cli  # noqa: E402
from priorreg.simulate import run as sim_run
from priorreg.simulate.fem import (
    NotConverged,
    Solution,
    probe_displacement,
    solve_model,
)
from priorreg.simulate.fields import (
    AFFINE_TOLERANCE_MM,
    decompose,
    fe_to_image,
    fit_affine,
    gland_box,
    inverse_field,
    random_domain,
)
from priorreg.simulate.mesh import GLAND, PROBE, TISSUE, build_mesh
from priorreg.simulate.params import RANGES, sample_parameters
from priorreg.spatial import Grid, read_field, sample

COARSE = (6.0, 24.0)  # mm, near the gland and probe / far: ~1,400 nodes


@pytest.fixture(scope="module")
def scenario():
    params = sample_parameters(np.random.default_rng(0), COARSE)
    mesh = build_mesh(params)
    return params, mesh, solve_model(mesh, params)


@pytest.fixture(scope="module")
def train_labels(shared_data):
    """The first three TRUS labels of the training split (what `priorreg simulate` uses by default)."""
    return [str(p.fixed_labels) for p in data.split_by_patient(data.mrus_pairs(shared_data))["train"][:3]]


@pytest.fixture(scope="module")
def sampled(scenario, train_labels):
    _, _, solution = scenario
    labels = Volume.read(train_labels[0])
    to_image = fe_to_image(solution, gland_box(labels))
    field, outside = inverse_field(solution, to_image, Grid.of(labels))
    return labels, to_image, field, outside


def _probe_max(params, mesh) -> float:
    probe = mesh.region_nodes(PROBE)
    return float(np.linalg.norm(probe_displacement(mesh.nodes[probe], params), axis=1).max())


def test_mesh_holds_gland_tissue_and_probe_and_is_reproducible(scenario):
    params, mesh, _ = scenario
    volumes = mesh.volumes()
    assert (volumes > 0).all()
    assert all((mesh.region == r).sum() > 100 for r in (GLAND, TISSUE, PROBE))
    a, b, c = params.gland_semi_axes
    assert volumes[mesh.region == GLAND].sum() == pytest.approx(4 / 3 * np.pi * a * b * c, rel=0.06)
    x = mesh.nodes[mesh.region_nodes(GLAND)]
    assert ((x / params.gland_semi_axes) ** 2).sum(axis=1).max() <= 1 + 1e-6  # gland nodes on or in the ellipsoid
    again = build_mesh(params)
    assert np.array_equal(again.nodes, mesh.nodes) and np.array_equal(again.tets, mesh.tets)


def test_solution_meets_boundary_conditions_and_displacement_bound(scenario):
    params, mesh, solution = scenario
    u = solution.displacement
    assert solution.element_jacobians.min() > 0  # no inverted tetrahedron
    probe = mesh.region_nodes(PROBE)
    assert np.abs(u[probe] - probe_displacement(mesh.nodes[probe], params)).max() < 1e-9
    anterior = np.abs(mesh.nodes[:, 1] + params.block_half_size[1]) < 1e-6
    assert anterior.sum() > 10 and np.abs(u[anterior & ~np.isin(np.arange(len(u)), probe)]).max() == 0
    # Loading comes only from the probe: no tissue moves further than the probe does.
    probe_max = _probe_max(params, mesh)
    assert probe_max > 8  # the scenario really pushes
    assert np.linalg.norm(u, axis=1).max() <= probe_max * (1 + 1e-6)
    assert np.linalg.norm(u[mesh.region_nodes(GLAND)], axis=1).max() > 3  # and the gland moves


def test_gland_volume_change_follows_compressibility(scenario):
    """|dV/V| <= 3 (1 - 2 nu) eps E_max / E_gland: volumetric strain is mean stress over bulk modulus,
    and the mean stress in the gland is at most the stiffer tissue's modulus times the nominal
    strain eps (probe displacement over the gland's smallest diameter)."""
    params, mesh, _ = scenario
    eps = _probe_max(params, mesh) / (2 * min(params.gland_semi_axes))
    stiffness = max(params.youngs_modulus_gland, params.youngs_modulus_tissue) / params.youngs_modulus_gland
    change = {}
    for nu in (0.40, 0.49):
        p = dataclasses.replace(params, poisson_gland=nu, poisson_tissue=nu)
        change[nu] = solve_model(mesh, p).volume_change()
        assert change[nu] < 0  # the probe compresses the gland
        assert abs(change[nu]) <= 3 * (1 - 2 * nu) * eps * stiffness
    assert abs(change[0.49]) < 0.5 * abs(change[0.40])  # nearly incompressible: far less volume change


def test_inverse_field_maps_deformed_positions_back(scenario, sampled):
    params, mesh, solution = scenario
    labels, to_image, field, outside = sampled
    grid = Grid.of(labels)
    assert outside == 0  # the tissue block covers the TRUS field of view
    assert grid.matches(field) and field.array.shape == (3, *grid.shape)
    # The deformed FE gland's box is the label's gland box.
    gland = mesh.region_nodes(GLAND)
    deformed = (mesh.nodes + solution.displacement) @ to_image[:3, :3].T + to_image[:3, 3]
    lo, hi = gland_box(labels)
    assert np.allclose(deformed[gland].min(axis=0), lo) and np.allclose(deformed[gland].max(axis=0), hi)
    # x + u(x) is the undeformed position of the tissue now at x (nodes inside the field of view).
    undeformed = mesh.nodes @ to_image[:3, :3].T + to_image[:3, 3]
    index = np.c_[deformed, np.ones(len(deformed))] @ np.linalg.inv(grid.index_to_physical).T
    inside = ((index[:, :3] >= 0) & (index[:, :3] <= np.array(grid.shape[::-1]) - 1)).all(axis=1)
    assert inside.sum() > 200
    u = sample(torch.as_tensor(field.array)[None], grid, torch.as_tensor(deformed[inside])[None], padding="border")[0].T.numpy()
    error = np.linalg.norm(deformed[inside] + u - undeformed[inside], axis=1)
    moved = np.linalg.norm(deformed[inside] - undeformed[inside], axis=1)
    assert moved.max() > 5 and np.median(error) < 0.1 and error.max() < 0.5, (np.median(error), error.max())
    # No folding; no displacement beyond the probe's, scaled to image mm.
    assert jacobian_determinant(field).min() > 0
    scale = np.abs(np.linalg.svd(to_image[:3, :3], compute_uv=False)).max()
    assert np.linalg.norm(field.array, axis=0).max() <= scale * _probe_max(params, mesh) * (1 + 1e-6)


def _affine_motion_mm(affine, grid) -> float:
    """Largest displacement (mm) that the map x -> A x + b causes on the grid's voxel centres."""
    x = grid.physical_points()
    return float(np.abs(x @ (affine[:, :3] - np.eye(3)).T + affine[:, 3]).max())


def test_decomposition_composes_a_local_field_after_the_global_affine(scenario, sampled):
    _, _, solution = scenario
    labels, to_image, field, _ = sampled
    grid = Grid.of(labels)
    parts = decompose(solution, to_image, grid)
    assert np.array_equal(parts.full.array, field.array)
    assert _affine_motion_mm(parts.affine, grid) > 5  # there was a global part to remove
    assert _affine_motion_mm(fit_affine(parts.local), grid) < AFFINE_TOLERANCE_MM  # and none is left
    assert jacobian_determinant(parts.local).min() > 0
    # phi(x) = phi_local(g(x)): x + u(x) = g(x) + u_local(g(x)), at voxels whose g(x) is in the field of view.
    x = grid.physical_points().reshape(-1, 3)
    gx = x @ parts.affine[:, :3].T + parts.affine[:, 3]
    index = np.c_[gx, np.ones(len(gx))] @ np.linalg.inv(grid.index_to_physical).T
    inside = ((index[:, :3] >= 0) & (index[:, :3] <= np.array(grid.shape[::-1]) - 1)).all(axis=1)
    u_local = sample(torch.as_tensor(parts.local.array)[None], grid, torch.as_tensor(gx[inside])[None])[0].T.numpy()
    u_full = parts.full.array.reshape(3, -1).T[inside]
    assert inside.mean() > 0.6 and np.abs(x[inside] + u_full - (gx[inside] + u_local)).max() < 0.3


def test_affine_motion_has_no_local_part(scenario, sampled):
    """An FE displacement that is itself affine leaves a zero local field and its inverse as the global part."""
    _, mesh, _ = scenario
    labels = sampled[0]
    b = np.eye(4)
    b[:3] = np.c_[[[1.06, 0.02, 0.0], [-0.03, 0.93, 0.01], [0.0, 0.02, 1.02]], [1.0, -3.0, 2.0]]
    moved = Solution(mesh, mesh.nodes @ (b[:3, :3] - np.eye(3)).T + b[:3, 3], 1, 1)
    to_image = fe_to_image(moved, gland_box(labels))
    parts = decompose(moved, to_image, Grid.of(labels))
    assert parts.iterations == 2 and np.abs(parts.local.array).max() < 1e-6  # one fit finds it, the next confirms
    expected = to_image @ np.linalg.inv(b) @ np.linalg.inv(to_image)  # the inverse motion, in image mm
    assert np.abs(parts.affine - expected[:3]).max() < 1e-8


def test_domain_augmentation_resamples_the_simulation(scenario, sampled):
    _, _, solution = scenario
    labels, to_image, field, _ = sampled
    grid = Grid.of(labels)
    domain = random_domain(grid, np.random.default_rng(4))
    assert np.array_equal(domain, random_domain(grid, np.random.default_rng(4)))
    assert not np.allclose(domain, random_domain(grid, np.random.default_rng(5)))
    low, high = RANGES["domain_scale"]
    assert (np.linalg.svd(domain[:3, :3], compute_uv=False) >= low - 1e-9).all()
    assert (np.linalg.svd(domain[:3, :3], compute_uv=False) <= high + 1e-9).all()
    moved, outside = inverse_field(solution, to_image, grid, domain)
    assert outside == 0 and jacobian_determinant(moved).min() > 0
    # u'(x) = D^-1 u(D x): compare with the unmoved field interpolated at D x, inside the field of view.
    points = grid.physical_points() @ domain[:3, :3].T + domain[:3, 3]
    index = points @ np.linalg.inv(grid.index_to_physical)[:3, :3].T + np.linalg.inv(grid.index_to_physical)[:3, 3]
    inside = ((index >= 1) & (index <= np.array(grid.shape[::-1]) - 2)).all(axis=-1)
    at = sample(torch.as_tensor(field.array)[None], grid, torch.as_tensor(points[inside])[None])[0].T.numpy()
    expected = at @ np.linalg.inv(domain[:3, :3]).T
    got = np.moveaxis(moved.array, 0, -1)[inside]
    assert inside.mean() > 0.5 and np.abs(got - expected).max() < 0.3
    assert np.abs(got - np.moveaxis(field.array, 0, -1)[inside]).max() > 1  # the domain really moved


def _outputs(folder):
    fields = {p.name: p.read_bytes() for p in sorted(folder.glob("*.nii.gz"))}
    sidecars = {}
    for p in sorted(folder.glob("*.json")):
        record = json.loads(p.read_text())
        record.pop("seconds")
        sidecars[p.name] = record
    return fields, sidecars


def test_batch_is_reproducible_across_workers_and_resumes(tmp_path, train_labels):
    calls = []
    options = {"seed": 3, "mesh_size": COARSE, "augment": 1}
    one = sim_run.simulate(tmp_path / "one", 2, train_labels, workers=1, progress=lambda d, n: calls.append((d, n)), **options)
    two = sim_run.simulate(tmp_path / "two", 2, train_labels, workers=2, **options)
    assert one.written == two.written == [0, 1] and not one.failed
    assert calls[0] == (0, 2) and calls[-1] == (2, 2)
    fields, sidecars = _outputs(tmp_path / "one")
    assert sorted(fields) == ["sim_000000.nii.gz", "sim_000000_aug1.nii.gz", "sim_000001.nii.gz", "sim_000001_aug1.nii.gz"]
    assert (fields, sidecars) == _outputs(tmp_path / "two")  # byte-identical fields, same sidecars

    # The file is an ITK displacement field on the chosen fixed label's grid, affine removed.
    record = sidecars["sim_000000.json"]
    assert record["fixed_labels"] in train_labels
    path = tmp_path / "one" / "sim_000000.nii.gz"
    image = sitk.ReadImage(str(path))
    assert image.GetPixelID() == sitk.sitkVectorFloat32 and image.GetNumberOfComponentsPerPixel() == 3
    field = read_field(path)
    assert Grid.of(Volume.read(record["fixed_labels"])).matches(field)
    local = Volume(field.array.astype(np.float64), field.spacing, field.origin, field.direction)
    assert _affine_motion_mm(fit_affine(local), Grid.of(field)) < AFFINE_TOLERANCE_MM + 1e-4  # float32 rounding
    assert jacobian_determinant(field).min() > 0 and record["fields"][0]["detj_min"] > 0
    assert record["max_displacement_mm"] > 1 and -0.2 < record["gland_volume_change"] < 0

    # Resume: nothing is recomputed; a larger n computes only the new index.
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "one").iterdir()}
    again = sim_run.simulate(tmp_path / "one", 2, train_labels, workers=1, **options)
    assert again.written == [] and again.skipped == [0, 1]
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "one").iterdir()} == stamps
    more = sim_run.simulate(tmp_path / "one", 3, train_labels, workers=1, **options)
    assert more.written == [2] and more.skipped == [0, 1]


def test_failed_simulation_is_retried_then_reported_and_not_written(tmp_path, train_labels, monkeypatch):
    seen = []

    def diverge(mesh, params):
        seen.append(params)
        raise NotConverged("test: diverged")

    monkeypatch.setattr(sim_run, "solve_model", diverge)
    with pytest.raises(sim_run.SimulationFailed, match="all 3 attempts failed"):
        sim_run.simulate_one(tmp_path, 0, train_labels, seed=1, mesh_size=COARSE)
    assert len(seen) == 3 and len({p.probe_translation for p in seen}) == 3  # new scenario each attempt
    assert list(tmp_path.iterdir()) == []


def _parse(argv, data_root):
    import argparse

    parser = argparse.ArgumentParser(prog="priorreg")
    parser.add_argument("--data-root")
    sim_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["--data-root", str(data_root), *argv])


def test_cli_uses_training_labels_and_reports_errors(tmp_path, shared_data, capsys):
    args = _parse(["simulate", "--out", str(tmp_path / "sims"), "--n", "1"], shared_data)
    splits = data.split_by_patient(data.mrus_pairs(shared_data))
    assert sim_cli.fixed_label_files(args) == [p.fixed_labels for p in splits["train"]]
    held_out = {p.fixed_labels for p in splits["val"] + splits["test"]}
    assert held_out and not held_out & set(sim_cli.fixed_label_files(args))

    (tmp_path / "empty").mkdir()
    bad = _parse(["simulate", "--out", str(tmp_path / "sims"), "--n", "1", "--fixed-labels", str(tmp_path / "empty")], shared_data)
    assert bad.func(bad) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("priorreg simulate: error:") and "no label files" in err[-1]
    assert not (tmp_path / "sims").exists()

    glob = str(shared_data / "mrus_prostate" / "fixed_labels" / "obs00[0-1].nii.gz")
    ok = _parse(["simulate", "--out", str(tmp_path / "sims"), "--n", "1", "--fixed-labels", glob, "--seed", "2"], shared_data)
    assert ok.func(ok) == 0
    assert (tmp_path / "sims" / "sim_000000.nii.gz").is_file() and (tmp_path / "sims" / "sim_000000.json").is_file()
    out = capsys.readouterr().out
    assert "1 written, 0 already done, 0 failed, from 2 fixed labels" in out
    sidecar = json.loads((tmp_path / "sims" / "sim_000000.json").read_text())
    median = f"local |u| in the gland, median per simulation (mm): {sidecar['local_gland_median_mm']:.3g} / "
    assert "1 simulations in" in out and median in out  # the summary reads the sidecars
