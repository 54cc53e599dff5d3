"""Hugging Face transformers' Deformable-DETR as a benchmark peer, trained from scratch on CPU.

The model is the library's ``DeformableDetrForObjectDetection`` with a ResNet-50 backbone; the
training loop is our own plain torch loop, so its time budget, threads and seed work like our runs.
Two changes to the library's model, both because nothing here is pretrained:

- every parameter trains (the library freezes the ResNet stem and first stage, for pretrained
  weights; for transformers' own ResNet its name filter freezes the whole backbone);
- the backbone's frozen batch norms become trainable ``nn.BatchNorm2d`` (the library replaces them
  with frozen copies of the pretrained statistics; frozen at their initial values, a random
  ResNet-50 has no normalisation at all).

``transformers`` is imported only when a peer is built, so the box helper works without it.
"""
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision.ops import box_convert, clip_boxes_to_image
from torchvision.transforms.v2.functional import horizontal_flip_bounding_boxes
from torchvision.tv_tensors import BoundingBoxFormat

# A small transformer for a CPU budget. Our tiny DINO has 2 + 2 layers of width 64; the library's
# default is 6 + 6 of width 256. 128 keeps 8 heads at 16 channels each (a power of 2, as the
# library advises) at about a quarter of the default's attention cost.
D_MODEL = 128
# Feed-forward width: 4 x D_MODEL, the usual transformer ratio (the library's 1024 is 4 x 256).
FFN_DIM = 4 * D_MODEL
# Encoder and decoder layers: as many as our tiny DINO, so the transformers cost alike.
ENCODER_LAYERS = 2
DECODER_LAYERS = 2
# Queries: the paper's 300 fill COCO's crowded images; 100 is what the contract keeps per image.
NUM_QUERIES = 100
# Levels: strides 8, 16, 32 from ResNet-50 plus one stride-64 conv, as in the paper.
NUM_FEATURE_LEVELS = 4
# The paper's optimiser, with the backbone at the full LR since it starts from random weights.
BASE_LR = 2e-4
WEIGHT_DECAY = 1e-4
GRAD_CLIP_NORM = 0.1
# The paper drops the LR x0.1 for the last fifth of training; the run length here is a time.
LR_DROP_AT = 0.8
LR_DROP_FACTOR = 0.1
# Detections kept per image (the contract's maximum).
MAX_DETECTIONS = 100
# Iterations averaged for the first and last loss that train() reports (one batch is noisy).
LOSS_WINDOW = 5


def to_detr_boxes(boxes_xyxy: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """XYXY boxes in pixels -> the model's (cx, cy, w, h) boxes as fractions of the image size."""
    boxes = box_convert(boxes_xyxy.float().reshape(-1, 4), "xyxy", "cxcywh")
    return boxes / boxes.new_tensor([width, height, width, height])


def _pad_batch(images: list) -> tuple:
    """CHW float images of any size -> one zero-padded batch and its ``pixel_mask`` (1 = image)."""
    height = max(im.shape[1] for im in images)
    width = max(im.shape[2] for im in images)
    batch = images[0].new_zeros(len(images), 3, height, width)
    mask = torch.zeros(len(images), height, width, dtype=torch.long)
    for i, im in enumerate(images):
        batch[i, :, :im.shape[1], :im.shape[2]] = im
        mask[i, :im.shape[1], :im.shape[2]] = 1
    return batch, mask


def _make_trainable_norms(module: nn.Module, frozen_cls) -> None:
    """Swaps every ``frozen_cls`` batch norm inside ``module`` for a trainable ``nn.BatchNorm2d``
    that starts from its weights and statistics."""
    for name, child in module.named_children():
        if isinstance(child, frozen_cls):
            norm = nn.BatchNorm2d(child.weight.numel())
            with torch.no_grad():
                norm.weight.copy_(child.weight)
                norm.bias.copy_(child.bias)
                norm.running_mean.copy_(child.running_mean)
                norm.running_var.copy_(child.running_var)
            setattr(module, name, norm)
        else:
            _make_trainable_norms(child, frozen_cls)


class DeformableDetrPeer:
    """Deformable-DETR (transformers) with a random-weight ResNet-50, for ``tools/train_peer.py``.

    The model is built in the constructor (seeded by ``seed``), so its build is not part of the
    training budget; everything in :meth:`train` after the optimiser is made is.
    """

    def __init__(self, num_classes: int, seed: int, work_dir: str, threads: int, batch_size: int):
        # No network at run time: the hub stays offline and transformers may not swap the deformable
        # attention for a hub kernel (it would only for CUDA, and only with the `kernels` package).
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("USE_HUB_KERNELS", "NO")
        from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection, ResNetConfig
        from transformers.models.deformable_detr.modeling_deformable_detr import DeformableDetrFrozenBatchNorm2d

        self.num_classes = int(num_classes)
        self.seed = int(seed)
        self.work_dir = Path(work_dir)
        self.threads = int(threads)
        self.batch_size = int(batch_size)
        torch.set_num_threads(self.threads)
        torch.manual_seed(self.seed)
        # transformers' own ResNet-50 (a config, never a checkpoint): stages 2-4 are strides 8-32.
        backbone = ResNetConfig(out_features=["stage2", "stage3", "stage4"])
        self.config = DeformableDetrConfig(
            backbone_config=backbone, num_labels=self.num_classes, d_model=D_MODEL,
            encoder_layers=ENCODER_LAYERS, decoder_layers=DECODER_LAYERS,
            encoder_ffn_dim=FFN_DIM, decoder_ffn_dim=FFN_DIM, num_queries=NUM_QUERIES,
            num_feature_levels=NUM_FEATURE_LEVELS,
            # the paper trains with a loss after every decoder layer; the library's default is off
            auxiliary_loss=True,
            # the pure PyTorch deformable attention (grid_sample), the only one on CPU
            disable_custom_kernels=True,
        )
        self.model = DeformableDetrForObjectDetection(self.config)
        _make_trainable_norms(self.model.model.backbone, DeformableDetrFrozenBatchNorm2d)
        for p in self.model.parameters():
            p.requires_grad_(True)
        from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
        self._mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
        self._std = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)

    def _image_tensor(self, image: np.ndarray) -> torch.Tensor:
        """uint8 H x W x 3 RGB -> normalised float 3 x H x W."""
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255.0
        return (x - self._mean) / self._std

    def _training_batch(self, images: list, targets: list, flips: list) -> tuple:
        """Images, their targets and whether to flip each -> ``pixel_values``, ``pixel_mask`` and the
        ``labels`` the model wants (``class_labels`` and normalised cxcywh ``boxes``)."""
        pixels, boxes = [], []
        for image, target, flip in zip(images, targets, flips):
            x = self._image_tensor(image)
            b = torch.as_tensor(target["boxes"], dtype=torch.float32).reshape(-1, 4)
            b = clip_boxes_to_image(b, x.shape[1:])
            if flip:
                x = x.flip(-1)
                b = horizontal_flip_bounding_boxes(b, BoundingBoxFormat.XYXY, tuple(x.shape[1:]))
            pixels.append(x)
            boxes.append(b)
        pixel_values, pixel_mask = _pad_batch(pixels)
        height, width = pixel_values.shape[-2:]
        # fractions of the padded batch, the frame the model predicts in (the image when sizes agree)
        labels = [{"class_labels": torch.as_tensor(t["classes"], dtype=torch.long).reshape(-1),
                   "boxes": to_detr_boxes(b, height, width)} for t, b in zip(targets, boxes)]
        return pixel_values, pixel_mask, labels

    def train(self, images: list, targets: list, budget_seconds: float) -> dict:
        """Trains until ``budget_seconds`` of training have passed (checked after each iteration).

        Returns ``train_seconds``, ``iterations``, ``epochs`` (full passes) and ``loss_first`` /
        ``loss_last``: the mean total loss of the first and the last ``LOSS_WINDOW`` iterations.
        """
        if not images or len(images) != len(targets):
            raise ValueError(f"train needs images and one target per image, got {len(images)} images and "
                             f"{len(targets)} targets")
        torch.set_num_threads(self.threads)
        torch.manual_seed(self.seed)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.config.to_json_file(self.work_dir / "deformable_detr_config.json")
        generator = torch.Generator().manual_seed(self.seed)
        model = self.model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=BASE_LR, weight_decay=WEIGHT_DECAY)
        iterations, epochs, losses, dropped = 0, 0, [], False
        start = time.perf_counter()
        while time.perf_counter() - start < budget_seconds:
            order = torch.randperm(len(images), generator=generator).tolist()
            for first in range(0, len(order), self.batch_size):
                chosen = order[first:first + self.batch_size]
                flips = (torch.rand(len(chosen), generator=generator) < 0.5).tolist()
                pixel_values, pixel_mask, labels = self._training_batch(
                    [images[i] for i in chosen], [targets[i] for i in chosen], flips)
                loss = model(pixel_values=pixel_values, pixel_mask=pixel_mask, labels=labels).loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP_NORM)
                optimizer.step()
                iterations += 1
                losses.append(float(loss.detach()))
                epochs += first + self.batch_size >= len(order)
                elapsed = time.perf_counter() - start
                if not dropped and elapsed >= LR_DROP_AT * budget_seconds:
                    for group in optimizer.param_groups:
                        group["lr"] *= LR_DROP_FACTOR
                    dropped = True
                if elapsed >= budget_seconds:
                    break
        window = min(LOSS_WINDOW, len(losses))
        return {"train_seconds": time.perf_counter() - start, "iterations": iterations, "epochs": epochs,
                "loss_first": float(np.mean(losses[:window])) if losses else float("nan"),
                "loss_last": float(np.mean(losses[-window:])) if losses else float("nan")}

    @torch.inference_mode()
    def predict(self, images: list) -> list:
        """Per image the best ``MAX_DETECTIONS`` boxes (XYXY, LR pixels), scores and classes,
        decoded by the library's own ``post_process_object_detection``."""
        from transformers import DeformableDetrImageProcessor

        torch.set_num_threads(self.threads)
        processor = DeformableDetrImageProcessor()
        model = self.model.eval()
        results = []
        for first in range(0, len(images), self.batch_size):
            chunk = images[first:first + self.batch_size]
            pixel_values, pixel_mask = _pad_batch([self._image_tensor(im) for im in chunk])
            outputs = model(pixel_values=pixel_values, pixel_mask=pixel_mask)
            # the boxes are fractions of the padded batch (the image itself when all sizes agree)
            sizes = [tuple(pixel_values.shape[-2:])] * len(chunk)
            decoded = processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=sizes,
                                                               top_k=MAX_DETECTIONS)
            for image, det in zip(chunk, decoded):
                boxes = clip_boxes_to_image(det["boxes"].float(), image.shape[:2])
                results.append({"boxes": boxes.numpy().astype(np.float32),
                                "scores": det["scores"].float().numpy().astype(np.float32),
                                "classes": det["labels"].numpy().astype(np.int64)})
        return results
