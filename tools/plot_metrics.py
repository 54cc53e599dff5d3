#!/usr/bin/env python
"""Plot a detectron2 metrics.json (one JSON object per line, written by JSONWriter) as PNGs.

Writes, when their keys are present:
    losses.png   total_loss, the detection losses (their sum and each one), SR losses (loss_sr*)
                 and saliency losses (loss_saliency*) in their own panels
    ap.png       evaluation AP over iterations (bbox/AP, bbox/AP50, bbox/APs, bbox/AP_vt, ...)
    routing.png  gradient-routing curves, one panel per routing/* key

    python tools/plot_metrics.py output/sdconet_run/metrics.json --out output/plots --smooth 20
"""
import argparse
import os
from typing import Dict, List

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sdconet.utils.stats import Series, load_metrics  # noqa: E402

PANEL_INCHES = (5.0, 3.6)  # each panel is 500 x 360 pixels at DPI
DPI = 100


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over ``window`` points (fewer at the start), so curves do not shift in time."""
    if window <= 1 or len(values) == 0:
        return values
    cumulative = np.concatenate([[0.0], np.cumsum(values)])
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(0, ends - window)
    return (cumulative[ends] - cumulative[starts]) / (ends - starts)


def summed(series: Dict[str, Series], keys: List[str]) -> Series:
    """Sum of ``keys`` at the iterations where all of them were logged."""
    common = set(series[keys[0]][0].tolist())
    for key in keys[1:]:
        common &= set(series[key][0].tolist())
    iters = np.array(sorted(common), dtype=int)
    total = np.zeros(len(iters))
    for key in keys:
        lookup = dict(zip(series[key][0].tolist(), series[key][1].tolist()))
        total += np.array([lookup[i] for i in iters.tolist()])
    return iters, total


def _save_panels(path: str, panels: List[dict], smooth: int) -> str:
    """panels: dicts with title, curves [(label, (iters, values), style)], and optional ylim."""
    fig, axes = plt.subplots(1, len(panels), figsize=(PANEL_INCHES[0] * len(panels), PANEL_INCHES[1]),
                             dpi=DPI, squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for label, (iters, values), style in panel["curves"]:
            style = dict(style)
            if style.pop("smooth", True):
                values = moving_average(values, smooth)
            ax.plot(iters, values, label=label, **style)
        ax.set_title(panel["title"] + (f" (mean of {smooth})" if smooth > 1 and panel.get("smoothed", True) else ""),
                     fontsize=9)
        ax.set_xlabel("iteration", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.ticklabel_format(axis="y", useOffset=False)  # flat curves would otherwise show "1e-13+0.1"
        ax.grid(alpha=0.3)
        n_curves = len(panel["curves"])
        ax.legend(fontsize=6, ncol=1 + n_curves // 12, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def loss_panels(series: Dict[str, Series]) -> List[dict]:
    loss_keys = sorted(k for k in series if k.startswith("loss_"))
    sr_keys = [k for k in loss_keys if k.startswith("loss_sr")]
    saliency_keys = [k for k in loss_keys if k.startswith("loss_saliency")]
    detection_keys = [k for k in loss_keys if k not in sr_keys and k not in saliency_keys]
    panels = []
    curves = []
    if "total_loss" in series:
        curves.append(("total_loss", series["total_loss"], {"color": "black", "linewidth": 1.6}))
    if detection_keys:
        curves.append(("detection (sum)", summed(series, detection_keys), {"color": "tab:red", "linewidth": 1.6}))
        curves += [(k, series[k], {"linewidth": 0.7, "alpha": 0.7}) for k in detection_keys]
    if curves:
        panels.append({"title": "total and detection losses", "curves": curves})
    if sr_keys:
        panels.append({"title": "SR losses", "curves": [(k, series[k], {"linewidth": 1.0}) for k in sr_keys]})
    if saliency_keys:
        panels.append({"title": "saliency losses",
                       "curves": [(k, series[k], {"linewidth": 1.0}) for k in saliency_keys]})
    return panels


def ap_panels(series: Dict[str, Series]) -> List[dict]:
    """One panel per task prefix (bbox/, segm/): the summary APs, not the per-class AP-<name> keys."""
    by_task: Dict[str, List[str]] = {}
    for key in sorted(series):
        task, _, metric = key.rpartition("/")
        if task and metric.startswith("AP") and "-" not in metric and not task.startswith("routing"):
            by_task.setdefault(task, []).append(key)
    return [{"title": f"{task} AP (%)", "smoothed": False,
             "curves": [(k.rpartition("/")[2], series[k], {"marker": "o", "markersize": 3, "smooth": False})
                        for k in keys]}
            for task, keys in by_task.items()]


def routing_panels(series: Dict[str, Series]) -> List[dict]:
    """One panel per routing/* key; the phase is a state, so it is drawn as steps and never smoothed."""
    panels = []
    for key in sorted(k for k in series if k.startswith("routing/")):
        is_phase = key.endswith("phase")
        style = {"drawstyle": "steps-post", "smooth": False} if is_phase else {"linewidth": 1.0}
        panels.append({"title": key, "smoothed": not is_phase, "curves": [(key, series[key], style)]})
    return panels


def plot_metrics(metrics_path: str, out_dir: str = None, smooth: int = 1) -> List[str]:
    """Write losses.png, ap.png and routing.png (those whose keys exist) to ``out_dir``; return their paths."""
    out_dir = out_dir or os.path.dirname(os.path.abspath(metrics_path))
    os.makedirs(out_dir, exist_ok=True)
    series = load_metrics(metrics_path)
    written = []
    for name, panels, needs in (("losses.png", loss_panels(series), "total_loss / loss_*"),
                                ("ap.png", ap_panels(series), "<task>/AP*"),
                                ("routing.png", routing_panels(series), "routing/*")):
        if panels:
            written.append(_save_panels(os.path.join(out_dir, name), panels, smooth))
        else:
            print(f"skipped {name}: no {needs} keys in {metrics_path}")
    return written


def compare_routing(metrics_paths: List[str], labels: List[str], out_path: str, smooth: int = 1) -> str:
    """One PNG overlaying the routing/cosine and routing/conflict_fraction curves of several runs
    (e.g. the sum / project / stop modes at equal iterations)."""
    if len(labels) != len(metrics_paths):
        raise ValueError(f"{len(labels)} labels for {len(metrics_paths)} metrics files")
    runs = [load_metrics(p) for p in metrics_paths]
    panels = []
    for key in ("routing/cosine", "routing/conflict_fraction"):
        curves = [(label, run[key], {"linewidth": 1.0}) for label, run in zip(labels, runs) if key in run]
        if curves:
            panels.append({"title": key, "curves": curves})
    if not panels:
        raise ValueError(f"no routing/* keys in {metrics_paths}")
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    return _save_panels(out_path, panels, smooth)


def main(argv=None) -> List[str]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics", nargs="+", help="path to a detectron2 metrics.json (several with --compare)")
    parser.add_argument("--out", default=None, help="output folder (default: next to metrics.json); "
                        "with --compare, the PNG file to write")
    parser.add_argument("--smooth", type=int, default=1, help="trailing moving-average window, in logged points")
    parser.add_argument("--compare", nargs="+", metavar="LABEL",
                        help="overlay the routing curves of the given runs, one label per metrics.json")
    args = parser.parse_args(argv)
    if args.compare:
        written = [compare_routing(args.metrics, args.compare, args.out or "routing_comparison.png", args.smooth)]
    elif len(args.metrics) > 1:
        parser.error("several metrics.json files need --compare LABEL ...")
    else:
        written = plot_metrics(args.metrics[0], args.out, args.smooth)
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    main()
