"""`python -m bench airnet --models A.safetensors B.safetensors ... --out DIR`: AIR-net models compared.

For each model, on the test patients (never seen in training or calibration):
- the quality score against known errors through the user's path (`priorreg.quality.evaluate_quality`:
  warped images on the fixed grid, TRE from the landmark labels): Spearman, AUROC for TRE > 5 mm,
  the calibrated estimate's error;
- the paper's registration protocol (section 3.2) in the model frame: random perturbations of the
  reference alignment, landmark TRE before and after the generator (1 and 3 passes);
- registration from the `centres` initialisation (`priorreg evaluate --method airnet`), beside
  `centres` itself, as a user would run it.
Writes `airnet_mrus.md` and `airnet_mrus.json`; with `merge`, the models already there that are not
run now are kept (same test alignments: per-pair count and seed), and each row names its run.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from priorreg import data
from priorreg.evaluate import evaluate_task, versions
from priorreg.methods import airnet as air
from priorreg.quality import evaluate_quality
from priorreg.train_airnet import FramedPairs, known_error_evaluation


def evaluate_model(path: str, root, per_pair: int, seed: int, pairs: int | None = None) -> dict:
    """Everything above for one model; `pairs`: only the first N test pairs (a seeded sample of N from centres)."""
    model = air.LoadedAirNet.load(path, "cpu")
    test = data.split_by_patient(data.mrus_pairs(root))["test"][:pairs]
    framed = FramedPairs(test, model.frame, model.card["preprocessing"]["init"])
    out: dict = {"model": str(path), "card": {k: model.card[k] for k in ("architecture", "perturbation")}}
    critic = model.card.get("training", {}).get("config", {}).get("critic", {})
    out["critic_mode"] = critic.get("mode") if critic.get("wasserstein", True) else "regression"
    out["validation"] = model.card.get("validation")
    quality = evaluate_quality(root, "test", per_pair, seed, path, n_pairs=pairs)
    out["quality"] = quality["summary"]
    for passes in (1, 3):
        out[f"recovery_{passes}"] = known_error_evaluation(
            model.generator, model.critic, model.card, framed, per_pair, seed, "cpu", passes
        )
    for method, options in (("centres", {}), ("airnet", {"model": str(path), "device": "cpu", "passes": 3})):
        report = evaluate_task("mrus_prostate", method, root, pairs, split="test", options=options)
        out[f"from_centres_{method}"] = {k: report["summary"].get(k) for k in ("tre_median_mm", "tre_iqr_low_mm", "tre_iqr_high_mm", "dice_mean")}
    return out


def run(
    models: list[str], root, out: Path, per_pair: int = 20, seed: int = 100, merge: bool = False, command: str = "", pairs: int | None = None
) -> str:
    torch.set_num_threads(2)
    start = time.perf_counter()
    path = out / "airnet_mrus.json"
    previous = json.loads(path.read_text()) if merge and path.exists() else {"runs": [], "results": []}
    if previous["results"] and (previous["per_pair"], previous["seed"], previous.get("pairs")) != (per_pair, seed, pairs):
        raise ValueError(
            f"--merge: {path} scored other alignments (per pair {previous['per_pair']}, seed {previous['seed']}, pairs {previous.get('pairs')})"
        )
    index = len(previous["runs"])
    results = []
    for model in models:
        results.append({**evaluate_model(model, root, per_pair, seed, pairs), "run": index})
        print(f"{model}: done", file=sys.stderr)
    now = {Path(r["model"]).stem for r in results}
    results = [r for r in previous["results"] if Path(r["model"]).stem not in now] + results
    runs = [*previous["runs"], {"date": time.strftime("%Y-%m-%d"), "command": command, "seconds": round(time.perf_counter() - start)}]
    out.mkdir(parents=True, exist_ok=True)
    report = {"versions": versions(), "per_pair": per_pair, "seed": seed, "pairs": pairs, "runs": runs, "results": results}
    path.write_text(json.dumps(report, indent=1) + "\n")
    lines = [
        f"On the test patients ({f'{pairs} pairs' if pairs else 'every pair'}), {per_pair} known-error alignments per pair, seed {seed}; "
        "`run` says which run scored each row:",
        "",
        *(f"- run {i}: {r['date']}, {r['seconds']} s, `{r['command']}`" for i, r in enumerate(runs) if any(x["run"] == i for x in results)),
        "",
        "| model | run | critic | val Spearman | test Spearman | test AUROC (TRE > 5 mm) | MI Spearman, AUROC (peer) | estimate MAE mm | "
        "within 1.5 mm | TRE before mm | after 1 pass | after 3 passes | from centres: TRE median mm | centres alone |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        q, one, three = r["quality"], r["recovery_1"], r["recovery_3"]
        val = (r["validation"] or {}).get("spearman", float("nan"))
        lines.append(
            f"| {Path(r['model']).stem} | {r['run']} | {r['critic_mode']} | {val:.2f} | {q['spearman']:.2f} | {q['auroc']:.3f} | "
            f"{q['mi_spearman']:.2f}, {q['mi_auroc']:.3f} | "
            f"{q.get('calibration_mae_mm', float('nan')):.2f} | {q.get('within_1_5mm', float('nan')):.2f} | "
            f"{one['tre_before_mm']:.2f} | {one['tre_after_mm']:.2f} | {three['tre_after_mm']:.2f} | "
            f"{r['from_centres_airnet']['tre_median_mm']:.2f} | {r['from_centres_centres']['tre_median_mm']:.2f} |"
        )
    text = "\n".join(lines) + "\n"
    (out / "airnet_mrus.md").write_text(text)
    return text


def ship(results: Path, model: str, name: str, dest: Path) -> Path:
    """Copy one compared model into `dest` as `<name>`, its test figures from `airnet_mrus.json` in the card."""
    from priorreg.models import load_model, save_model

    report = json.loads(Path(results).read_text())
    chosen = [r for r in report["results"] if Path(r["model"]).stem == Path(model).stem]
    if not chosen:
        raise SystemExit(f"{model} is not in {results}")
    tensors, card, _ = load_model(chosen[0]["model"])
    card["name"] = name
    card["metrics"] = {
        "split": "test",
        "test_patients": card["training"]["patients"]["test"],
        "quality": chosen[0]["quality"],
        "registration_from_perturbations": {"one_pass": chosen[0]["recovery_1"], "three_passes": chosen[0]["recovery_3"]},
        "registration_from_centres": {"airnet_3_passes": chosen[0]["from_centres_airnet"], "centres": chosen[0]["from_centres_centres"]},
        "source": f"{Path(results).name} (python -m bench airnet)",
    }
    return save_model(dest / f"{name}.safetensors", tensors, card)
