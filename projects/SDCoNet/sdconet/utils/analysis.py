"""Parameters and FLOPs of a detector: which parameters the inference path reads, fvcore FLOPs of
one eval forward (with cost models for the ops fvcore has no formula for) and the multiply-adds
of a training forward + backward.

FLOPs follow fvcore, which counts one fused multiply-add as ONE flop (so its "GFLOPs" are GMACs).
This module imports nothing else from ``sdconet``: tools/benchmark_page.py also measures an older
commit's package with it.
"""
import warnings
from typing import Dict, List

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

with warnings.catch_warnings():
    # fvcore scripts a loss at import time, which torch now flags as deprecated: not ours to fix.
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.* is deprecated", category=FutureWarning)
    from detectron2.utils.analysis import FlopCountAnalysis
    from fvcore.nn.jit_handles import get_shape

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


def _numel(value) -> int:
    numel = 1
    for d in get_shape(value):
        numel *= d
    return numel


def grid_sampler_flops(inputs, outputs):
    """grid_sample: each output element (per channel, per sample) is a weighted sum of its taps:
    4 for bilinear (deformable attention), 1 for nearest, 16 for bicubic. The coordinate maths,
    shared by all channels, is not counted."""
    mode = inputs[2].toIValue() if len(inputs) > 2 else 0
    return _GRID_SAMPLE_TAPS.get(mode, 4) * _numel(outputs[0])


def upsample_bicubic_flops(inputs, outputs):
    """Bicubic resize (the x s degradation): 16 taps (4 x 4 neighbourhood) per output element."""
    return 16 * _numel(outputs[0])


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
COST_MODELS = ("grid_sampler 4 MACs/output (bilinear), upsample_bicubic2d 16 MACs/output, "
               "scaled_dot_product_attention L*S*(E+Ev) per batch-head")

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
