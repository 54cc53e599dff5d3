"""Pure-PyTorch multi-scale deformable attention against an explicit bilinear reference."""
import warnings

import pytest
import torch
from sdconet.layers.ms_deform_attn import (
    IMPLEMENTATIONS,
    MSDeformAttn,
    multi_scale_deformable_attention,
    resolve_implementation,
)


def reference_deformable_attention(value, shapes, locations, weights):
    """Bilinear sampling written out corner by corner (pixel centres at (i + 0.5) / size,
    zero outside the map), looping over levels and points."""
    batch, _, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = locations.shape
    out = torch.zeros(batch, queries, heads, head_dim, dtype=value.dtype)
    start = 0
    for level, (height, width) in enumerate(shapes):
        level_value = value[:, start:start + height * width].reshape(batch, height, width, heads, head_dim)
        start += height * width
        for point in range(points):
            x = locations[:, :, :, level, point, 0] * width - 0.5  # (B, Q, H) in pixel units
            y = locations[:, :, :, level, point, 1] * height - 0.5
            x0, y0 = torch.floor(x), torch.floor(y)
            sample = torch.zeros(batch, queries, heads, head_dim, dtype=value.dtype)
            for dx in (0, 1):
                for dy in (0, 1):
                    cx, cy = x0 + dx, y0 + dy
                    corner_weight = (1 - (x - cx).abs()) * (1 - (y - cy).abs())
                    inside = (cx >= 0) & (cx <= width - 1) & (cy >= 0) & (cy <= height - 1)
                    ix = cx.clamp(0, width - 1).long()
                    iy = cy.clamp(0, height - 1).long()
                    b = torch.arange(batch)[:, None, None].expand_as(ix)
                    h = torch.arange(heads)[None, None, :].expand_as(ix)
                    corner = level_value[b, iy, ix, h]  # (B, Q, H, Dh)
                    sample += (corner_weight * inside)[..., None] * corner
            out += weights[:, :, :, level, point][..., None] * sample
    return out.reshape(batch, queries, heads * head_dim)


def random_inputs(seed, shapes, batch=2, heads=2, head_dim=3, queries=5, points=3, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    tokens = sum(h * w for h, w in shapes)
    value = torch.randn(batch, tokens, heads, head_dim, generator=gen, dtype=dtype)
    # Locations in [-0.3, 1.3]: some samples fall (partly or fully) outside the map.
    locations = torch.rand(batch, queries, heads, len(shapes), points, 2, generator=gen, dtype=dtype) * 1.6 - 0.3
    weights = torch.rand(batch, queries, heads, len(shapes), points, generator=gen, dtype=dtype)
    return value, locations, weights


def test_matches_explicit_bilinear_reference():
    for seed, shapes in enumerate([[(4, 5), (2, 3)], [(6, 3), (3, 7), (1, 2)], [(5, 5), (3, 3), (2, 1)]]):
        value, locations, weights = random_inputs(seed, shapes)
        assert ((locations < 0) | (locations > 1)).any()
        expected = reference_deformable_attention(value, shapes, locations, weights)
        got = multi_scale_deformable_attention(value, torch.tensor(shapes), locations, weights)
        assert got.shape == (2, 5, 2 * 3)
        assert (got - expected).abs().max().item() < 1e-9
        # A list of (h, w) is accepted as well and gives the same result.
        assert torch.equal(multi_scale_deformable_attention(value, shapes, locations, weights), got)


def test_samples_far_outside_read_zero():
    shapes = [(3, 4), (2, 2)]
    value, locations, weights = random_inputs(7, shapes)
    far = torch.full_like(locations, 2.0)
    assert multi_scale_deformable_attention(value, shapes, far, weights).abs().max().item() == 0.0


def test_gradcheck():
    shapes = [(3, 2), (1, 2)]
    value, locations, weights = random_inputs(3, shapes, batch=1, heads=2, head_dim=2, queries=2, points=2)
    value.requires_grad_(True)
    locations.requires_grad_(True)
    weights.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda v, l, w: multi_scale_deformable_attention(v, shapes, l, w), (value, locations, weights), eps=1e-6, atol=1e-5
    )


def test_module_shapes_boxes_padding_and_autocast():
    torch.manual_seed(0)
    module = MSDeformAttn(embed_dim=16, num_heads=2, num_levels=2, num_points=3)
    shapes = torch.tensor([[4, 6], [2, 3]])
    tokens = 4 * 6 + 2 * 3
    query = torch.randn(2, 7, 16)
    value = torch.randn(2, tokens, 16)
    pad = torch.zeros(2, tokens, dtype=torch.bool)
    pad[1, 20:24] = True
    points = torch.rand(2, 7, 2, 2)
    boxes = torch.cat([points, torch.rand(2, 7, 2, 2) * 0.5], dim=-1)
    out_points = module(query, points, value, shapes, pad)
    out_boxes = module(query, boxes, value, shapes, pad)
    assert out_points.shape == out_boxes.shape == (2, 7, 16)
    # Changing padded values must not change the output: they are masked to zero.
    value_changed = value.clone()
    value_changed[1, 20:24] += 100.0
    assert torch.allclose(module(query, points, value_changed, shapes, pad), out_points, atol=1e-5)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(query, points, value, shapes, pad)
    assert out.shape == (2, 7, 16)
    assert torch.isfinite(out.float()).all()
    assert (out.float() - out_points).abs().max().item() < 0.1


def test_initial_offsets_fan_out_radially():
    module = MSDeformAttn(embed_dim=16, num_heads=4, num_levels=2, num_points=3)
    bias = module.sampling_offsets.bias.view(4, 2, 3, 2)
    # Head 0 points along +x, head 1 along +y; point k is k+1 pixels away; same on every level.
    assert torch.allclose(bias[0, 0], torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]]), atol=1e-6)
    assert torch.allclose(bias[1, 1, :, 1], torch.tensor([1.0, 2.0, 3.0]))
    assert torch.equal(bias[:, 0], bias[:, 1])
    assert module.attention_weights.weight.abs().sum() == 0 and module.sampling_offsets.weight.abs().sum() == 0


# ----------------------------------------------------------------------------- implementations
# Every formulation must equal the explicit reference in value and in all three gradients.

IMPLS = pytest.mark.parametrize("impl", IMPLEMENTATIONS)

# Non-square levels, a level one pixel wide, B > 1, more heads than channels.
SHAPE_SETS = [[(4, 5), (2, 3)], [(6, 3), (3, 7), (1, 2)], [(5, 5), (3, 3), (2, 1)]]


def gradients(fn, value, locations, weights, grad_output):
    leaves = [t.detach().requires_grad_(True) for t in (value, locations, weights)]
    out = fn(*leaves)
    return [out.detach()] + list(torch.autograd.grad(out, leaves, grad_output))


def assert_matches_reference(impl, shapes, value, locations, weights, tolerance=1e-9, check_location_grad=True):
    gen = torch.Generator().manual_seed(123)
    grad_output = torch.randn(value.shape[0], locations.shape[1], value.shape[2] * value.shape[3], generator=gen,
                              dtype=value.dtype)
    expected = gradients(lambda v, l, w: reference_deformable_attention(v, shapes, l, w), value, locations, weights,
                         grad_output)
    got = gradients(lambda v, l, w: multi_scale_deformable_attention(v, shapes, l, w, impl=impl), value, locations,
                    weights, grad_output)
    for name, g, e in zip(["output", "d value", "d locations", "d weights"], got, expected):
        if name == "d locations" and not check_location_grad:
            continue
        assert g.shape == e.shape, name
        assert (g - e).abs().max().item() < tolerance, f"{impl}: {name} off by {(g - e).abs().max().item()}"


@IMPLS
def test_every_impl_matches_reference_in_value_and_gradients(impl):
    for seed, shapes in enumerate(SHAPE_SETS):
        value, locations, weights = random_inputs(seed, shapes, batch=2, heads=3, queries=6)
        assert ((locations < 0) | (locations > 1)).any()
        assert_matches_reference(impl, shapes, value, locations, weights)


@IMPLS
def test_every_impl_on_map_edges_and_beyond(impl):
    """Samples on the map edge (0 and 1), half outside, far outside on each side and at corners."""
    shapes = [(4, 6), (3, 2)]
    value, locations, weights = random_inputs(11, shapes, batch=2, heads=2, queries=8, points=4)
    edge_values = torch.tensor([0.0, 1.0, -0.05, 1.05, -3.0, 4.0], dtype=torch.float64)
    gen = torch.Generator().manual_seed(5)
    pick = torch.randint(0, len(edge_values), locations.shape, generator=gen)
    on_edge = torch.rand(locations.shape, generator=gen) < 0.5
    locations = torch.where(on_edge, edge_values[pick], locations)
    assert_matches_reference(impl, shapes, value, locations, weights)
    # Samples fully outside read zeros and move nothing.
    far = torch.full_like(locations, -2.0)
    far[..., 1] = 3.0
    value_grad_out = gradients(lambda v, l, w: multi_scale_deformable_attention(v, shapes, l, w, impl=impl),
                               value, far, weights, torch.ones(2, 8, 2 * 3, dtype=torch.float64))
    assert all(t.abs().max().item() == 0.0 for t in value_grad_out)


@IMPLS
def test_every_impl_on_pixel_centres(impl):
    """Exactly on pixel centres (integer pixel coordinates): the output and the gradients of
    value and weights are continuous there and must match; the location gradient has a kink."""
    shapes = [(4, 4), (2, 8)]
    value, locations, weights = random_inputs(3, shapes, batch=1, heads=2, queries=5, points=2)
    sizes = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float64)[:, None, :]  # (L, 1, 2)
    gen = torch.Generator().manual_seed(9)
    centres = (torch.randint(0, 4, locations.shape, generator=gen).double() + 0.5) / sizes
    assert_matches_reference(impl, shapes, value, centres, weights, check_location_grad=False)


@IMPLS
def test_every_impl_gradcheck(impl):
    shapes = [(3, 2), (1, 2)]
    value, locations, weights = random_inputs(3, shapes, batch=2, heads=2, head_dim=2, queries=2, points=2)
    inputs = tuple(t.requires_grad_(True) for t in (value, locations, weights))
    assert torch.autograd.gradcheck(
        lambda v, l, w: multi_scale_deformable_attention(v, shapes, l, w, impl=impl), inputs, eps=1e-6, atol=1e-5
    )


@IMPLS
def test_every_impl_without_queries(impl):
    """Zero queries (no token selected) give an empty output and zero gradients."""
    shapes = [(3, 4), (2, 2)]
    value, locations, weights = random_inputs(2, shapes, queries=0)
    got = gradients(lambda v, l, w: multi_scale_deformable_attention(v, shapes, l, w, impl=impl), value, locations,
                    weights, torch.zeros(2, 0, 6, dtype=torch.float64))
    assert got[0].shape == (2, 0, 6)
    assert got[1].shape == value.shape and got[1].abs().max().item() == 0.0


def test_impls_agree_in_float32_at_a_realistic_size():
    shapes = [(16, 16), (8, 8), (4, 4), (2, 2)]
    value, locations, weights = random_inputs(4, shapes, batch=2, heads=4, head_dim=8, queries=60, points=4,
                                              dtype=torch.float32)
    grad_output = torch.randn(2, 60, 32)
    results = {impl: gradients(lambda v, l, w: multi_scale_deformable_attention(v, shapes, l, w, impl=impl),
                               value, locations, weights, grad_output) for impl in IMPLEMENTATIONS}
    for impl in IMPLEMENTATIONS[1:]:
        for got, expected in zip(results[impl], results[IMPLEMENTATIONS[0]]):
            scale = expected.abs().max().item()
            assert (got - expected).abs().max().item() < 1e-5 * max(scale, 1.0)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore:`torch.jit.trace` is deprecated:FutureWarning")
def test_auto_picks_embedding_bag_on_cpu_grid_sample_on_gpu_and_when_traced():
    assert resolve_implementation("auto", torch.device("cpu")) == "embedding_bag"
    assert resolve_implementation("auto", torch.device("cuda")) == "grid_sample"
    assert resolve_implementation("gather", torch.device("cuda")) == "gather"
    shapes = [(3, 4), (2, 2)]
    value, locations, weights = random_inputs(1, shapes, dtype=torch.float32)
    # Tracers (ONNX export, fvcore) must see grid_sample: they have no use for a Python autograd.Function.
    traced = torch.jit.trace(lambda v, l, w: multi_scale_deformable_attention(v, shapes, l, w),
                             (value, locations, weights))
    assert "grid_sampler" in str(traced.graph)
    eager = multi_scale_deformable_attention(value, shapes, locations, weights)
    assert torch.allclose(traced(value, locations, weights), eager, atol=1e-6)


def test_unknown_impl_is_a_clear_error():
    shapes = [(2, 2)]
    value, locations, weights = random_inputs(0, shapes)
    with pytest.raises(ValueError, match="unknown deformable attention impl 'cuda_kernel'.*grid_sample"):
        multi_scale_deformable_attention(value, shapes, locations, weights, impl="cuda_kernel")
    with pytest.raises(ValueError, match="unknown deformable attention impl 'fast'"):
        MSDeformAttn(embed_dim=16, num_heads=2, num_levels=1, num_points=2, impl="fast")


def module_inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(4, 6), (2, 3)]
    query = torch.randn(2, 7, 16, generator=gen)
    value = torch.randn(2, 30, 16, generator=gen)
    boxes = torch.cat([torch.rand(2, 7, 2, 2, generator=gen), torch.rand(2, 7, 2, 2, generator=gen) * 0.5], dim=-1)
    return query, boxes, value, shapes


def test_module_impl_is_stored_and_used():
    torch.manual_seed(0)
    modules = {impl: MSDeformAttn(embed_dim=16, num_heads=2, num_levels=2, num_points=3, impl=impl)
               for impl in ("auto",) + IMPLEMENTATIONS}
    assert MSDeformAttn(embed_dim=16, num_heads=2, num_levels=2, num_points=3).impl == "auto"
    state = modules["auto"].state_dict()
    query, boxes, value, shapes = module_inputs()
    # Learned offsets spread the samples so that some fall between pixels and some outside.
    state["sampling_offsets.weight"] = torch.randn_like(state["sampling_offsets.weight"])
    outputs = {}
    for impl, module in modules.items():
        module.load_state_dict(state)
        assert module.impl == impl
        outputs[impl] = module(query, boxes, value, shapes)
        outputs[impl].sum().backward()
    for impl in IMPLEMENTATIONS:
        assert torch.allclose(outputs[impl], outputs["auto"], atol=1e-5)
        for name, parameter in modules[impl].named_parameters():
            assert torch.allclose(parameter.grad, dict(modules["auto"].named_parameters())[name].grad, atol=1e-4), name


def test_compiled_module_matches_eager():
    """compile=True runs the sampling through torch.compile (gather under "auto") without
    warnings, with the eager output and gradients (about 15 s of compilation on CPU)."""
    torch.manual_seed(0)
    compiled = MSDeformAttn(embed_dim=16, num_heads=2, num_levels=2, num_points=3, compile=True)
    eager = MSDeformAttn(embed_dim=16, num_heads=2, num_levels=2, num_points=3)
    eager.load_state_dict(compiled.state_dict())
    assert compiled.compile_sampling and not eager.compile_sampling
    query, boxes, value, shapes = module_inputs(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = compiled(query, boxes, value, shapes)
        out.sum().backward()
    # A failed compilation would warn and fall back to eager.
    assert not [w for w in caught if "torch.compile of deformable attention failed" in str(w.message)]
    expected = eager(query, boxes, value, shapes)
    expected.sum().backward()
    assert torch.allclose(out, expected, atol=1e-5)
    for (name, parameter), reference in zip(compiled.named_parameters(), eager.parameters()):
        assert torch.allclose(parameter.grad, reference.grad, atol=1e-4), name


def test_level_sizes_are_kept_per_shapes_and_usable_after_inference_mode():
    """The (w, h) table is reused for the same shapes, rebuilt for others, and one made under
    inference_mode is not handed to a training forward (it could not be saved for backward)."""
    torch.manual_seed(0)
    module = MSDeformAttn(embed_dim=16, num_heads=2, num_levels=2, num_points=3)
    first = module.level_sizes([(4, 6), (2, 3)], torch.device("cpu"))
    assert first.tolist() == [[6.0, 4.0], [3.0, 2.0]]
    assert module.level_sizes([(4, 6), (2, 3)], "cpu") is first
    assert module.level_sizes([(5, 6), (2, 3)], "cpu").tolist() == [[6.0, 5.0], [3.0, 2.0]]

    shapes, tokens = [(4, 6), (2, 3)], 4 * 6 + 2 * 3
    query, value, points = torch.randn(2, 7, 16), torch.randn(2, tokens, 16), torch.rand(2, 7, 2, 2)
    with torch.inference_mode():
        expected = module(query, points, value, shapes)
    offsets_query = query.clone().requires_grad_()
    out = module(offsets_query, points, value, shapes)
    out.sum().backward()
    torch.testing.assert_close(out.detach(), expected)
    assert offsets_query.grad is not None and torch.isfinite(offsets_query.grad).all()
