"""The pre-attention ranking of the salient encoder (SALIENCY.PRE_ATTENTION_SCORE) and its padding
mask (docs/method.md, "Saliency and token selection")."""
import pytest
import torch
from common import make_cfg
from sdconet import check_sdconet_config
from sdconet.modeling.meta_arch import build_dino_transformer
from sdconet.modeling.transformer.dino_transformer import DINOTransformer
from sdconet.modeling.transformer.encoder import encoder_reference_points
from sdconet.modeling.transformer.salient_encoder import SalientDeformableEncoder, select_salient_tokens
from torch import nn

DIM = 32
PRIOR_BIAS = -4.6  # the class heads' initial bias: every class logit starts negative


def pre_attention_inputs(encoder):
    """Per layer, the tokens (B, k, C) that its pre-attention updated."""
    picked = []
    for layer in encoder.layers:
        layer.pre_attention.register_forward_hook(lambda m, args, out: picked.append(args[2].detach().clone()))
    return picked


def channel_zero_scorer(classes=3, bias=0.0):
    """A class head whose every logit is channel 0 of the token plus ``bias``."""
    scorer = nn.Linear(DIM, classes)
    with torch.no_grad():
        scorer.weight.zero_()
        scorer.weight[:, 0] = 1.0
        scorer.bias.fill_(bias)
    return scorer


@pytest.mark.parametrize("mode, winner", [("logit_product", 0), ("sigmoid", 1)])
def test_score_ranks_confident_background_by_mode(mode, winner):
    """Token 0 (class -4, saliency -4) against token 1 (class 2, saliency 0.5): the logit product
    (16 against 1) puts the background first, the product of probabilities puts the object first."""
    torch.manual_seed(0)
    encoder = SalientDeformableEncoder(num_layers=1, embed_dim=DIM, num_heads=4, num_levels=1, num_points=2,
                                       ffn_dim=64, level_ratios=(1.0,), layer_ratios=(1.0,), topk_sa=1,
                                       pre_attention_score=mode).eval()
    src = torch.randn(1, 2, DIM)
    src[0, :, 0] = torch.tensor([-4.0, 2.0])  # the max class logit of each token
    saliency = torch.tensor([[-4.0, 0.5]])
    picked = pre_attention_inputs(encoder)
    with torch.no_grad():
        encoder(src, torch.randn(1, 2, DIM), [(1, 2)], torch.ones(1, 1, 2), torch.zeros(1, 2, dtype=torch.bool),
                saliency, channel_zero_scorer())
    assert torch.equal(picked[0][0, 0], src[0, winner])


def test_default_is_logit_product_and_the_key_is_checked():
    cfg = make_cfg()
    assert cfg.MODEL.SDCONET.SALIENCY.PRE_ATTENTION_SCORE == "logit_product"
    model = DINOTransformer(num_classes=3, embed_dim=DIM, num_heads=4, num_levels=4, num_points=2, enc_layers=2,
                            dec_layers=2, ffn_dim=64, saliency_alpha="learnable", layer_ratios=(1.0, 0.5))
    assert model.encoder.pre_attention_score == "logit_product"
    cfg.MODEL.SDCONET.SALIENCY.PRE_ATTENTION_SCORE = "softmax"
    with pytest.raises(ValueError, match=r"MODEL\.SDCONET\.SALIENCY\.PRE_ATTENTION_SCORE"):
        check_sdconet_config(cfg)
    with pytest.raises(ValueError, match="pre_attention_score"):
        SalientDeformableEncoder(num_layers=1, embed_dim=DIM, num_heads=4, layer_ratios=(1.0,),
                                 pre_attention_score="softmax")


def test_config_key_reaches_the_encoder():
    cfg = make_cfg()
    cfg.MODEL.SDCONET.SALIENCY.ENABLED = True
    cfg.MODEL.SDCONET.SALIENCY.PRE_ATTENTION_SCORE = "sigmoid"
    assert build_dino_transformer(cfg, 4).encoder.pre_attention_score == "sigmoid"


def release_encoder_forward(encoder, src, pos, shapes, valid_ratios, padding, saliency, scorer):
    """The encoder as it was before the switch and the mask: logit product, no key padding mask,
    padded tokens ranked by their score like any other (kept here as the reference)."""
    selection = select_salient_tokens(saliency, padding, shapes, encoder.level_ratios, encoder.layer_ratios)
    channels = src.shape[-1]
    reference_points = encoder_reference_points(shapes, valid_ratios)
    flat_refs = reference_points.flatten(2)
    own = ~padding.gather(1, selection.indices)
    output = src
    for layer, keep in zip(encoder.layers, selection.per_layer):
        index = selection.indices[:, :keep]
        expand = index[..., None].expand(-1, -1, channels)
        before = output.gather(1, expand)
        query_pos = pos.gather(1, expand)
        refs = flat_refs.gather(1, index[..., None].expand(-1, -1, flat_refs.shape[-1]))
        refs = refs.view(src.shape[0], keep, *reference_points.shape[2:])
        rank = scorer(before).max(-1).values * saliency.gather(1, index)
        top = rank.topk(min(layer.topk_sa, keep), dim=1).indices[..., None].expand(-1, -1, channels)
        tokens = before.gather(1, top)
        q = tokens + query_pos.gather(1, top)
        tokens = layer.pre_norm(tokens + layer.pre_dropout(layer.pre_attention(q, q, tokens, need_weights=False)[0]))
        query = layer(before.scatter(1, top, tokens), query_pos, refs, value=src, spatial_shapes=shapes,
                      value_padding_mask=padding)
        output = output.scatter(1, expand, torch.where(own[:, :keep, None], query, before))
    background = torch.cat([encoder.background_embedding(h, w) for h, w in shapes], 0)
    selected = torch.zeros_like(padding)
    selected.scatter_(1, selection.indices, own)
    return output + background * (~(selected | padding))[..., None]


SHAPES = [(16, 16), (8, 8), (4, 4), (2, 2)]
VALID = [(10, 12), (5, 6), (3, 3), (2, 2)]  # the smaller image of the padded batch, (h, w) per level


def make_encoder(mode="logit_product", level_ratios=(0.4, 0.8, 1.0, 1.0), layer_ratios=(1.0, 0.8, 0.6, 0.6, 0.4, 0.2),
                 topk_sa=20):
    torch.manual_seed(0)
    return SalientDeformableEncoder(num_layers=len(layer_ratios), embed_dim=DIM, num_heads=4, num_levels=4,
                                    num_points=2, ffn_dim=64, level_ratios=level_ratios, layer_ratios=layer_ratios,
                                    topk_sa=topk_sa, pre_attention_score=mode).eval()


def level_maps(seed):
    """Features, positions (C, H, W) and saliency (H, W) of both images on every level: image 0
    fills the grid, image 1 only its top-left VALID corner; the rest of its grid is padding holding
    arbitrary features (as a neck gives) and the SaliencyPredictor's floor (level minimum - 1)."""
    torch.manual_seed(seed)
    maps = []
    for (height, width), (h, w) in zip(SHAPES, VALID):
        feature, position = torch.randn(2, DIM, height, width), torch.randn(2, DIM, height, width)
        saliency = torch.randn(2, height, width)
        pad = torch.ones(2, height, width, dtype=torch.bool)
        pad[0] = False
        pad[1, :h, :w] = False
        saliency = torch.where(pad, saliency.min() - 1.0, saliency)
        maps.append((feature, position, saliency, pad))
    return maps


def flatten(maps, image=None):
    """Encoder inputs of both images (the padded batch), or of ``image`` alone, cropped to its valid part:
    src, pos, spatial shapes, valid ratios, padding, saliency."""
    src, pos, shapes, ratios, pad, saliency = [], [], [], [], [], []
    for level, (h, w) in zip(maps, VALID):
        if image is not None:
            level = [x[image:image + 1, ..., :h, :w] for x in level]
        feature, position, score, mask = level
        height, width = score.shape[-2:]
        shapes.append((height, width))
        src.append(feature.flatten(2).transpose(1, 2))
        pos.append(position.flatten(2).transpose(1, 2))
        ratios.append(torch.stack([(~mask[:, 0, :]).sum(1) / width, (~mask[:, :, 0]).sum(1) / height], -1))
        pad.append(mask.flatten(1))
        saliency.append(score.flatten(1))
    return (torch.cat(src, 1), torch.cat(pos, 1), shapes, torch.stack(ratios, 1).float(), torch.cat(pad, 1),
            torch.cat(saliency, 1))


def test_default_output_is_bit_identical_to_the_release_ranking_without_padding():
    encoder = make_encoder()
    torch.manual_seed(1)
    total = sum(h * w for h, w in SHAPES)
    src, pos, saliency = torch.randn(2, total, DIM), torch.randn(2, total, DIM), torch.randn(2, total)
    pad, ratios = torch.zeros(2, total, dtype=torch.bool), torch.ones(2, 4, 2)
    scorer = channel_zero_scorer(bias=PRIOR_BIAS)
    with torch.no_grad():
        memory, selection = encoder(src, pos, SHAPES, ratios, pad, saliency, scorer)
        reference = release_encoder_forward(encoder, src, pos, SHAPES, ratios, pad, saliency, scorer)
    assert not selection.padded
    assert torch.equal(memory, reference)


@pytest.mark.parametrize("mode", ["logit_product", "sigmoid"])
def test_padded_tokens_never_enter_the_pre_attention_when_valid_ones_suffice(mode):
    encoder = make_encoder(mode)
    src, pos, shapes, ratios, pad, saliency = flatten(level_maps(2))
    # Negative class logits, as at initialisation: times the very low saliency of padding, the
    # logit product ranks padded tokens first.
    scorer = channel_zero_scorer(bias=PRIOR_BIAS)
    picked = pre_attention_inputs(encoder)
    with torch.no_grad():
        _, selection = encoder(src, pos, shapes, ratios, pad, saliency, scorer)
    assert selection.padded
    # Padded fillers are in the layers' selections, but each layer has more valid tokens than topk_sa.
    filler = pad[1][selection.indices[1]]
    assert filler.any()
    assert all(int((~filler[:keep]).sum()) >= encoder.layers[0].topk_sa for keep in selection.per_layer)
    # Padded tokens are never written back, so their rows stay the neck features: find them by value.
    padded_rows = src[1][pad[1]]
    for tokens in picked:
        assert not (tokens[1][:, None] == padded_rows[None]).all(-1).any()
    if mode == "logit_product":  # the release's ranking would have picked them
        first = selection.indices[1, :selection.per_layer[0]]
        before = src[1, first]
        rank = scorer(before).max(-1).values * saliency[1, first]
        assert pad[1][first[rank.topk(encoder.layers[0].topk_sa).indices]].any()


@pytest.mark.parametrize("mode", ["logit_product", "sigmoid"])
def test_valid_tokens_of_a_padded_image_match_the_image_alone_with_all_ratios_one(mode):
    """With all ratios 1 every valid token is updated in both runs, so the padded image's valid
    tokens must come out as when the image runs alone. With ratios below 1 this cannot hold: a
    level keeps the batch maximum of floor(valid x ratio), so the smaller image keeps more of its
    tokens in a batch than alone (test_padded_tokens_never_enter_the_pre_attention... covers it)."""
    encoder = make_encoder(mode, level_ratios=(1.0, 1.0, 1.0, 1.0), layer_ratios=(1.0, 1.0, 1.0), topk_sa=12)
    maps = level_maps(3)
    scorer = channel_zero_scorer(bias=PRIOR_BIAS)
    src, pos, shapes, ratios, pad, saliency = flatten(maps)
    with torch.no_grad():
        batched, _ = encoder(src, pos, shapes, ratios, pad, saliency, scorer)
        alone, _ = encoder(*flatten(maps, image=1), scorer)
        release = release_encoder_forward(encoder, src, pos, shapes, ratios, pad, saliency, scorer)
    assert torch.allclose(batched[1][~pad[1]], alone[0], atol=1e-5)
    # Without the mask the padded tokens join the pre-attention and change the valid ones.
    assert not torch.allclose(release[1][~pad[1]], alone[0], atol=1e-3)


def test_padded_picks_that_fill_the_quota_are_never_attended_to():
    """An image with fewer valid tokens than topk_sa: padded tokens fill its picks (ranked after the
    valid ones, whatever their score) but no valid token attends to them."""
    layer = make_encoder(topk_sa=8).layers[0]
    torch.manual_seed(4)
    query, pos, rank = torch.randn(2, 10, DIM), torch.randn(2, 10, DIM), torch.randn(2, 10)
    padding = torch.zeros(2, 10, dtype=torch.bool)
    padding[1, 6:] = True
    rank[1, 6:] = 100.0  # the best scores sit on padding
    assert set(layer.pre_attention_indices(rank, padding)[1].tolist()) >= set(range(6))
    noisy = query.clone()
    noisy[1, 6:] = 10 * torch.randn(4, DIM)
    with torch.no_grad():
        out = layer.pre_attend(query, pos, rank, padding)
        out_noisy = layer.pre_attend(noisy, pos, rank, padding)
        alone = layer.pre_attend(query[1:, :6], pos[1:, :6], rank[1:, :6])
        unpadded = layer.pre_attend(query[:1], pos[:1], rank[:1])
        padding[1] = True  # no valid token at all: attends among its picks rather than giving NaN
        all_padded = layer.pre_attend(query, pos, rank, padding)
    assert torch.allclose(out[1, :6], alone[0], atol=1e-5)
    assert torch.allclose(out_noisy[1, :6], out[1, :6], atol=1e-5)
    assert torch.allclose(out[0], unpadded[0], atol=1e-5)
    assert torch.isfinite(all_padded).all()
