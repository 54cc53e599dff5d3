"""The training optimizer: parameter groups, full-model clipping and the fused AdamW kernel."""
import copy

import pytest
import sdconet
import torch
from common import SDCONET_TINY
from detectron2.modeling import build_model
from sdconet.engine.trainer import build_sdconet_optimizer, fused_kernel_available


def tiny_model_and_cfg():
    cfg = sdconet.get_sdconet_cfg(SDCONET_TINY, ["MODEL.DEVICE", "cpu", "SOLVER.FULL_MODEL_CLIP_NORM", 0.1], freeze=False)
    torch.manual_seed(0)
    return build_model(cfg), cfg


def test_fused_adamw_makes_the_same_update_as_the_reference_loop():
    model, cfg = tiny_model_and_cfg()
    optimizer = build_sdconet_optimizer(cfg, model)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["fused"], "CPU float parameters should get the fused kernel"
    lrs = sorted(group["lr"] for group in optimizer.param_groups)
    assert lrs == pytest.approx([cfg.SOLVER.BASE_LR * cfg.SOLVER.BACKBONE_MULTIPLIER, cfg.SOLVER.BASE_LR])

    reference_model = copy.deepcopy(model)
    reference_groups = [
        {**{k: v for k, v in group.items() if k != "params"},
         "params": [dict(reference_model.named_parameters())[name] for name, p in model.named_parameters()
                    if any(p is q for q in group["params"])]}
        for group in optimizer.param_groups]
    for group in reference_groups:
        group.update(fused=None, foreach=False)  # the textbook per-tensor loop
    reference = torch.optim.AdamW(reference_groups, lr=cfg.SOLVER.BASE_LR)

    before = model.backbone.patch_embed.proj.weight.detach().clone()
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        for p, q in zip(model.parameters(), reference_model.parameters()):
            p.grad = torch.randn(p.shape, generator=generator)
            q.grad = p.grad.clone()
        optimizer.step()  # clips the whole model to 0.1, then fused AdamW
        torch.nn.utils.clip_grad_norm_(list(reference_model.parameters()), 0.1)
        reference.step()
    for (name, p), q in zip(model.named_parameters(), reference_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=name)
    assert not torch.allclose(model.backbone.patch_embed.proj.weight, before), "the steps must move the weights"


def test_fused_kernel_is_refused_for_mixed_or_integer_parameters():
    floats = [torch.nn.Parameter(torch.zeros(2))]
    assert fused_kernel_available([{"params": floats}])
    assert not fused_kernel_available([{"params": []}])
    meta = [torch.nn.Parameter(torch.zeros(2, device="meta"))]
    assert not fused_kernel_available([{"params": floats + meta}])


def test_a_gradient_laid_out_unlike_its_parameter_gets_the_reference_update():
    """torch's fused CPU AdamW reads the gradient with the parameter's strides; the optimizer
    re-lays such gradients out first (routing's autograd.grad can produce them)."""
    model, cfg = tiny_model_and_cfg()
    optimizer = build_sdconet_optimizer(cfg, model)
    weight = model.sr_decoder.stages[0].expand.weight  # (in, out, 2, 2) transposed convolution
    start = weight.detach().clone()
    gradient = torch.randn(weight.shape[0], weight.shape[2], weight.shape[3], weight.shape[1]).permute(0, 3, 1, 2)
    assert gradient.stride() != weight.stride()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    weight.grad = gradient.clone(memory_format=torch.preserve_format)
    optimizer.step()

    reference_weight = torch.nn.Parameter(start.clone())
    reference_weight.grad = gradient.contiguous()
    group = next(g for g in optimizer.param_groups if any(p is weight for p in g["params"]))
    reference = torch.optim.AdamW([reference_weight], lr=group["lr"], weight_decay=group["weight_decay"], foreach=False)
    scale = min(1.0, 0.1 / (gradient.norm().item() + 1e-6))  # the full-model clipping (other grads are 0)
    reference_weight.grad.mul_(scale)
    reference.step()
    torch.testing.assert_close(weight.detach(), reference_weight.detach(), rtol=1e-5, atol=1e-7)
