"""oneDNN linear layers: F.linear's values and gradients, oneDNN where it should be, F.linear elsewhere."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from sdconet.layers.onednn_linear import OneDNNLinear, linear, onednn_available, use_onednn_linear
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

pytestmark = pytest.mark.skipif(not onednn_available(), reason="this PyTorch build has no oneDNN")


class OpLog(TorchDispatchMode):
    """Names of the ATen / mkldnn ops that ran."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def _inputs(shape, out_features=24, bias=True, transpose=False):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=generator)
    if transpose:  # a non-contiguous input, as a permuted feature map gives
        x = x.transpose(0, 1)
    weight = torch.randn(out_features, x.shape[-1], generator=generator) / x.shape[-1] ** 0.5
    b = torch.randn(out_features, generator=generator) if bias else None
    return x, weight, b


def _value_and_grads(fn, x, weight, bias):
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias) if t is not None]
    if bias is None:
        leaves.append(None)
    out = fn(leaves[0], leaves[1], leaves[2])
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(out.dtype)
    grads = torch.autograd.grad(out, [t for t in leaves if t is not None], grad)
    return out, grads


@pytest.mark.parametrize("shape,bias,transpose", [
    ((37, 16), True, False),
    ((3, 11, 16), False, False),
    ((2, 5, 7, 16), True, False),
    ((6, 4, 16), True, True),
])
def test_values_and_gradients_equal_float64_linear(shape, bias, transpose):
    x, weight, b = _inputs(shape, bias=bias, transpose=transpose)
    got, got_grads = _value_and_grads(linear, x, weight, b)
    as64 = lambda t: None if t is None else t.double()  # noqa: E731
    expected, expected_grads = _value_and_grads(F.linear, as64(x), as64(weight), as64(b))
    assert got.dtype == torch.float32 and got.shape == expected.shape
    torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-5)
    for g, e in zip(got_grads, expected_grads):
        assert g.shape == e.shape
        torch.testing.assert_close(g, e.float(), rtol=1e-5, atol=1e-5)


def test_forward_and_input_gradient_run_in_onednn_weight_gradient_in_mkl():
    x, weight, b = _inputs((9, 16))
    x.requires_grad_()
    weight.requires_grad_()
    with OpLog() as forward_log:
        out = linear(x, weight, b)
    with OpLog() as backward_log:
        out.sum().backward()
    assert "mkldnn._linear_pointwise" in forward_log.names
    assert "aten.addmm" not in forward_log.names and "aten.linear" not in forward_log.names
    assert backward_log.names.count("mkldnn._linear_pointwise") == 1  # the input gradient
    assert "aten.mm" in backward_log.names  # the weight gradient


@pytest.mark.parametrize("case", ["float64", "autocast", "trace"])
def test_other_calls_take_stock_linear(case):
    x, weight, b = _inputs((5, 16))
    if case == "float64":
        x, weight, b = x.double(), weight.double(), b.double()
    with OpLog() as log:
        if case == "autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = linear(x, weight, b)
            assert out.dtype == torch.bfloat16
        elif case == "trace":
            layer = OneDNNLinear(16, 24)
            traced = torch.jit.trace(layer, x, check_trace=False)
            assert "mkldnn" not in str(traced.graph)
            out = traced(x)
        else:
            out = linear(x, weight, b)
    assert "mkldnn._linear_pointwise" not in log.names
    assert out.shape == (5, 24)


def test_result_may_be_modified_in_place():
    """An FFN's ReLU(inplace=True) right after the layer: allowed, and the gradient is right."""
    layer = OneDNNLinear(16, 24)
    reference = nn.Linear(16, 24).double()
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(3, 5, 16)
    out = layer(x)
    assert out._base is None  # not an autograd view: no slice-copy node after the in-place op
    torch.relu_(out)
    assert type(out.grad_fn).__name__ == "ReluBackward0"
    out.sum().backward()
    torch.relu_(reference(x.double())).sum().backward()
    torch.testing.assert_close(layer.weight.grad, reference.weight.grad.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.bias.grad, reference.bias.grad.float(), rtol=1e-5, atol=1e-5)


def test_no_grad_and_inference_mode_give_the_training_values():
    layer = OneDNNLinear(16, 24)
    x = torch.randn(2, 7, 16)
    with_grad = layer(x)
    with torch.no_grad():
        no_grad = layer(x)
    with torch.inference_mode():
        inference = layer(x)
    torch.testing.assert_close(no_grad, with_grad, rtol=0, atol=0)
    torch.testing.assert_close(inference, with_grad, rtol=0, atol=0)


def test_flop_counter_sees_the_onednn_products():
    x, weight, b = _inputs((8, 3, 16))

    def count(fn):
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, weight, b))
        with FlopCounterMode(display=False) as counter:
            fn(xs, ws, bs).sum().backward()
        return counter.get_total_flops()

    expected = count(F.linear)
    assert expected == 3 * 2 * 24 * 16 * 24  # forward, input and weight gradients
    assert count(linear) == expected


def test_use_onednn_linear_switches_plain_linears_only_and_keeps_the_state_dict():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.MultiheadAttention(8, 2, batch_first=True),
                          nn.Sequential(nn.Linear(8, 4)))
    keys = list(model.state_dict())
    assert use_onednn_linear(model) == 2
    assert isinstance(model[0], OneDNNLinear) and isinstance(model[3][0], OneDNNLinear)
    assert type(model[2].out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert list(model.state_dict()) == keys
    assert use_onednn_linear(model) == 0  # already switched


def test_eval_reads_a_packed_weight_that_follows_weight_updates_and_is_dropped_by_train():
    from sdconet.layers import onednn_linear

    layer = OneDNNLinear(16, 24).eval()
    x = torch.randn(4, 16)
    with torch.no_grad():
        first = layer(x)
        torch.testing.assert_close(first, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
        assert layer.weight in onednn_linear._PACKED
        layer.weight.add_(1.0)  # as an optimizer step does: in place, a new version
        second = layer(x)
    torch.testing.assert_close(second, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(first, second)
    layer.train()
    assert layer.weight not in onednn_linear._PACKED


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="this CPU has no native bf16")
def test_bf16_autocast_eval_reads_a_packed_bf16_weight():
    """Under CPU bf16 autocast (TEST.SDCONET.AMP) an eval layer runs autocast's bf16 product on a
    packed bf16 copy of its weight, cast once instead of on every call; with gradients it leaves
    autocast alone."""
    from sdconet.layers import onednn_linear

    x, weight, b = _inputs((2, 7, 16))
    layer = OneDNNLinear(16, 24).eval()
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(b)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected = F.linear(x, layer.weight, layer.bias)
            with OpLog() as first:
                got = layer(x)
            with OpLog() as second:
                again = layer(x)
    assert got.dtype == again.dtype == torch.bfloat16 and torch.equal(got, again)
    torch.testing.assert_close(got, expected, rtol=8e-3, atol=1e-2)
    assert first.names.count("mkldnn._linear_pointwise") == second.names.count("mkldnn._linear_pointwise") == 1
    assert "aten.addmm" not in first.names + second.names and "aten.linear" not in first.names + second.names
    # The weight is cast (and packed) on the first call only: the second casts x and the bias.
    assert first.names.count("mkldnn._reorder_linear_weight") == 1
    assert "mkldnn._reorder_linear_weight" not in second.names
    assert second.names.count("aten._to_copy") == first.names.count("aten._to_copy") - 1 == 2
    assert onednn_linear._PACKED[layer.weight][0][2] == torch.bfloat16
    layer.train()
    with torch.autocast("cpu", dtype=torch.bfloat16), OpLog() as log:
        assert layer(x).dtype == torch.bfloat16
    assert "mkldnn._linear_pointwise" not in log.names
