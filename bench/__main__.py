"""`python -m bench run --suite accuracy --data-root PATH --out DIR`: every method and peer, same pairs.

`python -m bench regularizers ...` reruns seed 000's Table 1 (see `bench/regularizers.py`);
`python -m bench speed ...` times registrations against volume size (see `bench/speed.py`);
`python -m bench readme` copies `results.md` into the README (see `bench/readme.py`);
`python -m bench reproduce` reruns every figure the README reports (see `bench/reproduce.py`).

Writes `DIR/<task>.json` (ARCHITECTURE.md's evaluation format, one entry per
method), `DIR/<task>.md` (the run's date, machine, versions and command, and the table),
`DIR/results.md` (every suite's latest `<task>.md`: the tables the README quotes) and
`DIR/<task>.png` (box plots per method). Peers whose package is missing are listed as missing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from priorreg.cli import DEFAULT_MODELS
from priorreg.evaluate import evaluate_task, versions
from priorreg.methods import METHODS
from priorreg.models import available_models

from .peers import PEERS, THREADS, missing

ROOT = Path(__file__).resolve().parent.parent

# Suites: task -> seeded pair count by default, on the test split (patients or subjects no model trained on).
# Sized for one 2-core CPU run of every method and peer in about half an hour; raise with --pairs.
ACCURACY = {
    "hippocampus": {"pairs": 8, "split": "test"},
    "mrus_prostate": {"pairs": 5, "split": "test"},
    # Known deformations of co-registered scans (seed 002), split by set: the test split is the held-back tumour study 3
    # (Deform-GAN trains on the other two), T1 -> T2 and T1 -> FLAIR under two seeded deformations each.
    "brain_t1t2": {"pairs": 4, "split": "test"},
    # Atlas-to-subject at 160x192x224 (seed 003's experiment): the data has 2 labelled subjects, and no model trains on OASIS.
    "oasis": {"pairs": 2, "split": "all"},
}
# Per-task options for PriorReg's methods (MR and TRUS headers are in unrelated frames).
OPTIONS = {
    # DIP's smoothness 0.5, not its 0.1, then mutual information, not LNCC: chosen on the validation patients (README,
    # "Command line", `dip`).
    "mrus_prostate": {"iterative": {"init": "centres"}, "dip": {"init": "centres", "similarity": "mi", "smooth_weight": 0.5}},
    # T1 -> T2/FLAIR: unrelated intensities, so not MAE. Iterative: LNCC (its squared local correlation is blind to which
    # side of an edge is bright), chosen over seed 002's local gradient on 3 training pairs, mean EPE 1.28 against 2.25 mm
    # (`bench/results/iterative_logs/`); the paper's signed local gradient had made iterative and DIP diverge here (11.4 and
    # 10.7 mm from 7.18). DIP here is still the paper's network with the local gradient (its 4 pairs take an hour; not
    # rerun since the coordinate channels and the LNCC choice came in).
    "brain_t1t2": {"iterative": {"similarity": "lncc"}, "dip": {"similarity": "local_gradient", "network": "paper"}},
    # A brain on 2 CPU threads: DIP's default schedule (200 steps at 1/2, 100 at full size) takes 37 minutes (speed.md), and
    # a fresh network spends its first ~100 steps leaving its near-zero start, so a finer level given a share of a
    # short budget adds nothing (exploratory runs: 60 steps at 1/2 after 400 at 1/4 left Dice unchanged). It gets 5 minutes,
    # all at 1/4 (about 0.27 s a step); `bench/results/speed_cuda.md` has the full schedule on a GPU. The paper's MAE: with
    # LNCC the default network folds more for no more Dice (README, "oasis"; `bench/results/dip_logs/`).
    "oasis": {"dip": {"levels": (4,), "steps": (2000,), "max_seconds": 300}},
}
# Trained networks run only on the task their shipped model was trained for.
ONLY_ON = {
    "adversarial": {"mrus_prostate"},
    "airnet": {"mrus_prostate"},
    "symmetric": {"hippocampus"},
    "deformgan": {"brain_t1t2"},
    "glands": {"mrus_prostate"},
    "segreg": {"hippocampus"},
    "voxelmorph": {"hippocampus"},
}
COLUMNS = {
    "hippocampus": ["dice_mean", "dice30", "hd95_mm", "sdlogj", "folding_pct", "seconds_per_pair"],
    "mrus_prostate": ["tre_median_mm", "tre_iqr_low_mm", "tre_iqr_high_mm", "dice_mean", "folding_pct", "seconds_per_pair"],
    "brain_t1t2": ["epe_mm", "rmse", "folding_pct", "seconds_per_pair"],
    "oasis": ["dice_mean", "ssim", "detj_mean", "detj_std", "folding_pct", "seconds_per_pair"],  # seed 003's table
}


def run_task(task: str, methods: list[str], peers: list[str], root, n_pairs: int, split: str, seed: int) -> dict:
    """Every method on the same seeded pairs of one task; the report is a dict per method."""
    reports: dict[str, dict] = {}
    for name in methods + peers:
        if task not in ONLY_ON.get(name, {task}):
            continue
        why = missing(name) if name in PEERS else unshipped(name)
        if why:
            reports[name] = {"missing": why}
            print(f"{task}: {name} missing", file=sys.stderr)
            continue
        options = {"device": "cpu", **OPTIONS.get(task, {}).get(name, {})} if name in METHODS and name != "identity" else {}
        registrar = PEERS[name][1] if name in PEERS else None
        start = time.perf_counter()
        reports[name] = evaluate_task(task, name, root, n_pairs, split, seed, options, registrar=registrar)
        print(f"{task}: {name} done in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return reports


def unshipped(method: str) -> str | None:
    """Why a trained method cannot run (its default model is not shipped), else None."""
    model = DEFAULT_MODELS.get(method)
    if model is None or model in available_models():
        return None
    return f"no shipped model {model!r} (train one: bench/configs/{model}.yaml)"


def markdown(task: str, reports: dict[str, dict]) -> str:
    """One table per task; seconds also as a ratio to the fastest method measured in this run."""
    cols = COLUMNS[task]
    timed = [r["summary"]["seconds_per_pair"] for r in reports.values() if "summary" in r]
    fastest = min(t for t in timed if t > 0) if timed else 1.0
    lines = [f"### {task}", "", "| method | n | " + " | ".join(cols) + " | time vs fastest |", "|---" * (len(cols) + 3) + "|"]
    for name, r in reports.items():
        if "missing" in r:
            lines.append(f"| {name} | missing: {r['missing']} |" + " |" * (len(cols) + 1))
            continue
        s = r["summary"]
        cells = [f"{s[c]:.3g}" if c in s else "" for c in cols]
        lines.append(f"| {name} | {s['n_pairs']} | " + " | ".join(cells) + f" | {s['seconds_per_pair'] / fastest:.1f}x |")
    return "\n".join(lines) + "\n"


def merged(out: Path, task: str, reports: dict[str, dict]) -> dict[str, dict]:
    """The suite's previous reports with this run's methods replaced (or added at the end).

    `--merge` lets a new method or peer join a suite without rerunning hours of the others; a
    merged report must be on the same pairs. Reports from before runs were stamped take their
    stamp from the previous table's two header lines.
    """
    path = out / f"{task}.json"
    if not path.exists():
        return reports
    previous = json.loads(path.read_text())
    lines = (out / f"{task}.md").read_text().splitlines() if (out / f"{task}.md").exists() else ["", ""]
    legacy = {"run": lines[0], "command": lines[1].removeprefix("Command: `").removesuffix("`")}
    ids = {tuple(p["id"] for p in r["pairs"]) for r in [*previous.values(), *reports.values()] if "pairs" in r}
    if len(ids) > 1:
        raise ValueError(f"--merge: {path} was measured on other pairs than this run; rerun the suite without --merge")
    combined = {name: {"run": legacy, **r} for name, r in previous.items()}
    combined.update(reports)
    return combined


def runs_header(reports: dict[str, dict]) -> str:
    """Each run that produced the table (date, machine, versions, command), with its methods when there are several."""
    runs: dict[str, tuple[dict, list[str]]] = {}
    for name, r in reports.items():
        runs.setdefault(r["run"]["command"], (r["run"], []))[1].append(name)
    lines = []
    for stamp, names in runs.values():
        lines += [stamp["run"], f"Command: `{stamp['command']}`" + (f" ({', '.join(names)})" if len(runs) > 1 else "")]
    return "\n".join(lines) + "\n\n"


def plot(task: str, reports: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key, label = {
        "mrus_prostate": ("tre_mm", "landmark TRE (mm)"),
        "brain_t1t2": ("epe_mm", "mean end-point error (mm)"),
    }.get(task, ("dice_mean", "mean Dice"))
    names, values = [], []
    for name, r in reports.items():
        if "pairs" in r:
            v = [x for p in r["pairs"] for x in (p[key] if isinstance(p.get(key), list) else [p.get(key)]) if x is not None]
            names.append(name)
            values.append([x for x in v if np.isfinite(x)])
    fig, ax = plt.subplots(figsize=(1.4 * max(len(names), 3), 4))
    ax.boxplot(values)
    ax.set_xticks(range(1, len(names) + 1), names)
    ax.set_ylabel(label)
    ax.set_title(task)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--suite", default="accuracy", choices=["accuracy"])
    r.add_argument("--data-root")
    r.add_argument("--out", required=True)
    r.add_argument("--tasks", nargs="+", default=list(ACCURACY), choices=list(ACCURACY))
    r.add_argument("--methods", nargs="*", default=sorted(METHODS), choices=sorted(METHODS))
    r.add_argument("--peers", nargs="*", default=sorted(PEERS), choices=sorted(PEERS))
    r.add_argument("--pairs", type=int, help="pairs per task (default: the suite's)")
    r.add_argument("--split", choices=["all", "train", "val", "test"], help="the pairs' split (default: the suite's)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--merge", action="store_true", help="add to DIR/<task>.json, replacing only the methods run now (the table names each run)")
    g = sub.add_parser("regularizers", help="seed 000's Table 1: train (or reuse) four networks, score them on test patients")
    g.add_argument("--data-root")
    g.add_argument("--simulations", required=True, help="folder of simulated fields (priorreg simulate --out DIR)")
    g.add_argument("--models", required=True, help="where the four trained networks are (trained there when missing)")
    g.add_argument("--out", required=True)
    sh = sub.add_parser("ship", help="copy a trained model into Resources/Models with its test figures")
    sh.add_argument("--results", required=True, help="mrus_regularizers.json (python -m bench regularizers) or a priorreg evaluate --json report")
    sh.add_argument("--variant", default="adversarial")
    sh.add_argument("--name", default="adversarial_mrus")
    sh.add_argument("--dest", default=str(ROOT / "Resources" / "Models"))
    sh.add_argument("--baselines", nargs="*", default=[], help="priorreg evaluate --json reports of baselines on the same pairs")
    a = sub.add_parser("airnet", help="AIR-net models compared on the test patients: quality score and registration")
    a.add_argument("--data-root")
    a.add_argument("--models", nargs="+", required=True, help="trained .safetensors files (priorreg train, method airnet)")
    a.add_argument("--per-pair", type=int, default=20)
    a.add_argument("--out", required=True)
    a.add_argument("--ship", help="then copy this one of --models into Resources/Models as airnet_mrus")
    a.add_argument("--merge", action="store_true", help="keep the models already in DIR/airnet_mrus.json that are not run now")
    a.add_argument("--pairs", type=int, help="only the first N test pairs (a quick look; the committed table uses every pair)")
    v = sub.add_parser("voxelmorph", help="train the VoxelMorph peer on the hippocampus training subjects (its own recipe)")
    v.add_argument("--data-root")
    v.add_argument("--iterations", type=int, default=3000)
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--out", default=None, help="weights file (default: bench/results/voxelmorph_hippocampus.safetensors, where the peer looks)")
    rd = sub.add_parser("readme", help="copy the results tables (results.md) into the README's results block")
    rd.add_argument("--results", default=str(ROOT / "bench" / "results" / "results.md"))
    rd.add_argument("--readme", default=str(ROOT / "README.md"))
    sp = sub.add_parser("speed", help="seconds per registration and peak memory vs volume size")
    sp.add_argument("--data-root")
    sp.add_argument("--out", required=True)
    sp.add_argument("--methods", nargs="+", default=["centres", "adversarial"])
    sp.add_argument("--sizes", nargs="+", default=["mrus", "64", "128"], choices=["mrus", "64", "128", "160x192x224"])
    sp.add_argument("--repeats", type=int, default=5)
    sp.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    sp.add_argument("--merge", action="store_true", help="keep the previous measurements of this device, except those measured now")
    rp = sub.add_parser("reproduce", help="every figure in the README, one step after another (bench/reproduce.py)")
    rp.add_argument("--data-root", help="shared data folder (default: $PRIORREG_DATA or ../shared/data)")
    rp.add_argument("--runs", default="results/reproduce", help="training runs and worked examples go here (never Resources/Models)")
    rp.add_argument("--train", action="store_true", help="also the training runs behind the models and the recipe comparisons")
    rp.add_argument("--only", nargs="+", default=[], metavar="STEP", help="run only these steps (names as --list prints them)")
    rp.add_argument("--list", action="store_true", help="print the steps and their commands; run nothing")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(THREADS)
    # the line this run can be repeated with, stamped on what it writes
    command = f"python -m bench {shlex.join(sys.argv[1:] if argv is None else argv)}"
    if args.command == "reproduce":
        from priorreg.data import data_root

        from .reproduce import run as reproduce

        return reproduce(str(data_root(args.data_root).resolve()), args.runs, args.only, args.train, args.list)
    if args.command == "readme":
        from .readme import update

        changed = update(Path(args.readme), Path(args.results))
        print(f"{args.readme}: {'updated from' if changed else 'already shows'} {args.results}")
        return 0
    if args.command == "ship":
        from .regularizers import ship

        print(f"shipped {ship(Path(args.results), args.variant, args.name, Path(args.dest), [Path(b) for b in args.baselines])}")
        return 0
    if args.command == "airnet":
        from . import airnet

        print(airnet.run(args.models, args.data_root, Path(args.out), args.per_pair, merge=args.merge, command=command, pairs=args.pairs))
        if args.ship:
            dest = ROOT / "Resources" / "Models"
            print(f"shipped {airnet.ship(Path(args.out) / 'airnet_mrus.json', args.ship, 'airnet_mrus', dest)}")
        return 0
    if args.command == "voxelmorph":
        from . import voxelmorph

        print(f"wrote {voxelmorph.train(args.data_root, Path(args.out) if args.out else voxelmorph.WEIGHTS, args.iterations, args.seed)}")
        return 0
    if args.command == "speed":
        from .speed import run as run_speed

        options = {name: OPTIONS["mrus_prostate"][name] for name in args.methods if name in OPTIONS["mrus_prostate"]}
        print(run_speed(args.data_root, args.methods, args.sizes, Path(args.out), args.repeats, args.device, options, args.merge, command))
        return 0
    if args.command == "regularizers":
        from .regularizers import run as run_regularizers

        print(run_regularizers(args.data_root, args.simulations, Path(args.models), Path(args.out)))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = {
        "run": f"Run {time.strftime('%Y-%m-%d')} on {platform.machine()} ({os.cpu_count()} cores, {THREADS} threads), "
        f"{', '.join(f'{k} {v}' for k, v in versions().items())}.",
        "command": command,
    }
    for task in args.tasks:
        suite = ACCURACY[task]
        reports = run_task(task, args.methods, args.peers, args.data_root, args.pairs or suite["pairs"], args.split or suite["split"], args.seed)
        for report in reports.values():
            report["run"] = stamp
        if args.merge:
            reports = merged(out, task, reports)
        (out / f"{task}.json").write_text(json.dumps(reports, indent=1, default=float) + "\n")
        plot(task, reports, out / f"{task}.png")
        (out / f"{task}.md").write_text(runs_header(reports) + markdown(task, reports))
    # Every suite's latest table, whichever run made it: a suite can be rerun alone.
    tables = [(out / f"{task}.md").read_text() for task in ACCURACY if (out / f"{task}.md").exists()]
    (out / "results.md").write_text("\n".join(tables))
    print("\n".join(tables))
    return 0


if __name__ == "__main__":
    sys.exit(main())
