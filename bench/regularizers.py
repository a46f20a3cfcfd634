"""Seed 000's Table 1 on the shared MR-US data: adversarial vs bending energy vs L2 vs no regularization.

`python -m bench regularizers --data-root PATH --simulations DIR --models DIR --out DIR`
trains the four networks of `bench/configs/mrus_<regularizer>.yaml` into `--models`
(a finished model is reused, an interrupted one resumes from its checkpoint), then scores
each, with `identity` and `centres`, on the test patients of the same patient-level split
(never seen in training): landmark TRE median [IQR] and gland Dice median [IQR] as in the
paper, plus folding and SDlogJ. The networks see images only at test time.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from priorreg.evaluate import evaluate_task, versions
from priorreg.train import load_config, train

CONFIGS = Path(__file__).parent / "configs"
VARIANTS = ("adversarial", "bending", "l2", "none")


def trained_model(variant: str, models: Path, simulations, root, configs: Path = CONFIGS) -> Path:
    """The model file of one variant, training (or resuming) it first when it is not finished."""
    overrides = {"simulations": str(simulations)} if variant == "adversarial" else {}
    config = load_config(configs / f"mrus_{variant}.yaml", **overrides)
    config["data"]["root"] = str(root) if root else None
    out = models / f"mrus_{variant}"
    path = out / f"{config['name']}.safetensors"
    if not path.exists():
        print(f"training {variant} into {out}", file=sys.stderr)
        train(config, out, progress=lambda row, total: print(f"{variant} {row['iteration']}/{total}", file=sys.stderr))
    return path


def _median_iqr(values) -> str:
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=float)
    if not v.size:
        return ""
    q1, med, q3 = np.percentile(v, [25, 50, 75])
    return f"{med:.2f} [{q1:.2f}, {q3:.2f}]"


def table(reports: dict[str, dict]) -> str:
    lines = [
        "| method | pairs | landmarks | TRE mm, median [IQR] | gland Dice, median [IQR] | folding % | SDlogJ | s/pair |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in reports.items():
        tre = [t for p in r["pairs"] for t in p.get("tre_mm", [])]
        dice = [p["dice_mean"] for p in r["pairs"] if "dice_mean" in p]
        s = r["summary"]
        lines.append(
            f"| {name} | {s['n_pairs']} | {len(tre)} | {_median_iqr(tre)} | {_median_iqr(dice)} | "
            f"{s.get('folding_pct', 0):.3g} | {s.get('sdlogj', 0):.3g} | {s.get('seconds_per_pair', 0):.3g} |"
        )
    return "\n".join(lines) + "\n"


def run(root, simulations, models: Path, out: Path, split: str = "test", configs: Path = CONFIGS) -> str:
    reports = {}
    for name in ("identity", "centres"):
        reports[name] = evaluate_task("mrus_prostate", name, root, split=split)
    for variant in VARIANTS:
        model = trained_model(variant, models, simulations, root, configs)
        start = time.perf_counter()
        report = evaluate_task("mrus_prostate", "adversarial", root, split=split, options={"model": str(model), "device": "cpu"})
        report["model"] = str(model)
        report["card"] = json.loads(model.with_suffix(".json").read_text())["training"]
        reports[variant] = report
        print(f"{variant}: evaluated in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    (out / "mrus_regularizers.json").write_text(json.dumps(reports, indent=1, default=float) + "\n")
    text = (
        f"Run {time.strftime('%Y-%m-%d')}, {', '.join(f'{k} {v}' for k, v in versions().items())}.\n"
        f"Command: `python -m bench regularizers --simulations {simulations} --models {models} --out {out}`; "
        f"configs in `bench/configs/mrus_*.yaml`; MR-US patient-level split seed 0, `{split}` patients.\n\n" + table(reports)
    )
    (out / "mrus_regularizers.md").write_text(text)
    return text


def ship(results: Path, variant: str, name: str, dest: Path, baselines: list[Path] = ()) -> Path:
    """Copy a trained model into `dest` as `<name>` with its held-out figures in the card.

    The shipped card says where the weights came from (config, data, split, command) and
    what they measure on the test patients, from the same JSON the table was made from.
    `baselines`: `priorreg evaluate --json` reports of other methods on the same pairs
    (identity, centres), so the card says what the model adds.
    """
    from priorreg.models import load_model, save_model

    reports = json.loads(Path(results).read_text())
    # a Table 1 file (one report per variant), or one `priorreg evaluate --json` report
    report = reports if "pairs" in reports else reports[variant]
    tensors, card, _ = load_model(report["model"])
    tre = [t for p in report["pairs"] for t in p.get("tre_mm", [])]
    dice = [p["dice_mean"] for p in report["pairs"] if "dice_mean" in p]
    card["name"] = name
    mrus = report.get("task", "mrus_prostate") == "mrus_prostate"
    card["metrics"] = {
        "split": report.get("split"),
        "test_patients": (card["training"].get("patients") or card["training"]["split"])["test"],  # Deform-GAN's: sets
        "summary": report["summary"],
        **({"tre_median_iqr_mm": _median_iqr(tre)} if tre else {}),
        **({("gland_dice_median_iqr" if mrus else "dice_median_iqr"): _median_iqr(dice)} if dice else {}),
        "baselines": {
            **{k: reports[k]["summary"] for k in ("identity", "centres") if k in reports and "pairs" not in reports},
            **{_baseline_name(b): b["summary"] for b in (_baseline(path, report) for path in baselines)},
        },
        "source": f"evaluation report {Path(results).name}",
    }
    return save_model(dest / f"{name}.safetensors", tensors, card)


def _baseline_name(report: dict) -> str:
    """The method, fine-tuned on each pair where it was, and the expert labels it was given where it was
    (a label-driven reference, not a method)."""
    steps = (report.get("options") or {}).get("finetune_steps")
    method = f"{report['method']} fine-tuned {steps} steps on each pair" if steps else report["method"]
    channels, roles = report.get("label_channels"), report.get("label_roles") or ["fixed", "moving"]
    if not channels:
        return method
    whose = "" if len(roles) == 2 else f" of the {roles[0]} image"
    return f"{method} with expert label channels {channels}{whose}"


def _baseline(path: Path, report: dict) -> dict:
    """A baseline's evaluation report, refused when it was made on other pairs than `report`."""
    baseline = json.loads(Path(path).read_text())
    if [p["id"] for p in baseline["pairs"]] != [p["id"] for p in report["pairs"]]:
        raise ValueError(f"{path}: its pairs are not the model's evaluation pairs")
    return baseline
