#!/usr/bin/env python
"""Eval latency, training-step time, peak memory and matrix-product peak of an SDCoNet config.

    python tools/benchmark.py --config-file configs/Baselines/dino_swin-t_lr_nwpu.yaml
    python tools/benchmark.py --config-file C --input-size 800 800 --device cuda --json out.json [opts ...]
    python tools/benchmark.py --config-file configs/SDCoNet/sdconet_swin-t_nwpu.yaml \
        --serial-config configs/Baselines/serial_sr_dino_swin-t_nwpu.yaml --selection-ablation

Eval latency: ``--iters`` eval forwards under ``torch.no_grad()`` after ``--warmup`` untimed ones,
on one random uint8 BGR HR image already on the device; the model itself degrades it
(MODEL.SDCONET.DEGRADE.SCALE) before the backbone, exactly as in evaluation. Training step:
forward + backward + the training optimizer's step (``Trainer.build_optimizer``, SOLVER.AMP as
in training) on a batch of 2 random images with 8 boxes each, timed after ``--train-warmup``
untimed steps, in steady state; peak memory is the CUDA allocator's peak on GPU, the process's
peak RSS on CPU. The matrix-product peak is the best fp32 throughput of a ``--gemm-size``^3
product (on CPU, both MKL and oneDNN). Weights are random: cost does not depend on them.

``--serial-config`` adds the serial SR-then-detect baseline and prints its latency divided by
the main config's. ``--selection-ablation`` rebuilds the main config with every token-selection
ratio at 1.0 (nothing dropped, as released) and times encoder and whole model of both,
alternately. Parameters and FLOPs: tools/analyze_model.py; the benchmark page:
tools/benchmark_page.py. The printed block (machine, command line, figures) is meant to be pasted
into a benchmark page as is.
"""
import statistics
from typing import Dict

import torch
from detectron2.modeling import build_model

from sdconet.config import get_sdconet_cfg
from sdconet.engine.trainer import build_sdconet_optimizer
from sdconet.utils.cli import add_config_args, measuring_parser, parse, report
from sdconet.utils.models import random_weights_opts, run_description, selection_variants
from sdconet.utils.report import comparison_lines, header_lines, machine_info
from sdconet.utils.timing import (gemm_peaks, measure_latency, measure_training_step, random_inputs,
                                  synthetic_training_batch)


def benchmark(config_file: str, opts=(), height: int = 512, width: int = 512, device: str = "cpu",
              warmup: int = 3, iters: int = 10, seed: int = 0, train_warmup: int = 4, train_iters: int = 3,
              gemm_size: int = 2048) -> Dict:
    """All figures for one config, as a JSON-ready dict (``command`` and ``machine`` filled by
    main). ``train_iters`` 0 skips the training step, ``gemm_size`` 0 the matrix-product peak."""
    # Random Swin weights unless opts name a file: timings do not depend on the weights.
    cfg = get_sdconet_cfg(config_file, [*random_weights_opts(opts), "MODEL.DEVICE", device])
    model = build_model(cfg).eval()
    inputs = random_inputs(height, width, device, seed)
    result = dict(run_description(model, config_file, opts, device, height, width),
                  latency=measure_latency(model, inputs, warmup, iters))
    if train_iters > 0:
        amp = cfg.SOLVER.AMP
        result["training"] = measure_training_step(
            model, synthetic_training_batch(height, width, device, seed=seed), train_warmup, train_iters,
            optimizer=build_sdconet_optimizer(cfg, model),
            autocast_dtype=getattr(torch, amp.DTYPE) if amp.ENABLED else None)
    if gemm_size > 0:
        result["gemm_peaks"] = gemm_peaks(device, gemm_size)
        result["gemm_size"] = gemm_size
    return result


def serial_comparison(main: Dict, serial_config: str, height: int, width: int, device: str,
                      warmup: int, iters: int, seed: int) -> Dict:
    """The serial baseline's eval latency and its latency divided by the main config's."""
    serial = benchmark(serial_config, [], height, width, device, warmup, iters, seed, train_iters=0, gemm_size=0)
    return {"config_file": serial_config, "latency_median_ms": serial["latency"]["median_ms"],
            "latency_ratio": serial["latency"]["median_ms"] / main["latency"]["median_ms"]}


def selection_ablation(config_file: str, opts, height: int, width: int, device: str,
                       warmup: int, iters: int, seed: int) -> Dict:
    """Encoder and whole-model latency with the config's selection ratios vs all ratios 1.0.

    The two models are timed alternately, one forward each in turn, so a change of machine load
    affects both alike.
    """
    inputs = random_inputs(height, width, device, seed)
    models = selection_variants(config_file, opts, device)
    runs = {name: [] for name in models}
    for model in models.values():
        measure_latency(model, inputs, warmup=warmup, iters=1)
    for _ in range(iters):
        for name, model in models.items():
            runs[name].append(measure_latency(model, inputs, 0, 1, "transformer.encoder"))
    result = {name: {"median_ms": statistics.median(r["median_ms"] for r in runs[name]),
                     "encoder_median_ms": statistics.median(r["submodule_median_ms"] for r in runs[name])}
              for name in models}
    sel, full = result["selected"], result["all_tokens"]
    result["encoder_latency_ratio"] = sel["encoder_median_ms"] / full["encoder_median_ms"]
    result["latency_ratio"] = sel["median_ms"] / full["median_ms"]
    result["iters"] = iters
    return result


def format_report(result: Dict) -> str:
    m, lat = result["machine"], result["latency"]
    lines = header_lines(result) + [
        "",
        f"latency ({result['device']}, {lat['threads']} threads, {lat['warmup']} warmup + {lat['iters']} runs): "
        f"median {lat['median_ms']:.1f} ms, mean {lat['mean_ms']:.1f} ms "
        f"(min {lat['min_ms']:.1f}, max {lat['max_ms']:.1f})",
    ]
    load = m.get("load_average_1min")
    if result["device"] == "cpu" and load is not None and load > 0.5 * (m["cpu_cores"] or 1):
        lines.append(f"  WARNING: load average {load} on {m['cpu_cores']} cores before the run: other work competes "
                     "for the CPU and the latency is unreliable (more so with several threads)")
    train = result.get("training")
    if train:
        lines.append(f"training step (batch {train['batch']} with 8 boxes each, the training optimizer, "
                     f"{train['warmup']} warmup + {train['iters']} steps): median {train['median_ms']:.0f} ms; "
                     f"peak memory {train['peak_memory_mb']:.0f} MiB ({train['peak_memory_kind']})")
    if result.get("gemm_peaks"):
        n = result["gemm_size"]
        lines.append(f"fp32 matrix-product peak ({n}^3): "
                     + ", ".join(f"{name} {v:.0f}" for name, v in result["gemm_peaks"].items()) + " G multiply-adds/s")
    return "\n".join(lines + comparison_lines(result))


def main(argv=None) -> Dict:
    parser = add_config_args(measuring_parser(__doc__, timing=True), "latency")
    parser.add_argument("--gemm-size", type=int, default=2048,
                        help="matrix size of the fp32 matrix-product peak (0: not measured)")
    args = parse(parser, argv, "benchmark.py")
    machine = machine_info(args.device)  # before the run, so the load average is other work's
    previous_threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        result = benchmark(args.config_file, args.opts, *args.input_size, device=args.device, warmup=args.warmup,
                           iters=args.iters, seed=args.seed, train_warmup=args.train_warmup,
                           train_iters=args.train_iters, gemm_size=args.gemm_size)
        if args.serial_config:
            result["serial"] = serial_comparison(result, args.serial_config, *args.input_size, args.device,
                                                 args.warmup, args.iters, args.seed)
        if args.selection_ablation:
            try:
                result["selection_ablation"] = selection_ablation(args.config_file, args.opts, *args.input_size,
                                                                  args.device, args.warmup, args.iters, args.seed)
            except ValueError as e:  # the config has no token selection to switch off
                raise SystemExit(str(e))
    finally:
        torch.set_num_threads(previous_threads)  # main() may be called from other code (tests)
    return report(args, result, machine, format_report)


if __name__ == "__main__":
    main()
