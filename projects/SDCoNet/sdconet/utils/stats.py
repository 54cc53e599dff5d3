"""Statistics over training runs that differ only in their seed, for tools/summarize_runs.py and
tools/compare.py: a run's final metric, the mean over seeds with its confidence interval, and the
paired difference between two configs run on the same seeds; and a run's metrics.json as curves
(tools/plot_metrics.py, tools/time_to_level.py).

Seeds are few (3 to 10), so intervals use Student's t with n - 1 degrees of freedom. Two configs
are compared seed by seed: a seed fixes the initial weights and the data order of both runs, and
the per-seed differences leave out the part of the spread the two runs share.
"""
import json
import math
import os
from dataclasses import asdict, dataclass, replace
from typing import Dict, Sequence, Tuple

import numpy as np
from scipy import stats

CONFIDENCE = 0.95

Series = Tuple[np.ndarray, np.ndarray]  # (iterations, values)


@dataclass(frozen=True)
class Interval:
    """The mean of ``n`` values and its confidence interval ``[low, high]`` (NaN for one value or
    a NaN among them). ``p_value``: for a paired difference, the two-sided p of a zero mean."""

    mean: float
    low: float
    high: float
    n: int
    p_value: float = math.nan

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def as_dict(self) -> Dict:
        return {**asdict(self), "half_width": self.half_width}


def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """Mean of ``values`` and its t interval (``scipy.stats.t.interval`` around the standard error)."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or len(values) == 0:
        raise ValueError(f"mean_interval needs a non-empty list of numbers, got shape {values.shape}")
    mean, n = float(values.mean()), len(values)
    if n < 2 or not np.isfinite(values).all():
        return Interval(mean, math.nan, math.nan, n)
    sem = float(stats.sem(values))
    if sem == 0.0:  # all equal: t.interval would give NaN for a zero scale
        return Interval(mean, mean, mean, n)
    low, high = stats.t.interval(confidence, n - 1, loc=mean, scale=sem)
    return Interval(mean, float(low), float(high), n)


def paired_difference(values: Sequence[float], reference: Sequence[float],
                      confidence: float = CONFIDENCE) -> Interval:
    """Mean and t interval of ``values[i] - reference[i]`` (run i of both on the same seed), with
    the p-value of the paired t-test; NaN p when the differences are all equal."""
    values, reference = np.asarray(values, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if values.shape != reference.shape:
        raise ValueError(f"paired differences need as many values ({len(values)}) as the reference "
                         f"({len(reference)}), one per seed")
    interval = mean_interval(values - reference, confidence)
    if interval.high > interval.low:
        interval = replace(interval, p_value=float(stats.ttest_rel(values, reference).pvalue))
    return interval


def read_final_metrics(run_dir: str) -> Dict:
    """``run_dir/final_metrics.json`` (written by tools/train_net.py at the end of a run) as
    ``{task: {key: value}}``; of the first dataset when DATASETS.TEST had several."""
    path = os.path.join(run_dir, "final_metrics.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: is the run {run_dir} finished?")
    with open(path) as f:
        results = json.load(f)
    if results and "bbox" not in results:  # {dataset: {task: {key: value}}}, as train_net's report reads it
        results = next(iter(results.values()))
    return results


def metric_value(results: Dict, metric: str) -> float:
    """``metric`` = "task/key" (e.g. "bbox/AP") of :func:`read_final_metrics`'s dict; NaN when absent."""
    task, key = metric.split("/", 1)
    value = results.get(task, {}).get(key)
    return math.nan if value is None else float(value)


def load_metrics(metrics_path: str) -> Dict[str, Series]:
    """Per-key (iterations, values) of a detectron2 metrics.json (one JSON object per line, written
    by JSONWriter), sorted by iteration.

    Lines that do not parse (a line still being written) are skipped; when an iteration appears
    twice (a resumed run appends to the same file) the later value wins.
    """
    points: Dict[str, Dict[int, float]] = {}
    with open(metrics_path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(row, dict) or "iteration" not in row:
                continue
            for key, value in row.items():
                if key != "iteration" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    points.setdefault(key, {})[int(row["iteration"])] = float(value)
    series = {}
    for key, by_iter in points.items():
        iters = np.array(sorted(by_iter))
        series[key] = (iters, np.array([by_iter[i] for i in iters]))
    return series
