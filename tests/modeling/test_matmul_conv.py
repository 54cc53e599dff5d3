"""Matrix-product convolutions: the same values, gradients and state dict as the nn layers."""
import pytest
import torch
import torch.nn as nn
from sdconet.layers.matmul_conv import MatmulConv2d, MatmulConvTranspose2x2


def _values_and_gradients(layer, x, grad_seed=1):
    out = layer(x)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed))
    params = [p for p in layer.parameters()]
    grads = torch.autograd.grad(out, [x, *params], grad)
    return out, grads


@pytest.mark.parametrize("cin,cout,kernel,stride,padding,dilation,size,bias", [
    (64, 96, 3, 2, 1, 1, (8, 8), False),   # the SR bottleneck's shape, scaled down
    (5, 7, 3, 1, 1, 1, (9, 6), True),      # odd, non-square map
    (4, 6, 3, 2, 1, 1, (7, 5), True),      # odd map, stride 2
    (3, 8, 1, 1, 0, 1, (5, 5), True),      # 1x1
    (6, 4, 4, 4, 0, 1, (12, 8), False),    # patch-embedding-like
    (4, 5, 3, 1, 2, 2, (9, 9), True),      # dilation
])
def test_matmul_conv2d_equals_conv2d(cin, cout, kernel, stride, padding, dilation, size, bias):
    torch.manual_seed(0)
    reference = nn.Conv2d(cin, cout, kernel, stride, padding, dilation, bias=bias).double()
    layer = MatmulConv2d(cin, cout, kernel, stride, padding, dilation, bias=bias).double()
    layer.load_state_dict(reference.state_dict())
    x = torch.randn(2, cin, *size, dtype=torch.float64, requires_grad=True)
    expected, expected_grads = _values_and_gradients(reference, x)
    got, got_grads = _values_and_gradients(layer, x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("cin,cout,size,bias,channels_last", [
    (48, 24, (4, 4), False, True),   # the SR decoder's case: an NCHW view of NHWC tokens
    (5, 3, (3, 7), True, False),     # odd map, plain NCHW input, bias
])
def test_matmul_conv_transpose_equals_conv_transpose(cin, cout, size, bias, channels_last):
    torch.manual_seed(0)
    reference = nn.ConvTranspose2d(cin, cout, kernel_size=2, stride=2, bias=bias).double()
    layer = MatmulConvTranspose2x2(cin, cout, bias=bias).double()
    layer.load_state_dict(reference.state_dict())
    x = torch.randn(2, cin, *size, dtype=torch.float64)
    if channels_last:
        x = x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    x.requires_grad_()
    expected, expected_grads = _values_and_gradients(reference, x)
    got, got_grads = _values_and_gradients(layer, x)
    assert got.shape == expected.shape == (2, cout, 2 * size[0], 2 * size[1])
    torch.testing.assert_close(got, expected)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e)


def test_unsupported_settings_are_refused():
    with pytest.raises(ValueError, match="groups=1"):
        MatmulConv2d(4, 4, 3, groups=2)
    with pytest.raises(ValueError, match="groups=1"):
        MatmulConv2d(4, 4, 3, padding="same")
    with pytest.raises(ValueError, match="no padding"):
        MatmulConvTranspose2x2(4, 4, padding=1)
