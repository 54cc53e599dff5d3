#!/usr/bin/env python
"""Train several configs on the same seeds and compare them: per metric, the mean over the seeds
with its 95% t interval for every run, and every run's paired difference to a reference run.

    python tools/compare.py --out output/compare/sr_head --seeds 0 1 2 3 4 --reference dino \\
        --run dino configs/quick_schedules/dino_tiny_synthetic.yaml \\
        --run sdconet configs/quick_schedules/sdconet_tiny_synthetic.yaml \\
        --run release configs/quick_schedules/sdconet_tiny_synthetic.yaml MODEL.SDCONET.SR.HEAD x2_bilinear \\
        --jobs 2 --threads 8 --budget-seconds 1800
    python tools/compare.py --spec compare.yaml --out output/compare/sr_head   # the runs in a file

``--run NAME CONFIG [KEY VALUE ...]`` is one run: a short name, a config file and its overrides;
``--opts KEY VALUE ...`` go to every run (before the run's own). A spec file holds the same:

    seeds: [0, 1, 2]
    reference: dino
    opts: [DATALOADER.NUM_WORKERS, 0]
    budget_seconds: 1800
    runs:
      dino: {config: configs/quick_schedules/dino_tiny_synthetic.yaml}
      release: {config: configs/quick_schedules/sdconet_tiny_synthetic.yaml, opts: [MODEL.SDCONET.SR.HEAD, x2_bilinear]}
      hr: {config: configs/quick_schedules/dino_tiny_synthetic.yaml, opts: [MODEL.SDCONET.DEGRADE.SCALE, 1],
           seeds: [0, 1]}
      yolo: {config: configs/quick_schedules/dino_tiny_synthetic.yaml, peer: yolo11n}

Peers (benchmark extra: ``pip install --no-build-isolation -e ".[benchmark]"``) go in the same table with
``--peer NAME KIND CONFIG [KEY VALUE ...]`` (KIND yolo11n or deformable_detr, see tools/train_peer.py:
the config gives the data, batch and degradation the peer uses) or a spec run with ``peer: KIND``.
A peer has no iteration schedule: it trains for ``--peer-budget-seconds`` (spec
``peer_budget_seconds``; default ``--budget-seconds``), and starts again from scratch when
interrupted.

(flags given on the command line win; ``--run`` and ``--peer`` add runs; a run's own ``seeds`` and
``budget_seconds`` replace the common ones, and differences use the seeds both runs have). Every
run is ``tools/train_net.py --resume`` with SEED S and OUTPUT_DIR OUT/NAME/seed_S, ``--jobs`` at a time with ``--threads`` /
``--jobs`` threads each (OMP_NUM_THREADS), seed by seed so that the pairs complete first. A run
with a final_metrics.json is skipped and an unfinished one continues from its last checkpoint, so
the same command picks up after a crash or a stop. ``--budget-seconds`` gives every run the same
training time (SOLVER.TIME_BUDGET_SECONDS) instead of the same SOLVER.MAX_ITER.

Writes OUT/compare.json, OUT/compare.md and OUT/plots/<metric>.png (``--report-name NAME``: OUT/NAME.json,
OUT/NAME.md and OUT/plots_NAME/, so that two specs can share their runs in one OUT and keep their own
reports); exit status 1 when a run failed.
"""
import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from sdconet import get_sdconet_cfg  # noqa: E402
from sdconet.peers import PEERS  # noqa: E402
from sdconet.utils.report import machine_info  # noqa: E402
from sdconet.utils.stats import mean_interval, metric_value, paired_difference, read_final_metrics  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_NET = os.path.join(REPO, "tools", "train_net.py")
TRAIN_PEER = os.path.join(REPO, "tools", "train_peer.py")
RUN_RECORD = "compare_run.json"  # in each run folder: its command and wall time over all attempts
LOG = "compare.log"  # in each run folder: train_net's stdout and stderr, appended attempt after attempt

# name in the report -> "task/key" of final_metrics.json, or the run's timings
METRICS = {
    "AP": "bbox/AP", "AP50": "bbox/AP50", "APs": "bbox/APs", "AP_vt": "bbox/AP_vt", "AP_t": "bbox/AP_t",
    "AP_s_tod": "bbox/AP_s_tod", "PSNR_SR": "sr_quality/PSNR_SR", "PSNR_gain": "sr_quality/PSNR_gain",
    "train_seconds": "training steps, s (train_seconds of metrics.json)",
    "wall_seconds": "train_net.py wall time, s (all attempts)",
}


@dataclass
class Run:
    """One config to compare: ``name`` (its folder under OUT), the config file and its overrides;
    ``peer``: the peer detector trained instead of our model (tools/train_peer.py), "" for ours."""

    name: str
    config: str
    opts: List[str]
    peer: str = ""
    seeds: Optional[List[int]] = None  # this run's seeds when not all of --seeds (spec files only)
    budget_seconds: Optional[float] = None  # this run's training time when not the common one (spec files only)


@dataclass
class Job:
    """One training run: a run on one seed."""

    run: Run
    seed: int
    folder: str
    command: List[str]  # the script's arguments
    script: str = TRAIN_NET


# ------------------------------------------------------------------ command line and spec
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--run", nargs="+", action="append", default=[], metavar=("NAME", "CONFIG"),
                        help="a run: short name, config file, then KEY VALUE overrides (repeat for each run)")
    parser.add_argument("--peer", nargs="+", action="append", default=[], metavar=("NAME", "KIND"),
                        help="a peer run: short name, peer kind (yolo11n, deformable_detr), config file, then "
                             "KEY VALUE overrides of the config (repeat for each peer)")
    parser.add_argument("--spec", default="", help="yaml/json file with runs, seeds, reference, opts, budget_seconds")
    parser.add_argument("--seeds", nargs="+", type=int, help="SEED of each run's trainings (default: 0 1 2)")
    parser.add_argument("--reference", help="run the others are compared with, seed by seed (default: the first)")
    parser.add_argument("--opts", nargs="+", help="KEY VALUE overrides for every run (before the run's own)")
    parser.add_argument("--out", required=True, help="output folder: OUT/NAME/seed_S per training, the report")
    parser.add_argument("--jobs", type=int, default=1, help="trainings at once (subprocesses)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="threads of all trainings together; each gets threads / jobs (default: all CPUs)")
    parser.add_argument("--budget-seconds", type=float,
                        help="equal training time: each run trains this many seconds (SOLVER.TIME_BUDGET_SECONDS, "
                             "data loading included, checkpoints and evaluations not), then is evaluated")
    parser.add_argument("--peer-budget-seconds", type=float,
                        help="training time of each peer run (default: --budget-seconds)")
    parser.add_argument("--report-name", default="compare",
                        help="the report's file names: OUT/NAME.json, OUT/NAME.md, plots in OUT/plots_NAME "
                             "(default compare: OUT/compare.json, OUT/compare.md, OUT/plots)")
    parser.add_argument("--no-train", action="store_true", help="only report the finished runs; train nothing")
    parser.add_argument("--only", nargs="+", default=[], metavar="NAME",
                        help="train only these runs now; the others are reported if finished, else missing")
    args = parser.parse_args(argv)
    try:
        resolve(args)
    except ValueError as e:
        parser.error(str(e))
    return args


def pairs(opts: Sequence, where: str) -> List[str]:
    """``opts`` as train_net's command-line strings; an error naming ``where`` if not KEY VALUE pairs
    or if they set what compare.py sets itself."""
    if len(opts) % 2:
        raise ValueError(f"{where}: overrides must be KEY VALUE pairs, got {list(opts)}")
    for key in opts[0::2]:
        if key in ("SEED", "OUTPUT_DIR"):
            raise ValueError(f"{where}: {key} is set by compare.py (--seeds, --out)")
    return [str(o) for o in opts]


def resolve(args) -> None:
    """Merge the spec file and the flags into ``args.runs``, ``seeds``, ``reference``, ``opts``,
    ``budget_seconds``; a ValueError saying what is wrong."""
    if not args.report_name or os.path.basename(args.report_name) != args.report_name or \
            args.report_name.startswith("."):
        raise ValueError(f"--report-name must be a plain file name (no folder), got {args.report_name!r}")
    spec = {}
    if args.spec:
        with open(args.spec) as f:
            spec = yaml.safe_load(f) or {}  # json is yaml too
        unknown = set(spec) - {"runs", "seeds", "reference", "opts", "budget_seconds", "peer_budget_seconds"}
        if unknown:
            raise ValueError(f"{args.spec}: unknown entries {sorted(unknown)}")
    runs = []
    for name, entry in (spec.get("runs") or {}).items():
        if not isinstance(entry, dict) or "config" not in entry:
            raise ValueError(f"{args.spec}: run {name!r} needs a 'config' entry")
        unknown = set(entry) - {"config", "opts", "peer", "seeds", "budget_seconds"}
        if unknown:
            raise ValueError(f"{args.spec}: run {name!r} has unknown entries {sorted(unknown)}")
        seeds = [int(v) for v in entry["seeds"]] if entry.get("seeds") is not None else None
        budget = float(entry["budget_seconds"]) if entry.get("budget_seconds") is not None else None
        if budget is not None and budget <= 0:
            raise ValueError(f"{args.spec}: run {name!r}: budget_seconds must be > 0, got {budget:g}")
        runs.append(Run(str(name), str(entry["config"]), pairs(entry.get("opts") or [], f"run {name!r}"),
                        str(entry.get("peer") or ""), seeds, budget))
    for values in args.run:
        if len(values) < 2:
            raise ValueError(f"--run {values[0]} needs a config file after the name")
        runs.append(Run(values[0], values[1], pairs(values[2:], f"--run {values[0]}")))
    for values in args.peer:
        if len(values) < 3:
            raise ValueError(f"--peer {values[0]} needs a peer kind and a config file after the name")
        runs.append(Run(values[0], values[2], pairs(values[3:], f"--peer {values[0]}"), values[1]))
    if not runs:
        raise ValueError("nothing to compare: give --run NAME CONFIG [KEY VALUE ...], --peer NAME KIND CONFIG "
                         "or a --spec with runs")
    names = [r.name for r in runs]
    for name in names:
        if names.count(name) > 1:
            raise ValueError(f"two runs are named {name!r}")
        if not name or name != os.path.basename(name) or name.startswith("."):
            raise ValueError(f"run name {name!r} must be a plain folder name")
    for run in runs:
        if not os.path.isfile(run.config):
            raise ValueError(f"run {run.name!r}: config file {run.config} does not exist")
    args.runs = runs
    args.seeds = args.seeds if args.seeds is not None else [int(s) for s in spec.get("seeds", [0, 1, 2])]
    if len(set(args.seeds)) != len(args.seeds):
        raise ValueError(f"--seeds repeats a seed: {args.seeds}")
    for run in runs:
        run.seeds = run.seeds if run.seeds is not None else list(args.seeds)
        if not run.seeds or len(set(run.seeds)) != len(run.seeds):
            raise ValueError(f"run {run.name!r}: its seeds {run.seeds} are empty or repeat a seed")
    # every seed any run trains, the common ones first: seed by seed, the pairs complete first
    args.all_seeds = list(args.seeds) + sorted({s for r in runs for s in r.seeds} - set(args.seeds))
    args.reference = args.reference if args.reference is not None else str(spec.get("reference", names[0]))
    if args.reference not in names:
        raise ValueError(f"--reference {args.reference!r} is not one of the runs {names}")
    args.opts = pairs(args.opts if args.opts is not None else spec.get("opts") or [], "--opts")
    budget = args.budget_seconds if args.budget_seconds is not None else spec.get("budget_seconds", 0)
    args.budget_seconds = float(budget or 0)
    if args.budget_seconds < 0:
        raise ValueError(f"--budget-seconds must be >= 0, got {args.budget_seconds:g}")
    peer_budget = args.peer_budget_seconds if args.peer_budget_seconds is not None else spec.get("peer_budget_seconds")
    args.peer_budget_seconds = float(peer_budget or args.budget_seconds)
    for run in runs:
        if run.peer and run.peer not in PEERS and ":" not in run.peer:
            raise ValueError(f"run {run.name!r}: unknown peer {run.peer!r}; known: {sorted(PEERS)} (or module:Class)")
    peers = [r.name for r in runs if r.peer and r.budget_seconds is None]
    if peers and args.peer_budget_seconds <= 0:
        raise ValueError(f"peer runs {peers} train for a time, not a number of iterations: give "
                         "--peer-budget-seconds (or --budget-seconds)")
    if args.jobs < 1 or args.threads < 1:
        raise ValueError("--jobs and --threads must be >= 1")
    unknown = sorted(set(args.only) - set(names))
    if unknown:
        raise ValueError(f"--only names {unknown}, which are not runs: {names}")


# ------------------------------------------------------------------ the trainings
def make_jobs(args) -> List[Job]:
    """Seed by seed, every run; each checked by building its config (a bad key fails here, not
    hours later)."""
    jobs = []
    checked = set()
    for seed in args.all_seeds:
        for run in (r for r in args.runs if seed in r.seeds):
            folder = os.path.abspath(os.path.join(args.out, run.name, f"seed_{seed}"))
            seconds = run.budget_seconds if run.budget_seconds is not None else args.budget_seconds
            budget = ["SOLVER.TIME_BUDGET_SECONDS", repr(seconds)] if seconds else []
            opts = [*args.opts, *run.opts, "SEED", str(seed), "OUTPUT_DIR", folder, *budget]
            if run.name not in checked:
                checked.add(run.name)
                try:
                    cfg = get_sdconet_cfg(run.config, opts, cpu_fallback=True)
                except (ValueError, KeyError, AssertionError) as e:  # yacs: KeyError / AssertionError
                    raise ValueError(f"run {run.name!r}: {e}") from e
                if not cfg.DATASETS.TEST:
                    raise ValueError(f"run {run.name!r}: DATASETS.TEST is empty, so the run has no final "
                                     "evaluation to compare")
            if run.peer:
                command = ["--peer", run.peer, "--config-file", os.path.abspath(run.config), "--seed", str(seed),
                           "--budget-seconds", repr(run.budget_seconds or args.peer_budget_seconds),
                           "--output-dir", folder,
                           *args.opts, *run.opts]
                jobs.append(Job(run, seed, folder, command, TRAIN_PEER))
            else:
                jobs.append(Job(run, seed, folder, ["--config-file", os.path.abspath(run.config), "--resume", *opts]))
    return jobs


def read_record(folder: str) -> Dict:
    path = os.path.join(folder, RUN_RECORD)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def check_folders(jobs: Sequence[Job]) -> None:
    """A folder that holds a run of another command (other config, overrides or budget) would be
    skipped or resumed with the wrong settings: stop before anything runs."""
    stale = [j.folder for j in jobs if read_record(j.folder).get("command", j.command) != j.command]
    if stale:
        raise ValueError("these folders hold runs of another command (config, overrides, seeds or budget "
                         f"changed): {stale}; use another --out or delete them")


def finished(job: Job) -> bool:
    return os.path.isfile(os.path.join(job.folder, "final_metrics.json"))


def last_line(path: str) -> str:
    """The last non-empty line of a log (the exception of a failed run)."""
    with open(path, errors="replace") as f:
        lines = [line.strip() for line in f if line.strip()]
    return lines[-1] if lines else ""


def train(job: Job, threads: int) -> Dict:
    """Run train_net.py (or train_peer.py) for one job; its status, wall time and the reason when it failed."""
    os.makedirs(job.folder, exist_ok=True)
    record = read_record(job.folder)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    log = os.path.join(job.folder, LOG)
    start = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"\n[compare] {shlex.join([sys.executable, job.script, *job.command])}\n")
        f.flush()
        returncode = subprocess.run([sys.executable, job.script, *job.command], stdout=f, stderr=subprocess.STDOUT,
                                    env=env).returncode
    wall = time.perf_counter() - start
    record = {"command": job.command, "wall_seconds": record.get("wall_seconds", 0.0) + wall,
              "attempts": record.get("attempts", 0) + 1, "returncode": returncode, "threads": threads}
    with open(os.path.join(job.folder, RUN_RECORD), "w") as f:
        json.dump(record, f, indent=2)
    if returncode != 0:
        return {"status": "failed", "wall_seconds": wall, "reason": f"exit status {returncode}: {last_line(log)}"}
    if not finished(job):
        return {"status": "failed", "wall_seconds": wall,
                "reason": f"{os.path.basename(job.script)} wrote no final_metrics.json"}
    return {"status": "done", "wall_seconds": wall}


def train_seconds(folder: str) -> float:
    """The training steps' time of a run: the last ``train_seconds`` of its metrics.json (the
    TimeBudget hook's sum, which goes on across resumes); NaN when it has none."""
    value, path = math.nan, os.path.join(folder, "metrics.json")
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    value = float(json.loads(line).get("train_seconds", value))
                except (json.JSONDecodeError, AttributeError, TypeError):
                    continue
    return value


def run_metrics(job: Job) -> Dict[str, float]:
    results = read_final_metrics(job.folder)
    values = {name: metric_value(results, source) for name, source in METRICS.items() if "/" in source}
    values["train_seconds"] = train_seconds(job.folder)
    values["wall_seconds"] = float(read_record(job.folder).get("wall_seconds", math.nan))
    return values


def progress(job: Job, status: str, seconds: float, detail: str = "") -> None:
    wall = f"{seconds:7.0f} s" if seconds == seconds else "      - s"
    print(f"[compare] {job.run.name:<16} seed {job.seed:<4} {status:<8} {wall}  {detail}".rstrip(), flush=True)


def run_all(jobs: Sequence[Job], jobs_at_once: int, threads: int, no_train) -> Dict[tuple, Dict]:
    """Every job's outcome by (name, seed): skipped, done or failed, or missing for a job ``no_train``
    says not to train (a bool, or a function of the job)."""
    outcomes, lock = {}, threading.Lock()

    def one(job: Job):
        if finished(job) or (no_train(job) if callable(no_train) else no_train):
            status = "skipped" if finished(job) else "missing"
            outcome = {"status": status, "wall_seconds": float(read_record(job.folder).get("wall_seconds", math.nan))}
        else:
            outcome = train(job, threads)
        if outcome["status"] in ("done", "skipped"):
            try:
                outcome["metrics"] = run_metrics(job)
            except (OSError, ValueError) as e:  # e.g. a final_metrics.json cut short
                outcome.update(status="failed", reason=f"cannot read its metrics: {e}")
        detail = f"AP {outcome['metrics']['AP']:.2f}" if "metrics" in outcome else outcome.get("reason", "")
        with lock:
            outcomes[job.run.name, job.seed] = outcome
            progress(job, outcome["status"], outcome["wall_seconds"], detail)
            if outcome["status"] == "failed":
                print(f"[compare]     log: {os.path.join(job.folder, LOG)}", flush=True)

    pool = ThreadPoolExecutor(max_workers=jobs_at_once)
    try:
        for future in [pool.submit(one, job) for job in jobs]:
            future.result()
    finally:  # on Ctrl-C: start no further training, wait for the running ones (they got the signal too)
        pool.shutdown(wait=True, cancel_futures=True)
    return outcomes


# ------------------------------------------------------------------ the report
def summarize(args, outcomes: Dict[tuple, Dict]) -> Dict:
    """Per metric: each run's values by seed, their mean and interval, and the paired difference
    to the reference over the seeds both finished."""
    def values(name: str, metric: str) -> Dict[int, float]:
        return {seed: outcomes[name, seed]["metrics"][metric] for seed in args.all_seeds
                if "metrics" in outcomes.get((name, seed), {})}

    summary = {}
    for metric, source in METRICS.items():
        entry = {"source": source, "runs": {}, "differences": {}}
        reference = values(args.reference, metric)
        for run in args.runs:
            by_seed = values(run.name, metric)
            if by_seed:
                entry["runs"][run.name] = {**mean_interval(list(by_seed.values())).as_dict(),
                                           "values": {str(s): v for s, v in by_seed.items()}}
            common = [s for s in by_seed if s in reference]
            if run.name != args.reference and common:
                diff = paired_difference([by_seed[s] for s in common], [reference[s] for s in common])
                entry["differences"][run.name] = {**diff.as_dict(), "seeds": common}
        summary[metric] = entry
    return summary


def git_state() -> Dict:
    """The commit of the repository and whether its tracked files had changes; empty without git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return {}
    return {"git_commit": commit.stdout.strip(), "git_uncommitted_changes": bool(dirty.stdout.strip())}


def without_nan(obj):
    """``obj`` with NaN floats as None: compare.json stays standard JSON (null = no such value)."""
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: without_nan(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [without_nan(v) for v in obj]
    return obj


def fmt(value: float, half: float, sign: bool = False) -> str:
    if value != value:
        return "-"
    text = f"{value:+.2f}" if sign else f"{value:.2f}"
    return text + (f" ± {half:.2f}" if half == half else "")


def markdown(report: Dict) -> str:
    runs, reference = report["runs"], report["reference"]
    names = list(runs)
    budget = f", training budget {report['budget_seconds']:g} s per run" if report["budget_seconds"] else ""
    if report.get("peer_budget_seconds"):
        budget += f", peers trained {report['peer_budget_seconds']:g} s each"
    m = report["machine"]
    lines = ["# Comparison over seeds", "", f"command: `{report['command']}`", "",
             f"commit {report.get('git_commit', '?')}"
             + (" (with uncommitted changes)" if report.get("git_uncommitted_changes") else "")
             + f"; {m['cpu']} ({m['cpu_cores']} CPUs), {report['jobs']} trainings at once with "
             f"{report['threads_per_run']} threads each{budget}", "",
             "| run | config | overrides | seeds finished |", "|---|---|---|---|"]
    for name, run in runs.items():
        done = [s for s, o in run["seeds"].items() if o["status"] in ("done", "skipped")]
        config = f"peer {run['peer']} on {run['config']}" if run.get("peer") else run["config"]
        if run.get("budget_seconds"):
            config += f" ({run['budget_seconds']:g} s)"
        lines.append(f"| {name} | {config} | {' '.join(run['opts']) or '-'} | "
                     f"{len(done)} of {len(run['seeds'])} ({' '.join(done) or '-'}) |")
    lines += ["", "Mean ± half-width of the 95% t interval over the seeds:", "",
              "| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for metric, entry in report["metrics"].items():
        cells = [fmt(entry["runs"][n]["mean"], entry["runs"][n]["half_width"]) if n in entry["runs"] else "-"
                 for n in names]
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    others = [n for n in names if n != reference]
    if others:
        lines += ["", f"Paired difference to {reference} (same seeds), ± half-width of its 95% t interval, "
                  "p of the paired t-test:", "",
                  "| metric | " + " | ".join(f"{n} - {reference}" for n in others) + " |",
                  "|---|" + "---|" * len(others)]
        for metric, entry in report["metrics"].items():
            cells = []
            for n in others:
                d = entry["differences"].get(n)
                p = f" (p {d['p_value']:.3f})" if d and d["p_value"] == d["p_value"] else ""
                cells.append(fmt(d["mean"], d["half_width"], sign=True) + p if d else "-")
            lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    lines += ["", "Metrics: " + "; ".join(f"{k} = {v}" for k, v in METRICS.items()) + "."]
    return "\n".join(lines) + "\n"


def plot(report: Dict, folder: str) -> List[str]:
    """One PNG per metric that any run has: every seed's value as a dot, the mean and its
    interval as a bar, one column per run."""
    os.makedirs(folder, exist_ok=True)
    written, names = [], list(report["runs"])
    for metric, entry in report["metrics"].items():
        if not any(v == v for r in entry["runs"].values() for v in r["values"].values()):
            continue
        fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(names), 3.6))
        labelled = False
        for x, name in enumerate(names):
            run = entry["runs"].get(name)
            if run is None:
                continue
            values = list(run["values"].values())
            spread = np.linspace(-0.12, 0.12, len(values)) if len(values) > 1 else np.zeros(1)
            xs = x - 0.15 + spread
            ax.scatter(xs, values, s=14, color="tab:blue", alpha=0.7, label=None if labelled else "seeds")
            for px, py, seed in zip(xs, values, run["values"]):
                if py == py:
                    ax.annotate(seed, (px, py), xytext=(3, 2), textcoords="offset points", fontsize=6, color="0.4")
            if run["mean"] == run["mean"]:
                half = run["half_width"] if run["half_width"] == run["half_width"] else 0.0
                ax.errorbar([x + 0.15], [run["mean"]], yerr=[[half], [half]], fmt="s", color="black", capsize=4,
                            label=None if labelled else "mean, 95% interval")
            labelled = True
        ax.set_xticks(range(len(names)), names)
        ax.set_xlim(-0.6, len(names) - 0.4)
        ax.set_title(metric)
        ax.set_ylabel(entry["source"] if "/" in entry["source"] else "s")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        path = os.path.join(folder, f"{metric}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    try:
        jobs = make_jobs(args)
        check_folders(jobs)
    except ValueError as e:
        print(f"compare.py: error: {e}", file=sys.stderr)
        return 2
    threads = max(1, args.threads // args.jobs)
    def no_train(job: Job) -> bool:
        return args.no_train or bool(args.only and job.run.name not in args.only)

    todo = sum(not finished(j) and not no_train(j) for j in jobs)
    print(f"[compare] {len(jobs)} trainings ({len(args.runs)} runs, seeds {' '.join(map(str, args.all_seeds))}): "
          f"{sum(map(finished, jobs))} finished, {todo} to train; "
          f"{args.jobs} at once, {threads} threads each", flush=True)
    outcomes = run_all(jobs, args.jobs, threads, no_train)

    report = {
        "command": shlex.join(["python", os.path.relpath(os.path.abspath(__file__)), *argv]),
        **git_state(),
        "machine": machine_info("cpu"),
        "torch_threads": torch.get_num_threads(),
        "jobs": args.jobs, "threads": args.threads, "threads_per_run": threads,
        "seeds": args.seeds, "reference": args.reference, "budget_seconds": args.budget_seconds, "opts": args.opts,
        "peer_budget_seconds": args.peer_budget_seconds if any(r.peer for r in args.runs) else 0.0,
        "runs": {r.name: {"config": r.config, "opts": r.opts, "peer": r.peer, "budget_seconds": r.budget_seconds,
                          "seeds": {}} for r in args.runs},
    }
    for job in jobs:
        outcome = outcomes[job.run.name, job.seed]
        report["runs"][job.run.name]["seeds"][str(job.seed)] = {"folder": job.folder, **outcome}
    report["metrics"] = summarize(args, outcomes)
    os.makedirs(args.out, exist_ok=True)
    name = args.report_name
    with open(os.path.join(args.out, f"{name}.json"), "w") as f:
        json.dump(without_nan(report), f, indent=2)
    text = markdown(report)
    with open(os.path.join(args.out, f"{name}.md"), "w") as f:
        f.write(text)
    plot(report, os.path.join(args.out, "plots" if name == "compare" else f"plots_{name}"))
    print(text, flush=True)
    failed = [f"{n} seed {s}" for (n, s), o in outcomes.items() if o["status"] == "failed"]
    if failed:
        print(f"[compare] {len(failed)} failed: {', '.join(failed)} (rerun the same command to retry them)",
              file=sys.stderr, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
