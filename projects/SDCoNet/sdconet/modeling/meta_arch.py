"""The ``SDCoNet`` meta-architecture: normalise, pad, degrade, Swin, neck, DINO transformer, losses.

With the SR branch and saliency switched off this is the paper's "DINO on low-resolution
input" baseline. Boxes in and out are in the coordinates of the image the user gave.
"""
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, ImageList, Instances
from torch import nn
from torchvision.ops import box_convert

from .criterion import DINOCriterion
from .degradation import Degradation
from .matcher import HungarianMatcher
from .neck import build_neck
from .transformer.dino_transformer import DINOTransformer


@META_ARCH_REGISTRY.register()
class SDCoNet(nn.Module):
    """Shared Swin encoder + DINO detector on the degraded (LR) image."""

    @configurable
    def __init__(self, *, backbone, neck, transformer, criterion, degradation, in_features,
                 pixel_mean, pixel_std, num_detections=300, degrade_test=True):
        super().__init__()
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
        t = s.TRANSFORMER
        transformer = DINOTransformer(
            num_classes=s.NUM_CLASSES, embed_dim=s.NECK.OUT_CHANNELS, num_heads=t.NUM_HEADS,
            num_levels=len(in_features) + s.NECK.NUM_EXTRA_LEVELS, num_points=t.NUM_POINTS,
            enc_layers=t.ENC_LAYERS, dec_layers=t.DEC_LAYERS, ffn_dim=t.FFN_DIM, dropout=t.DROPOUT,
            num_queries=t.NUM_QUERIES, pos_temperature=t.POS_TEMPERATURE,
            dn_num_queries=s.DN.NUM_QUERIES, dn_label_noise=s.DN.LABEL_NOISE, dn_box_noise=s.DN.BOX_NOISE)
        m, lo = s.MATCHER, s.LOSS
        matcher = HungarianMatcher(cost_class=m.COST_CLASS, cost_bbox=m.COST_BBOX, cost_giou=m.COST_GIOU,
                                   focal_alpha=lo.FOCAL_ALPHA, focal_gamma=lo.FOCAL_GAMMA)
        criterion = DINOCriterion(
            num_classes=s.NUM_CLASSES, matcher=matcher,
            weight_dict={"loss_class": lo.CLASS_WEIGHT, "loss_bbox": lo.BBOX_WEIGHT, "loss_giou": lo.GIOU_WEIGHT},
            focal_alpha=lo.FOCAL_ALPHA, focal_gamma=lo.FOCAL_GAMMA)
        return {
            "backbone": backbone, "neck": neck, "transformer": transformer, "criterion": criterion,
            "degradation": Degradation.from_config(cfg), "in_features": in_features,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN, "pixel_std": cfg.MODEL.PIXEL_STD,
            "num_detections": t.NUM_DETECTIONS, "degrade_test": s.DEGRADE.TEST,
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
            scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=self.device)
            boxes = box_convert(inst.gt_boxes.tensor, "xyxy", "cxcywh") / scale
            targets.append({"labels": inst.gt_classes, "boxes": boxes})
        return targets

    def extract_features(self, lr: torch.Tensor, lr_sizes):
        """Backbone + neck on the LR batch; returns (backbone dict, neck levels, padding masks)."""
        feats = self.backbone(lr)
        levels = self.neck([feats[f] for f in self.in_features])
        pad_mask = torch.ones(lr.shape[0], lr.shape[2], lr.shape[3], dtype=torch.bool, device=lr.device)
        for i, (h, w) in enumerate(lr_sizes):
            pad_mask[i, :h, :w] = False
        masks = [F.interpolate(pad_mask[None].float(), size=lvl.shape[-2:])[0].bool() for lvl in levels]
        return feats, levels, masks

    # ------------------------------------------------------------------ forward
    def forward(self, batched_inputs):
        images = self.preprocess_image(batched_inputs)
        s = self.input_scale
        # Degradation is its own identity at scale 1 without blur/noise; skipping it only when the
        # test images are real low-quality input keeps blur/noise at scale 1 working.
        lr = self.degradation(images.tensor) if (self.training or self.degrade_test) else images.tensor
        lr_sizes = [(-(-h // s), -(-w // s)) for h, w in images.image_sizes]
        _, levels, masks = self.extract_features(lr, lr_sizes)

        if self.training:
            targets = self.prepare_targets(batched_inputs, images)
            outputs = self.transformer(levels, masks, targets)
            return self.criterion(outputs, targets)

        outputs = self.transformer(levels, masks, None)
        results = self.inference(outputs["pred_logits"], outputs["pred_boxes"], images.image_sizes)
        return [
            {"instances": detector_postprocess(r, x.get("height", size[0]), x.get("width", size[1]))}
            for r, x, size in zip(results, batched_inputs, images.image_sizes)
        ]

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
            scale = torch.tensor([w, h, w, h], dtype=boxes.dtype, device=boxes.device)
            r.pred_boxes = Boxes(boxes[i] * scale)
            r.pred_boxes.clip((h, w))
            r.scores = scores[i]
            r.pred_classes = labels[i]
            results.append(r)
        return results
