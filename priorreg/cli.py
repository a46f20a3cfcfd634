"""The `priorreg` command line: register, warp, score, evaluate-field, evaluate, train, simulate.

Every command reads and writes files through `Volume` (geometry kept), validates
all inputs before writing anything, and reports errors as one line naming the
file and the problem (exit code 2), never as a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from tqdm import tqdm

from . import data
from .evaluate import TASKS, evaluate_task, pair_metrics, summarise, versions
from .jacobian import jacobian_volume
from .methods import METHODS
from .methods.common import SIMILARITIES
from .methods.dip import NETWORKS as DIP_NETWORKS
from .models import FINETUNED
from .registration import Cancelled, Progress, register
from .simulate import cli as simulate_cli
from .spatial import Grid, read_field, resample, write_field
from .volume import Volume, VolumeError

DIP_NETWORK_HELP = "dip: coords (default: noise and voxel coordinates in) or paper (seed 003's: noise in, weights N(0, 0.01))"
OPTIMISED = ("iterative", "dip")  # per-pair optimisers, no model: --init, --similarity, --levels/--steps
LABEL_DRIVEN = (*OPTIMISED, "glands", "segreg")  # methods that take segmentations to align (--label-channels)
SEGMENTING = ("glands", "segreg")  # methods that segment an image whose labels are not given
SMOOTHED = (*OPTIMISED, "segreg")  # methods with a smoothness weight to set (--smooth-weight)
IMAGE_WEIGHTED = ("iterative", "segreg", "glands")  # methods weighing an image similarity beside their labels (--image-weight)
DEFAULT_MODELS = {  # --method -> shipped model
    "adversarial": "adversarial_mrus",
    "airnet": "airnet_mrus",
    "symmetric": "symmetric_hippocampus",
    "deformgan": "deformgan_brain",
    "glands": "glands_mrus",
    "segreg": "segreg_hippocampus",
}


def _progress_bar(total_desc: str):
    """A tqdm bar fed by a method's progress callback (the Slicer module uses the same callback)."""

    bar = None

    def update(p: Progress) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=p.total, desc=total_desc, unit="step", file=sys.stderr)
        bar.set_postfix(stage=p.stage, loss=f"{p.loss:.4f}", refresh=False)
        bar.update(1)
        if p.step >= p.total:
            bar.close()

    return update


def _write_json(obj, path: str | None) -> None:
    text = json.dumps(obj, indent=2, default=float)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n")
    else:
        print(text)


def _method_options(args) -> dict:
    """Options every learned or optimised method takes: the device, and the model file for networks."""
    if args.smooth_mm is not None and args.method != "symmetric":
        raise VolumeError(f"--smooth-mm is for --method symmetric, not {args.method}")
    if args.smooth_weight is not None and args.method not in SMOOTHED:
        raise VolumeError(f"--smooth-weight is for --method {', '.join(SMOOTHED)}, not {args.method}")
    if args.image_weight is not None and args.method not in IMAGE_WEIGHTED:
        raise VolumeError(f"--image-weight is for --method {', '.join(IMAGE_WEIGHTED)}, not {args.method}")
    given = {"smooth_mm": args.smooth_mm, "smooth_weight": args.smooth_weight, "image_weight": args.image_weight}
    weights = {k: v for k, v in given.items() if v is not None}
    if args.method in OPTIMISED:
        return {"device": args.device, **weights}
    if args.method in DEFAULT_MODELS:
        return {"device": args.device, "model": args.model or DEFAULT_MODELS[args.method], **weights}
    return {}


def _finetune_options(args) -> dict:
    """Test-time fine-tuning of a trained network (its similarity, when given: `_similarity_option`)."""
    if args.finetune_steps < 0:
        raise VolumeError(f"--finetune-steps: 0 or more, got {args.finetune_steps}")
    if args.method not in FINETUNED or not args.finetune_steps:
        return {}
    return {"finetune_steps": args.finetune_steps}


def _schedule_options(args) -> dict:
    """The coarse-to-fine schedule of dip and iterative (DIP's time budget and network too), where given (the method's defaults otherwise)."""
    given = {
        name: value
        for name, value in (
            ("levels", args.levels), ("steps", args.steps), ("max_seconds", args.max_seconds), ("network", args.dip_network)
        )
        if value is not None
    }
    if args.max_seconds is not None and args.method != "dip":
        raise VolumeError(f"--max-seconds is DIP's time budget; --method {args.method} has none")
    if args.dip_network is not None and args.method != "dip":
        raise VolumeError(f"--dip-network is DIP's network; --method {args.method} has none")
    if given and args.method not in OPTIMISED:
        raise VolumeError(f"--levels and --steps are the schedule of dip and iterative; --method {args.method} has its own")
    if ("levels" in given) != ("steps" in given) or len(given.get("levels", ())) != len(given.get("steps", ())):
        raise VolumeError("give --levels and --steps together, one step count per level (e.g. --levels 2 1 --steps 200 100)")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}


def _similarity_option(args) -> dict:
    """--similarity for iterative, dip and fine-tuning, only when given (each has its default); refused where it would be ignored."""
    if not args.similarity:
        return {}
    if args.method in OPTIMISED or (args.method in FINETUNED and args.finetune_steps):
        return {"similarity": args.similarity}
    raise VolumeError(
        f"--similarity is for iterative, dip, and --finetune-steps of {', '.join(FINETUNED)}; not for --method {args.method}"
    )


def _chosen_labels(args, fixed_labels, moving_labels) -> dict:
    """The labels given, restricted to --label-channels (none without it; an error with it and no labels)."""
    if args.label_channels is None:
        return {}
    given = {"fixed_labels": fixed_labels, "moving_labels": moving_labels}
    chosen = {k: data.select_channels(v, args.label_channels) for k, v in given.items() if v is not None}
    if not chosen:
        raise VolumeError("--label-channels needs --fixed-labels and/or --moving-labels")
    return chosen


def _driving_labels(args, fixed_labels, moving_labels) -> dict:
    """The label channels chosen with --label-channels, as the method's driving labels."""
    chosen = _chosen_labels(args, fixed_labels, moving_labels)
    if chosen and len(chosen) < 2:
        raise VolumeError("--label-channels needs both fixed and moving labels")
    return chosen


def cmd_register(args) -> int:
    if Path(args.out).exists() and not Path(args.out).is_dir():  # found now, not after the registration
        raise VolumeError(f"--out {args.out}: a file is there; give a folder (made if missing)")
    if args.sample:
        pair = data.sample_pair(args.sample, args.data_root)
        fixed_path, moving_path = pair.fixed, pair.moving
        fixed_labels_path, moving_labels_path = pair.fixed_labels, pair.moving_labels
    else:
        if not (args.fixed and args.moving):
            raise VolumeError("give --fixed and --moving images, or --sample NAME")
        fixed_path, moving_path = args.fixed, args.moving
        fixed_labels_path, moving_labels_path = args.fixed_labels, args.moving_labels
    fixed, moving = Volume.read(fixed_path), Volume.read(moving_path)
    fixed_labels = Volume.read(fixed_labels_path) if fixed_labels_path else None
    moving_labels = Volume.read(moving_labels_path) if moving_labels_path else None
    options = {**_method_options(args), **_schedule_options(args), **_similarity_option(args)}
    if args.method in OPTIMISED:
        options["init"] = args.init
        options.update(_driving_labels(args, fixed_labels, moving_labels))
    elif args.method == "airnet":
        options["passes"] = args.passes
    elif args.method in SEGMENTING:  # a segmentation the user has replaces that image's prediction
        options.update(_chosen_labels(args, fixed_labels, moving_labels))
    elif args.method in FINETUNED and args.finetune_steps:
        options.update(_finetune_options(args))
        if args.method == "deformgan" and args.label_channels is not None:
            raise VolumeError("--label-channels: Deform-GAN fine-tunes on the images alone (its training loss), not on labels")
        options.update(_driving_labels(args, fixed_labels, moving_labels))
    print(f"registering {moving_path} -> {fixed_path} with {args.method}", file=sys.stderr)
    result = register(fixed, moving, method=args.method, progress=_progress_bar(args.method), **options)
    before = register(fixed, moving, method="identity")
    report = {
        "method": args.method,
        "fixed": str(fixed_path),
        "moving": str(moving_path),
        "seconds": result.seconds,
        "options": {k: v for k, v in options.items() if not isinstance(v, Volume)},
        "steps_run": len(result.history),
        "versions": versions(),
        "identity": pair_metrics(before.field, fixed, moving, fixed_labels, moving_labels),
        "registered": pair_metrics(result.field, fixed, moving, fixed_labels, moving_labels),
    }
    out = Path(args.out)
    write_field(result.field, out / "field.nii.gz")
    result.warped.write(out / "warped.nii.gz")
    jacobian_volume(result.field).write(out / "jacobian.nii.gz")
    if moving_labels is not None:
        resample(moving_labels, fixed, result.field).write(out / "warped_labels.nii.gz")
    _write_json(report, str(out / "metrics.json"))
    for name in ("identity", "registered"):
        m = report[name]
        shown = {k: round(v, 3) for k, v in m.items() if k in ("tre_rms_mm", "dice_mean", "hd95_mm", "folding_pct")}
        print(f"{name:>10}: {shown}")
    print(f"outputs in {out}/ (field.nii.gz is an ITK displacement field in mm, LPS; loads in Slicer)")
    return 0


def cmd_warp(args) -> int:
    moving, field = Volume.read(args.moving), read_field(args.field)
    reference = Grid.of(Volume.read(args.reference)) if args.reference else Grid.of(field)
    if not reference.matches(field):
        raise VolumeError(f"{args.field}: the field's grid differs from the reference image {args.reference}")
    mode = "nearest" if args.labels else None
    resample(moving, reference, field, mode=mode).write(args.out)
    print(f"wrote {args.out}")
    return 0


def cmd_evaluate_field(args) -> int:
    fixed, moving, field = Volume.read(args.fixed), Volume.read(args.moving), read_field(args.field)
    if not Grid.of(field).matches(fixed):
        raise VolumeError(f"{args.field}: a displacement field must lie on the fixed image's grid ({args.fixed})")
    fixed_labels = Volume.read(args.fixed_labels) if args.fixed_labels else None
    moving_labels = Volume.read(args.moving_labels) if args.moving_labels else None
    row = pair_metrics(field, fixed, moving, fixed_labels, moving_labels, intensity=args.intensity)
    _write_json({"pairs": [row], "summary": summarise([dict(row)])}, args.json)
    return 0


def cmd_evaluate(args) -> int:
    def on_pair(index, total, row):
        shown = {k: round(v, 3) for k, v in row.items() if isinstance(v, float) and k != "seconds"}
        print(f"[{index + 1}/{total}] {row['id']}: {shown}", file=sys.stderr)

    if args.task == "quality":
        from .quality import evaluate_quality

        def on_scored(index, total, row):
            print(f"[{index + 1}/{total}] {row['id']}: scored", file=sys.stderr)

        model = args.model or "airnet_mrus"
        report = evaluate_quality(args.data_root, args.split, args.per_pair, args.seed, model, on_scored, args.pairs)
        _write_json(report, args.json)
        print(json.dumps(report["summary"], indent=2))
        return 0
    options = {**_method_options(args), **_finetune_options(args), **_schedule_options(args), **_similarity_option(args)}
    if args.init:
        if args.method not in OPTIMISED:
            raise VolumeError(f"--init is for iterative and dip; --method {args.method} has its own")
        options["init"] = args.init
    if args.label_channels is not None and args.method not in LABEL_DRIVEN:
        raise VolumeError(f"--label-channels: --method {args.method} is not driven by labels (methods that are: {', '.join(LABEL_DRIVEN)})")
    if args.label_roles is not None:
        if args.label_channels is None:
            raise VolumeError("--label-roles says whose expert labels --label-channels takes: give --label-channels too")
        if len(set(args.label_roles)) < 2 and args.method not in SEGMENTING:
            raise VolumeError(
                f"--label-roles {args.label_roles[0]}: --method {args.method} needs both images' labels (only {' and '.join(SEGMENTING)} predict the other)"
            )
    roles = tuple(dict.fromkeys(args.label_roles or ("fixed", "moving")))
    if args.method == "glands" and args.label_channels is not None and len(roles) == 2:
        del options["model"]  # both expert glands given: no segmenter runs
    model = None
    if "model" in options:  # before any pair is registered: a wrong name fails now, not after the run
        from .models import resolve_model

        model = str(resolve_model(options["model"]))
    report = evaluate_task(
        args.task, args.method, args.data_root, args.pairs, args.split, args.seed, options, on_pair,
        label_channels=args.label_channels, label_roles=roles,
    )  # fmt: skip
    report["model"] = model
    _write_json(report, args.json)
    print(json.dumps(report["summary"], indent=2))
    return 0


def cmd_score(args) -> int:
    from .quality import QualityModel, quality_report

    fixed, warped = Volume.read(args.fixed), Volume.read(args.warped)
    field = read_field(args.field) if args.field else None
    inverse = read_field(args.inverse_field) if args.inverse_field else None
    if (args.fixed_labels is None) != (args.warped_labels is None):
        raise VolumeError("give both --fixed-labels and --warped-labels, or neither")
    fixed_labels = Volume.read(args.fixed_labels) if args.fixed_labels else None
    warped_labels = Volume.read(args.warped_labels) if args.warped_labels else None
    if field is not None and not Grid.of(field).matches(fixed):
        raise VolumeError(f"{args.field}: a displacement field must lie on the fixed image's grid ({args.fixed})")
    plausibility = None if args.plausibility == "none" else args.plausibility
    model = QualityModel(args.model, plausibility, args.device, glands=None if args.glands == "none" else args.glands)
    report = quality_report(fixed, warped, field, inverse, fixed_labels, warped_labels, model)
    report.update(fixed=str(args.fixed), warped=str(args.warped), model=str(model.airnet.path), versions=versions())
    _write_json(report, args.json)
    low, high = report["tre_interval_mm"]
    print(f"{report['verdict']}: estimated TRE {report['tre_estimate_mm']:.1f} mm (80% interval {low:.1f} to {high:.1f}), D-score {report['d_score']:.4f}")
    for reason in report["reasons"]:
        print(f"  {reason}")
    return 0


def cmd_calibrate(args) -> int:
    from .models import resolve_model
    from .quality import calibrate

    if args.per_pair < 1 or (args.pairs is not None and args.pairs < 1):
        raise VolumeError(f"--per-pair and --pairs: 1 or more, got {args.per_pair} and {args.pairs}")
    if args.out and not args.out.endswith(".safetensors"):
        raise VolumeError(f"--out: a .safetensors path (its card is written beside it), got {args.out}")
    path = resolve_model(args.model)
    pairs = data.split_by_patient(data.mrus_pairs(args.data_root))["val"][: args.pairs]
    if args.out:  # a calibrated copy: the model named stays as it was
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        for source, target in ((path, out), (path.with_suffix(".json"), out.with_suffix(".json"))):
            shutil.copyfile(source, target)
        path = out
    calibrate(path, pairs, args.per_pair, args.seed, None if args.glands == "none" else args.glands)
    card = json.loads(path.with_suffix(".json").read_text())
    print(json.dumps({"card": str(path.with_suffix(".json")), "validation": card["validation"]}, indent=2))
    return 0


def cmd_train(args) -> int:
    from .train import load_config, train

    overrides = {"simulations": args.simulations} if args.simulations else {}
    config = load_config(args.config, **overrides)
    if args.data_root:
        config["data"]["root"] = args.data_root
    if int(os.environ.get("RANK", "0")) != 0:
        train(config, args.out)
        _leave_torchrun_worker()
    bar = tqdm(total=config["iterations"], desc=f"train {config['name']}", unit="it", file=sys.stderr)

    def progress(row: dict, total: int) -> None:
        bar.total, bar.n = total, row["iteration"]
        shown = {k: round(row[k], 3) for k in ("loss", "label", "regularizer", "discriminator", "critic", "val_tre_median_mm", "val_dice") if k in row}
        bar.set_postfix(shown, refresh=True)
        validation = {k: v for k, v in row.items() if k.startswith("val_") and isinstance(v, float)}
        if validation:
            bar.write(f"iteration {row['iteration']}: " + ", ".join(f"{k} {v:.3f}" for k, v in validation.items()))

    try:
        last = train(config, args.out, progress)
    except KeyboardInterrupt:
        bar.close()
        print(f"priorreg train: interrupted; rerun the same command to resume from {Path(args.out) / 'checkpoint.safetensors'}", file=sys.stderr)
        return 130
    bar.close()
    print(f"model: {Path(args.out) / (config['name'] + '.safetensors')} (card beside it); log: {Path(args.out) / 'log.csv'}")
    print(json.dumps({k: v for k, v in last.items() if isinstance(v, (int, float))}))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _leave_torchrun_worker()
    return 0


def _leave_torchrun_worker():
    """End a torchrun worker whose training finished, without the interpreter's finalisation.

    Why: a CI run saw rank 1 of a finished two-process training abort (SIGABRT) while rank 0 was
    still ending, so torchrun reported the saved run as failed. The DDP wrappers keep gloo's
    process group and its C++ threads alive until Python tears itself down, and a C++ thread
    taking the GIL during that teardown aborts the process (pytorch/pytorch#179291); skipping the
    teardown removes that window. Everything is written and closed by now; only stdio needs flushing.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="priorreg", description=__doc__.splitlines()[0])
    p.add_argument("--data-root", help="shared data folder (default: $PRIORREG_DATA or ../shared/data)")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("register", help="register a moving image to a fixed image, write warped image, field, Jacobian, metrics")
    r.add_argument("--fixed")
    r.add_argument("--moving")
    r.add_argument("--fixed-labels", help="fixed labels for evaluation (and for --label-channels)")
    r.add_argument("--moving-labels")
    r.add_argument("--sample", choices=sorted({e["name"] for e in data.SAMPLES}), help="register a sample pair")
    r.add_argument("--method", default="iterative", choices=sorted(METHODS))
    r.add_argument(
        "--similarity",
        choices=SIMILARITIES,
        help="mi (mutual information) or local_gradient for two modalities; default: lncc for iterative and symmetric "
        "fine-tuning, mae for dip (the paper's), the card's for deformgan fine-tuning (lncc or local_gradient only), none "
        "for adversarial fine-tuning",
    )
    r.add_argument("--init", default="geometry", choices=["geometry", "centres"], help="iterative, dip (adversarial: its card's)")
    r.add_argument(
        "--label-channels", type=int, nargs="+",
        help="label channels that drive the registration, e.g. 0 (gland); glands, segreg: the segmentation(s) to use in place of the predicted (an integer map is taken whole)",
    )  # fmt: skip
    r.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    r.add_argument(
        "--finetune-steps", type=int, default=0,
        help="adversarial, symmetric, deformgan: fine-tune a copy of the network on this pair first (adversarial, symmetric: "
        "with --label-channels and/or --similarity; deformgan: on its training loss)",
    )  # fmt: skip
    r.add_argument(
        "--levels", type=float, nargs="+",
        help="dip, iterative (its deformable stage): downsampling factor of each level, coarse to fine (default: dip 2 1, iterative 4 2 1)",
    )
    r.add_argument("--steps", type=int, nargs="+", help="dip, iterative: optimisation steps at each level (default: dip 200 100, iterative 120 80 40)")
    r.add_argument("--max-seconds", type=float, help="dip: time budget, shared by the levels in proportion to their steps")
    r.add_argument("--dip-network", choices=DIP_NETWORKS, help=DIP_NETWORK_HELP)
    r.add_argument("--model", help="trained model name or .safetensors path (default: the method's shipped model, e.g. adversarial_mrus)")
    r.add_argument("--smooth-mm", type=float, help="symmetric: Gaussian (mm) on the predicted field (default: the model card's; 0: raw)")
    r.add_argument("--smooth-weight", type=float, help="iterative, dip, segreg: the field's smoothness weight (default: the method's)")
    r.add_argument("--image-weight", type=float, help="iterative, segreg, glands (its mutual information): the image similarity's weight beside the labels' (default: the method's)")
    r.add_argument("--passes", type=int, default=1, help="airnet: generator passes, each undoing the remaining misalignment")
    r.add_argument("--out", required=True, help="output folder")
    r.set_defaults(func=cmd_register)

    w = sub.add_parser("warp", help="apply a displacement field to an image or a label map")
    w.add_argument("--moving", required=True)
    w.add_argument("--field", required=True, help="ITK displacement field (mm) on the fixed grid")
    w.add_argument("--reference", help="fixed image whose grid the field lies on (checked)")
    w.add_argument("--labels", action="store_true", help="nearest-neighbour interpolation (label maps)")
    w.add_argument("--out", required=True)
    w.set_defaults(func=cmd_warp)

    q = sub.add_parser("score", help="quality report of a registered pair: D-score, estimated TRE (mm), verdict")
    q.add_argument("--fixed", required=True)
    q.add_argument("--warped", required=True, help="the moving image after registration (any grid; resampled onto the fixed)")
    q.add_argument("--field", help="the registration's displacement field on the fixed grid: Jacobian, plausibility")
    q.add_argument("--inverse-field", help="the inverse field on the moving grid: inverse consistency")
    q.add_argument("--fixed-labels")
    q.add_argument("--warped-labels", help="moving labels after registration: Dice")
    q.add_argument("--model", default="airnet_mrus", help="AIR-net model whose critic scores (name or .safetensors)")
    q.add_argument("--glands", default="glands_mrus", help="gland segmenters whose glands' offset catches gross misalignment, or none")
    q.add_argument("--plausibility", default="adversarial_mrus", help="adversarial model whose discriminator judges the field, or none")
    q.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    q.add_argument("--json", help="write the report here instead of standard output")
    q.set_defaults(func=cmd_score)

    e = sub.add_parser("evaluate-field", help="metrics of a given field on a given pair, as JSON")
    e.add_argument("--fixed", required=True)
    e.add_argument("--moving", required=True)
    e.add_argument("--field", required=True)
    e.add_argument("--fixed-labels")
    e.add_argument("--moving-labels")
    e.add_argument("--intensity", action="store_true", help="also SSIM and RMSE (same-modality pairs)")
    e.add_argument("--json", help="write here instead of standard output")
    e.set_defaults(func=cmd_evaluate_field)

    v = sub.add_parser("evaluate", help="register and score every pair of a shared data set")
    v.add_argument("--task", required=True, choices=sorted([*TASKS, "quality"]), help="quality: the critic's score against known MR-US errors")
    v.add_argument("--method", default="identity", choices=sorted(METHODS))
    v.add_argument("--pairs", type=int, help="a seeded sample of N pairs")
    v.add_argument("--split", default="all", choices=["all", "train", "val", "test"])
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    v.add_argument("--model", help="trained model name or .safetensors path (default: the method's shipped model, e.g. adversarial_mrus)")
    v.add_argument("--smooth-mm", type=float, help="symmetric: Gaussian (mm) on the predicted field (default: the model card's; 0: raw)")
    v.add_argument("--smooth-weight", type=float, help="iterative, dip, segreg: the field's smoothness weight (default: the method's)")
    v.add_argument("--image-weight", type=float, help="iterative, segreg, glands (its mutual information): the image similarity's weight beside the labels' (default: the method's)")
    v.add_argument("--finetune-steps", type=int, default=0, help="adversarial, symmetric, deformgan: fine-tune on each pair's images first")
    v.add_argument(
        "--similarity", choices=SIMILARITIES,
        help="iterative, dip: the image similarity; adversarial, symmetric, deformgan: that of --finetune-steps (default: the method's)",
    )
    v.add_argument(
        "--levels", type=float, nargs="+",
        help="dip, iterative (its deformable stage): downsampling factor of each level, coarse to fine (default: dip 2 1, iterative 4 2 1)",
    )
    v.add_argument("--steps", type=int, nargs="+", help="dip, iterative: optimisation steps at each level (default: dip 200 100, iterative 120 80 40)")
    v.add_argument("--max-seconds", type=float, help="dip: time budget, shared by the levels in proportion to their steps")
    v.add_argument("--dip-network", choices=DIP_NETWORKS, help=DIP_NETWORK_HELP)
    v.add_argument("--init", choices=["geometry", "centres"], help="iterative, dip: the starting alignment (default: the method's)")
    v.add_argument(
        "--label-channels", type=int, nargs="+",
        help="iterative, dip, glands: each pair's expert label channels drive the registration (an oracle for comparison, not a method)",
    )  # fmt: skip
    v.add_argument(
        "--label-roles", nargs="+", choices=["fixed", "moving"],
        help="whose expert labels --label-channels gives (default both); glands: 'moving' is the MR planning contour, the ultrasound gland predicted",
    )  # fmt: skip
    v.add_argument("--per-pair", type=int, default=20, help="quality: known-error alignments scored per pair")
    v.add_argument("--json", help="write the full report here")
    v.set_defaults(func=cmd_evaluate)

    c = sub.add_parser("calibrate", help="refit an AIR-net model's TRE calibration on the validation patients (writes its card)")
    c.add_argument("--model", required=True, help="AIR-net model (.safetensors, its .json card beside it; a shipped name calibrates the shipped card)")
    c.add_argument("--glands", default="none", help="gland segmenters whose misfit joins the critic's estimate (e.g. glands_mrus; opt-in: see README)")
    c.add_argument("--per-pair", type=int, default=40, help="known-error alignments per validation pair")
    c.add_argument("--pairs", type=int, help="the first N validation pairs only (default: all)")
    c.add_argument("--out", help="write a calibrated copy here (NAME.safetensors, its card beside it) instead of rewriting the model's card")
    c.add_argument("--seed", type=int, default=1)
    c.set_defaults(func=cmd_calibrate)

    t = sub.add_parser("train", help="train a registration network from a YAML config (also under torchrun)")
    t.add_argument("config", help="YAML config (keys: priorreg.train.DEFAULTS)")
    t.add_argument("--out", required=True, help="output folder: checkpoint, log.csv, the model and its card; rerun to resume")
    t.add_argument("--simulations", help="folder of simulated displacement fields (overrides the config)")
    t.set_defaults(func=cmd_train)

    simulate_cli.add_parser(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (VolumeError, OSError, ValueError, data.DownloadError) as e:  # OSError: a folder not writable, a full disk
        print(f"priorreg {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (Cancelled, KeyboardInterrupt):
        print(f"priorreg {args.command}: cancelled; no outputs written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
