"""The ``SDCoNet`` meta-architecture: normalise, pad, degrade, Swin, neck, DINO transformer, losses.

Training adds two branches on the shared Swin: the SR decoder (``loss_sr``; docs/method.md, SR
branch) and the saliency predictor that drives token selection (``loss_saliency``; docs/method.md,
Saliency and token selection). Inference runs detection only. With both branches off this is the
paper's "DINO on low-resolution input" baseline. Boxes in and out are in the coordinates of the
image the user gave.

Losses are grouped by task through their names: keys in :data:`SR_LOSS_KEYS` are the SR task,
every other ``loss_*`` is detection (the gradient-routing trainer splits the backward on this).
"""
import contextlib
import logging
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, ImageList, Instances
from torch import nn
from torchvision.ops import box_convert

from ..layers.onednn_linear import use_onednn_linear
from .criterion import DINOCriterion
from .degradation import build_degradation
from .matcher import HungarianMatcher
from .neck import build_neck
from .saliency import flatten_levels, saliency_loss, saliency_targets
from .sr_decoder import SRDecoder, build_sr_decoder
from .transformer.dino_transformer import DINOTransformer

# Loss names that belong to the SR task; all other losses are detection (+ saliency).
SR_LOSS_KEYS = ("loss_sr",)
AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def per_axis(op, boxes: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """``op(boxes, [x, y, x, y])`` for (..., 4) boxes, with Python numbers: a scale tensor made from
    them would be a host-to-device copy, which syncs on CUDA."""
    return torch.stack([op(boxes[..., 0::2], x), op(boxes[..., 1::2], y)], dim=-1).flatten(-2)


def build_dino_transformer(cfg, num_levels: int) -> DINOTransformer:
    """The DINO transformer of ``cfg`` (with saliency-driven selection when SALIENCY.ENABLED)."""
    s = cfg.MODEL.SDCONET
    t, sal = s.TRANSFORMER, s.SALIENCY
    return DINOTransformer(
        num_classes=s.NUM_CLASSES, embed_dim=s.NECK.OUT_CHANNELS, num_heads=t.NUM_HEADS,
        num_levels=num_levels, num_points=t.NUM_POINTS,
        enc_layers=t.ENC_LAYERS, dec_layers=t.DEC_LAYERS, ffn_dim=t.FFN_DIM, dropout=t.DROPOUT,
        num_queries=t.NUM_QUERIES, pos_temperature=t.POS_TEMPERATURE,
        dn_num_queries=s.DN.NUM_QUERIES, dn_label_noise=s.DN.LABEL_NOISE, dn_box_noise=s.DN.BOX_NOISE,
        saliency_alpha=sal.ALPHA if sal.ENABLED else None, level_ratios=tuple(sal.LEVEL_RATIOS),
        layer_ratios=tuple(sal.LAYER_RATIOS), topk_sa=sal.TOPK_PRE_ATTENTION, shared_scorer=sal.SHARED_SCORER,
        pre_attention_score=sal.PRE_ATTENTION_SCORE,
        deform_impl=t.DEFORM_IMPL, deform_compile=t.DEFORM_COMPILE)


def build_dino_criterion(cfg) -> DINOCriterion:
    s = cfg.MODEL.SDCONET
    m, lo = s.MATCHER, s.LOSS
    matcher = HungarianMatcher(cost_class=m.COST_CLASS, cost_bbox=m.COST_BBOX, cost_giou=m.COST_GIOU,
                               focal_alpha=lo.FOCAL_ALPHA, focal_gamma=lo.FOCAL_GAMMA)
    return DINOCriterion(
        num_classes=s.NUM_CLASSES, matcher=matcher,
        weight_dict={"loss_class": lo.CLASS_WEIGHT, "loss_bbox": lo.BBOX_WEIGHT, "loss_giou": lo.GIOU_WEIGHT},
        focal_alpha=lo.FOCAL_ALPHA, focal_gamma=lo.FOCAL_GAMMA)


def eval_amp_dtype(cfg) -> Optional[torch.dtype]:
    """The autocast dtype of eval forwards from TEST.SDCONET.AMP (None = fp32). Warns when bf16
    is asked for on a CPU without native bf16 (then it is slower than fp32, not faster)."""
    amp = cfg.TEST.SDCONET.AMP
    if not amp.ENABLED:
        return None
    dtype = AMP_DTYPES[amp.DTYPE]
    if (dtype == torch.bfloat16 and cfg.MODEL.DEVICE == "cpu"
            and not torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        logging.getLogger(__name__).warning(
            "TEST.SDCONET.AMP: this CPU has no native bf16 (AVX512-BF16 / AMX), so bf16 inference is "
            "emulated and slower than fp32")
    return dtype


@META_ARCH_REGISTRY.register()
class SDCoNet(nn.Module):
    """Shared Swin encoder + DINO detector on the degraded (LR) image."""

    @configurable
    def __init__(self, *, backbone, neck, transformer, criterion, degradation, in_features,
                 pixel_mean, pixel_std, num_detections=300, degrade_test=True, sr_decoder=None,
                 sr_loss_weight=5.0, saliency_loss_weight=2.0, saliency_ranges=None, saliency_focal=(0.25, 2.0),
                 eval_amp_dtype: Optional[torch.dtype] = None):
        super().__init__()
        # Autocast dtype of eval forwards (TEST.SDCONET.AMP); None = fp32.
        self.eval_amp_dtype = eval_amp_dtype
        # Training-only SR branch (skipped inside ``outputs(sr=False)``: gradient-routing phase 1).
        self.sr_decoder = sr_decoder
        self.sr_loss_weight = sr_loss_weight
        # What forward returns besides detections / losses; changed only through ``outputs``.
        self._outputs = {"sr": None, "saliency": None}
        self.saliency_loss_weight = saliency_loss_weight
        self.saliency_ranges = tuple(tuple(float(v) for v in r) for r in saliency_ranges) if saliency_ranges else None
        self.saliency_focal = saliency_focal
        self.backbone = backbone
        self.neck = neck
        self.transformer = transformer
        self.criterion = criterion
        self.degradation = degradation
        self.in_features = list(in_features)
        self.num_detections = num_detections
        self.degrade_test = degrade_test
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @classmethod
    def from_config(cls, cfg):
        s = cfg.MODEL.SDCONET
        backbone = build_backbone(cfg)
        in_features = list(s.SWIN.OUT_FEATURES)
        shapes = backbone.output_shape()
        neck = build_neck(cfg, [shapes[f] for f in in_features])
        sr_decoder = build_sr_decoder(cfg, shapes["patch_embed"].channels) if s.SR.ENABLED else None
        transformer = build_dino_transformer(cfg, len(in_features) + s.NECK.NUM_EXTRA_LEVELS)
        if s.ONEDNN_LINEAR:
            for part in (backbone, neck, transformer, sr_decoder):
                if part is not None:
                    use_onednn_linear(part)
        return {
            "backbone": backbone, "neck": neck, "transformer": transformer,
            "criterion": build_dino_criterion(cfg),
            "degradation": build_degradation(cfg), "in_features": in_features,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN, "pixel_std": cfg.MODEL.PIXEL_STD,
            "num_detections": s.TRANSFORMER.NUM_DETECTIONS, "degrade_test": s.DEGRADE.TEST,
            "sr_decoder": sr_decoder, "sr_loss_weight": s.SR.LOSS_WEIGHT,
            "saliency_loss_weight": s.SALIENCY.LOSS_WEIGHT, "saliency_ranges": s.SALIENCY.RANGES,
            "saliency_focal": (s.SALIENCY.FOCAL_ALPHA, s.SALIENCY.FOCAL_GAMMA),
            "eval_amp_dtype": eval_amp_dtype(cfg),
        }

    @property
    def device(self):
        return self.pixel_mean.device

    @property
    def input_scale(self) -> int:
        """Down-sampling applied to the input in the current mode (1 when it is used as is)."""
        return self.degradation.scale if (self.training or self.degrade_test) else 1

    # ------------------------------------------------------------------ input
    def preprocess_image(self, batched_inputs):
        """Normalise and pad the HR images so the LR batch is divisible by the backbone's stride."""
        images = [(x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        divisibility = self.backbone.size_divisibility * self.input_scale
        return ImageList.from_tensors(images, divisibility)

    def prepare_targets(self, batched_inputs, images: ImageList):
        """GT boxes as cxcywh normalised by each (unpadded) image size, as the transformer expects."""
        targets = []
        for x, (h, w) in zip(batched_inputs, images.image_sizes):
            inst = x["instances"].to(self.device)
            boxes = per_axis(torch.div, box_convert(inst.gt_boxes.tensor, "xyxy", "cxcywh"), w, h)
            targets.append({"labels": inst.gt_classes, "boxes": boxes})
        return targets

    @staticmethod
    def padding_mask(batch: torch.Tensor, sizes) -> torch.Tensor:
        """(B, H, W) bool, True outside each image's (h, w) in the padded batch."""
        mask = torch.ones(batch.shape[0], batch.shape[2], batch.shape[3], dtype=torch.bool, device=batch.device)
        for i, (h, w) in enumerate(sizes):
            mask[i, :h, :w] = False
        return mask

    def extract_features(self, lr: torch.Tensor, lr_sizes, backbone=None):
        """Backbone + neck on the LR batch; returns (backbone dict, neck levels, padding masks)."""
        feats = (backbone or self.backbone)(lr)
        levels = self.neck([feats[f] for f in self.in_features])
        pad_mask = self.padding_mask(lr, lr_sizes)
        masks = [F.interpolate(pad_mask[None].float(), size=lvl.shape[-2:])[0].bool() for lvl in levels]
        return feats, levels, masks

    def degrade(self, images: ImageList):
        """The LR batch the detector sees and each image's LR size."""
        s = self.input_scale
        # Degradation is its own identity at scale 1 without blur/noise; skipping it only when the
        # test images are real low-quality input keeps blur/noise at scale 1 working.
        lr = self.degradation(images.tensor) if (self.training or self.degrade_test) else images.tensor
        return lr, [(-(-h // s), -(-w // s)) for h, w in images.image_sizes]

    # ------------------------------------------------------------------ auxiliary losses
    def sr_loss(self, sr: torch.Tensor, images: ImageList) -> Dict[str, torch.Tensor]:
        """Weighted L1 of the SR image against the normalised HR batch, padding excluded."""
        valid = ~self.padding_mask(images.tensor, images.image_sizes)
        return {"loss_sr": self.sr_loss_weight * SRDecoder.loss(sr, images.tensor, valid)}

    def saliency_loss(self, outputs, batched_inputs, images: ImageList) -> Dict[str, torch.Tensor]:
        """Focal BCE of the per-level saliency logits against box-derived soft targets."""
        logits = outputs["saliency"].logits
        hr_h, hr_w = images.tensor.shape[-2:]
        strides = [(hr_h / h, hr_w / w) for h, w in outputs["spatial_shapes"]]
        boxes = [x["instances"].gt_boxes.tensor.to(self.device) for x in batched_inputs]
        kwargs = {"ranges": self.saliency_ranges} if self.saliency_ranges else {}
        targets = saliency_targets(boxes, images.image_sizes, outputs["spatial_shapes"], strides, **kwargs)
        alpha, gamma = self.saliency_focal
        loss = saliency_loss(flatten_levels(logits).float(), flatten_levels(targets), alpha=alpha, gamma=gamma)
        return {"loss_saliency": self.saliency_loss_weight * loss}

    # ------------------------------------------------------------------ forward
    @contextlib.contextmanager
    def outputs(self, *, sr: Optional[bool] = None, saliency: Optional[bool] = None):
        """What forwards inside the ``with`` return, like ``do_postprocess`` in detectron2's
        ``GeneralizedRCNN.inference`` but for the whole model (the trainer's loop calls ``model(x)``).

        Training: ``sr=False`` skips the SR branch, so no ``loss_sr`` (gradient-routing phase 1);
        by default it runs. Eval: ``sr=True`` adds the "sr" and "lr" images to each output dict and
        ``saliency=True`` the per-level "saliency" maps; by default neither. None keeps what the
        enclosing ``with`` chose; the previous choice comes back on exit, also after an error.
        """
        previous = self._outputs
        self._outputs = {"sr": previous["sr"] if sr is None else bool(sr),
                         "saliency": previous["saliency"] if saliency is None else bool(saliency)}
        try:
            yield self
        finally:
            self._outputs = previous

    @property
    def runs_sr(self) -> bool:
        """Whether this forward computes the SR image (see :meth:`outputs`)."""
        if self.sr_decoder is None:
            return False
        sr = self._outputs["sr"]
        return sr is not False if self.training else sr is True

    def eval_autocast(self):
        """Autocast for an eval forward when TEST.SDCONET.AMP asks for it. Never in training (the
        trainer owns autocast there, SOLVER.AMP) nor while tracing for export (fp32 graphs)."""
        if (self.training or self.eval_amp_dtype is None or torch.jit.is_tracing()
                or torch.onnx.is_in_onnx_export()):
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.eval_amp_dtype)

    def forward(self, batched_inputs):
        with self.eval_autocast():
            images = self.preprocess_image(batched_inputs)
            lr, lr_sizes = self.degrade(images)
            feats, levels, masks = self.extract_features(lr, lr_sizes)
            sr = self.sr_decoder(feats, lr, images.tensor.shape[-2:]) if self.runs_sr else None

            if self.training:
                return self.training_losses(levels, masks, batched_inputs, images, sr)
            outputs = self.transformer(levels, masks, None)
        return self.postprocess(outputs, batched_inputs, images, lr, lr_sizes, sr)

    def training_losses(self, levels, masks, batched_inputs, images: ImageList, sr=None) -> Dict[str, torch.Tensor]:
        """Detection losses, plus ``loss_saliency`` when saliency is on and ``loss_sr`` for an SR image."""
        targets = self.prepare_targets(batched_inputs, images)
        outputs = self.transformer(levels, masks, targets)
        losses = self.criterion(outputs, targets)
        if outputs["saliency"] is not None:
            losses.update(self.saliency_loss(outputs, batched_inputs, images))
        if sr is not None:
            losses.update(self.sr_loss(sr, images))
        return losses

    def postprocess(self, outputs, batched_inputs, images: ImageList, lr, lr_sizes, sr=None):
        """Detections in input-image pixels, plus the SR / saliency extras when asked for."""
        # fp32 from here on, also after an autocast forward (TEST.SDCONET.AMP).
        results = self.inference(outputs["pred_logits"].float(), outputs["pred_boxes"].float(), images.image_sizes)
        processed = []
        for i, (r, x, size) in enumerate(zip(results, batched_inputs, images.image_sizes)):
            out_h, out_w = x.get("height", size[0]), x.get("width", size[1])
            out = {"instances": detector_postprocess(r, out_h, out_w)}
            if sr is not None:
                out["sr"] = self.to_pixels(sr[i, :, : size[0], : size[1]])
                out["lr"] = self.to_pixels(lr[i, :, : lr_sizes[i][0], : lr_sizes[i][1]])
            if self._outputs["saliency"] and outputs.get("saliency") is not None:
                # Per level (h_l, w_l) probabilities over the padded LR grid, cropped to the image.
                out["saliency"] = [
                    lvl[i, : -(-lr_sizes[i][0] * lvl.shape[1] // lr.shape[-2]),
                        : -(-lr_sizes[i][1] * lvl.shape[2] // lr.shape[-1])].float().sigmoid()
                    for lvl in outputs["saliency"].logits]
            processed.append(out)
        return processed

    def to_pixels(self, normalised: torch.Tensor) -> torch.Tensor:
        """Undo the mean/std normalisation: (3, H, W) float in the input's 0-255 BGR space."""
        return (normalised.float() * self.pixel_std + self.pixel_mean).clamp(0, 255)

    def inference(self, logits, boxes, image_sizes):
        """Top-k (query, class) pairs per image -> ``Instances`` in input-image pixels."""
        b, q, c = logits.shape
        k = min(self.num_detections, q * c)
        scores, index = logits.sigmoid().flatten(1).topk(k, dim=1)
        query = torch.div(index, c, rounding_mode="floor")
        labels = index % c
        boxes = torch.gather(boxes, 1, query.unsqueeze(-1).expand(-1, -1, 4))
        boxes = box_convert(boxes, "cxcywh", "xyxy")
        results = []
        for i, (h, w) in enumerate(image_sizes):
            r = Instances((h, w))
            r.pred_boxes = Boxes(per_axis(torch.mul, boxes[i], w, h))
            r.pred_boxes.clip((h, w))
            r.scores = scores[i]
            r.pred_classes = labels[i]
            results.append(r)
        return results
