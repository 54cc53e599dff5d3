#!/usr/bin/env python
"""Parameters and FLOPs of an SDCoNet config on its inference path (fvcore).

    python tools/analyze_model.py --config-file configs/Baselines/dino_swin-t_lr_nwpu.yaml
    python tools/analyze_model.py --config-file C --input-size 800 800 --json out.json [opts ...]
    python tools/analyze_model.py --config-file configs/SDCoNet/sdconet_swin-t_nwpu.yaml \
        --serial-config configs/Baselines/serial_sr_dino_swin-t_nwpu.yaml --selection-ablation

The model (random weights) runs one eval forward under ``torch.no_grad()`` on one random uint8
BGR HR image; the model itself degrades it (MODEL.SDCONET.DEGRADE.SCALE) before the backbone,
exactly as in evaluation. Parameters are counted in total and on the inference path (those the
eval forward reads: training-only parts such as the SR decoder drop out).

FLOPs come from fvcore, which counts one fused multiply-add as ONE flop (so its "GFLOPs" are
GMACs). Ops fvcore has no formula for are listed; the ones that matter here get a cost model
(sdconet/utils/analysis.py).

``--serial-config`` adds the serial SR-then-detect baseline and prints its FLOPs divided by the
main config's (the paper's efficiency claim). ``--selection-ablation`` rebuilds the main config
with every token-selection ratio at 1.0 (nothing dropped, as released) and prints encoder and
whole-model GFLOPs of both. Latency: tools/benchmark.py.
"""
import logging
from typing import Dict

from sdconet.utils.analysis import COST_MODELS, count_gflops, count_parameters
from sdconet.utils.cli import add_config_args, measuring_parser, parse, report
from sdconet.utils.models import build_benchmark_model, run_description, selection_variants
from sdconet.utils.report import comparison_lines, header_lines, machine_info
from sdconet.utils.timing import random_inputs


def analyze(config_file: str, opts=(), height: int = 512, width: int = 512, device: str = "cpu",
            seed: int = 0) -> Dict:
    """Parameters and GFLOPs of one config, as a JSON-ready dict (``command`` and ``machine``
    filled by main)."""
    model = build_benchmark_model(config_file, opts, device)
    inputs = random_inputs(height, width, device, seed)
    return dict(run_description(model, config_file, opts, device, height, width),
                params=count_parameters(model, inputs), gflops=count_gflops(model, inputs))


def serial_comparison(main: Dict, serial_config: str, height: int, width: int, device: str, seed: int) -> Dict:
    """The serial baseline's size and FLOPs, and its FLOPs divided by the main config's."""
    serial = analyze(serial_config, [], height, width, device, seed)
    return {"config_file": serial_config, "params_inference": serial["params"]["inference"],
            "gflops": serial["gflops"]["total"], "gflops_by_module": serial["gflops"]["by_module"],
            "gflops_ratio": serial["gflops"]["total"] / main["gflops"]["total"]}


def selection_ablation(config_file: str, opts, height: int, width: int, device: str, seed: int) -> Dict:
    """Encoder and whole-model GFLOPs with the config's selection ratios vs all ratios 1.0."""
    inputs = random_inputs(height, width, device, seed)
    result = {}
    for name, model in selection_variants(config_file, opts, device).items():
        flops = count_gflops(model, inputs)
        result[name] = {"encoder_gflops": flops["by_submodule"]["transformer.encoder"], "total_gflops": flops["total"]}
    result["encoder_gflops_ratio"] = result["selected"]["encoder_gflops"] / result["all_tokens"]["encoder_gflops"]
    return result


def format_report(result: Dict) -> str:
    p, g = result["params"], result["gflops"]
    lines = header_lines(result) + [
        "",
        f"parameters: total {p['total'] / 1e6:.2f} M, inference path {p['inference'] / 1e6:.2f} M",
    ]
    for name, c in p["modules"].items():
        lines.append(f"  {name:<20} total {c['total'] / 1e6:8.3f} M   inference {c['inference'] / 1e6:8.3f} M")
    lines += ["", f"GFLOPs (fvcore: 1 fused multiply-add = 1 flop, i.e. GMACs): {g['total']:.2f}"]
    for name, v in g["by_module"].items():
        lines.append(f"  {name:<20} {v:8.3f}")
    lines.append("  by operator: " + ", ".join(f"{op} {v:.3f}" for op, v in g["by_operator"].items()))
    lines.append("  cost models: " + COST_MODELS)
    if g["uncounted_negligible"]:
        lines.append("  not counted (element-wise/reduction/indexing, negligible): "
                     + ", ".join(f"{op} x{n}" for op, n in g["uncounted_negligible"].items()))
    if g["uncounted_unknown"]:
        lines.append("  WARNING not counted, no cost model (check they are negligible): "
                     + ", ".join(f"{op} x{n}" for op, n in g["uncounted_unknown"].items()))
    return "\n".join(lines + comparison_lines(result))


def main(argv=None) -> Dict:
    args = parse(add_config_args(measuring_parser(__doc__, timing=False), "FLOPs"), argv, "analyze_model.py")
    logging.getLogger("fvcore").setLevel(logging.ERROR)
    machine = machine_info(args.device)
    result = analyze(args.config_file, args.opts, *args.input_size, device=args.device, seed=args.seed)
    if args.serial_config:
        result["serial"] = serial_comparison(result, args.serial_config, *args.input_size, args.device, args.seed)
    if args.selection_ablation:
        try:
            result["selection_ablation"] = selection_ablation(args.config_file, args.opts, *args.input_size,
                                                              args.device, args.seed)
        except ValueError as e:  # the config has no token selection to switch off
            raise SystemExit(str(e))
    return report(args, result, machine, format_report)


if __name__ == "__main__":
    main()
