"""Linear layers whose fp32 CPU matrix products run in oneDNN rather than MKL.

PyTorch's CPU ``F.linear`` calls MKL's sgemm for fp32. oneDNN, which PyTorch also ships
(``torch.ops.mkldnn``, the op inductor emits for CPU linears), runs the same products faster on
some CPUs (AMD ones in our measurements, BENCHMARKS.md item 9). The weight gradient stays with
MKL, which measured the faster of the two for most of its shapes. Where MKL is the faster
library (Intel CPUs, usually), keep the stock layers (``MODEL.SDCONET.ONEDNN_LINEAR False``);
``tools/benchmark.py`` prints both libraries' peaks.

It is the same fp32 maths in another summation order (relative differences ~1e-6). Everything
that is not a plain fp32 CPU call takes the stock ``F.linear``: GPUs, other dtypes, autocast, and
tracing / ONNX export / ``torch.compile``, which need an op they know. One exception: eval under
CPU bf16 autocast (TEST.SDCONET.AMP) reads a packed bf16 copy of the weight, the product autocast
would run, without casting the weight again on every call.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["OneDNNLinear", "linear", "onednn_available", "use_onednn_linear"]


def onednn_available() -> bool:
    """Whether this PyTorch build has oneDNN and its linear op."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):
        return False
    return True


_AVAILABLE = onednn_available()
# Whether this CPU has native bf16 for oneDNN (AVX512-BF16 / AMX); without it autocast keeps its path.
_BF16_NATIVE = _AVAILABLE and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _onednn_product(x: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    """``x @ weight.T + bias`` in oneDNN (``weight`` may be a transposed view)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


if _AVAILABLE:
    @register_flop_formula(torch.ops.mkldnn._linear_pointwise)
    def _linear_flops(x_shape, w_shape, *args, **kwargs) -> int:
        """So that torch's FlopCounterMode (the benchmark's training count) sees these products."""
        return 2 * math.prod(x_shape[:-1]) * w_shape[0] * w_shape[1]


class _OneDNNLinearFunction(torch.autograd.Function):
    """y = x W^T + b on 2-D ``x``; forward and input gradient in oneDNN, weight gradient in MKL."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn_product(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = _onednn_product(grad, weight.t()) if ctx.needs_input_grad[0] else None
        grad_weight = grad.t().mm(x) if ctx.needs_input_grad[1] else None
        grad_bias = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias


def _capturing_a_graph() -> bool:
    """Tracing, scripting, ONNX export or torch.compile: they need the stock op."""
    return (torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export()
            or torch.compiler.is_compiling())


def _use_onednn(x: torch.Tensor, weight: torch.Tensor, bias) -> bool:
    return (
        _AVAILABLE
        and x.device.type == "cpu"
        and x.dtype == torch.float32 and weight.dtype == torch.float32
        and (bias is None or bias.dtype == torch.float32)
        and x.dim() >= 2 and weight.is_contiguous()
        and not torch.is_autocast_enabled("cpu")
        and not _capturing_a_graph()
    )


def _needs_grad(x: torch.Tensor, weight: torch.Tensor, bias) -> bool:
    return torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))


# weight -> ((version, address, dtype), oneDNN's packed copy in that dtype). Weakly keyed: a
# deleted layer frees its entry.
_PACKED = WeakIdKeyDictionary()


def _packed_weight(weight: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """oneDNN's blocked layout of ``weight`` in ``dtype``, made once and remade when the weight
    changes (an optimizer step or ``load_state_dict`` bumps its version, ``.to()`` moves it)."""
    key = (weight._version, weight.data_ptr(), dtype)
    entry = _PACKED.get(weight)
    if entry is None or entry[0] != key:
        entry = (key, torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(dtype), None))
        _PACKED[weight] = entry
    return entry[1]


def _bf16_autocast_inference(x: torch.Tensor, weight: torch.Tensor, bias) -> bool:
    """An eval product under CPU bf16 autocast (TEST.SDCONET.AMP) that can read a packed bf16
    weight instead of autocast casting the fp32 weight again on every call."""
    return (
        _BF16_NATIVE
        and x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
        and torch.get_autocast_dtype("cpu") == torch.bfloat16
        and x.dtype in (torch.float32, torch.bfloat16) and weight.dtype == torch.float32
        and x.dim() >= 2 and weight.is_contiguous() and not _needs_grad(x, weight, bias)
        and not _capturing_a_graph()
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias=None, packed: bool = False) -> torch.Tensor:
    """``F.linear`` with fp32 CPU products in oneDNN (see the module docstring); differentiable.
    ``packed``: without gradients, read the weight's cached packed copy (:func:`_packed_weight`),
    also under CPU bf16 autocast (the same bf16 product autocast would run, bitwise)."""
    if packed and _bf16_autocast_inference(x, weight, bias):
        bias = None if bias is None else bias.to(torch.bfloat16)
        return _onednn_product(x.to(torch.bfloat16), _packed_weight(weight, torch.bfloat16), bias)
    if not _use_onednn(x, weight, bias):
        return F.linear(x, weight, bias)
    if not _needs_grad(x, weight, bias):
        return _onednn_product(x, _packed_weight(weight) if packed else weight, bias)
    # The Function sees 2-D tensors and returns a fresh one; the reshape to (..., out) happens
    # outside it, as ``_unsafe_view`` (what ``torch.matmul`` uses for the same purpose): autograd
    # does not track the result as a view, so an in-place op on it (ReLU(inplace=True)) is legal
    # and costs no slice-copy backward (which a plain view would add to every FFN's backward).
    out = _OneDNNLinearFunction.apply(x.reshape(-1, x.shape[-1]), weight, bias)
    return torch.ops.aten._unsafe_view(out, (*x.shape[:-1], weight.shape[0]))


class OneDNNLinear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict keys) computed by :func:`linear`.

    In eval mode without gradients the weight is read from oneDNN's packed (blocked) copy, made
    on first use: the weight is not re-laid out on every call, and the results are bitwise the
    same. ``train()`` drops the copy, so a training run does not carry a second set of weights
    between evaluations.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, packed=not self.training)

    def train(self, mode: bool = True):
        if mode:
            _PACKED.pop(self.weight, None)
        return super().train(mode)


def use_onednn_linear(module: nn.Module) -> int:
    """Turn every plain ``nn.Linear`` inside ``module`` into a :class:`OneDNNLinear`, in place.

    Subclasses of ``nn.Linear`` are left alone (``nn.MultiheadAttention``'s output projection is
    never called as a module). Returns how many layers were switched.
    """
    switched = 0
    for layer in module.modules():
        if type(layer) is nn.Linear:
            layer.__class__ = OneDNNLinear
            switched += 1
    return switched
