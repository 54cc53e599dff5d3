"""Pure-PyTorch multi-scale deformable attention against an explicit bilinear reference."""
import torch

from sdconet.modeling.transformer.ms_deform_attn import MSDeformAttn, multi_scale_deformable_attention


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
