#!/usr/bin/env python
"""Parameters, GFLOPs and latency of an SDCoNet config on its inference path.

    python tools/benchmark.py --config-file configs/Baselines/dino_swin-t_lr_nwpu.yaml
    python tools/benchmark.py --config-file C --input-size 800 800 --device cuda --json out.json [opts ...]
    python tools/benchmark.py --config-file configs/SDCoNet/sdconet_swin-t_nwpu.yaml \
        --serial-config configs/Baselines/serial_sr_dino_swin-t_nwpu.yaml --selection-ablation

    python tools/benchmark.py --all [--baseline-commit SHA] [--device cuda]

``--all`` measures the four models of the benchmark page (SDCoNet, the DINO-LR baseline, the
serial baseline and DINO on HR) at 512x512 HR, each in its own process (params, GFLOPs, eval
latency, training-step time, peak memory), prints ratios to SDCoNet and writes
projects/SDCoNet/BENCHMARKS.md. ``--baseline-commit`` also measures SDCoNet with the package of
an older commit (checked out with ``git worktree``), alternating old and new runs (``--rounds``;
the page lists every round, because a 2-core cloud machine drifts by 10-15% within minutes).
Training steps are timed after ``--train-warmup`` untimed ones, in steady state. Text below
``NOTES_MARKER`` in an existing page is written by hand and kept.

``--serial-config`` adds the serial SR-then-detect baseline and prints its FLOPs and latency
divided by the main config's (the paper's efficiency claim). ``--selection-ablation`` rebuilds
the main config with every token-selection ratio at 1.0 (nothing dropped, as released) and
prints encoder GFLOPs and encoder / whole-model latency of both.

The model runs in eval mode under ``torch.no_grad()`` on one random uint8 BGR HR image; the
model itself degrades it (MODEL.SDCONET.DEGRADE.SCALE) before the backbone, exactly as in
evaluation. The printed block (machine, command line, figures) is meant to be pasted into a
benchmark page as is.

FLOPs come from fvcore, which counts one fused multiply-add as ONE flop (so its "GFLOPs" are
GMACs). Ops fvcore has no formula for are listed; the ones that matter here get a handle below.
"""
import argparse
import json
import logging
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

with warnings.catch_warnings():
    # fvcore scripts a loss at import time, which torch now flags as deprecated: not ours to fix.
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.* is deprecated", category=FutureWarning)
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model
    from detectron2.utils.analysis import FlopCountAnalysis
    from fvcore.nn.jit_handles import get_shape

    import sdconet
    from sdconet.engine.trainer import build_sdconet_optimizer

# ----------------------------------------------------------------------------- model


def benchmark_cfg(config_file: str, opts: Optional[List[str]] = None, device: str = "cpu"):
    cfg = get_cfg()
    sdconet.add_sdconet_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts or []))
    cfg.MODEL.DEVICE = device
    sdconet.check_sdconet_config(cfg)
    cfg.freeze()
    return cfg


def build_benchmark_model(config_file: str, opts: Optional[List[str]] = None, device: str = "cpu") -> nn.Module:
    """The detectron2 model of a config on ``device``, in eval mode (random weights: cost does not
    depend on them)."""
    return build_model(benchmark_cfg(config_file, opts, device)).eval()


def random_inputs(height: int, width: int, device: str = "cpu", seed: int = 0) -> List[Dict]:
    """detectron2 batched inputs holding one random uint8 BGR HR image, already on ``device`` so
    the latency excludes the host-to-device copy."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)
    return [{"image": image.to(device), "height": height, "width": width}]


# ----------------------------------------------------------------------------- parameters


class _ParameterReads(TorchFunctionMode):
    """Records which parameters any torch function or tensor method receives."""

    def __init__(self, parameter_ids):
        super().__init__()
        self.parameter_ids = parameter_ids
        self.read = set()

    def _visit(self, value):
        if isinstance(value, torch.Tensor):
            if id(value) in self.parameter_ids:
                self.read.add(id(value))
        elif isinstance(value, (list, tuple)):
            for item in value:
                self._visit(item)
        elif isinstance(value, dict):
            for item in value.values():
                self._visit(item)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self._visit(args)
        self._visit(kwargs or {})
        return func(*args, **(kwargs or {}))


def inference_parameter_names(model: nn.Module, inputs) -> set:
    """Names of the parameters read during one eval forward: the inference path.

    Training-only parts (denoising label embedding, later the SR branch) are never read in
    eval, so they drop out without a hand-kept list.
    """
    named = dict(model.named_parameters())
    ids = {id(p): name for name, p in named.items()}
    was_training = model.training
    model.eval()
    recorder = _ParameterReads(set(ids))
    with torch.no_grad(), recorder:
        model(inputs)
    model.train(was_training)
    return {ids[i] for i in recorder.read}


def count_parameters(model: nn.Module, inputs=None) -> Dict:
    """Parameter counts: ``total``, ``inference`` (read in an eval forward on ``inputs``; equals
    ``total`` when no inputs are given) and the same two per top-level child module."""
    used = inference_parameter_names(model, inputs) if inputs is not None else None
    named = dict(model.named_parameters())

    def counts(prefix):
        names = [n for n in named if not prefix or n.startswith(prefix + ".")]
        total = sum(named[n].numel() for n in names)
        inference = total if used is None else sum(named[n].numel() for n in names if n in used)
        return {"total": total, "inference": inference}

    result = counts("")
    result["modules"] = {name: counts(name) for name, _ in model.named_children()}
    direct = [n for n in named if "." not in n]  # parameters owned by the root module itself
    if direct:
        result["modules"]["(root)"] = {
            "total": sum(named[n].numel() for n in direct),
            "inference": sum(named[n].numel() for n in direct if used is None or n in used)}
    return result


# ----------------------------------------------------------------------------- FLOPs
# Cost models (multiply-adds, fvcore convention) for ops fvcore does not count or counts blindly.

_GRID_SAMPLE_TAPS = {0: 4, 1: 1, 2: 16}  # interpolation_mode: bilinear, nearest, bicubic


def grid_sampler_flops(inputs, outputs):
    """grid_sample: each output element (per channel, per sample) is a weighted sum of its taps:
    4 for bilinear (deformable attention), 1 for nearest, 16 for bicubic. The coordinate maths,
    shared by all channels, is not counted."""
    mode = inputs[2].toIValue() if len(inputs) > 2 else 0
    taps = _GRID_SAMPLE_TAPS.get(mode, 4)
    numel = 1
    for d in get_shape(outputs[0]):
        numel *= d
    return taps * numel


def upsample_bicubic_flops(inputs, outputs):
    """Bicubic resize (the x s degradation): 16 taps (4 x 4 neighbourhood) per output element."""
    numel = 1
    for d in get_shape(outputs[0]):
        numel *= d
    return 16 * numel


def sdpa_flops(inputs, outputs):
    """scaled_dot_product_attention, query (..., L, E), key (..., S, E), value (..., S, Ev):
    Q K^T costs L*S*E and the weighted sum of values L*S*Ev per batch-head; the softmax is not
    counted, as fvcore does not count it elsewhere."""
    q, v = get_shape(inputs[0]), get_shape(inputs[2])
    batch_heads = 1
    for d in q[:-2]:
        batch_heads *= d
    length, embed = q[-2], q[-1]
    source, value_dim = v[-2], v[-1]
    return batch_heads * length * source * (embed + value_dim)


OP_HANDLES = {
    "aten::grid_sampler": grid_sampler_flops,
    "aten::grid_sampler_2d": grid_sampler_flops,
    "aten::upsample_bicubic2d": upsample_bicubic_flops,
    "aten::scaled_dot_product_attention": sdpa_flops,
}

# Ops left uncounted on purpose: element-wise maths, reductions, indexing and data movement,
# each O(tensor size) with no multiply-add structure (detectron2 and fvcore skip the same kind).
NEGLIGIBLE_OPS = {
    "aten::gelu", "aten::relu", "aten::silu", "aten::pow", "aten::sin", "aten::cos", "aten::log",
    "aten::exp", "aten::sum", "aten::mean", "aten::cumsum", "aten::ne", "aten::eq", "aten::lt",
    "aten::gt", "aten::le", "aten::ge", "aten::all", "aten::any", "aten::fill_", "aten::pad",
    "aten::topk", "aten::max", "aten::min", "aten::clamp", "aten::clamp_min", "aten::masked_fill",
    "aten::masked_fill_", "aten::where", "aten::roll", "aten::floor_divide", "aten::remainder",
    "aten::abs", "aten::tanh", "aten::softmax", "aten::sigmoid", "aten::gather", "aten::scatter",
    "aten::index", "aten::index_put_", "aten::bitwise_not", "aten::logical_not", "aten::linspace",
    "aten::arange", "aten::full_like", "aten::zeros_like", "aten::ones_like", "aten::repeat",
    "aten::__or__", "aten::__and__", "aten::expand_as", "aten::scatter_", "aten::sort", "aten::argsort",
    "aten::index_copy", "aten::empty_like", "aten::numel",
}


def _quiet_tracing():
    """Tracing a detector warns on every Python-side shape read; those are expected here."""
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.* is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.trace.* is deprecated", category=FutureWarning)


# Deeper modules whose FLOPs are reported on their own (when the model has them).
SUBMODULES = ("transformer.encoder", "transformer.decoder", "transformer.saliency", "sr_decoder", "sr_backbone")


def count_gflops(model: nn.Module, image) -> Dict:
    """fvcore FLOPs (1 multiply-add = 1 flop) of one eval forward, in GFLOPs.

    ``image`` is a uint8 CHW tensor or detectron2 batched inputs. detectron2's
    ``FlopCountAnalysis`` adapts the list-of-dicts interface for ``torch.jit.trace``. Returns
    total, per top-level child module (plus what ``SDCoNet.forward`` does outside any child),
    per operator, and the ops that were not counted (split into negligible and unknown).
    """
    inputs = image if isinstance(image, list) else [{"image": image, "height": image.shape[-2],
                                                       "width": image.shape[-1]}]
    was_training = model.training
    model.eval()
    with warnings.catch_warnings(), torch.no_grad():
        _quiet_tracing()
        analysis = FlopCountAnalysis(model, inputs)
        analysis.set_op_handle(**OP_HANDLES)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
        total = analysis.total()
        by_module = analysis.by_module()
        by_operator = analysis.by_operator()
        unsupported = analysis.unsupported_ops()
    model.train(was_training)

    # The tracing adapter wraps the detector as ``model``: strip that prefix.
    modules = {name: by_module.get(f"model.{name}", 0) / 1e9 for name, _ in model.named_children()}
    modules["(outside modules)"] = total / 1e9 - sum(modules.values())
    parts = {name: by_module.get(f"model.{name}", 0) / 1e9 for name in SUBMODULES if by_module.get(f"model.{name}")}
    return {
        "total": total / 1e9,
        "by_module": modules,
        "by_submodule": parts,
        "by_operator": {op: n / 1e9 for op, n in by_operator.most_common()},
        "uncounted_negligible": {op: n for op, n in sorted(unsupported.items()) if op in NEGLIGIBLE_OPS},
        "uncounted_unknown": {op: n for op, n in sorted(unsupported.items()) if op not in NEGLIGIBLE_OPS},
    }


# ----------------------------------------------------------------------------- latency


class ModuleTimer:
    """Wall time spent inside one submodule's forward, through forward hooks (synchronising CUDA)."""

    def __init__(self, module: nn.Module):
        self.times: List[float] = []
        self._start = 0.0
        cuda = next(module.parameters()).device.type == "cuda"

        def before(*_):
            if cuda:
                torch.cuda.synchronize()
            self._start = time.perf_counter()

        def after(*_):
            if cuda:
                torch.cuda.synchronize()
            self.times.append((time.perf_counter() - self._start) * 1000.0)

        self._handles = [module.register_forward_pre_hook(before), module.register_forward_hook(after)]

    def remove(self):
        for handle in self._handles:
            handle.remove()


def measure_latency(model: nn.Module, inputs, warmup: int = 3, iters: int = 10,
                    submodule: Optional[str] = None) -> Dict:
    """Wall time of ``iters`` eval forwards after ``warmup`` untimed ones, in ms; with
    ``submodule`` (a dotted name), also the median time spent inside it (``submodule_median_ms``)."""
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    cuda = next(model.parameters()).device.type == "cuda"
    was_training = model.training
    model.eval()
    timer = ModuleTimer(model.get_submodule(submodule)) if submodule else None
    times = []
    try:
        with torch.no_grad():
            for step in range(warmup + iters):
                if cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                model(inputs)
                if cuda:
                    torch.cuda.synchronize()
                if step >= warmup:
                    times.append((time.perf_counter() - start) * 1000.0)
    finally:
        if timer:
            timer.remove()
        model.train(was_training)
    result = {"median_ms": statistics.median(times), "mean_ms": statistics.fmean(times),
              "min_ms": min(times), "max_ms": max(times), "warmup": warmup, "iters": iters,
              "threads": torch.get_num_threads()}
    if timer:
        result["submodule"] = submodule
        result["submodule_median_ms"] = statistics.median(timer.times[-iters:])
    return result


# ----------------------------------------------------------------------------- report


def machine_info(device: str) -> Dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__}
    if hasattr(os, "getloadavg"):  # other work on the machine inflates latencies: record it
        info["load_average_1min"] = round(os.getloadavg()[0], 2)
    try:
        import detectron2
        import fvcore
        info["detectron2"] = detectron2.__version__
        info["fvcore"] = getattr(fvcore, "__version__", "?")
    except ImportError:
        pass
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def format_report(result: Dict) -> str:
    m, p, g, lat = result["machine"], result["params"], result["gflops"], result["latency"]
    hr, lr = result["input_size_hr"], result["input_size_model"]
    lines = [
        f"command: {result['command']}",
        f"machine: {m['cpu']} ({m['cpu_cores']} cores), {m['platform']}"
        + (f", load average {m['load_average_1min']} at start" if "load_average_1min" in m else ""),
        f"software: python {m['python']}, torch {m['torch']}, detectron2 {m.get('detectron2', '?')}, "
        f"fvcore {m.get('fvcore', '?')}" + (f", GPU {m['gpu']}" if "gpu" in m else ""),
        f"config: {result['config_file']}" + (f"  opts: {' '.join(result['opts'])}" if result["opts"] else ""),
        f"input: HR {hr[0]}x{hr[1]} -> model input (after x{result['degrade_scale']} degradation inside "
        f"the model) {lr[0]}x{lr[1]}, batch 1, eval mode, no_grad, device {result['device']}",
        "",
        f"parameters: total {p['total'] / 1e6:.2f} M, inference path {p['inference'] / 1e6:.2f} M",
    ]
    for name, c in p["modules"].items():
        lines.append(f"  {name:<20} total {c['total'] / 1e6:8.3f} M   inference {c['inference'] / 1e6:8.3f} M")
    lines += [
        "",
        f"GFLOPs (fvcore: 1 fused multiply-add = 1 flop, i.e. GMACs): {g['total']:.2f}",
    ]
    for name, v in g["by_module"].items():
        lines.append(f"  {name:<20} {v:8.3f}")
    lines.append("  by operator: " + ", ".join(f"{op} {v:.3f}" for op, v in g["by_operator"].items()))
    lines.append("  cost models: grid_sampler 4 MACs/output (bilinear), upsample_bicubic2d 16 MACs/output, "
                 "scaled_dot_product_attention L*S*(E+Ev) per batch-head")
    if g["uncounted_negligible"]:
        lines.append("  not counted (element-wise/reduction/indexing, negligible): "
                     + ", ".join(f"{op} x{n}" for op, n in g["uncounted_negligible"].items()))
    if g["uncounted_unknown"]:
        lines.append("  WARNING not counted, no cost model (check they are negligible): "
                     + ", ".join(f"{op} x{n}" for op, n in g["uncounted_unknown"].items()))
    lines += [
        "",
        f"latency ({result['device']}, {lat['threads']} threads, {lat['warmup']} warmup + {lat['iters']} runs): "
        f"median {lat['median_ms']:.1f} ms, mean {lat['mean_ms']:.1f} ms "
        f"(min {lat['min_ms']:.1f}, max {lat['max_ms']:.1f})",
    ]
    load = m.get("load_average_1min")
    if result["device"] == "cpu" and load is not None and load > 0.5 * (m["cpu_cores"] or 1):
        lines.append(f"  WARNING: load average {load} on {m['cpu_cores']} cores before the run: other work competes "
                     "for the CPU and the latency is unreliable (more so with several threads)")
    return "\n".join(lines)


def benchmark(config_file: str, opts=None, height: int = 512, width: int = 512, device: str = "cpu",
              warmup: int = 3, iters: int = 10, seed: int = 0) -> Dict:
    """All figures for one config, as a JSON-ready dict (``command`` and ``machine`` filled by main)."""
    model = build_benchmark_model(config_file, opts, device)
    inputs = random_inputs(height, width, device, seed)
    scale = model.input_scale
    result = {
        "config_file": config_file, "opts": list(opts or []), "device": device,
        "input_size_hr": [height, width], "degrade_scale": scale,
        "input_size_model": [-(-height // scale), -(-width // scale)],
        "params": count_parameters(model, inputs),
        "gflops": count_gflops(model, inputs),
        "latency": measure_latency(model, inputs, warmup, iters),
    }
    return result


# Overrides that switch token selection off: every level and layer keeps all tokens (the release).
def no_selection_opts(config_file: str, opts=None) -> List[str]:
    cfg = get_cfg()
    sdconet.add_sdconet_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts or []))
    sal = cfg.MODEL.SDCONET.SALIENCY
    return list(opts or []) + ["MODEL.SDCONET.SALIENCY.LEVEL_RATIOS", str((1.0,) * len(sal.LEVEL_RATIOS)),
                               "MODEL.SDCONET.SALIENCY.LAYER_RATIOS", str((1.0,) * len(sal.LAYER_RATIOS))]


def selection_ablation(config_file: str, opts=None, height: int = 512, width: int = 512, device: str = "cpu",
                       warmup: int = 3, iters: int = 10, seed: int = 0) -> Dict:
    """Encoder GFLOPs and latency with the config's selection ratios vs all ratios 1.0.

    The two models are timed alternately, one forward each in turn, so a change of machine load
    affects both alike.
    """
    inputs = random_inputs(height, width, device, seed)
    variants = {"selected": list(opts or []), "all_tokens": no_selection_opts(config_file, opts)}
    models = {name: build_benchmark_model(config_file, o, device) for name, o in variants.items()}
    result = {}
    for name, model in models.items():
        if model.transformer.saliency is None:
            raise SystemExit("--selection-ablation needs MODEL.SDCONET.SALIENCY.ENABLED True in the config")
        flops = count_gflops(model, inputs)
        result[name] = {"encoder_gflops": flops["by_submodule"]["transformer.encoder"],
                        "total_gflops": flops["total"], "latency": []}
        measure_latency(model, inputs, warmup=warmup, iters=1)
    for _ in range(iters):
        for name, model in models.items():
            result[name]["latency"].append(measure_latency(model, inputs, 0, 1, "transformer.encoder"))
    for name in models:
        runs = result[name].pop("latency")
        result[name]["median_ms"] = statistics.median(r["median_ms"] for r in runs)
        result[name]["encoder_median_ms"] = statistics.median(r["submodule_median_ms"] for r in runs)
    sel, full = result["selected"], result["all_tokens"]
    result["encoder_gflops_ratio"] = sel["encoder_gflops"] / full["encoder_gflops"]
    result["encoder_latency_ratio"] = sel["encoder_median_ms"] / full["encoder_median_ms"]
    result["latency_ratio"] = sel["median_ms"] / full["median_ms"]
    result["iters"] = iters
    return result


def serial_comparison(main: Dict, serial_config: str, height: int, width: int, device: str,
                      warmup: int, iters: int, seed: int) -> Dict:
    """The serial baseline's figures and its cost divided by the main config's."""
    serial = benchmark(serial_config, [], height, width, device, warmup, iters, seed)
    return {
        "config_file": serial_config,
        "params_inference": serial["params"]["inference"],
        "gflops": serial["gflops"]["total"],
        "gflops_by_module": serial["gflops"]["by_module"],
        "latency_median_ms": serial["latency"]["median_ms"],
        "gflops_ratio": serial["gflops"]["total"] / main["gflops"]["total"],
        "latency_ratio": serial["latency"]["median_ms"] / main["latency"]["median_ms"],
    }


def format_comparisons(result: Dict) -> str:
    lines = []
    serial = result.get("serial")
    if serial:
        lines += ["", f"serial baseline: {serial['config_file']}",
                  f"  inference params {serial['params_inference'] / 1e6:.2f} M, GFLOPs {serial['gflops']:.2f}, "
                  f"latency median {serial['latency_median_ms']:.1f} ms",
                  f"  serial / this config: GFLOPs x{serial['gflops_ratio']:.2f}, latency x{serial['latency_ratio']:.2f}"]
    sel = result.get("selection_ablation")
    if sel:
        a, b = sel["selected"], sel["all_tokens"]
        lines += ["", f"token selection (this config's ratios) vs all ratios 1.0, {sel['iters']} alternating runs each:",
                  f"  encoder GFLOPs {a['encoder_gflops']:.3f} vs {b['encoder_gflops']:.3f} "
                  f"(x{sel['encoder_gflops_ratio']:.2f})",
                  f"  encoder latency median {a['encoder_median_ms']:.1f} ms vs {b['encoder_median_ms']:.1f} ms "
                  f"(x{sel['encoder_latency_ratio']:.2f})",
                  f"  whole model: GFLOPs {a['total_gflops']:.2f} vs {b['total_gflops']:.2f}, latency median "
                  f"{a['median_ms']:.1f} ms vs {b['median_ms']:.1f} ms (x{sel['latency_ratio']:.2f})"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- training step


def synthetic_training_batch(height: int, width: int, device: str, batch: int = 2, seed: int = 0) -> List[Dict]:
    """``batch`` random HR images, each with a few boxes of small-object size (8-48 px)."""
    from detectron2.structures import Boxes, Instances
    generator = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(batch):
        image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)
        n = 8
        xy = torch.rand(n, 2, generator=generator) * torch.tensor([width - 48.0, height - 48.0])
        wh = 8 + torch.rand(n, 2, generator=generator) * 40
        inst = Instances((height, width))
        inst.gt_boxes = Boxes(torch.cat([xy, xy + wh], dim=1))
        inst.gt_classes = torch.randint(0, 3, (n,), generator=generator)
        items.append({"image": image.to(device), "instances": inst.to(device), "height": height, "width": width})
    return items


def measure_training_step(model: nn.Module, batch: List[Dict], warmup: int = 1, iters: int = 3,
                          optimizer: Optional[torch.optim.Optimizer] = None,
                          autocast_dtype: Optional[torch.dtype] = None) -> Dict:
    """Median wall time of forward + backward + optimizer step in training mode, in ms, and the
    peak memory: CUDA allocator peak on GPU, the process's peak RSS (everything so far) on CPU.

    ``optimizer``: the one training uses (the page passes ``Trainer.build_optimizer``'s: full-model
    gradient clipping + AdamW); None = a plain AdamW. ``autocast_dtype``: run the forward under
    autocast, as the trainer does with SOLVER.AMP.ENABLED.
    """
    device_type = next(model.parameters()).device.type
    cuda = device_type == "cuda"
    model.train()
    if optimizer is None:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(warmup + iters):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device_type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            losses = model(batch)
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()
        if cuda:
            torch.cuda.synchronize()
        if step >= warmup:
            times.append((time.perf_counter() - start) * 1000.0)
    model.eval()
    if cuda:
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        import resource
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"median_ms": statistics.median(times), "iters": iters, "warmup": warmup, "batch": len(batch),
            "peak_memory_mb": peak_mb,
            "peak_memory_kind": "CUDA allocator peak" if cuda else "process peak RSS"}


def training_gmacs(model: nn.Module, batch: List[Dict]) -> float:
    """Multiply-adds of one training forward + backward in G, as torch's FlopCounterMode counts
    them (matrix products, convolutions, attention: the dense maths; sampling is left out)."""
    from torch.utils.flop_counter import FlopCounterMode
    model.train()
    with FlopCounterMode(display=False) as counter:
        sum(model(batch).values()).backward()
    model.zero_grad(set_to_none=True)
    model.eval()
    return counter.get_total_flops() / 2e9  # it counts 2 flops per multiply-add


def gemm_peaks(device: str, size: int = 2048, repeats: int = 5) -> Dict[str, float]:
    """The best fp32 matrix-product throughput seen on ``device``, in G multiply-adds per second,
    per library: on CPU both of torch's (MKL behind ``@``, oneDNN behind ``torch.ops.mkldnn``,
    which ``MODEL.SDCONET.ONEDNN_LINEAR`` uses), so a user sees which one this machine favours."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    products = {"cublas" if device == "cuda" else "mkl": lambda: a @ b}
    if device == "cpu" and torch.backends.mkldnn.is_available():
        products["onednn"] = lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
    peaks = {}
    for name, product in products.items():
        best = float("inf")
        for _ in range(repeats + 1):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            product()
            if device == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
        peaks[name] = size**3 / best / 1e9
    return peaks


# ----------------------------------------------------------------------------- benchmark page

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
PAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "projects", "SDCoNet", "BENCHMARKS.md")


def measure_config(config_file: str, height: int, width: int, device: str, warmup: int, iters: int,
                   train_iters: int, seed: int = 0, train_warmup: int = 4, opts: Sequence[str] = ()) -> Dict:
    """Everything the page lists for one config (run in a fresh process for a clean peak memory)."""
    cfg = benchmark_cfg(config_file, list(opts), device)
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
    import subprocess
    import tempfile
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
    import subprocess
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(repo, "output", "benchmark-baseline", commit[:12])
    if not os.path.isdir(path):
        subprocess.run(["git", "-C", repo, "worktree", "add", "--detach", path, commit], check=True,
                       capture_output=True)
    return path


# Everything from this line on in an existing page is written by hand (GPU runs, analysis) and is
# carried over when --all rewrites the measured part above it.
NOTES_MARKER = "<!-- Written by hand below this line; tools/benchmark.py --all keeps it. -->"


def kept_notes(page: str) -> str:
    """The hand-written part of an existing page (from ``NOTES_MARKER`` on), or ''."""
    if not os.path.exists(page):
        return ""
    with open(page) as f:
        text = f.read()
    start = text.find(NOTES_MARKER)
    return "" if start < 0 else "\n" + text[start:]


def run_page(args, machine: Dict, command: str) -> Dict:
    """Measure the page's models (and the baseline commit) and write BENCHMARKS.md."""
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


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", metavar="FILE")
    parser.add_argument("--all", action="store_true", help="measure the benchmark page's models and write BENCHMARKS.md")
    parser.add_argument("--page", default=PAGE, help="where --all writes the page")
    parser.add_argument("--baseline-commit", metavar="SHA", help="with --all: also measure SDCoNet at this commit")
    parser.add_argument("--rounds", type=int, default=2, help="alternating before/after rounds for --baseline-commit")
    parser.add_argument("--train-iters", type=int, default=3, help="timed training steps per model")
    parser.add_argument("--train-warmup", type=int, default=4,
                        help="untimed training steps first: a process's first 2-3 steps grow its heap (page "
                             "faults, seconds of system time on CPU), which a long training run pays only once")
    parser.add_argument("--measure", metavar="FILE", help=argparse.SUPPRESS)  # one page row, used by --all
    parser.add_argument("--input-size", nargs=2, type=int, default=[512, 512], metavar=("H", "W"),
                        help="HR image size given to the model (it degrades it itself)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random input image")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON here")
    parser.add_argument("--serial-config", metavar="FILE",
                        help="also measure this serial baseline and print its cost / this config's")
    parser.add_argument("--selection-ablation", action="store_true",
                        help="also compare encoder cost with all token-selection ratios at 1.0")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE pairs")
    return parser.parse_args(argv)


def main(argv=None) -> Dict:
    command_args = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if not (args.config_file or args.all or args.measure):
        raise SystemExit("give --config-file, or --all for the benchmark page")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but CUDA is not available")
    logging.getLogger("fvcore").setLevel(logging.ERROR)
    machine = machine_info(args.device)  # before the run, so the load average is other work's
    previous_threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.measure:
        try:
            row = measure_config(args.measure, *args.input_size, args.device, args.warmup, args.iters, args.train_iters,
                                 args.seed, args.train_warmup, opts=args.opts)
        finally:
            torch.set_num_threads(previous_threads)
        with open(args.json, "w") as f:
            json.dump(row, f)
        return row
    if args.all:
        return run_page(args, machine, "python tools/benchmark.py " + shlex.join(command_args))
    try:
        result = benchmark(args.config_file, args.opts, *args.input_size, device=args.device,
                           warmup=args.warmup, iters=args.iters, seed=args.seed)
        if args.serial_config:
            result["serial"] = serial_comparison(result, args.serial_config, *args.input_size, args.device,
                                                 args.warmup, args.iters, args.seed)
        if args.selection_ablation:
            result["selection_ablation"] = selection_ablation(args.config_file, args.opts, *args.input_size,
                                                              args.device, args.warmup, args.iters, args.seed)
    finally:
        torch.set_num_threads(previous_threads)  # main() may be called from other code (tests)
    result["command"] = "python tools/benchmark.py " + shlex.join(command_args)
    result["machine"] = machine
    print(format_report(result) + format_comparisons(result))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
