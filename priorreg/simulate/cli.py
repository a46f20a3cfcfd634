"""`priorreg simulate`: write a folder of simulated local displacement fields for training.

`add_parser(subparsers)` adds the sub-command to the main parser; `run(args)` executes it with
a progress bar and returns the exit code: 0 when every simulation was written (or already
there), 1 when some failed (each reported on one line), 2 for bad input (one line, nothing run).

By default the fields of view come from the fixed (TRUS) labels of the *training* patients of
the MR-US set, split exactly as `priorreg train` splits it, so no validation or test label
shapes the regularising distribution.
"""

from __future__ import annotations

import argparse
import glob
import sys
from pathlib import Path

from .. import data
from ..volume import VolumeError

_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "simulate",
        help="finite-element simulations of TRUS-probe prostate motion: local displacement fields for adversarial training",
    )
    p.add_argument("--out", required=True, help="output folder (sim_NNNNNN.nii.gz fields and .json sidecars)")
    p.add_argument("--n", type=int, required=True, help="number of simulations (indices 0..N-1)")
    # SUPPRESS: do not overwrite a --data-root given before the sub-command.
    p.add_argument("--data-root", default=argparse.SUPPRESS, help="shared data folder (default: $PRIORREG_DATA or ../shared/data)")
    p.add_argument("--fixed-labels", help="TRUS label files instead of the MR-US set: a folder or a glob pattern")
    p.add_argument("--split", default="train", choices=["train", "val", "test", "all"], help="MR-US patients whose labels are used")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the patient split (as priorreg train's data.split_seed)")
    p.add_argument("--seed", type=int, default=0, help="seed of the simulations (same seed, same fields)")
    p.add_argument("--workers", type=int, default=1, help="parallel processes")
    p.add_argument("--augment", type=int, default=0, help="extra fields per simulation on randomly moved fields of view")
    p.add_argument("--restart", action="store_true", help="recompute indices already done (default: resume)")
    p.set_defaults(func=run)
    return p


def fixed_label_files(args) -> list[Path]:
    """The label files the command will use (see the module docstring)."""
    if args.fixed_labels:
        given = Path(args.fixed_labels)
        if given.is_dir():
            files = sorted(f for f in given.iterdir() if f.name.endswith(_SUFFIXES))
        else:
            files = sorted(Path(f) for f in glob.glob(args.fixed_labels))
        if not files:
            raise FileNotFoundError(f"{args.fixed_labels}: no label files ({', '.join(_SUFFIXES)})")
        return files
    pairs = data.mrus_pairs(getattr(args, "data_root", None))
    if args.split != "all":
        pairs = data.split_by_patient(pairs, seed=args.split_seed)[args.split]
    return [p.fixed_labels for p in pairs]


def run(args) -> int:
    from tqdm import tqdm

    try:
        from .run import simulate
    except ImportError as e:
        print(f"priorreg simulate: error: {e.msg}; install the simulator with: pip install 'priorreg[sim]'", file=sys.stderr)
        return 2
    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, initial=done, desc="simulate", unit="sim", file=sys.stderr)
        bar.update(done - bar.n)

    try:
        labels = fixed_label_files(args)
        report = simulate(args.out, args.n, labels, args.seed, args.workers, progress, not args.restart, args.augment)
    except (VolumeError, FileNotFoundError, ValueError) as e:
        print(f"priorreg simulate: error: {e}", file=sys.stderr)
        return 2
    finally:
        if bar is not None:
            bar.close()
    for _, reason in sorted(report.failed.items()):
        print(f"priorreg simulate: failed: {reason}", file=sys.stderr)
    print(
        f"{len(report.written)} written, {len(report.skipped)} already done, {len(report.failed)} failed, "
        f"from {len(labels)} fixed labels; fields in {args.out}"
    )
    print(summary(Path(args.out)))
    return 1 if report.failed else 0


def summary(folder: Path) -> str:
    """Plausibility figures over every simulation in `folder` (from the sidecars): 5th, 50th, 95th percentiles."""
    import json

    import numpy as np

    sidecars = [json.loads(p.read_text()) for p in sorted(folder.glob("sim_*.json"))]
    if not sidecars:
        return "no simulations yet"
    rows = {
        "local |u| in the gland, median per simulation (mm)": [s["local_gland_median_mm"] for s in sidecars],
        "local |u| in the gland, 95th percentile per simulation (mm)": [s["local_gland_p95_mm"] for s in sidecars],
        "max |u| before affine removal (mm)": [s["max_displacement_mm"] for s in sidecars],
        "gland volume change (%)": [100 * s["gland_volume_change"] for s in sidecars],
        "min det J of the written local fields": [min(f["detj_min"] for f in s["fields"]) for s in sidecars],
        "seconds per simulation": [s["seconds"] for s in sidecars],
    }
    lines = [f"{len(sidecars)} simulations in {folder}; 5th / 50th / 95th percentile:"]
    for name, values in rows.items():
        p5, p50, p95 = np.percentile(values, [5, 50, 95])
        lines.append(f"  {name}: {p5:.3g} / {p50:.3g} / {p95:.3g}")
    return "\n".join(lines)
