"""DINO transformer + criterion on a tiny configuration: shapes, losses, gradients, DN, padding."""
import math

import pytest
import torch
from sdconet.layers.position_encoding import PositionEmbeddingSine, box_sine_embedding
from sdconet.modeling.criterion import DINOCriterion, paired_giou_loss
from sdconet.modeling.matcher import HungarianMatcher
from sdconet.modeling.transformer.denoising import ContrastiveDenoising, DenoisingMeta, denoising_attention_mask
from sdconet.modeling.transformer.dino_transformer import DINOTransformer
from torchvision.ops import box_convert, generalized_box_iou_loss

NUM_CLASSES = 4
SHAPES = [(8, 10), (4, 5), (2, 3)]


def tiny_model(dec_layers=2, seed=0):
    torch.manual_seed(seed)
    return DINOTransformer(NUM_CLASSES, embed_dim=32, num_heads=2, num_levels=3, num_points=2, enc_layers=2,
                           dec_layers=dec_layers, ffn_dim=64, num_queries=10, dn_num_queries=6)


def tiny_inputs(seed=0):
    """Image 0 unpadded; image 1 padded on the right and bottom (its valid part is about 5/8 x 1/2)."""
    gen = torch.Generator().manual_seed(seed)
    features = [torch.randn(2, 32, h, w, generator=gen) for h, w in SHAPES]
    masks = []
    for h, w in SHAPES:
        mask = torch.zeros(2, h, w, dtype=torch.bool)
        mask[1, :, (w + 1) // 2:] = True
        mask[1, (h * 5 + 7) // 8:, :] = True
        masks.append(mask)
    return features, masks


def targets_one_empty():
    return [
        {"labels": torch.tensor([0, 3, 2]),
         "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.3, 0.1], [0.8, 0.8, 0.1, 0.2]])},
        {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)},
    ]


def empty_targets():
    return [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)} for _ in range(2)]


def expected_keys(dec_layers):
    suffixes = [""] + [f"_{i}" for i in range(dec_layers - 1)] + ["_enc", "_dn"] + [f"_dn_{i}" for i in range(dec_layers - 1)]
    return {f"loss_{name}{s}" for name in ("class", "bbox", "giou") for s in suffixes}


def test_train_forward_backward_shapes_losses_and_gradients():
    model = tiny_model()
    features, masks = tiny_inputs()
    targets = targets_one_empty()
    out = model(features, masks, targets)

    assert out["pred_logits"].shape == (2, 10, NUM_CLASSES) and out["pred_boxes"].shape == (2, 10, 4)
    assert len(out["aux_outputs"]) == 1 and out["aux_outputs"][0]["pred_boxes"].shape == (2, 10, 4)
    assert out["enc_outputs"]["pred_logits"].shape == (2, 10, NUM_CLASSES)
    meta = out["dn_meta"]
    assert meta == DenoisingMeta(num_groups=2, max_targets=3)  # 6 positives budget // 3 objects
    assert len(out["dn_outputs"]) == 2
    assert out["dn_outputs"][-1]["pred_boxes"].shape == (2, meta.pad_size, 4)
    for boxes in (out["pred_boxes"], out["enc_outputs"]["pred_boxes"]):
        assert ((boxes >= 0) & (boxes <= 1)).all()

    criterion = DINOCriterion(NUM_CLASSES, HungarianMatcher())
    losses = criterion(out, targets)
    assert set(losses) == expected_keys(2)
    assert all(torch.isfinite(v) and v.ndim == 0 for v in losses.values())
    assert losses["loss_bbox_dn"] > 0 and losses["loss_class_enc"] > 0
    sum(losses.values()).backward()
    for name, param in [("content queries", model.query_embedding.weight),
                        ("label embedding", model.denoising.label_embedding.weight),
                        ("encoder values", model.encoder.layers[0].self_attn.value_proj.weight),
                        # (zero-initialised, so the position / level embeddings get gradient only
                        # from the second step on; these weights must get it now)
                        ("encoder offsets", model.encoder.layers[0].self_attn.sampling_offsets.weight),
                        ("decoder offsets", model.decoder.layers[0].cross_attn.sampling_offsets.weight)]:
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    # Only labels that were used (after label noise) get gradient; class 1 is never a target.
    assert model.denoising.label_embedding.weight.grad[[0, 2, 3]].abs().sum() > 0


def test_eval_and_missing_targets_give_no_denoising():
    model = tiny_model()
    features, masks = tiny_inputs()
    model.eval()
    with torch.no_grad():
        out = model(features, masks, targets_one_empty())
    assert out["dn_outputs"] is None and out["dn_meta"] is None
    assert out["pred_logits"].shape == (2, 10, NUM_CLASSES)
    model.train()
    out = model(features, masks, None)
    assert out["dn_outputs"] is None and out["pred_logits"].shape == (2, 10, NUM_CLASSES)


def test_zero_gt_batch_gives_finite_losses_same_keys_and_backward():
    model = tiny_model()
    features, masks = tiny_inputs()
    out = model(features, masks, empty_targets())
    assert out["dn_outputs"] is None
    losses = DINOCriterion(NUM_CLASSES, HungarianMatcher())(out, empty_targets())
    assert set(losses) == expected_keys(2)
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_class"] > 0  # every query is pushed towards background
    assert losses["loss_bbox"] == 0 and losses["loss_giou_dn"] == 0
    assert all(v.requires_grad for v in losses.values())
    sum(losses.values()).backward()
    assert model.class_heads[-1].weight.grad.abs().sum() > 0
    # The unused label embedding still takes part in the graph (DDP), with a zero gradient.
    assert model.denoising.label_embedding.weight.grad is not None
    assert model.denoising.label_embedding.weight.grad.abs().sum() == 0


def test_padded_content_does_not_change_the_padded_image():
    """Image 1's predictions must not depend on what lies in its padding, nor on image 0."""
    model = tiny_model().eval()
    features, masks = tiny_inputs()
    changed = [f.clone() for f in features]
    for f, m in zip(changed, masks):
        f[1][:, m[1]] = 50.0 * torch.randn(f.shape[1], int(m[1].sum()))
        f[0] = torch.randn_like(f[0])
    with torch.no_grad():
        a = model(features, masks)
        b = model(changed, masks)
    assert torch.allclose(a["pred_boxes"][1], b["pred_boxes"][1], atol=1e-5)
    assert torch.allclose(a["pred_logits"][1], b["pred_logits"][1], atol=1e-5)
    assert not torch.allclose(a["pred_logits"][0], b["pred_logits"][0], atol=1e-3)


def test_proposals_are_normalised_by_the_valid_extent():
    model = tiny_model()
    features, masks = tiny_inputs()
    src, pos, padding, shapes, ratios = model.flatten_inputs(features, masks)
    _, proposals, usable = model.encoder_proposals(src, padding, shapes, ratios)
    assert shapes == SHAPES and src.shape == (2, sum(h * w for h, w in SHAPES), 32)
    assert torch.allclose(ratios[1, 0], torch.tensor([5 / 10, 5 / 8]))
    assert not usable[padding].any() and usable.any(dim=1).all()
    level0 = proposals[1, :80].sigmoid().view(8, 10, 4)
    # Image 1, level 0: 5 valid columns, 5 valid rows; the last valid pixel centre is at 4.5 / 5.
    assert torch.allclose(level0[4, 4, :2], torch.tensor([0.9, 0.9]), atol=1e-5)
    assert torch.allclose(level0[0, 0], torch.tensor([0.1, 0.1, 0.05, 0.05]), atol=1e-5)


def test_look_forward_twice_gradient_paths():
    """Layer i's box loss reaches box head i-1 (through the un-detached refined box) but no further."""
    model = tiny_model(dec_layers=3)
    features, masks = tiny_inputs()
    out = model(features, masks)
    weights = torch.rand(out["pred_boxes"].shape, generator=torch.Generator().manual_seed(1))
    last_heads = [model.box_heads[i].layers[-1].weight for i in range(3)]
    grads = torch.autograd.grad((out["pred_boxes"] * weights).sum(), last_heads, allow_unused=True, retain_graph=True)
    assert grads[2].abs().sum() > 0 and grads[1].abs().sum() > 0
    assert grads[0] is None or grads[0].abs().sum() == 0
    grads = torch.autograd.grad((out["aux_outputs"][1]["pred_boxes"] * weights).sum(), last_heads, allow_unused=True)
    assert grads[0].abs().sum() > 0


def test_denoising_attention_mask_hand_example():
    # 2 groups of (2 positives + 2 negatives), then 3 matching queries. 1 = blocked.
    expected = torch.tensor([
        [0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0],
        [0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0],
        [0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0],
        [0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    ], dtype=torch.bool)
    meta = DenoisingMeta(num_groups=2, max_targets=2)
    assert torch.equal(denoising_attention_mask(meta, 3), expected)

    torch.manual_seed(0)
    dn = ContrastiveDenoising(num_classes=3, embed_dim=8, num_dn_queries=4, label_noise=0.0, box_noise=1.0)
    targets = [{"labels": torch.tensor([2, 1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.4, 0.6, 0.2, 0.1]])},
               {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.4, 0.1, 0.2]])}]
    content, reference, mask, got_meta = dn(targets, num_matching_queries=3)
    assert got_meta == meta and torch.equal(mask, expected)
    assert content.shape == (2, 8, 8) and reference.shape == (2, 8, 4)
    embed = dn.label_embedding.weight
    # Slots per group: [pos t0, pos t1, neg t0, neg t1]; image 1 has only t0, its t1 slots are padding.
    for g in range(2):
        assert torch.equal(content[0, 4 * g], embed[2]) and torch.equal(content[0, 4 * g + 3], embed[1])
        assert torch.equal(content[1, 4 * g + 2], embed[0])
        assert content[1, 4 * g + 1].abs().sum() == 0 and content[1, 4 * g + 3].abs().sum() == 0


def test_denoising_box_noise_ranges():
    """Corner shifts in units of half the box size: positives in [0, 1), negatives in [1, 2)
    (a negative whose corners cross collapses to a near-empty box, as in DINO)."""
    torch.manual_seed(1)
    dn = ContrastiveDenoising(num_classes=3, embed_dim=8, num_dn_queries=60, label_noise=0.0, box_noise=1.0)
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.4, 0.6, 0.2, 0.1]])
    _, reference, _, meta = dn([{"labels": torch.tensor([2, 1]), "boxes": boxes}], num_matching_queries=3)
    assert meta == DenoisingMeta(num_groups=30, max_targets=2)
    noisy = reference[0].sigmoid().view(30, 2, 2, 4)  # group, positive/negative, target, cxcywh
    corners = box_convert(boxes, "cxcywh", "xyxy")
    half = boxes[:, 2:].repeat(1, 2) / 2
    shift = (box_convert(noisy, "cxcywh", "xyxy") - corners).abs() / half
    assert (shift[:, 0] < 1 + 1e-3).all()
    assert shift[:, 0].max() > 0.8 and shift[:, 0].min() < 0.2  # spread over the whole range
    kept = (noisy[:, 1, :, 2:] > 2e-3).all(-1)  # negatives that did not collapse
    assert kept.sum() > 10
    assert (shift[:, 1][kept] > 1 - 1e-3).all() and (shift[:, 1][kept] < 2 + 1e-3).all()


def test_denoising_label_noise_and_empty_batches():
    torch.manual_seed(0)
    dn = ContrastiveDenoising(num_classes=50, embed_dim=4, num_dn_queries=100, label_noise=1.0, box_noise=0.0)
    labels = torch.full((100,), 7)
    targets = [{"labels": labels, "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]]).repeat(100, 1)}]
    content, reference, _, meta = dn(targets, num_matching_queries=5)
    assert meta == DenoisingMeta(num_groups=1, max_targets=100)
    changed = (content[0] != dn.label_embedding.weight[7]).any(-1).float().mean().item()
    assert 0.35 < changed < 0.65  # half the labels are re-drawn (a few land on 7 again)
    # box_noise 0: the reference boxes are the targets themselves.
    assert torch.allclose(reference[0].sigmoid(), targets[0]["boxes"].repeat(2, 1), atol=1e-5)
    assert dn(empty_targets(), num_matching_queries=5) is None


def test_position_encodings():
    mask = torch.zeros(1, 3, 4, dtype=torch.bool)
    mask[0, :, 2:] = True
    pos = PositionEmbeddingSine(num_pos_feats=8, temperature=20)(mask)
    assert pos.shape == (1, 16, 3, 4)
    # Normalised x of the last valid column is 2*pi, whatever the padding: sin 0, cos 1 on the first pair.
    assert torch.allclose(pos[0, 8:10, 0, 1], torch.tensor([0.0, 1.0]), atol=1e-4)
    emb = box_sine_embedding(torch.rand(2, 5, 4), num_feats=16)
    assert emb.shape == (2, 5, 64)
    with pytest.raises(ValueError):
        box_sine_embedding(torch.rand(2, 3))


def test_sine_encodings_follow_the_formula():
    """Feature 2i is sin and 2i + 1 cos of the coordinate over temperature^(2i / F), coordinates
    in the order y, x, w, h (boxes) or y, x (maps); checked in float64 element by element."""
    feats, temperature, scale = 8, 10000.0, 2 * math.pi
    boxes = torch.rand(3, 4, dtype=torch.float64)
    emb = box_sine_embedding(boxes.float(), num_feats=feats, temperature=temperature)
    expected = torch.empty(3, 4 * feats, dtype=torch.float64)
    for slot, coordinate in enumerate([1, 0, 2, 3]):
        for i in range(feats // 2):
            angle = boxes[:, coordinate] * scale / temperature ** (2 * i / feats)
            expected[:, slot * feats + 2 * i] = angle.sin()
            expected[:, slot * feats + 2 * i + 1] = angle.cos()
    torch.testing.assert_close(emb.double(), expected, rtol=0, atol=2e-6)

    mask = torch.zeros(1, 2, 5, dtype=torch.bool)
    mask[0, :, 3:] = True  # 3 valid columns, 2 valid rows
    pos = PositionEmbeddingSine(num_pos_feats=feats, temperature=20)(mask)
    y, x = 2.0 / (2 + 1e-6) * scale, 2.0 / (3 + 1e-6) * scale  # row 1 (of 2), column 1 (of 3)
    for block, coordinate in ((0, y), (feats, x)):
        for i in range(feats // 2):
            angle = torch.tensor(coordinate / 20 ** (2 * i / feats), dtype=torch.float64)
            got = pos[0, block + 2 * i: block + 2 * i + 2, 1, 1].double()
            torch.testing.assert_close(got, torch.stack([angle.sin(), angle.cos()]), rtol=0, atol=2e-6)


def test_criterion_values_on_a_hand_case():
    """One object matched by query 1 with an exact box: only the focal term is left, and DN losses
    are normalised per object and group."""
    logits = torch.tensor([[[-2.0, 1.0], [3.0, -1.0]]])
    target = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.3, 0.3, 0.1, 0.1]])}]
    dn_boxes = torch.tensor([[[0.4, 0.3, 0.1, 0.1], [0.9, 0.9, 0.1, 0.1], [0.2, 0.3, 0.1, 0.1], [0.5, 0.5, 0.2, 0.2]]])
    outputs = {"pred_logits": logits, "pred_boxes": torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.1]]]),
               "aux_outputs": [], "enc_outputs": None,
               "dn_outputs": [{"pred_logits": torch.zeros(1, 4, 2), "pred_boxes": dn_boxes}],
               "dn_meta": DenoisingMeta(num_groups=2, max_targets=1)}
    losses = DINOCriterion(2, HungarianMatcher(), weight_dict={"loss_class": 3.0})(outputs, target)
    assert set(losses) == {f"loss_{n}{s}" for n in ("class", "bbox", "giou") for s in ("", "_dn")}

    p = logits.sigmoid()
    positive = torch.zeros_like(p, dtype=torch.bool)
    positive[0, 1, 0] = True
    focal = torch.where(positive, 0.25 * (1 - p) ** 2 * -p.log(), 0.75 * p**2 * -(1 - p).log()).sum()
    assert torch.allclose(losses["loss_class"], 3.0 * focal)
    assert losses["loss_bbox"].abs() < 1e-6 and losses["loss_giou"].abs() < 1e-4  # torchvision eps
    # DN positives are slots 0 and 2, each 0.1 off in cx: 5 * (0.1 + 0.1) / (1 object * 2 groups).
    assert torch.allclose(losses["loss_bbox_dn"], torch.tensor(0.5))
    # All-zero DN logits: 4 slots x 2 classes of background plus 2 positives, over 2.
    dn_focal = (2 * 0.25 * 0.25 * -torch.tensor(0.5).log() + 6 * 0.75 * 0.25 * -torch.tensor(0.5).log()) / 2
    assert torch.allclose(losses["loss_class_dn"], 3.0 * dn_focal)


def test_paired_giou_loss_equals_torchvision_values_and_gradients():
    """Overlapping, disjoint (in x, in y, in both), nested and identical pairs, in float64."""
    gen = torch.Generator().manual_seed(3)
    centres, sizes = torch.rand(64, 2, generator=gen, dtype=torch.float64), 0.05 + 0.4 * torch.rand(64, 2, generator=gen, dtype=torch.float64)
    a = torch.cat([centres - sizes / 2, centres + sizes / 2], dim=1)
    b = a[torch.randperm(64, generator=gen)].clone()
    b[:4] = a[:4]  # identical
    b[4] = torch.tensor([a[4, 0] + 0.01, a[4, 1] + 0.01, a[4, 2] - 0.01, a[4, 3] - 0.01])  # nested
    b[5] = a[5] + torch.tensor([2.0, 0.0, 2.0, 0.0], dtype=torch.float64)  # disjoint in x only
    b[6] = a[6] + torch.tensor([0.0, 2.0, 0.0, 2.0], dtype=torch.float64)  # disjoint in y only
    disjoint = ((torch.min(a[:, 2], b[:, 2]) <= torch.max(a[:, 0], b[:, 0]))
                | (torch.min(a[:, 3], b[:, 3]) <= torch.max(a[:, 1], b[:, 1])))
    assert 5 < int(disjoint.sum()) < 60  # both kinds of pair are exercised
    ours_a, ours_b = a.clone().requires_grad_(), b.clone().requires_grad_()
    ref_a, ref_b = a.clone().requires_grad_(), b.clone().requires_grad_()
    ours = paired_giou_loss(ours_a, ours_b)
    ref = generalized_box_iou_loss(ref_a, ref_b, reduction="sum")
    ours.backward()
    ref.backward()
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours_a.grad, ref_a.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours_b.grad, ref_b.grad, rtol=1e-10, atol=1e-12)
