"""Saliency-driven token selection: counts, what is computed, the pre-attention scorer
(docs/method.md, "Saliency and token selection")."""
import math

import pytest
import torch
from sdconet.modeling.transformer.dino_transformer import DINOTransformer
from sdconet.modeling.transformer.salient_encoder import SalientDeformableEncoder, select_salient_tokens
from torch import nn

SHAPES = [(8, 8), (4, 4), (2, 2), (1, 1)]
LEVEL_RATIOS = (0.4, 0.8, 1.0, 1.0)
LAYER_RATIOS = (1.0, 0.8, 0.6, 0.6, 0.4, 0.2)


def test_selection_keeps_floor_of_ratio_per_level_and_per_layer():
    torch.manual_seed(0)
    sizes = [h * w for h, w in SHAPES]
    scores = torch.randn(3, sum(sizes))
    padding = torch.zeros(3, sum(sizes), dtype=torch.bool)
    sel = select_salient_tokens(scores, padding, SHAPES, LEVEL_RATIOS, LAYER_RATIOS)
    expected_levels = [math.floor(n * r) for n, r in zip(sizes, LEVEL_RATIOS)]  # 25, 12, 4, 1
    assert sel.per_level == expected_levels
    total = sum(expected_levels)
    assert sel.indices.shape == (3, total)
    assert sel.per_layer == [math.floor(total * r) for r in LAYER_RATIOS]
    starts = [0, 64, 80, 84, 85]
    for b in range(3):
        idx = sel.indices[b]
        assert len(set(idx.tolist())) == total
        for level, keep in enumerate(expected_levels):
            lo, hi = starts[level], starts[level + 1]
            in_level = idx[(idx >= lo) & (idx < hi)]
            assert len(in_level) == keep
            # exactly the best `keep` of that level
            assert set(in_level.tolist()) == set((scores[b, lo:hi].topk(keep).indices + lo).tolist())
        # sorted by score, best first, across levels
        assert torch.all(scores[b, idx][:-1] >= scores[b, idx][1:])


def test_padded_tokens_are_never_chosen_before_valid_ones():
    sizes = [h * w for h, w in SHAPES]
    scores = torch.randn(2, sum(sizes))
    padding = torch.zeros(2, sum(sizes), dtype=torch.bool)
    padding[1, :32] = True  # image 1: half of level 0 is padding
    scores[1, :32] = -1e4  # what SaliencyPredictor.scores does to padded tokens
    sel = select_salient_tokens(scores, padding, SHAPES, LEVEL_RATIOS, LAYER_RATIOS)
    # level 0 keeps the batch maximum floor(64 * 0.4) = 25; image 1 has 32 valid tokens, all above padding
    assert sel.per_level[0] == 25
    assert not padding[1].gather(0, sel.indices[1]).any()


def test_selection_reads_the_device_once_for_all_levels(host_reads):
    """The kept counts of the four levels come to the host in one transfer, not one per level."""
    sizes = [h * w for h, w in SHAPES]
    padding = torch.zeros(2, sum(sizes), dtype=torch.bool)
    padding[0, :40] = True  # different valid counts per image: the batch maximum is kept
    with host_reads:
        sel = select_salient_tokens(torch.randn(2, sum(sizes)), padding, SHAPES, LEVEL_RATIOS, LAYER_RATIOS)
    assert host_reads.count == 1
    assert sel.per_level == [math.floor(n * r) for n, r in zip(sizes, LEVEL_RATIOS)]


def make_encoder(**kw):
    torch.manual_seed(0)
    return SalientDeformableEncoder(num_layers=6, embed_dim=32, num_heads=4, num_levels=4, num_points=2,
                                    ffn_dim=64, level_ratios=LEVEL_RATIOS, layer_ratios=LAYER_RATIOS,
                                    topk_sa=5, **kw)


def encoder_inputs(batch=2):
    torch.manual_seed(1)
    total = sum(h * w for h, w in SHAPES)
    src = torch.randn(batch, total, 32)
    pos = torch.randn(batch, total, 32)
    padding = torch.zeros(batch, total, dtype=torch.bool)
    valid_ratios = torch.ones(batch, 4, 2)
    saliency = torch.randn(batch, total)
    return src, pos, padding, valid_ratios, saliency


def test_only_selected_tokens_are_updated_and_layers_see_their_prefix():
    encoder = make_encoder().eval()
    scorer = nn.Linear(32, 3)
    src, pos, padding, ratios, saliency = encoder_inputs()
    seen = []
    for layer in encoder.layers:
        layer.ffn.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    with torch.no_grad():
        memory, sel = encoder(src, pos, SHAPES, ratios, padding, saliency, scorer)
    # every layer computed exactly its prefix of the selection: compute scales with the selection
    assert seen == sel.per_layer
    selected = torch.zeros_like(padding)
    selected.scatter_(1, sel.indices, True)
    background = torch.cat([encoder.background_embedding(h, w) for h, w in SHAPES])
    # unselected tokens: neck features + learned background embedding, nothing else
    expected = src + background
    assert torch.allclose(memory[~selected], expected[~selected])
    # selected tokens were updated (and get no background embedding)
    assert not torch.allclose(memory[selected], expected[selected])
    assert not torch.allclose(memory[selected], src[selected])


def test_all_ratios_one_updates_every_token():
    encoder = SalientDeformableEncoder(num_layers=2, embed_dim=32, num_heads=4, num_levels=4, num_points=2,
                                       ffn_dim=64, level_ratios=(1, 1, 1, 1), layer_ratios=(1, 1), topk_sa=5)
    src, pos, padding, ratios, saliency = encoder_inputs()
    with torch.no_grad():
        memory, sel = encoder(src, pos, SHAPES, ratios, padding, saliency, nn.Linear(32, 3))
    assert sel.per_layer == [85, 85]
    assert (memory - src).abs().amax(-1).min() > 0  # every token changed


def test_pre_attention_only_touches_topk_tokens():
    layer = make_encoder().layers[0].eval()
    query, pos = torch.randn(2, 20, 32), torch.randn(2, 20, 32)
    rank = torch.randn(2, 20)
    with torch.no_grad():
        out = layer.pre_attend(query, pos, rank)
    top = rank.topk(5, dim=1).indices
    changed = (out - query).abs().amax(-1) > 0
    for b in range(2):
        assert set(changed[b].nonzero().flatten().tolist()) == set(top[b].tolist())


def tiny_transformer(shared_scorer):
    torch.manual_seed(0)
    return DINOTransformer(num_classes=3, embed_dim=32, num_heads=4, num_levels=4, num_points=2, enc_layers=2,
                           dec_layers=2, ffn_dim=64, num_queries=10, dn_num_queries=6,
                           saliency_alpha="learnable", level_ratios=LEVEL_RATIOS, layer_ratios=(1.0, 0.5),
                           topk_sa=4, shared_scorer=shared_scorer)


def run_transformer(model):
    torch.manual_seed(2)
    features = [torch.randn(2, 32, h, w) for h, w in SHAPES]
    masks = [torch.zeros(2, h, w, dtype=torch.bool) for h, w in SHAPES]
    targets = [{"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.1, 0.3]])},
               {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]
    out = model(features, masks, targets)
    loss = out["pred_logits"].sigmoid().sum() + out["enc_outputs"]["pred_logits"].sigmoid().sum()
    loss = loss + sum(lvl.sum() for lvl in out["saliency"].logits)
    loss.backward()
    return out


def test_shared_scorer_is_the_trained_encoder_class_head():
    model = tiny_transformer(shared_scorer=True)
    scorer_calls = []
    model.encoder_class_head.register_forward_hook(lambda m, i, o: scorer_calls.append(i[0].shape))
    run_transformer(model)
    # used for the pre-attention ranking of each of the 2 layers, and for the proposals
    assert len(scorer_calls) == 3
    assert model.unshared_scorer is None
    assert model.encoder_class_head.weight.grad is not None
    assert model.encoder_class_head.weight.grad.abs().sum() > 0
    # the saliency predictor is trained too
    assert model.saliency.mask_predictor.head[-1].weight.grad.abs().sum() > 0


def test_release_scorer_is_separate_and_never_trained():
    model = tiny_transformer(shared_scorer=False)
    calls = []
    model.unshared_scorer.register_forward_hook(lambda m, i, o: calls.append(1))
    run_transformer(model)
    assert len(calls) == 2
    assert model.unshared_scorer.weight.grad is None
    assert not any(p.requires_grad for p in model.unshared_scorer.parameters())


def test_layer_ratio_count_must_match_layers():
    with pytest.raises(ValueError, match="layer ratios"):
        SalientDeformableEncoder(num_layers=3, embed_dim=32, num_heads=4, layer_ratios=(1.0, 0.5))
