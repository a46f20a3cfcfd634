"""Batch driver: many simulations in parallel, reproducible, resumable.

Simulation `i` of a batch with seed `s` draws everything random (the fixed label, the scenario,
the augmentation domains) from `numpy.random.default_rng([s, i, attempt])`, so its outputs do
not depend on how many workers run or in which order, and a batch can be extended with a
larger `n` or resumed after a kill. Its files are written atomically (temporary file, then
rename), the fields first and the sidecar JSON last: an index counts as done exactly when its
sidecar exists.

A scenario whose mesh cannot be built, whose Newton solve does not converge, or whose sampled
field folds (det J <= 0 anywhere) is an attempt that failed: the index is retried with the next
attempt's seed, and after `MAX_ATTEMPTS` it is reported in `BatchReport.failed`, with nothing
written for it.

Outputs per index `i` in `out_dir`:
- `sim_{i:06d}.nii.gz`: the local inverse DDF (global affine removed, `fields.decompose`) on the
  chosen fixed label's grid, an ITK displacement field (3 components, float32, mm, LPS).
- `sim_{i:06d}_aug{k}.nii.gz`, k = 1..augment: the same simulation sampled on randomly moved
  fields of view (sampling-domain augmentation), affine removed, on the same grid.
- `sim_{i:06d}.json`: parameters, seed, fixed label, and the checks (max displacement, det J
  range, gland volume change, field-of-view coverage).
"""

from __future__ import annotations

import json
import multiprocessing
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..files import atomic_write
from ..grid import Grid
from ..jacobian import jacobian_determinant
from ..volume import Volume
from .fem import NotConverged, solve_model
from .fields import MRUS_ORIENTATION, decompose, fe_to_image, gland_box, random_domain
from .mesh import MeshingError, build_mesh
from .params import MESH_SIZE, sample_parameters

MAX_ATTEMPTS = 3


class SimulationFailed(RuntimeError):
    """Every attempt of one simulation failed; the message lists why."""


@dataclass
class BatchReport:
    """Indices written by this call, skipped because already done, and failed (index -> reason)."""

    written: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)


def field_path(out_dir: Path, index: int, augmented: int = 0) -> Path:
    return Path(out_dir) / (f"sim_{index:06d}.nii.gz" if augmented == 0 else f"sim_{index:06d}_aug{augmented}.nii.gz")


def sidecar_path(out_dir: Path, index: int) -> Path:
    return Path(out_dir) / f"sim_{index:06d}.json"


def simulate(
    out_dir,
    n: int,
    fixed_labels: Sequence,
    seed: int = 0,
    workers: int = 1,
    progress: Callable[[int, int], None] | None = None,
    resume: bool = True,
    augment: int = 0,
    mesh_size: tuple = MESH_SIZE,
) -> BatchReport:
    """Run simulations `0 .. n-1` into `out_dir` over `workers` processes.

    `fixed_labels` are TRUS label files (4D, channel 0 the gland) whose grids and gland boxes
    define the fields of view; they are checked before anything runs. `progress(done, n)` is
    called once at the start and after every finished index (written, skipped or failed).
    With `resume`, indices whose sidecar exists are skipped.
    """
    if n < 1 or workers < 1 or augment < 0:
        raise ValueError(f"need n >= 1, workers >= 1 and augment >= 0, got n={n}, workers={workers}, augment={augment}")
    labels = sorted({str(p) for p in fixed_labels})
    if not labels:
        raise ValueError("no fixed label files given")
    for path in labels:
        gland_box(Volume.read(path))  # a missing, unreadable or empty label fails here, not in a worker
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = BatchReport()
    todo = []
    for index in range(n):
        (report.skipped if resume and sidecar_path(out_dir, index).exists() else todo).append(index)
    done = len(report.skipped)
    if progress:
        progress(done, n)
    if not todo:
        return report
    # Always worker processes, even for one worker: the same code path gives the same bytes.
    # Spawned, not forked: a fork of a process whose threads (torch, OpenMP) are running can deadlock.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=context, initializer=_single_thread) as pool:
        futures = {pool.submit(simulate_one, out_dir, index, labels, seed, augment, mesh_size): index for index in todo}
        try:
            for future in as_completed(futures):
                index = futures[future]
                try:
                    future.result()
                    report.written.append(index)
                except SimulationFailed as e:
                    report.failed[index] = str(e)
                done += 1
                if progress:
                    progress(done, n)
        except BaseException:  # a bug or Ctrl-C: stop now rather than after every queued simulation
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    report.written.sort()
    return report


def _single_thread() -> None:
    """One thread per worker process: the workers are the parallelism."""
    import torch

    torch.set_num_threads(1)


def simulate_one(out_dir, index: int, fixed_labels: Sequence[str], seed: int, augment: int = 0, mesh_size: tuple = MESH_SIZE) -> dict:
    """Simulation `index`: solve, sample, check, write its fields and sidecar; return the sidecar."""
    reasons = []
    for attempt in range(MAX_ATTEMPTS):
        start = time.perf_counter()
        rng = np.random.default_rng([seed, index, attempt])
        label_path = fixed_labels[int(rng.integers(len(fixed_labels)))]
        params = sample_parameters(rng, mesh_size)
        labels = Volume.read(label_path)
        grid = Grid.of(labels)
        domains = [None] + [random_domain(grid, rng) for _ in range(augment)]
        try:
            solution = solve_model(build_mesh(params), params)
            to_image = fe_to_image(solution, gland_box(labels), MRUS_ORIENTATION)
            samples = [_local_field(solution, to_image, grid, d) for d in domains]
        except (MeshingError, NotConverged) as e:
            reasons.append(f"attempt {attempt}: {e}")
            continue
        folded = [k for k, s in enumerate(samples) if s["detj_min"] <= 0]
        if folded:
            reasons.append(f"attempt {attempt}: sampled field {folded[0]} folds (det J {samples[folded[0]]['detj_min']:.3f})")
            continue
        main = samples[0]
        gland = labels.channel(0).array >= 0.5
        magnitude = np.linalg.norm(main["local"].array, axis=0)[gland]
        record = {
            "index": index,
            "seed": seed,
            "attempt": attempt,
            "fixed_labels": str(label_path),
            "parameters": params.as_dict(),
            "mesh": {"nodes": len(solution.mesh.nodes), "tetrahedra": len(solution.mesh.tets)},
            "solver": {"load_steps": solution.steps, "newton_iterations": solution.newton_iterations},
            "element_jacobian_min": float(solution.element_jacobians.min()),
            "gland_volume_change": solution.volume_change(),
            "fe_to_image": to_image.tolist(),
            "max_displacement_mm": main["max_displacement_mm"],
            "max_local_displacement_mm": float(np.linalg.norm(main["local"].array, axis=0).max()),
            "local_gland_median_mm": float(np.median(magnitude)),
            "local_gland_p95_mm": float(np.percentile(magnitude, 95)),
            "fields": [],
        }
        for k, (sample, domain) in enumerate(zip(samples, domains)):
            path = field_path(out_dir, index, k)
            _write_field(sample["local"], path)
            record["fields"].append(
                {
                    "file": path.name,
                    "domain": None if domain is None else domain.tolist(),
                    "removed_affine": sample["affine"].tolist(),
                    "affine_fits": sample["affine_fits"],
                    "detj_min": sample["detj_min"],
                    "detj_max": sample["detj_max"],
                    "outside_fraction": sample["outside_fraction"],
                }
            )
        record["seconds"] = time.perf_counter() - start
        _write_json(record, sidecar_path(out_dir, index))
        return record
    raise SimulationFailed(f"simulation {index}: all {MAX_ATTEMPTS} attempts failed: " + "; ".join(reasons))


def _local_field(solution, to_image: np.ndarray, grid: Grid, domain) -> dict:
    """Sample on `grid` (moved by `domain`), remove the global affine, and measure the local field."""
    parts = decompose(solution, to_image, grid, domain)
    detj = jacobian_determinant(parts.local)[0].numpy()
    return {
        "local": parts.local,
        "affine": parts.affine,
        "affine_fits": parts.iterations,
        "outside_fraction": parts.outside_fraction,
        "max_displacement_mm": float(np.linalg.norm(parts.full.array, axis=0).max()),
        "detj_min": float(detj.min()),
        "detj_max": float(detj.max()),
    }


def _write_field(field: Volume, path: Path) -> None:
    """ITK displacement field, float32 components (half the size of float64, far below the FE error)."""
    Volume(field.array.astype(np.float32), field.spacing, field.origin, field.direction).write(path, vector=True)


def _write_json(record: dict, path: Path) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1) + "\n"), ".json")
