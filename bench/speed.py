"""`python -m bench speed --data-root PATH --out DIR`: seconds per registration and peak memory vs volume size.

Each (method, size) runs in its own fresh process (so its peak RSS is its own): one
warm-up, then `repeats` timed registrations; the figure is the median. A warm-up longer
than `SLOW_SECONDS` is the only timing (loading a model or warming the allocator is a
rounding error there, and five more runs of a 10-minute registration are not affordable);
the table's `runs` column says how many timings each figure is the median of. Sizes are a real
MR-US pair (obs000) as stored ("mrus": TRUS 47x63x44, MR 69x69x64) and the same pair
resampled over the same fields of view onto N^3 or KxJxI grids, so the content is real
and only the voxel count changes. Every figure is also given as a ratio to the fastest
method measured at that size in the same run. CPU with `THREADS` threads; on a GPU
machine pass `--device cuda` (max allocated GPU memory is then reported too).
Method `quality` times `priorreg.quality.quality_report` of a registered pair (D-score,
calibrated TRE, Jacobian statistics, the field's plausibility) instead of a registration.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

SLOW_SECONDS = 60.0
SIZES = {"mrus": None, "64": (64, 64, 64), "128": (128, 128, 128), "160x192x224": (160, 192, 224)}


def _pair(root, size):
    from priorreg.data import mrus_pairs
    from priorreg.spatial import Grid, resample

    v = mrus_pairs(root)[0].load()
    if size is None:
        return v.fixed, v.moving

    def regrid(volume):
        g = Grid.of(volume)
        extent = g.spacing * (np.array(g.shape[::-1]) - 1)
        spacing = extent / (np.array(size[::-1]) - 1)
        return resample(volume, Grid(tuple(size), spacing, g.origin, g.direction))

    return regrid(v.fixed), regrid(v.moving)


def _measure(method, size, root, repeats, device, options, queue) -> None:
    import torch

    from priorreg.registration import register

    from .peers import PEERS, THREADS

    torch.set_num_threads(THREADS)
    fixed, moving = _pair(root, size)
    if method in PEERS:

        def run():
            PEERS[method][1](fixed, moving)
    elif method == "quality":  # scoring one registered pair (the critic model is loaded once, as a module holds it)
        from priorreg.quality import QualityModel, quality_report

        model = QualityModel(device=device)
        registered = register(fixed, moving, method="centres")

        def run():
            quality_report(fixed, registered.warped, registered.field, model=model)
    else:

        def run():
            register(fixed, moving, method=method, **({"device": device, **options} if method != "identity" else {}))

    start = time.perf_counter()
    run()  # warm-up: model loading, allocator, JIT-free first calls
    times = [time.perf_counter() - start]
    if times[0] <= SLOW_SECONDS:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
    gpu = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    rss = peak_rss_mb()
    queue.put({"seconds": statistics.median(times), "times": times, "peak_rss_mb": rss, "gpu_max_allocated_mb": gpu})


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB.

    Linux's VmHWM, not getrusage's ru_maxrss: ru_maxrss survives exec, so a spawned child
    reports at least the size of the parent that started it (a bench process that has loaded
    VoxelMorph: 1.1 GB under every later method).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # elsewhere (kB on Linux; bytes on macOS)


def measure(method, size_name, root, repeats=5, device="cpu", options=None) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_measure, args=(method, SIZES[size_name], root, repeats, device, options or {}, queue))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        return {"error": f"exit code {proc.exitcode}"}
    return queue.get()


def run(root, methods, sizes, out: Path, repeats=5, device="cpu", options=None, merge=False, command="") -> str:
    """Measure every (size, method); the tables are rewritten after each, so a cut-short run keeps what it measured.

    With `merge`, the device's previous measurements stay, except those of the (size, method)s measured
    now: slow cells (a brain registered by DIP on 2 threads) can come from their own, smaller command.
    Each row names the run it comes from; its ratio is to the fastest peer at that size, whichever run measured it.
    """
    from priorreg.evaluate import versions

    from .peers import PEERS, THREADS, missing

    path = out / f"{_stem(device)}.json"
    previous = json.loads(path.read_text()) if merge and path.exists() else {"runs": [], "results": {}}
    runs = previous["runs"] if "runs" in previous else [{"date": "", "command": "(a run before runs were recorded)"}]
    runs = [*runs, {"date": time.strftime("%Y-%m-%d"), "command": command, "repeats": repeats, "threads": THREADS, "versions": versions()}]
    this = len(runs) - 1
    results = {size: {m: {"run": 0, **r} for m, r in by.items()} for size, by in previous["results"].items()}
    text = ""
    for size in sizes:
        for method in methods:
            why = missing(method) if method in PEERS else None
            r = {"missing": why} if why else measure(method, size, root, repeats, device, (options or {}).get(method))
            results.setdefault(size, {})[method] = {**r, "run": this}
            print(f"{size} {method}: {r}", file=sys.stderr)
            text = _write(results, runs, out, device)
    _plot(results, out / f"{_stem(device)}.png")
    return text


def _stem(device: str) -> str:
    return "speed" if device == "cpu" else f"speed_{device}"  # a GPU run sits beside the CPU one


def _write(results: dict, runs: list[dict], out: Path, device) -> str:
    """`speed[_DEVICE].json` and `.md` of what is measured so far; returns the Markdown."""
    from .peers import PEERS

    out.mkdir(parents=True, exist_ok=True)
    gpu = device != "cpu"
    order = list(SIZES)
    results = dict(sorted(results.items(), key=lambda kv: order.index(kv[0])))
    (out / f"{_stem(device)}.json").write_text(json.dumps({"device": device, "runs": runs, "results": results}, indent=1) + "\n")
    lines = [f"Device {device}. Each figure is the median of the run's repeats after one warm-up (`runs`: 1 where the "
             f"warm-up took over {SLOW_SECONDS:g} s and was the only timing); `vs fastest peer`: the ratio to the fastest "
             f"peer ({', '.join(PEERS)}) measured at that size (`run` says which run measured each row: merge only "
             f"runs of one machine).", ""]
    for i, stamp in enumerate(runs):
        if any(r.get("run") == i for by in results.values() for r in by.values()):
            threads = f", {stamp['threads']} CPU threads" if "threads" in stamp else ""
            note = f" ({stamp['note']})" if stamp.get("note") else ""
            lines.append(f"- run {i}: {stamp['date'] or 'undated'}{threads}, `{stamp['command']}`{note}")
    lines += [
        "",
        "| size | method | seconds | runs | vs fastest peer | peak RSS MB |" + (" max GPU allocated MB |" if gpu else "") + " run |",
        "|---|---|---|---|---|---|" + ("---|" if gpu else "") + "---|",
    ]
    for size, by_method in results.items():
        for method, r in by_method.items():
            peers = [p["seconds"] for m, p in by_method.items() if m in PEERS and "seconds" in p]
            if "seconds" in r:
                ratio = f"{r['seconds'] / min(peers):.2g}x" if peers else ""
                row = f"| {size} | {method} | {r['seconds']:.3g} | {len(r['times'])} | {ratio} | {r['peak_rss_mb']:.0f} |"
                lines.append(row + (f" {r['gpu_max_allocated_mb']:.0f} |" if gpu else "") + f" {r['run']} |")
            else:
                lines.append(f"| {size} | {method} | {r.get('missing') or r.get('error')} | | | |" + (" |" if gpu else "") + f" {r['run']} |")
    text = "\n".join(lines) + "\n"
    (out / f"{_stem(device)}.md").write_text(text)
    return text


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    sizes = list(results)
    voxels = [47 * 63 * 44 if s == "mrus" else int(np.prod(SIZES[s])) for s in sizes]
    methods = sorted({m for r in results.values() for m in r})
    for method in methods:
        pts = [(v, results[s][method]["seconds"]) for s, v in zip(sizes, voxels) if "seconds" in results[s].get(method, {})]
        if pts:
            ax.loglog(*zip(*sorted(pts)), marker="o", label=method)
    ax.set_xlabel("fixed-image voxels")
    ax.set_ylabel("seconds per registration")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
