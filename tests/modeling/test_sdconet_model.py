"""The full SDCoNet (SR branch + saliency) and the serial baseline as detectron2 models."""

import pytest
import sdconet
import torch
from common import REPO, SDCONET_TINY
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from sdconet.layers.ms_deform_attn import MSDeformAttn
from sdconet.layers.onednn_linear import OneDNNLinear, onednn_available
from sdconet.modeling.meta_arch import SR_LOSS_KEYS
from sdconet.modeling.saliency import saliency_targets


def build(opts=()):
    cfg = sdconet.get_sdconet_cfg(SDCONET_TINY, [*opts, "MODEL.DEVICE", "cpu"])
    torch.manual_seed(0)
    return build_model(cfg)


def sample(h=128, w=128, seed=0):
    inst = Instances((h, w))
    inst.gt_boxes = Boxes(torch.tensor([[10.0, 12.0, 30.0, 28.0], [60.0, 70.0, 100.0, 90.0]]))
    inst.gt_classes = torch.tensor([0, 3])
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g), "instances": inst,
            "height": h, "width": w}


class CallCounter:
    def __init__(self, module):
        self.calls = 0
        module.register_forward_hook(self)

    def __call__(self, *_):
        self.calls += 1


def test_training_losses_grouped_by_task():
    model = build().train()
    losses = model([sample(), sample(96, 128, seed=1)])
    assert "loss_sr" in losses and "loss_saliency" in losses
    assert SR_LOSS_KEYS == ("loss_sr",)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.sr_decoder.parameters())
    assert model.transformer.saliency.alpha.grad is not None


def test_sr_branch_runs_only_when_asked():
    model = build()
    counter = CallCounter(model.sr_decoder)
    model.train()
    with model.outputs(sr=False):  # gradient-routing phase 1
        losses = model([sample()])
    assert counter.calls == 0 and "loss_sr" not in losses
    assert "loss_sr" in model([sample()]) and counter.calls == 1

    model.eval()
    with torch.no_grad():
        out = model([sample(96, 128)])
    assert counter.calls == 1 and "sr" not in out[0]  # inference never runs the SR branch
    with torch.no_grad(), model.outputs(sr=True, saliency=True):
        out = model([sample(96, 128)])[0]
    assert counter.calls == 2
    assert out["sr"].shape == (3, 96, 128) and out["lr"].shape == (3, 48, 64)
    assert 0 <= out["sr"].min() and out["sr"].max() <= 255
    # saliency maps per level, cropped to the image (LR 48x64 -> stride 8: 6x8, ...)
    assert [tuple(s.shape) for s in out["saliency"]] == [(6, 8), (3, 4), (2, 2), (1, 1)]


def test_outputs_choice_nests_and_is_restored_after_an_error():
    """``model.outputs``: None keeps the enclosing choice; leaving a ``with`` (also by an error)
    brings the previous one back; the model has no public output flags."""
    model = build().eval()
    assert not any(hasattr(model, name) for name in ("sr_active", "return_sr", "return_saliency"))

    def extras():
        with torch.no_grad():
            return sorted(set(model([sample(64, 64)])[0]) - {"instances"})

    with model.outputs(sr=True):
        assert extras() == ["lr", "sr"]
        with model.outputs(saliency=True):
            assert extras() == ["lr", "saliency", "sr"]
        with model.outputs(sr=False):
            assert extras() == []
        assert extras() == ["lr", "sr"]
    with pytest.raises(RuntimeError, match="inside"):
        with model.outputs(sr=True, saliency=True):
            raise RuntimeError("inside")
    assert extras() == []


def test_deformable_attention_choices_reach_every_attention_module():
    """TRANSFORMER.DEFORM_IMPL / DEFORM_COMPILE are constructor arguments of every MSDeformAttn."""
    model = build(["MODEL.SDCONET.TRANSFORMER.DEFORM_IMPL", "gather", "MODEL.SDCONET.TRANSFORMER.DEFORM_COMPILE", True])
    attention = [m for m in model.modules() if isinstance(m, MSDeformAttn)]
    assert len(attention) == 2 * 2  # the tiny config: 2 encoder + 2 decoder layers
    assert all(m.impl == "gather" and m.compile_sampling for m in attention)
    assert all(m.impl == "auto" and not m.compile_sampling for m in build().modules() if isinstance(m, MSDeformAttn))


def test_sr_loss_falls_when_overfitting_one_image():
    model = build(["MODEL.SDCONET.SR.HEAD", "full"]).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    # A smooth image (SR can recover it from the x2 input; pure noise it cannot).
    coarse = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(3)) * 255
    smooth = torch.nn.functional.interpolate(coarse, size=(128, 128), mode="bicubic", align_corners=False)
    batch = [dict(sample(), image=smooth[0].clamp(0, 255).to(torch.uint8))]
    history = []
    for _ in range(25):
        losses = model(batch)
        history.append(losses["loss_sr"].item())
        optimizer.zero_grad()
        losses["loss_sr"].backward()
        optimizer.step()
    assert min(history[-5:]) < 0.7 * history[0], history


@pytest.mark.parametrize("detach", [True, False])
def test_serial_detector_detach_switch(detach):
    model = build(["MODEL.META_ARCHITECTURE", "SerialSRDetector", "MODEL.SDCONET.SERIAL.DETACH", str(detach)])
    assert type(model).__name__ == "SerialSRDetector"
    model.train()
    losses = model([sample()])
    detection = sum(v for k, v in losses.items() if k not in SR_LOSS_KEYS)
    detection.backward()
    # the SR network = its Swin + the SR decoder (the residual head's last layer starts at zero,
    # so at first only that layer gets a detection gradient)
    sr_network = [*model.sr_backbone.parameters(), *model.sr_decoder.parameters()]
    reached = any(p.grad is not None and p.grad.abs().sum() > 0 for p in sr_network)
    assert reached is (not detach)
    # the detector's own Swin always learns from detection
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())

    model.eval()
    counter = CallCounter(model.sr_decoder)
    with torch.no_grad():
        out = model([sample()])
    assert counter.calls == 1 and len(out[0]["instances"]) > 0  # the serial pipeline needs SR at inference


@pytest.mark.skipif(not onednn_available(), reason="this PyTorch build has no oneDNN")
def test_onednn_linear_switch_changes_the_layers_not_the_losses():
    stock = build(["MODEL.SDCONET.ONEDNN_LINEAR", False])
    fast = build()  # the default: on
    assert not any(isinstance(m, OneDNNLinear) for m in stock.modules())
    assert not any(type(m) is torch.nn.Linear for m in fast.modules())
    assert sum(isinstance(m, OneDNNLinear) for m in fast.modules()) > 50
    fast.load_state_dict(stock.state_dict())
    losses = []
    for model in (stock, fast):
        model.train()
        torch.manual_seed(1)  # the same denoising noise for both
        losses.append(model([sample(), sample(seed=1)]))
    assert losses[0].keys() == losses[1].keys()
    for key in losses[0]:
        torch.testing.assert_close(losses[1][key], losses[0][key], rtol=1e-4, atol=1e-5)


def test_test_amp_autocasts_eval_only_and_returns_fp32():
    """TEST.SDCONET.AMP: the eval forward runs in bf16 (the same network: features near the fp32
    ones), detections come out in fp32; a training forward stays fp32 (the trainer's SOLVER.AMP
    owns autocast there). Accuracy on a trained model: BENCHMARKS.md."""
    fp32, amp = build(), build(["TEST.SDCONET.AMP.ENABLED", True])
    amp.load_state_dict(fp32.state_dict())
    res5 = []
    for model in (fp32, amp):
        model.backbone.register_forward_hook(lambda m, i, o: res5.append(o["res5"]))
    with torch.no_grad():
        found = [model.eval()([sample()])[0]["instances"] for model in (fp32, amp)]
    assert [f.dtype for f in res5] == [torch.float32, torch.bfloat16]
    error = (res5[1].float() - res5[0]).norm() / res5[0].norm()
    assert error < 0.05, error
    assert found[1].scores.dtype == torch.float32 and found[1].pred_boxes.tensor.dtype == torch.float32
    assert len(found[1]) == len(found[0]) and found[1].scores.max() <= 1.0
    torch.manual_seed(1)
    losses = amp.train()([sample(), sample(seed=1)])
    assert res5[-1].dtype == torch.float32
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())


def test_untrained_residual_sr_is_bicubic_of_the_model_lr_input():
    """The residual head's last layer starts at zero: the SR image is the bicubic upsampling of
    the LR batch the backbone saw, both in normalised space and after de-normalisation."""
    model = build(["MODEL.SDCONET.SR.HEAD", "residual"]).eval()
    seen = {}
    model.sr_decoder.register_forward_hook(lambda m, args, out: seen.update(lr=args[1], sr=out))
    with torch.no_grad(), model.outputs(sr=True):
        out = model([sample(128, 128)])[0]
    lr = seen["lr"]
    assert lr.shape == (1, 3, 64, 64)  # the degraded input, not the HR image
    bicubic = torch.nn.functional.interpolate(lr, size=(128, 128), mode="bicubic", align_corners=False)
    torch.testing.assert_close(seen["sr"], bicubic, rtol=0, atol=1e-5)
    in_pixels = (bicubic[0] * model.pixel_std + model.pixel_mean).clamp(0, 255)
    torch.testing.assert_close(out["sr"], in_pixels, rtol=0, atol=1e-5)
    assert out["sr"].shape == (3, 128, 128) and out["sr"].std() > 10  # a real image, not a constant


def test_stride4_config_adds_a_stride4_level_and_gives_small_boxes_to_it():
    # sdconet_tiny_synthetic_stride4.yaml feeds res2..res5 to the neck and halves the saliency
    # ranges with the strides: a 12 px HR box must be a saliency positive on the stride-4 level only.
    path = str(REPO / "configs" / "quick_schedules" / "sdconet_tiny_synthetic_stride4.yaml")
    torch.manual_seed(0)
    model = build_model(sdconet.get_sdconet_cfg(path, ["MODEL.DEVICE", "cpu"])).train()
    x = sample()
    x["instances"] = Instances((128, 128), gt_boxes=Boxes(torch.tensor([[50.0, 50.0, 62.0, 62.0]])),
                               gt_classes=torch.tensor([1]))
    images = model.preprocess_image([x])
    lr, lr_sizes = model.degrade(images)
    _, levels, _ = model.extract_features(lr, lr_sizes)
    shapes = [tuple(level.shape[-2:]) for level in levels]
    assert shapes == [(16, 16), (8, 8), (4, 4), (2, 2)]  # LR 64 px at strides 4, 8, 16, 32
    strides = [128 / h for h, _ in shapes]
    targets = saliency_targets([x["instances"].gt_boxes.tensor], images.image_sizes, shapes, strides,
                               ranges=model.saliency_ranges)
    assert targets[0].sum() > 0 and all(t.sum() == 0 for t in targets[1:])
    # an 80 px box: max(l, t, r, b) >= 40 everywhere inside, past the stride-4 level's (-1, 32]
    big = saliency_targets([torch.tensor([[20.0, 20.0, 100.0, 100.0]])], images.image_sizes, shapes, strides,
                           ranges=model.saliency_ranges)
    assert big[0].sum() == 0 and big[1].sum() > 0
    losses = model([x, sample(seed=1)])
    assert "loss_saliency" in losses and all(torch.isfinite(v) for v in losses.values())
