#!/usr/bin/env python
"""Measures the benchmark page's models and writes projects/SDCoNet/BENCHMARKS.md.

    python tools/benchmark_page.py [--baseline-commit SHA] [--rounds N] [--device cuda] [--page PATH]

The page lists SDCoNet (fp32 and bf16 autocast), the DINO-LR baseline, the serial baseline and
DINO on HR at 512x512 HR. Each model is measured in its own process (a clean peak memory): inference
parameters and fvcore GFLOPs (as tools/analyze_model.py), eval latency, training-step time and peak
memory (as tools/benchmark.py), the multiply-adds of a training step and the fp32 matrix-product
peak, which together give the dense-maths floor. The page prints ratios to SDCoNet.

``--baseline-commit`` also measures SDCoNet with the package of an older commit (checked out with
``git worktree``), alternating old and new runs ``--rounds`` times; the page lists every round,
because machine load drifts within minutes and a round's own ratio is the least exposed to it.
Training steps are timed after ``--train-warmup`` untimed ones, in steady state. Text below
``NOTES_MARKER`` in an existing page is written by hand and kept.
"""
import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
from typing import Dict, Optional, Sequence

import torch
from detectron2.modeling import build_model

import sdconet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PACKAGE = os.path.join(REPO, "projects", "SDCoNet", "sdconet")
if all(os.path.realpath(p) != os.path.realpath(_PACKAGE) for p in sdconet.__path__):
    # A baseline commit's package (PYTHONPATH first) is measured with this tree's measuring code,
    # which it may predate: sdconet.utils is looked up here too.
    sdconet.__path__.append(_PACKAGE)

from sdconet.engine.trainer import build_sdconet_optimizer  # noqa: E402  (the measured package's own)
from sdconet.utils.analysis import count_gflops, count_parameters, training_gmacs  # noqa: E402
from sdconet.utils.cli import measuring_parser, parse, write_json  # noqa: E402
from sdconet.utils.models import random_weights_opts  # noqa: E402
from sdconet.utils.report import machine_info  # noqa: E402
from sdconet.utils.timing import (gemm_peaks, measure_latency, measure_training_step, random_inputs,  # noqa: E402
                                  synthetic_training_batch)

# (row name, config, overrides). The bf16 row is the same model with autocast at test and in
# training: another number format, so it is not what the fp32 rows and the floor compare.
BF16_OPTS = ("TEST.SDCONET.AMP.ENABLED", "True", "SOLVER.AMP.ENABLED", "True", "SOLVER.AMP.DTYPE", "bfloat16")
PAGE_MODELS = (
    ("SDCoNet", "configs/SDCoNet/sdconet_swin-t_nwpu.yaml", ()),
    ("SDCoNet, bf16 autocast", "configs/SDCoNet/sdconet_swin-t_nwpu.yaml", BF16_OPTS),
    ("DINO-LR baseline", "configs/Baselines/dino_swin-t_lr_nwpu.yaml", ()),
    ("Serial SR -> DINO", "configs/Baselines/serial_sr_dino_swin-t_nwpu.yaml", ()),
    ("DINO on HR (upper bound)", "configs/Baselines/dino_swin-t_hr_nwpu.yaml", ()),
)
PAGE = os.path.join(REPO, "projects", "SDCoNet", "BENCHMARKS.md")
# Everything from this line on in an existing page is written by hand (GPU runs, analysis) and is
# carried over when the tool rewrites the measured part above it.
NOTES_MARKER = "<!-- Written by hand below this line; tools/benchmark_page.py keeps it. -->"


def page_cfg(config_file: str, opts: Sequence[str] = (), device: str = "cpu"):
    """The frozen config of a page row, for this package or a baseline commit's older one."""
    from sdconet.modeling import backbone  # the measured package's
    if hasattr(backbone, "NO_PRETRAINED"):  # older packages read "none" as a file name
        # Random Swin weights unless opts name a file: timings do not depend on the weights.
        opts = random_weights_opts(opts)
    opts = [*opts, "MODEL.DEVICE", device]
    if hasattr(sdconet.config, "get_sdconet_cfg"):
        return sdconet.config.get_sdconet_cfg(config_file, opts)
    from detectron2.config import get_cfg  # a package older than get_sdconet_cfg
    cfg = get_cfg()
    sdconet.add_sdconet_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(opts)
    sdconet.check_sdconet_config(cfg)
    cfg.freeze()
    return cfg


def measure_config(config_file: str, height: int, width: int, device: str, warmup: int, iters: int,
                   train_iters: int, seed: int = 0, train_warmup: int = 4, opts: Sequence[str] = ()) -> Dict:
    """Everything the page lists for one config (run in a fresh process for a clean peak memory)."""
    cfg = page_cfg(config_file, list(opts), device)
    model = build_model(cfg).eval()
    inputs = random_inputs(height, width, device, seed)
    params = count_parameters(model, inputs)
    gflops = count_gflops(model, inputs)
    latency = measure_latency(model, inputs, warmup, iters)
    # The training optimizer of the package being measured (its own, for a baseline commit).
    batch = synthetic_training_batch(height, width, device, seed=seed)
    amp = cfg.SOLVER.AMP
    train = measure_training_step(model, batch, train_warmup, train_iters,
                                  optimizer=build_sdconet_optimizer(cfg, model),
                                  autocast_dtype=getattr(torch, amp.DTYPE) if amp.ENABLED else None)
    train_gmacs = training_gmacs(model, batch)
    peaks = gemm_peaks(device)
    return {"config_file": config_file, "opts": list(opts),
            "params_inference": params["inference"], "params_total": params["total"],
            "gflops": gflops["total"], "latency_ms": latency["median_ms"], "train_step_ms": train["median_ms"],
            "train_batch": train["batch"], "train_warmup": train["warmup"], "train_iters": train["iters"],
            "latency_warmup": latency["warmup"], "latency_iters": latency["iters"], "peak_memory_mb": train["peak_memory_mb"],
            "peak_memory_kind": train["peak_memory_kind"], "threads": torch.get_num_threads(),
            "train_gmacs": train_gmacs, "gemm_peaks": peaks, "gemm_peak_gmacs": max(peaks.values())}


def _measure_in_subprocess(config_file: str, args, pythonpath: Optional[str] = None, cwd: Optional[str] = None,
                           opts: Sequence[str] = ()) -> Dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "m.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--measure", config_file, "--json", out,
               "--input-size", *map(str, args.input_size), "--device", args.device, "--warmup", str(args.warmup),
               "--iters", str(args.iters), "--train-iters", str(args.train_iters),
               "--train-warmup", str(args.train_warmup)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        cmd += list(opts)
        env = dict(os.environ)
        if pythonpath:  # an older package first on the path: measure that code
            env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
        proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"measuring {config_file} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
        with open(out) as f:
            return json.load(f)


def _baseline_worktree(commit: str) -> str:
    """A read-only checkout of ``commit`` (git worktree) whose package is measured as 'before'."""
    path = os.path.join(REPO, "output", "benchmark-baseline", commit[:12])
    if not os.path.isdir(path):
        subprocess.run(["git", "-C", REPO, "worktree", "add", "--detach", path, commit], check=True,
                       capture_output=True)
    return path


def kept_notes(page: str) -> str:
    """The hand-written part of an existing page (from ``NOTES_MARKER`` on), or ''."""
    if not os.path.exists(page):
        return ""
    with open(page) as f:
        text = f.read()
    start = text.find(NOTES_MARKER)
    return "" if start < 0 else "\n" + text[start:]


def run_page(args, machine: Dict, command: str) -> Dict:
    """Measure the page's models (and the baseline commit) and write the page."""
    rows = {}
    for name, config, opts in PAGE_MODELS:
        print(f"measuring {name} ({config} {' '.join(opts)}) ...", flush=True)
        rows[name] = _measure_in_subprocess(config, args, opts=opts)
    comparison = None
    if args.baseline_commit:
        tree = _baseline_worktree(args.baseline_commit)
        config = PAGE_MODELS[0][1]
        runs = {"before": [], "after": []}
        for _ in range(args.rounds):  # alternate, so machine load hits both alike
            print("measuring SDCoNet at the baseline commit and now ...", flush=True)
            runs["before"].append(_measure_in_subprocess(os.path.join(tree, config), args,
                                                         pythonpath=os.path.join(tree, "projects", "SDCoNet"), cwd=tree))
            runs["after"].append(_measure_in_subprocess(config, args))
        comparison = {k: {q: statistics.median(r[q] for r in v) for q in ("latency_ms", "train_step_ms")}
                      for k, v in runs.items()}
        # Each round measures both back to back, so its ratio is the least exposed to machine drift.
        comparison["per_round"] = [{q: (b[q], a[q]) for q in ("latency_ms", "train_step_ms")}
                                   for b, a in zip(runs["before"], runs["after"])]
        comparison["commit"] = args.baseline_commit
        comparison["rounds"] = args.rounds
    result = {"command": command, "machine": machine, "rows": rows, "baseline": comparison,
              "input_size_hr": args.input_size, "device": args.device}
    text = format_page(result) + kept_notes(args.page)
    print(text)
    with open(args.page, "w") as f:
        f.write(text)
    print(f"wrote {args.page}")
    return result


def format_page(result: Dict) -> str:
    m, rows = result["machine"], result["rows"]
    ref = rows[PAGE_MODELS[0][0]]
    h, w = result["input_size_hr"]
    any_row = next(iter(rows.values()))
    lines = [
        "# SDCoNet benchmarks",
        "",
        f"Written by `{result['command']}`.",
        "",
        f"- machine: {m['cpu']} ({m['cpu_cores']} cores)" + (f", GPU {m['gpu']}" if "gpu" in m else "")
        + f", {m['platform']}; python {m['python']}, torch {m['torch']}",
        f"- device {result['device']}, {any_row['threads']} threads; load average before the run: "
        f"{m.get('load_average_1min', '?')}",
        f"- input: one {h}x{w} HR image (the models degrade it x2 inside, except DINO on HR); random weights; "
        "GFLOPs from fvcore (1 multiply-add = 1 flop); "
        f"eval latency = median of {any_row.get('latency_iters', '?')} eval forwards after "
        f"{any_row.get('latency_warmup', '?')} untimed ones; "
        f"training step = median of {any_row.get('train_iters', '?')} steps after {any_row.get('train_warmup', '?')} "
        "untimed ones (a process's first 2-3 steps grow its heap: page faults cost seconds of system time "
        "there), each forward + backward + the training optimizer's step (`Trainer.build_optimizer`: "
        f"full-model gradient clipping + AdamW) on a batch of {any_row['train_batch']} with 8 "
        f"boxes each; peak memory = {any_row['peak_memory_kind']}.",
        "",
        "| model | config | inference params (M) | GFLOPs | eval latency (ms) | training step (ms) | peak memory (MiB) "
        "| GFLOPs / SDCoNet | latency / SDCoNet | train step / SDCoNet |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | `{' '.join([r['config_file'], *r.get('opts', [])])}` | {r['params_inference'] / 1e6:.2f} | {r['gflops']:.2f} | "
            f"{r['latency_ms']:.1f} | {r['train_step_ms']:.0f} | {r['peak_memory_mb']:.0f} | "
            f"{r['gflops'] / ref['gflops']:.2f} | {r['latency_ms'] / ref['latency_ms']:.2f} | "
            f"{r['train_step_ms'] / ref['train_step_ms']:.2f} |")
    peak = max(r["gemm_peak_gmacs"] for r in rows.values())
    by_library = {}  # best per library over the rows (rows of older runs lack the split)
    for r in rows.values():
        for name, value in r.get("gemm_peaks", {}).items():
            by_library[name] = max(value, by_library.get(name, 0.0))
    libraries = ", ".join(f"{name} {value:.0f}" for name, value in by_library.items())
    eval_floor, train_floor = ref["gflops"] / peak * 1000, ref["train_gmacs"] / peak * 1000
    lines += [
        "",
        "## SDCoNet against the machine's limit",
        "",
        f"The dense maths alone, run at the best fp32 matrix-product throughput measured in this run "
        f"({peak:.0f} G multiply-adds/s for 2048^3{'; ' + libraries if libraries else ''}), sets a floor no "
        f"implementation of the same fp32 model can beat:",
        "",
        "| | multiply-adds (G) | floor (ms) | measured (ms) | measured / floor |",
        "|---|---|---|---|---|",
        f"| eval forward (fvcore) | {ref['gflops']:.1f} | {eval_floor:.0f} | {ref['latency_ms']:.0f} | "
        f"{ref['latency_ms'] / eval_floor:.2f} |",
        f"| training step, forward + backward (torch FlopCounterMode) | {ref['train_gmacs']:.1f} | {train_floor:.0f} | "
        f"{ref['train_step_ms']:.0f} | {ref['train_step_ms'] / train_floor:.2f} |",
    ]
    base = result.get("baseline")
    if base:
        b, a = base["before"], base["after"]
        lines += [
            "",
            f"## SDCoNet before / after the performance work (commit {base['commit'][:12]} vs the working tree)",
            "",
            f"Measured in the same run, {base['rounds']} alternating rounds (median):",
            "",
            "| | eval latency (ms) | training step (ms) |",
            "|---|---|---|",
            f"| before ({base['commit'][:12]}) | {b['latency_ms']:.1f} | {b['train_step_ms']:.0f} |",
            f"| now | {a['latency_ms']:.1f} | {a['train_step_ms']:.0f} |",
            f"| speed-up | x{b['latency_ms'] / a['latency_ms']:.2f} | x{b['train_step_ms'] / a['train_step_ms']:.2f} |",
            "",
        ]
        if base.get("per_round"):
            lines += ["Each round on its own (before / now, ms):", "",
                      "| round | eval latency | speed-up | training step | speed-up |", "|---|---|---|---|---|"]
            for i, r in enumerate(base["per_round"], 1):
                (le, ln), (te, tn) = r["latency_ms"], r["train_step_ms"]
                lines.append(f"| {i} | {le:.1f} / {ln:.1f} | x{le / ln:.2f} | {te:.0f} / {tn:.0f} | x{te / tn:.2f} |")
            lines.append("")
        lines += [
            f"A 1.5x speed-up over the baseline would need {b['latency_ms'] / 1.5:.0f} ms (eval, "
            f"{b['latency_ms'] / 1.5 / eval_floor:.2f}x the floor) and {b['train_step_ms'] / 1.5:.0f} ms (training step, "
            f"{b['train_step_ms'] / 1.5 / train_floor:.2f}x the floor).",
        ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> Dict:
    parser = measuring_parser(__doc__, timing=True)
    parser.add_argument("--page", default=PAGE, help="where the page is written")
    parser.add_argument("--baseline-commit", metavar="SHA", help="also measure SDCoNet at this commit")
    parser.add_argument("--rounds", type=int, default=2, help="alternating before/after rounds for --baseline-commit")
    parser.add_argument("--measure", metavar="FILE", help=argparse.SUPPRESS)  # one row, in its own process
    parser.add_argument("--json", metavar="PATH", help=argparse.SUPPRESS)  # where --measure writes the row
    parser.add_argument("opts", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)  # the row's overrides
    args = parse(parser, argv, "benchmark_page.py")
    if not args.measure:
        return run_page(args, machine_info(args.device), args.command)
    logging.getLogger("fvcore").setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    row = measure_config(args.measure, *args.input_size, args.device, args.warmup, args.iters, args.train_iters,
                         args.seed, args.train_warmup, opts=args.opts)
    write_json(args.json, row)
    return row


if __name__ == "__main__":
    main()
