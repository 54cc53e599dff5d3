#!/usr/bin/env python
"""When did each run first reach a level of a metric, in seconds of training?

Reads each run folder's ``metrics.json`` (detectron2's JSONWriter, read by
``sdconet.utils.stats.load_metrics``): the periodic evaluations
(``TEST.EVAL_PERIOD``) give the metric at some iterations, and the ``TimeBudget`` hook's
``train_seconds`` gives the seconds of training steps up to each logged iteration. A run reaches
the level at the first evaluation whose value is at least the level; its time is the
``train_seconds`` of that iteration (the latest logged at or before it), so the figure is an upper
bound, one ``EVAL_PERIOD`` coarse. Prints one line per run, then the mean and 95% interval over the
runs that reached it, per level. Used for #24's "reach AP50 0.5 no later than YOLO11n"
(model card, "Training recipe"):

    python tools/time_to_level.py output/compare/v1/sdconet_stride4/seed_{0,1,2} \\
        --metric bbox/AP50 --levels 32.9 50
"""
import argparse
import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from sdconet.utils.stats import load_metrics, mean_interval


def read_curve(run_dir: str, metric: str) -> List[Tuple[int, float, float]]:
    """``(iteration, train_seconds, value)`` of every evaluation of ``metric`` in the run, in order."""
    path = os.path.join(run_dir, "metrics.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a training run's folder?")
    series = load_metrics(path)
    if metric not in series:
        return []
    if "train_seconds" not in series:
        raise ValueError(f"{path} has no train_seconds (a run from before the TimeBudget hook?)")
    (eval_iters, values), (logged_iters, seconds) = series[metric], series["train_seconds"]
    # the seconds logged last at or before each evaluation (0 before the first log)
    last = np.searchsorted(logged_iters, eval_iters, side="right") - 1
    return [(int(it), float(seconds[i]) if i >= 0 else 0.0, float(v)) for it, i, v in zip(eval_iters, last, values)]


def first_reach(curve: Sequence[Tuple[int, float, float]], level: float) -> Optional[Tuple[int, float]]:
    """``(iteration, train_seconds)`` of the first evaluation at or above ``level``; None if none is."""
    for iteration, seconds, value in curve:
        if value >= level:
            return iteration, seconds
    return None


def summarize(run_dirs: Sequence[str], metric: str, levels: Sequence[float]) -> Dict:
    """Per level: each run's first (iteration, seconds) or None, and the interval of the seconds
    over the runs that reached it."""
    curves = {d: read_curve(d, metric) for d in run_dirs}
    empty = [d for d, c in curves.items() if not c]
    if empty:
        raise ValueError(f"no evaluation of {metric} in {empty}: train with TEST.EVAL_PERIOD > 0")
    summary = {}
    for level in levels:
        reached = {d: first_reach(c, level) for d, c in curves.items()}
        times = [r[1] for r in reached.values() if r is not None]
        interval = mean_interval(times) if times else None
        summary[level] = {"runs": reached, "reached": len(times), "of": len(run_dirs),
                          "mean": interval.mean if interval else math.nan,
                          "half_width": interval.half_width if interval else math.nan}
    return summary


def main(argv=None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run folders (OUTPUT_DIR of tools/train_net.py)")
    parser.add_argument("--metric", default="bbox/AP50", help="task/key as in metrics.json (default bbox/AP50)")
    parser.add_argument("--levels", nargs="+", type=float, required=True, help="levels of the metric")
    args = parser.parse_args(argv)
    summary = summarize(args.runs, args.metric, args.levels)
    for level, entry in summary.items():
        print(f"{args.metric} >= {level:g}:")
        for run_dir, hit in entry["runs"].items():
            print(f"  {run_dir}: " + (f"iteration {hit[0]}, {hit[1]:.0f} s of training" if hit else "not reached"))
        spread = f" ± {entry['half_width']:.0f}" if entry["half_width"] == entry["half_width"] else ""
        print(f"  reached by {entry['reached']} of {entry['of']}"
              + (f"; mean {entry['mean']:.0f}{spread} s (95% interval)" if entry["reached"] else ""))
    return summary


if __name__ == "__main__":
    main()
