#!/usr/bin/env python
"""Latency of the multi-scale deformable attention formulations at SDCoNet's shapes.

    python tools/benchmark_deform_attn.py --threads 1 2 --repeats 9
    python tools/benchmark_deform_attn.py --device cuda --impls grid_sample embedding_bag

Times the sampling alone (``multi_scale_deformable_attention``: no projections), forward under
``torch.no_grad()`` and forward + backward with gradients for value, locations and weights. The
implementations run interleaved in one process, round after round, and the table gives the
median over rounds with the speed-up over ``original`` (the per-level grid_sample code this
module had before the other formulations were added). Every implementation is first checked
against ``original`` in float64 ("rel err": the largest error of the output or a gradient
relative to its largest magnitude).

Cases (B=2, 8 heads of 32 channels, levels 32x32, 16x16, 8x8, 4x4: S=1360 tokens, 4 points):
encoder (all 1360 tokens query), selected (700 salient tokens query), decoder (400 queries).
"""
import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

# Loaded by path: the module needs only torch, so this runs where detectron2 is not installed.
_PATH = Path(__file__).resolve().parents[1] / "projects/SDCoNet/sdconet/layers/ms_deform_attn.py"
_spec = importlib.util.spec_from_file_location("ms_deform_attn", _PATH)
msda = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = msda  # torch.compile looks modules up by name
_spec.loader.exec_module(msda)

LEVELS = [(32, 32), (16, 16), (8, 8), (4, 4)]
CASES = {"encoder": 1360, "selected": 700, "decoder": 400}


def original(value, shapes, sampling_locations, attention_weights):
    """The formulation before this benchmark existed: grid_sample per level, points innermost."""
    batch, _, num_heads, head_dim = value.shape
    _, num_queries, _, _, num_points, _ = sampling_locations.shape
    value_per_level = value.split([h * w for h, w in shapes], dim=1)
    grids = 2.0 * sampling_locations - 1.0
    output = None
    for level, (height, width) in enumerate(shapes):
        level_value = value_per_level[level].permute(0, 2, 3, 1).reshape(batch * num_heads, head_dim, height, width)
        level_grid = grids[:, :, :, level].transpose(1, 2).reshape(batch * num_heads, num_queries, num_points, 2)
        sampled = F.grid_sample(level_value, level_grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        weights = attention_weights[:, :, :, level].transpose(1, 2).reshape(batch * num_heads, 1, num_queries, num_points)
        contribution = (sampled * weights).sum(-1)
        output = contribution if output is None else output + contribution
    return output.view(batch, num_heads * head_dim, num_queries).transpose(1, 2).contiguous()


def implementations(names, compile_gather=False):
    impls = {"original": original}
    for name in names:
        impls[name] = lambda v, s, l, w, name=name: msda.multi_scale_deformable_attention(v, s, l, w, impl=name)
    if compile_gather:
        compiled = torch.compile(lambda v, s, l, w: msda.multi_scale_deformable_attention(v, s, l, w, impl="gather"),
                                 dynamic=True)
        impls["gather+compile"] = compiled
    return impls


def make_inputs(num_queries, device, batch=2, heads=8, head_dim=32, points=4, seed=0):
    """Random values; locations around random reference points, a few pixels off on every level
    (some beyond the map, as in training); softmax weights over levels x points."""
    gen = torch.Generator().manual_seed(seed)
    levels = len(LEVELS)
    value = torch.randn(batch, sum(h * w for h, w in LEVELS), heads, head_dim, generator=gen)
    reference = torch.rand(batch, num_queries, 1, 1, 1, 2, generator=gen)
    sizes = torch.tensor([[w, h] for h, w in LEVELS], dtype=torch.float32)[:, None, :]
    offsets = torch.randn(batch, num_queries, heads, levels, points, 2, generator=gen) * 2.0 / sizes
    weights = torch.randn(batch, num_queries, heads, levels * points, generator=gen).softmax(-1)
    weights = weights.view(batch, num_queries, heads, levels, points)
    return [t.to(device) for t in (value, reference + offsets, weights)]


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_only(fn, inputs, device):
    with torch.no_grad():
        fn(inputs[0], LEVELS, inputs[1], inputs[2])
    synchronize(device)


def forward_backward(fn, inputs, device):
    leaves = [t.detach().requires_grad_(True) for t in inputs]
    out = fn(leaves[0], LEVELS, leaves[1], leaves[2])
    out.backward(torch.ones_like(out))
    synchronize(device)


def check(impls, inputs):
    """Largest error of the output and of the three gradients relative to their largest magnitude,
    against ``original`` run in float64."""
    exact = [t.detach().double().requires_grad_(True) for t in inputs]
    expected = original(exact[0], LEVELS, exact[1], exact[2])
    grad_out = torch.randn_like(expected)
    expected_all = [expected] + list(torch.autograd.grad(expected, exact, grad_out))
    leaves = [t.detach().requires_grad_(True) for t in inputs]
    errors = {}
    for name, fn in impls.items():
        out = fn(leaves[0], LEVELS, leaves[1], leaves[2])
        got_all = [out] + list(torch.autograd.grad(out, leaves, grad_out.to(out.dtype)))
        errors[name] = max(((g.double() - e).abs().max() / e.abs().max()).item() for g, e in zip(got_all, expected_all))
    return errors


def measure(impls, inputs, device, repeats, warmup):
    """Median milliseconds per implementation for forward and forward + backward, interleaved."""
    times = {name: {"fwd": [], "fwd+bwd": []} for name in impls}
    for round_index in range(warmup + repeats):
        for name, fn in impls.items():
            for kind, run in (("fwd", forward_only), ("fwd+bwd", forward_backward)):
                start = time.perf_counter()
                run(fn, inputs, device)
                if round_index >= warmup:
                    times[name][kind].append((time.perf_counter() - start) * 1e3)
    return {name: {kind: statistics.median(v) for kind, v in kinds.items()} for name, kinds in times.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="intra-op thread counts (CPU)")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--impls", nargs="+", choices=list(msda.IMPLEMENTATIONS), default=list(msda.IMPLEMENTATIONS))
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the gather formulation")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    impls = implementations(args.impls, args.compile)
    print(f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
          + f", auto -> {msda.resolve_implementation('auto', device)}, {args.repeats} rounds (median)")
    print("command: " + " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])))
    thread_counts = args.threads if device.type == "cpu" else [torch.get_num_threads()]
    header = (f"{'threads':>7} {'case':>9} {'Q':>5} {'impl':>15} {'fwd ms':>8} {'x':>5} {'fwd+bwd ms':>10} {'x':>5} "
              f"{'rel err':>8}")
    print(header)
    print("-" * len(header))
    results = []
    for threads in thread_counts:
        torch.set_num_threads(threads)
        for case in args.cases:
            inputs = make_inputs(CASES[case], device)
            errors = check(impls, inputs)
            medians = measure(impls, inputs, device, args.repeats, args.warmup)
            base = medians["original"]
            for name, m in medians.items():
                print(f"{threads:>7} {case:>9} {CASES[case]:>5} {name:>15} "
                      f"{m['fwd']:>8.2f} {base['fwd'] / m['fwd']:>5.2f} "
                      f"{m['fwd+bwd']:>10.2f} {base['fwd+bwd'] / m['fwd+bwd']:>5.2f} {errors[name]:>8.1e}")
                results.append({"threads": threads, "case": case, "impl": name, **m, "rel_error": errors[name]})
    return results


if __name__ == "__main__":
    main()
