"""Saliency predictor, box-derived soft targets and focal loss against hand computations
(docs/method.md, "Saliency and token selection")."""
import math

import pytest
import torch
from sdconet.modeling.saliency import (
    MaskPredictor,
    SaliencyPredictor,
    flatten_levels,
    saliency_loss,
    saliency_targets,
    split_levels,
)

# A 512x512 HR image seen at HR strides 16/32/64/128 (LR strides 8..64 at x2 degradation).
IMAGE = (512, 512)
SHAPES = [(32, 32), (16, 16), (8, 8), (4, 4)]
STRIDES = [16, 32, 64, 128]


def centre_value(l, t, r, b):
    """The soft target written out by hand: 1 - 0.5*sqrt(dx^2 + dy^2)."""
    dx = (l - r) / (l + r)
    dy = (t - b) / (t + b)
    return 1 - 0.5 * math.sqrt(dx * dx + dy * dy)


def targets_for(boxes):
    return saliency_targets([torch.tensor(boxes, dtype=torch.float32)], [IMAGE], SHAPES, STRIDES)


def test_level_chosen_by_object_size():
    # Each box is placed on the token grid so that every token inside it has max(l,t,r,b) in exactly one
    # level's range: 40 px -> <= 40 (level 0); 136 px -> [68, 128] (level 1, 128 hits the closed upper end);
    # 264 px -> [132, 240] (level 2); 512 px -> [288, 448] (level 3).
    cases = {0: [148, 148, 188, 188], 1: [8, 8, 144, 144], 2: [8, 8, 272, 272], 3: [0, 0, 512, 512]}
    for level, box in cases.items():
        targets = targets_for([box])
        for other in range(4):
            positives = int((targets[other] > 0).sum())
            if other == level:
                assert positives > 0, (level, box)
            else:
                assert positives == 0, (level, other, box)
    # Level-1 token (0, 0) at (16, 16) in the 136-px box has r = b = 128: kept, the range is (64, 128].
    assert targets_for([cases[1]])[1][0, 0, 0].item() == pytest.approx(centre_value(8, 8, 128, 128), abs=1e-6)


def test_targets_exact_on_a_small_box():
    box = [148.0, 148.0, 188.0, 188.0]  # 40 px, centred on level-0 token (10, 10) at (168, 168)
    level0 = targets_for([box])[0][0]
    assert level0.shape == SHAPES[0]
    assert level0[10, 10].item() == pytest.approx(1.0, abs=1e-6)
    # Off-centre token (row 9, col 11): centre (184, 152): l=36, t=4, r=4, b=36.
    assert level0[9, 11].item() == pytest.approx(centre_value(36, 4, 4, 36), abs=1e-6)
    assert level0[9, 11].item() == pytest.approx(1 - 0.5 * math.sqrt(0.8**2 + 0.8**2), abs=1e-6)
    # Non-zero exactly at the token centres strictly inside the box.
    for i in range(SHAPES[0][0]):
        for j in range(SHAPES[0][1]):
            cx, cy = (j + 0.5) * 16, (i + 0.5) * 16
            inside = box[0] < cx < box[2] and box[1] < cy < box[3]
            assert (level0[i, j].item() > 0) == inside, (i, j)


def test_targets_take_max_over_overlapping_boxes():
    box_a = [148.0, 148.0, 188.0, 188.0]
    box_b = [160.0, 148.0, 208.0, 188.0]
    level0 = targets_for([box_a, box_b])[0][0]
    # Token (9, 11) at (184, 152): box A gives 0.434..., box B 0.6; the max, not the sum, is kept.
    value_a = centre_value(184 - 148, 152 - 148, 188 - 184, 188 - 152)
    value_b = centre_value(184 - 160, 152 - 148, 208 - 184, 188 - 152)
    assert value_a < value_b < value_a + value_b
    assert level0[9, 11].item() == pytest.approx(max(value_a, value_b), abs=1e-6)
    # Token (10, 13) at (216, 168) lies in neither box.
    assert level0[10, 13].item() == 0.0


def test_targets_batch_with_empty_image_and_rectangular_strides():
    boxes = [torch.tensor([[148.0, 148.0, 188.0, 188.0]]), torch.zeros(0, 4)]
    # A non-square image: 512 high x 256 wide gives (stride_y, stride_x) = (16, 16) on a 32x16 grid.
    targets = saliency_targets(boxes, [(512, 256), (512, 256)], [(32, 16)], [(16.0, 16.0)], ranges=((-1, 64),))
    assert targets[0].shape == (2, 32, 16)
    assert targets[0][0, 10, 10].item() == pytest.approx(1.0, abs=1e-6)
    assert targets[0][1].abs().sum().item() == 0.0
    # Boxes are clipped to the image: a box reaching past x=256 behaves like one ending at 256.
    clipped = saliency_targets([torch.tensor([[200.0, 148.0, 400.0, 188.0]])], [(512, 256)], [(32, 16)],
                               [16.0], ranges=((-1, 64),))[0][0]
    # Token (10, 14) at (232, 168): with the box clipped to x<=256, l=32, r=24, t=b=20.
    assert clipped[10, 14].item() == pytest.approx(centre_value(32, 20, 24, 20), abs=1e-6)


def make_inputs(dim=64, batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(8, 8), (4, 4), (2, 2), (1, 1)]
    tokens = [torch.randn(batch, h * w, dim, generator=gen) for h, w in shapes]
    masks = []
    for h, w in shapes:
        mask = torch.zeros(batch, h, w, dtype=torch.bool)
        if batch > 1:
            mask[1, :, (w + 1) // 2:] = True  # image 1 is padded on its right half
        masks.append(mask)
    return tokens, shapes, masks


def test_predictor_shapes_and_padded_scores():
    torch.manual_seed(0)
    tokens, shapes, masks = make_inputs()
    out = SaliencyPredictor(dim=64, num_levels=4)(tokens, shapes, masks)
    assert [tuple(x.shape) for x in out.logits] == [(2, h, w) for h, w in shapes]
    assert [tuple(x.shape) for x in out.scores] == [(2, h, w) for h, w in shapes]
    for logits, scores, mask in zip(out.logits, out.scores, masks):
        assert torch.isfinite(scores).all()
        assert torch.equal(scores[~mask], logits[~mask])
        if mask.any():
            assert scores[mask].max() < logits[~mask].min()
    flat = flatten_levels(out.logits)
    assert flat.shape == (2, sum(h * w for h, w in shapes))
    assert all(torch.equal(a, b) for a, b in zip(split_levels(flat, shapes), out.logits))


def test_mask_predictor_ignores_padded_tokens_and_init():
    torch.manual_seed(0)
    predictor = MaskPredictor(dim=64)
    assert all(m.bias.abs().sum() == 0 for m in predictor.modules() if isinstance(m, torch.nn.Linear))
    tokens = torch.randn(1, 10, 64)
    mask = torch.zeros(1, 10, dtype=torch.bool)
    mask[0, 6:] = True
    changed = tokens.clone()
    changed[0, 6:] = torch.randn(4, 64) * 5
    a, b = predictor(tokens, mask), predictor(changed, mask)
    assert torch.allclose(a[0, :6], b[0, :6], atol=1e-6)
    # Without the mask the global half sees the padded tokens, so the valid scores move.
    assert not torch.allclose(predictor(tokens)[0, :6], predictor(changed)[0, :6], atol=1e-4)


def test_fixed_alpha_top_down_by_hand():
    torch.manual_seed(0)
    tokens, shapes, _ = make_inputs(batch=1)
    model = SaliencyPredictor(dim=64, num_levels=4, alpha="fixed")
    out = model(tokens, shapes)
    s3 = model.mask_predictor(tokens[3])  # (1, 1): a 1x1 map upsamples to a constant
    assert torch.allclose(out.logits[3].flatten(1), s3)
    expected_s2 = model.mask_predictor(tokens[2] + tokens[2] * s3[:, :, None])  # alpha = 1
    assert torch.allclose(out.logits[2].flatten(1), expected_s2, atol=1e-6)
    # A zero alpha removes the top-down path entirely.
    learnable = SaliencyPredictor(dim=64, num_levels=4)
    learnable.mask_predictor.load_state_dict(model.mask_predictor.state_dict())
    with torch.no_grad():
        learnable.alpha.zero_()
    out0 = learnable(tokens, shapes)
    assert torch.allclose(out0.logits[0].flatten(1), learnable.mask_predictor(tokens[0]), atol=1e-6)


def test_alpha_learnable_gets_gradient_fixed_does_not():
    torch.manual_seed(0)
    tokens, shapes, masks = make_inputs()
    learnable = SaliencyPredictor(dim=64, num_levels=4, alpha="learnable")
    assert isinstance(learnable.alpha, torch.nn.Parameter) and learnable.alpha.shape == (3,)
    assert learnable.alpha.abs().max() <= 0.3
    flatten_levels(learnable(tokens, shapes, masks).logits).pow(2).sum().backward()
    assert learnable.alpha.grad is not None and learnable.alpha.grad.abs().sum() > 0

    fixed = SaliencyPredictor(dim=64, num_levels=4, alpha="fixed")
    assert not isinstance(fixed.alpha, torch.nn.Parameter) and not fixed.alpha.requires_grad
    assert all(p is not fixed.alpha for p in fixed.parameters())
    assert torch.equal(fixed.alpha, torch.ones(3)) and "alpha" not in fixed.state_dict()
    flatten_levels(fixed(tokens, shapes, masks).logits).pow(2).sum().backward()
    assert fixed.alpha.grad is None
    with pytest.raises(ValueError):
        SaliencyPredictor(dim=64, alpha="frozen")


def reference_sum(logits, targets, alpha=0.25, gamma=2.0):
    """Plain-math focal BCE with soft targets, summed over tokens (not normalised)."""
    total = 0.0
    for x, t in zip(logits, targets):
        p = 1 / (1 + math.exp(-x))
        bce = -(t * math.log(p) + (1 - t) * math.log(1 - p))
        weight = (1 - alpha) * p**gamma * (1 - t) + alpha * t * (1 - p) ** gamma
        total += weight * bce
    return total


def reference_loss(logits, targets, alpha=0.25, gamma=2.0):
    """The summed loss divided by max(1, number of targets > 0)."""
    return reference_sum(logits, targets, alpha, gamma) / max(1, sum(t > 0 for t in targets))


def test_loss_matches_hand_computation():
    logits = [2.0, -1.0, 0.5, -3.0, 1.5, 0.0]
    targets = [1.0, 0.0, 0.3, 0.0, 0.0, 0.7]
    got = saliency_loss(torch.tensor([logits[:3], logits[3:]]), torch.tensor([targets[:3], targets[3:]]))
    assert got.item() == pytest.approx(reference_loss(logits, targets), rel=1e-5)
    # num_pos normalisation: three soft positives (1.0, 0.3, 0.7) -> the summed loss divided by 3.
    assert got.item() == pytest.approx(reference_sum(logits, targets) / 3, rel=1e-5)
    other = saliency_loss(torch.tensor([logits]), torch.tensor([targets]), alpha=0.5, gamma=1.0)
    assert other.item() == pytest.approx(reference_loss(logits, targets, 0.5, 1.0), rel=1e-5)


def test_loss_without_positives_is_finite_and_unnormalised():
    logits = torch.tensor([[0.3, -2.0, 4.0]], requires_grad=True)
    loss = saliency_loss(logits, torch.zeros(1, 3))
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(reference_sum([0.3, -2.0, 4.0], [0.0, 0.0, 0.0]), rel=1e-5)
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_loss_gradient_reaches_mask_predictor():
    torch.manual_seed(0)
    dim, image = 64, (128, 128)
    shapes = [(8, 8), (4, 4), (2, 2), (1, 1)]
    strides = [image[0] / h for h, _ in shapes]  # 16 / 32 / 64 / 128 HR px
    tokens = [torch.randn(1, h * w, dim) for h, w in shapes]
    model = SaliencyPredictor(dim=dim, num_levels=4)
    logits = flatten_levels(model(tokens, shapes).logits)
    targets = flatten_levels(saliency_targets([torch.tensor([[20.0, 20.0, 60.0, 60.0]])], [image], shapes, strides))
    assert (targets > 0).sum() > 0
    loss = saliency_loss(logits, targets)
    loss.backward()
    first, last = model.mask_predictor.embed[1], model.mask_predictor.head[-1]
    assert first.weight.grad.abs().sum() > 0 and last.weight.grad.abs().sum() > 0
    # The weights of the focal term keep their gradient: it differs from the detached-weight version.
    x = torch.tensor([0.7], requires_grad=True)
    saliency_loss(x, torch.tensor([0.4])).backward()
    p = torch.sigmoid(x.detach())
    weight = 0.75 * p**2 * 0.6 + 0.25 * 0.4 * (1 - p) ** 2
    detached_grad = weight * (p - 0.4)
    assert not torch.allclose(x.grad, detached_grad, atol=1e-6)


def test_config_block_and_alpha_validation():
    from detectron2.config import get_cfg
    from sdconet.config import add_sdconet_config, check_sdconet_config

    cfg = add_sdconet_config(get_cfg())
    saliency = cfg.MODEL.SDCONET.SALIENCY
    assert (saliency.ENABLED, saliency.ALPHA, saliency.LOSS_WEIGHT) == (False, "learnable", 2.0)
    assert len(saliency.RANGES) == 4 and tuple(saliency.RANGES[1]) == (64, 128)
    check_sdconet_config(cfg)
    cfg.MODEL.SDCONET.SALIENCY.ALPHA = "frozen"
    with pytest.raises(ValueError, match="SALIENCY.ALPHA"):
        check_sdconet_config(cfg)
