#!/usr/bin/env python
"""Mean and 95% interval of finished runs' metrics, per group of seeds, and paired differences.

Reads ``final_metrics.json`` from each run folder (what ``tools/train_net.py`` writes at the end) and
prints a Markdown table: per group and metric, the mean over the runs and its 95% confidence
interval (Student t, n - 1 degrees of freedom), then each group's difference to ``--reference``,
paired run by run in the order given (give the seeds in the same order in every group).

    python tools/summarize_runs.py \\
        --group residual output/sr21/res32_s0 output/sr21/res32_s1 output/sr21/res32_s2 \\
        --group x2_bilinear output/sr21/x2_s0 output/sr21/x2_s1 output/sr21/x2_s2 --reference x2_bilinear
"""
import argparse
import json
from typing import Dict, List, Sequence

from sdconet.utils.stats import Interval, mean_interval, metric_value, paired_difference, read_final_metrics

DEFAULT_METRICS = ("bbox/AP", "bbox/AP50", "bbox/APs", "bbox/AP_vt", "bbox/AP_t", "bbox/AP_s_tod",
                   "sr_quality/PSNR_SR", "sr_quality/PSNR_bicubic", "sr_quality/SSIM_SR", "sr_quality/SSIM_bicubic")


def read_metric(run_dir: str, metric: str) -> float:
    """``metric`` = "task/key" from ``run_dir/final_metrics.json``; NaN when the run has no such key."""
    return metric_value(read_final_metrics(run_dir), metric)


def entry(interval: Interval) -> Dict:
    """An interval as the summary stores it: ``ci95`` is the half-width of the 95% interval."""
    return {"mean": interval.mean, "ci95": interval.half_width, "low": interval.low, "high": interval.high,
            "n": interval.n}


def summarize(groups: Dict[str, List[str]], metrics: Sequence[str], reference: str = "") -> Dict:
    table = {name: {m: [read_metric(d, m) for d in dirs] for m in metrics} for name, dirs in groups.items()}
    summary = {"groups": {}, "differences": {}}
    for name, values in table.items():
        summary["groups"][name] = {m: dict(entry(mean_interval(v)), values=v) for m, v in values.items()}
    if reference:
        if reference not in table:
            raise ValueError(f"--reference {reference!r} is not one of the groups {sorted(table)}")
        for name, values in table.items():
            if name == reference:
                continue
            if len(groups[name]) != len(groups[reference]):
                raise ValueError(f"paired differences need as many runs in {name!r} ({len(groups[name])}) "
                                 f"as in {reference!r} ({len(groups[reference])})")
            summary["differences"][name] = {}
            for m in metrics:
                diff = paired_difference(values[m], table[reference][m])
                summary["differences"][name][m] = dict(entry(diff), p_value=diff.p_value)
    return summary


def _cell(entry: Dict) -> str:
    return f"{entry['mean']:.2f} ± {entry['ci95']:.2f}" if entry["mean"] == entry["mean"] else "-"


def format_table(summary: Dict, metrics: Sequence[str], reference: str = "") -> str:
    names = [m.split("/", 1)[1] for m in metrics]
    lines = ["| group | runs | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for name, entries in summary["groups"].items():
        runs = len(next(iter(entries.values()))["values"])
        lines.append(f"| {name} | {runs} | " + " | ".join(_cell(entries[m]) for m in metrics) + " |")
    for name, entries in summary["differences"].items():
        lines.append(f"| {name} - {reference} (paired) | | " + " | ".join(_cell(entries[m]) for m in metrics) + " |")
    return "\n".join(lines + ["", "mean ± half-width of the 95% t interval over the runs"])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--group", nargs="+", action="append", required=True, metavar=("NAME", "RUN_DIR"),
                        help="a group name followed by its run folders (repeat for each group)")
    parser.add_argument("--reference", default="", help="group the others are compared with, run by run")
    parser.add_argument("--metrics", nargs="+", default=list(DEFAULT_METRICS), help="task/key of final_metrics.json")
    parser.add_argument("--json", default="", help="also write the summary here")
    args = parser.parse_args(argv)
    for group in args.group:
        if len(group) < 2:
            parser.error(f"--group {group[0]} needs at least one run folder after its name")
    return args


def main(argv=None) -> Dict:
    args = parse_args(argv)
    groups = {group[0]: group[1:] for group in args.group}
    summary = summarize(groups, args.metrics, args.reference)
    print(format_table(summary, args.metrics, args.reference))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return summary


if __name__ == "__main__":
    main()
