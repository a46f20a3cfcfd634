"""`python -m bench reproduce`: every figure the README reports, rerun by one command from a clean checkout.

The README's figures come from a chain of commands: the accuracy and speed suites, evaluations
of the shipped models, worked examples, and the training runs behind the models and the
comparisons of training recipes. `STEPS` lists them in the order they depend on each other,
each with the files under `bench/results/` it rewrites, so that this is the one place that
says how every committed figure was made. `Testing/bench/test_reproduce.py` keeps it honest:
every committed result file and every training config has a step (or is in `ARCHIVED`, with
the reason), every step's command parses with today's command lines, and the shipped models'
training configs are trained by a step.

By default the steps that need only the shipped models, the peers and `../shared` run (about
4.75 hours on 2 CPU threads, most of it the per-pair optimisers on brains and the speed suite);
`--train` adds the training runs (several more hours; the symmetric network's needs a GPU), which
write into `--runs` and never over `Resources/Models`. `--list` prints the commands;
`--only NAME ...` runs some. The last step rewrites the README's results block (`python -m bench readme`).
"""

from __future__ import annotations

import fnmatch
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = "bench/results"
SUITES = ("hippocampus", "mrus_prostate", "brain_t1t2", "oasis")
ALL_SIZES = "mrus 64 128 160x192x224"
ALL_METHODS = "identity centres affine ants_syn elastix_bspline voxelmorph adversarial airnet symmetric iterative dip quality"
# the rows of airnet_mrus.md
AIRNET_COMPARED = (
    "gp", "gp_early", "gp_early_all", "gp_early_wide", "gp_rank", "gp_rank10", "gp_rank_gland",
    "regress_gland", "regress_gland_1000", "regress_gland_long",
)  # fmt: skip
AIRNET_TRAINED = (*AIRNET_COMPARED, "clip", "gp_tre")  # the last two quoted from their logs (clip vs penalty; a TRE regression diverged)
# the shipped recipe (its log gpu_log.csv), the one shipped before it, the ones tried beside it (gpu_<suffix>_log.csv)
SYMMETRIC_GPU_RUNS = tuple(
    "symmetric_hippocampus_gpu" + suffix for suffix in ("", "_batch8", "_smooth3", "_full_wide", "_full_wide_smooth3")
)
# the shipped recipe, the recipes shipped before it, then one tried after it
GLAND_RUNS = ("glands_mrus", "glands_mrus_ensemble", "glands_mrus_single", "glands_mrus_wide_ensemble")


@dataclass(frozen=True)
class Step:
    """One command; `writes`: the globs (from the repository root) of the result files it rewrites.

    `needs`: "train" (only with --train), "cuda" (only where a GPU is visible). `copies`:
    (from, to) files copied after the command, e.g. a training log kept beside the results.
    Commands name `priorreg` and `python` as a user types them; `{data}` and `{runs}` are filled in.
    """

    name: str
    commands: tuple[str, ...]
    writes: tuple[str, ...] = ()
    needs: frozenset[str] = field(default_factory=frozenset)
    copies: tuple[tuple[str, str], ...] = ()


def _train(config: str, out: str, simulations: str = "") -> str:
    extra = f" --simulations {simulations}" if simulations else ""
    return f"priorreg --data-root {{data}} train bench/configs/{config}.yaml{extra} --out {{runs}}/{out}"


def _evaluate(task: str, method: str, json_path: str, split: str = "test", extra: str = "") -> str:
    return f"priorreg --data-root {{data}} evaluate --task {task} --method {method} --split {split}{extra} --json {json_path}"


TRAIN, CUDA = frozenset({"train"}), frozenset({"cuda"})
STEPS: tuple[Step, ...] = (
    # ---------------------------------------------------------------- from the shipped models and the peers
    Step("demo", tuple(  # README: the first command, and the adversarial network on the same pair
        f"priorreg --data-root {{data}} register --sample mrus --method {method} --out {{runs}}/examples/mrus_demo{suffix}"
        for method, suffix in (("glands", ""), ("adversarial", "_adversarial"))
    )),
    Step("examples", (
        "priorreg --data-root {data} register --sample mrus --method iterative --init centres --label-channels 0 "
        "--out {runs}/examples/mrus_iterative_gland",
        *(
            "priorreg --data-root {data} register --fixed {data}/hippocampus/images/hippocampus_034.nii.gz "
            "--moving {data}/hippocampus/images/hippocampus_039.nii.gz --fixed-labels {data}/hippocampus/labels/hippocampus_034.nii.gz "
            f"--moving-labels {{data}}/hippocampus/labels/hippocampus_039.nii.gz --method symmetric {extra}--out {{runs}}/examples/{out}"
            for extra, out in (("", "hippocampus_shipped"), ("--label-channels 0 1 --finetune-steps 40 ", "hippocampus_finetune"))
        ),
    )),
    Step(
        "accuracy",
        (f"python -m bench run --suite accuracy --data-root {{data}} --out {RESULTS}",),
        writes=tuple(f"{RESULTS}/{task}.{ext}" for task in SUITES for ext in ("json", "md", "png")) + (f"{RESULTS}/results.md",),
    ),
    Step(
        "speed",
        (f"python -m bench speed --methods {ALL_METHODS} --sizes {ALL_SIZES} --repeats 3 --data-root {{data}} --out {RESULTS}",
         # the MR-US segmenters apply only to MR-US pairs: timed at their size
         f"python -m bench speed --methods glands --sizes mrus --repeats 3 --merge --data-root {{data}} --out {RESULTS}"),
        writes=(f"{RESULTS}/speed.json", f"{RESULTS}/speed.md", f"{RESULTS}/speed.png"),
    ),
    Step(
        "speed_cuda",
        (f"python -m bench speed --methods {ALL_METHODS} --sizes {ALL_SIZES} --repeats 3 --device cuda --data-root {{data}} "
         f"--out {RESULTS}",),  # fmt: skip
        writes=(f"{RESULTS}/speed_cuda.json", f"{RESULTS}/speed_cuda.md", f"{RESULTS}/speed_cuda.png"),
        needs=CUDA,
    ),
    Step(
        "symmetric_test",
        tuple(
            _evaluate("hippocampus", method, f"{RESULTS}/symmetric_hippocampus_test_{name}.json", extra=extra)
            for name, method, extra in (
                ("identity", "identity", ""), ("centres", "centres", ""), ("symmetric", "symmetric", ""),
                ("raw", "symmetric", " --smooth-mm 0"), ("finetune40", "symmetric", " --finetune-steps 40"),
                ("segreg", "segreg", ""),  # the shipped segmenter's outlines, registered
                ("segreg_smooth0.5", "segreg", " --smooth-weight 0.5"),  # the same with the smoothness used until 2026-11-30
                # the experts' label maps (taken whole) in place of its outlines, at the smoothness of its time
                ("segreg_expert", "segreg", " --label-channels 0 --smooth-weight 0.5"),
            )
        ),
        writes=(f"{RESULTS}/symmetric_hippocampus_test_*.json",),
    ),
    Step(
        "glands_test",  # MR-US test patients: centring, the adversarial network, predicted glands, expert glands given
        tuple(
            _evaluate("mrus_prostate", method, f"{RESULTS}/mrus_test_{name}.json", extra=extra)
            for name, method, extra in (
                ("centres", "centres", ""), ("adversarial", "adversarial", ""), ("glands", "glands", ""),
                ("gland_oracle", "glands", " --label-channels 0"),  # the expert glands in place of the predicted
                ("glands_planning", "glands", " --label-channels 0 --label-roles moving"),  # the MR's given, the US's predicted
            )
        ),
        writes=(f"{RESULTS}/mrus_test_*.json",),
    ),
    Step(
        "glands_image",  # the glands method with the images' mutual information beside the outlines: validation, then test
        tuple(
            _evaluate("mrus_prostate", "glands", f"{RESULTS}/glands_logs/glands_mrus_{split}_image0.3.json", split, " --image-weight 0.3")
            for split in ("val", "test")
        ),
        writes=(f"{RESULTS}/glands_logs/glands_mrus_*_image0.3.json",),
    ),
    Step(
        "quality",  # the shipped critic against known errors, and the bound any score of the images has (gland error)
        ("priorreg --data-root {data} evaluate --task quality --split test --json bench/results/quality_test.json",),
        writes=(f"{RESULTS}/quality_test.json",),
    ),
    Step(
        "quality_glands",  # the opt-in blend of the critic's estimate with the glands' misfit, on a calibrated copy (not shipped)
        ("priorreg --data-root {data} calibrate --model airnet_mrus --glands glands_mrus --out {runs}/airnet_mrus_glands/airnet_mrus.safetensors",
         "priorreg --data-root {data} evaluate --task quality --split test --model {runs}/airnet_mrus_glands/airnet_mrus.safetensors "
         f"--json {RESULTS}/quality_test_glands.json"),  # fmt: skip
        writes=(f"{RESULTS}/quality_test_glands.json",),
    ),
    Step(
        "brain_baselines",  # the held-back brain set: PriorReg's baselines, the peers, and the undeformed control (false motion)
        tuple(
            _evaluate("brain_t1t2", method, f"{RESULTS}/deformgan_logs/{method}_{split}.json", split)
            for method, split in (("identity", "test"), ("centres", "test"), ("iterative", "test"), ("identity", "train"))
        )
        + (f"python -m bench run --tasks brain_t1t2 --split test --pairs 4 --methods identity --peers affine elastix_bspline ants_syn "
           f"--data-root {{data}} --out {RESULTS}/deformgan_logs/peers",)  # fmt: skip
        + tuple(
            _evaluate(task, "iterative", f"{RESULTS}/deformgan_logs/iterative_smooth{w}_{task}_test.json", "test",
                      f" --pairs 2 --levels 4 2 --steps 120 80 --smooth-weight {w} --device cpu")  # fmt: skip
            for w in ("0.5", "5") for task in ("brain_t1t2_undeformed", "brain_t1t2")
        ),
        writes=(*(f"{RESULTS}/deformgan_logs/{n}.json" for n in ("identity_test", "centres_test", "iterative_test", "identity_train")),
                f"{RESULTS}/deformgan_logs/peers/*", f"{RESULTS}/deformgan_logs/iterative_smooth*_test.json"),  # fmt: skip
    ),
    Step(
        "deformgan_shipped",  # the shipped Deform-GAN on the held-back set (one pass; fine-tuned on each pair) and on training-set deformations
        tuple(
            _evaluate("brain_t1t2", "deformgan", f"{RESULTS}/deformgan_logs/deformgan_{name}.json", split, f" --device cpu{extra}")
            for name, split, extra in (("test", "test", ""), ("finetune100_test", "test", " --finetune-steps 100"), ("train", "train", ""))
        ),
        writes=tuple(f"{RESULTS}/deformgan_logs/deformgan_{name}.json" for name in ("test", "finetune100_test", "train")),
    ),
    Step(
        # The OASIS suite's DIP setting (one 1/4 level, 5 minutes) with MAE and LNCC, the paper's network and the default one
        # (the suite's row is the default with MAE), and iterative at that one level.
        "dip_oasis",
        tuple(
            _evaluate("oasis", method, f"{RESULTS}/dip_logs/oasis_{name}_quarter_{sim}.json", "all",
                      f" --levels 4 {schedule} --similarity {sim}")
            for method, name, schedule, similarities in (
                ("dip", "dip_paper", "--steps 2000 --max-seconds 300 --dip-network paper", ("mae", "lncc")),
                ("dip", "dip", "--steps 2000 --max-seconds 300", ("mae", "lncc")),
                ("iterative", "iterative", "--steps 120", ("mae", "lncc")),
            )
            for sim in similarities
        ),
        writes=(f"{RESULTS}/dip_logs/*.json",),
    ),
    Step(
        "iterative_brain_similarity",  # the brain_t1t2 suite's similarity for iterative, chosen on 3 training pairs
        tuple(
            _evaluate("brain_t1t2", "iterative", f"{RESULTS}/iterative_logs/brain_t1t2_train_{sim}.json", "train",
                      f" --pairs 3 --similarity {sim}")
            for sim in ("lncc", "local_gradient")
        ),
        writes=(f"{RESULTS}/iterative_logs/brain_t1t2_train_*.json",),
    ),
    Step(
        # DIP on MR-US: its smoothness, then its similarity, chosen on 5 validation pairs; then the chosen setting on
        # every test pair (18), once.
        "dip_mrus",
        tuple(
            _evaluate("mrus_prostate", "dip", f"{RESULTS}/dip_logs/mrus_dip_val_{name}.json", "val",
                      f" --pairs 5 --init centres --similarity {sim} --smooth-weight {w}")
            for name, sim, w in (("smooth0.1", "lncc", "0.1"), ("smooth0.5", "lncc", "0.5"), ("mi_smooth0.5", "mi", "0.5"))
        ) + (_evaluate("mrus_prostate", "dip", f"{RESULTS}/dip_logs/mrus_dip_test_mi_smooth0.5.json", "test",
                       " --init centres --similarity mi --smooth-weight 0.5"),),
        writes=(f"{RESULTS}/dip_logs/mrus_dip_*.json",),
    ),
    # ------------------------------------------------------------------------------------ training runs
    Step(
        "regularizers",
        ("priorreg simulate --out {runs}/simulations --n 300 --augment 1 --workers 2",  # pip install -e ".[sim]"
         "python -m bench regularizers --data-root {data} --simulations {runs}/simulations --models {runs}/regularizers "
         f"--out {RESULTS}"),
        writes=(f"{RESULTS}/mrus_regularizers.json", f"{RESULTS}/mrus_regularizers.md"),
        needs=TRAIN,
    ),
    Step(
        "adversarial_landmarks",  # README: trained on landmark labels too, not shipped
        (_train("mrus_adversarial_landmarks", "mrus_adversarial_landmarks", "{runs}/simulations"),),
        needs=TRAIN,
    ),
    Step(
        "airnet",
        tuple(_train(f"airnet_mrus_{v}", f"airnet_{v}") for v in AIRNET_TRAINED)
        + ("python -m bench airnet --data-root {data} --models "
           + " ".join(f"{{runs}}/airnet_{v}/airnet_mrus_{v}.safetensors" for v in AIRNET_COMPARED) + f" --per-pair 20 --out {RESULTS}",),
        writes=(f"{RESULTS}/airnet_mrus.json", f"{RESULTS}/airnet_mrus.md", f"{RESULTS}/airnet_logs/*.csv"),
        needs=TRAIN,
        copies=tuple((f"{{runs}}/airnet_{v}/log.csv", f"{RESULTS}/airnet_logs/airnet_mrus_{v}.csv") for v in AIRNET_TRAINED),
    ),
    Step(
        "symmetric_gpu",  # the shipped symmetric_hippocampus (5.8 min on one H200), the run before it and the recipes tried beside it
        tuple(
            command
            for run in SYMMETRIC_GPU_RUNS
            for command in (
                _train(run, run),
                _evaluate("hippocampus", "symmetric", f"{{runs}}/{run}/val.json", "val",
                          f" --model {{runs}}/{run}/symmetric_hippocampus.safetensors"),  # fmt: skip
            )
        ),
        writes=(f"{RESULTS}/symmetric_logs/gpu_*log.csv",),
        needs=TRAIN | CUDA,
        copies=tuple(
            (f"{{runs}}/{run}/log.csv", f"{RESULTS}/symmetric_logs/{run.replace('symmetric_hippocampus_gpu', 'gpu')}_log.csv")
            for run in SYMMETRIC_GPU_RUNS
        ),
    ),
    Step(
        "symmetric_cpu",  # the model shipped until 2026-11-29: 29 min on 2 threads
        (_train("symmetric_hippocampus", "symmetric_hippocampus"),
         _evaluate("hippocampus", "symmetric", "{runs}/symmetric_hippocampus/test.json",
                   extra=" --model {runs}/symmetric_hippocampus/symmetric_hippocampus.safetensors")),  # fmt: skip
        writes=(f"{RESULTS}/symmetric_logs/shipped_log.csv",),
        needs=TRAIN,
        copies=(("{runs}/symmetric_hippocampus/log.csv", f"{RESULTS}/symmetric_logs/shipped_log.csv"),),
    ),
    Step(
        "glands",  # the shipped glands_mrus segmenters and the two recipes before them (two-network ensembles, single networks)
        tuple(
            command
            for run in GLAND_RUNS
            for command in (
                _train(run, run),
                *(_evaluate("mrus_prostate", "glands", f"{RESULTS}/glands_logs/{run}_{split}.json", split,
                            f" --model {{runs}}/{run}/{run}.safetensors") for split in ("val", "test")),  # fmt: skip
            )
        ),
        writes=(f"{RESULTS}/glands_logs/*",),
        needs=TRAIN,
        copies=tuple((f"{{runs}}/{run}/log.csv", f"{RESULTS}/glands_logs/{run}_log.csv") for run in GLAND_RUNS),
    ),
    Step(
        "segreg",  # the shipped segreg_hippocampus segmenters (two seeds): 80 min on 2 threads; validation of the registration through them
        (_train("segreg_hippocampus", "segreg_hippocampus"),
         *(_evaluate("hippocampus", "segreg", f"{RESULTS}/segreg_logs/segreg_hippocampus_val{suffix}.json", "val",
                     f" --model {{runs}}/segreg_hippocampus/segreg_hippocampus.safetensors{extra}")
           for suffix, extra in (("", ""), ("_smooth0.5", " --smooth-weight 0.5"), ("_smooth0.2", " --smooth-weight 0.2"),
                                   ("_image0.1", " --image-weight 0.1")))),  # fmt: skip
        writes=(f"{RESULTS}/segreg_logs/*",),
        needs=TRAIN,
        copies=(("{runs}/segreg_hippocampus/log.csv", f"{RESULTS}/segreg_logs/segreg_hippocampus_log.csv"),  # a row per member, one for both
                *((f"{{runs}}/segreg_hippocampus/member{k}/log.csv", f"{RESULTS}/segreg_logs/segreg_hippocampus_member{k}_log.csv") for k in (0, 1))),
    ),
    Step(
        "voxelmorph",  # the VoxelMorph peer of the hippocampus suite, trained with its own recipe
        ("python -m bench voxelmorph --data-root {data} --iterations 3000 --seed 0",),
        writes=(f"{RESULTS}/voxelmorph_hippocampus.*", f"{RESULTS}/voxelmorph_hippocampus_log.csv"),
        needs=TRAIN,
    ),
    Step(
        "deformgan",
        tuple(_train(name, name) for name in ("deformgan_brain", "voxelmorph_brain", "voxelmorph_lg_brain", "deformgan_brain_untrained"))
        + tuple(  # the shipped Deform-GAN is evaluated by deformgan_shipped; these are what it is compared with
            _evaluate("brain_t1t2", "deformgan", f"{RESULTS}/deformgan_logs/{name}_test.json", "test",
                      f" --device cpu --model {{runs}}/{run}/{run}.safetensors{extra}")  # fmt: skip
            for name, run, extra in (("voxelmorph", "voxelmorph_brain", ""), ("voxelmorph_lg", "voxelmorph_lg_brain", ""),
                                     ("voxelmorph_finetune100", "voxelmorph_brain", " --finetune-steps 100"),
                                     ("deformgan_untrained_finetune100", "deformgan_brain_untrained", " --finetune-steps 100"))  # fmt: skip
        ),
        writes=(f"{RESULTS}/deformgan_logs/deformgan_log.csv", f"{RESULTS}/deformgan_logs/voxelmorph_*",
                f"{RESULTS}/deformgan_logs/deformgan_untrained_*"),  # fmt: skip
        needs=TRAIN,
        copies=tuple(("{runs}/%s_brain/log.csv" % name, f"{RESULTS}/deformgan_logs/{name}_log.csv")
                     for name in ("deformgan", "voxelmorph", "voxelmorph_lg")),  # fmt: skip
    ),
    Step("readme", ("python -m bench readme",), writes=("README.md",)),  # the results block, from results.md
)

# Committed result files no step rewrites, and why.
ARCHIVED = {
    f"{RESULTS}/symmetric_logs/smoothness_0.1_log.csv": "exploratory CPU run quoted in the README (the CPU config, smoothness 0.1)",
    f"{RESULTS}/symmetric_logs/with_flips_*": "exploratory CPU run quoted in the README, its config kept beside its log",
    f"{RESULTS}/deformgan_logs/deformgan_centres_*": "Deform-GAN's recipe until 2026-12-01 (centred start, the paper's local "
    "gradient loss), quoted in the README; its config is bench/configs/deformgan_brain.yaml at commit 487c497",
}


def writer(path: str) -> str | None:
    """The step that rewrites a result file (a path from the repository root), 'archived', or None."""
    for step in STEPS:
        if any(fnmatch.fnmatch(path, pattern) for pattern in step.writes):
            return step.name
    return "archived" if any(fnmatch.fnmatch(path, pattern) for pattern in ARCHIVED) else None


def argv(command: str, data: str, runs: str) -> list[str]:
    """A step's command as the argument list to run: `priorreg` and `python` are this interpreter's."""
    words = shlex.split(command.format(data=data, runs=runs))
    if words[0] == "priorreg":
        return [sys.executable, "-m", "priorreg", *words[1:]]
    if words[0] == "python":
        return [sys.executable, *words[1:]]
    raise ValueError(f"a step runs priorreg or python, not {words[0]!r}: {command}")


def chosen(only=(), train=False, cuda=None) -> list[tuple[Step, str | None]]:
    """(step, why it is skipped or None) for the steps asked for, in order."""
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    unknown = sorted(set(only) - {s.name for s in STEPS})
    if unknown:
        raise ValueError(f"no step {unknown}; the steps: {', '.join(s.name for s in STEPS)}")
    out = []
    for step in STEPS:
        if only and step.name not in only:
            continue
        skip = None
        if "train" in step.needs and not train:
            skip = "a training run (add --train)"
        elif "cuda" in step.needs and not cuda:
            skip = "needs a CUDA GPU"
        out.append((step, skip))
    return out


def run(data: str, runs: str, only=(), train=False, listing=False, cuda=None) -> int:
    """Run (or with `listing`, print) the steps; stops at the first failure and returns its exit status."""
    steps = chosen(only, train, cuda)
    start = time.perf_counter()
    for step, skip in steps:
        print(f"## {step.name}" + (f": skipped, {skip}" if skip else ""), flush=True)
        if skip:
            continue
        for command in step.commands:
            if listing:
                print(command.format(data=data, runs=runs), flush=True)
                continue
            words = argv(command, data, runs)
            print(shlex.join(words), flush=True)
            began = time.perf_counter()
            status = subprocess.call(words, cwd=ROOT)
            if status:
                print(f"step {step.name} failed (exit {status}); the steps after it were not run", flush=True)
                return status
            print(f"({time.perf_counter() - began:.0f} s)", flush=True)
        for source, dest in step.copies:
            source, dest = source.format(data=data, runs=runs), dest.format(data=data, runs=runs)
            print(f"copy {source} -> {dest}")
            if not listing:
                Path(ROOT, dest).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(Path(ROOT, source), Path(ROOT, dest))
    if not listing:
        print(f"done in {(time.perf_counter() - start) / 3600:.1f} h; `git diff {RESULTS} README.md` shows what changed")
    return 0
