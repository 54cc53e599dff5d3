"""detectron2 ``DefaultTrainer`` wiring for SDCoNet: AdamW with a backbone LR multiplier,
full-model gradient clipping, our dataset mapper, COCO evaluation on the test split."""
import logging
import os

import torch
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.engine import DefaultTrainer
from detectron2.evaluation import COCOEvaluator

from ..data.mapper import SDCoNetDatasetMapper

logger = logging.getLogger(__name__)


def build_param_groups(model: torch.nn.Module, base_lr: float, weight_decay: float, backbone_multiplier: float):
    """Two parameter groups: the Swin encoders at ``base_lr * backbone_multiplier``, the rest at ``base_lr``.

    Swin encoders are the top-level modules whose name ends in ``backbone`` (``backbone``, and the
    serial baseline's ``sr_backbone``), also under a DDP ``module.`` prefix. Frozen parameters are
    left out. (detectron2 0.6's ``get_default_optimizer_params`` has no per-name LR factor.)
    """
    backbone, rest = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        top = name.removeprefix("module.").split(".")[0]
        (backbone if top.endswith("backbone") else rest).append(param)
    groups = [{"params": rest, "lr": base_lr, "weight_decay": weight_decay}]
    if backbone:
        groups.append({"params": backbone, "lr": base_lr * backbone_multiplier, "weight_decay": weight_decay})
    return groups


def with_full_model_clipping(optimizer_cls, max_norm: float):
    """Subclass ``optimizer_cls`` so ``step()`` first clips the L2 norm of all gradients together.

    detectron2's ``SOLVER.CLIP_GRADIENTS`` clips per parameter; DETR-family recipes clip the
    whole model at 0.1 (spec §7).
    """
    if max_norm <= 0:
        return optimizer_cls

    class FullModelClipped(optimizer_cls):
        def step(self, closure=None):
            params = [p for group in self.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, max_norm)
            return super().step(closure=closure)

    FullModelClipped.__name__ = f"FullModelClipped{optimizer_cls.__name__}"
    return FullModelClipped


def build_sdconet_optimizer(cfg, model):
    groups = build_param_groups(model, cfg.SOLVER.BASE_LR, cfg.SOLVER.WEIGHT_DECAY, cfg.SOLVER.BACKBONE_MULTIPLIER)
    if cfg.SOLVER.OPTIMIZER == "ADAMW":
        cls = with_full_model_clipping(torch.optim.AdamW, cfg.SOLVER.FULL_MODEL_CLIP_NORM)
        return cls(groups, lr=cfg.SOLVER.BASE_LR)
    cls = with_full_model_clipping(torch.optim.SGD, cfg.SOLVER.FULL_MODEL_CLIP_NORM)
    return cls(groups, lr=cfg.SOLVER.BASE_LR, momentum=cfg.SOLVER.MOMENTUM)


class Trainer(DefaultTrainer):
    """``DefaultTrainer`` with SDCoNet's optimizer, mapper and evaluator."""

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_sdconet_optimizer(cfg, model)

    @classmethod
    def build_train_loader(cls, cfg):
        return build_detection_train_loader(cfg, mapper=SDCoNetDatasetMapper(cfg, is_train=True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(cfg, dataset_name, mapper=SDCoNetDatasetMapper(cfg, is_train=False))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return COCOEvaluator(dataset_name, output_dir=output_folder, use_fast_impl=False,
                             max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE)
