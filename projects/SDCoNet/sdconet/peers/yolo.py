"""Ultralytics YOLO11n as a benchmark peer, trained from scratch with the library's own recipe.

What Ultralytics (8.4.190) does on its own, and what this peer changes:
- ``time`` (hours) replaces ``epochs``: the trainer stops at the first optimizer step past the
  budget, and after every epoch re-plans ``epochs`` from the mean epoch time (checkpoint save
  included) and rebuilds its linear LR decay to end there. The first epoch is planned with the
  default ``epochs`` (100), which also sizes the ``optimizer=auto`` choice (AdamW below 10k planned
  iterations, else MuSGD). Mosaic is switched off for good once an epoch reaches the plan minus
  ``close_mosaic`` (10): on a budget of a few epochs that is right after the first one.
- ``val=False`` still validates after the last epoch and ``final_eval`` validates ``best.pt`` once
  more; both read ``data.yaml`` through ``check_det_dataset``, which asks GitHub for a font on every
  call, online or not. ``_OfflineTrainer`` skips both: we score with our own evaluator, and without
  a fitness value ``best.pt`` is rewritten every epoch, so it is ``last.pt``.
- ``select_device`` (trainer, validator, predictor) sets torch threads to ``min(8, cpus - 1)``;
  callbacks set them back to ``threads`` before the first batch and before predicting.
- On CPU the trainer forces ``workers=0`` (loading in the training process) and AMP off, and
  ``check_amp`` returns before it would fetch a model.
"""
import os
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from .yolo_format import write_yolo_dataset

# Ultralytics decides ONLINE once, at import (a DNS probe): offline, it skips its pip-update check and
# analytics. Its import also sets OMP_NUM_THREADS=1 when unset (torch is already loaded, so only child
# processes see it) and cv2.setNumThreads(0).
os.environ["YOLO_OFFLINE"] = "1"
from ultralytics import YOLO, __version__ as ultralytics_version  # noqa: E402
from ultralytics.models.yolo.detect import DetectionTrainer  # noqa: E402

# What Ultralytics' own validator keeps (conf 0.001, NMS IoU 0.7), capped at our 100 boxes.
PREDICT_ARGS = {"conf": 0.001, "iou": 0.7, "max_det": 100, "verbose": False}


class _OfflineTrainer(DetectionTrainer):
    """``DetectionTrainer`` without validation: it reads our ``data.yaml`` directly and never evaluates,
    since evaluating only costs time here and its dataset check fetches a font."""

    def get_dataset(self):
        """What ``check_det_dataset`` returns for the ``data.yaml`` of ``write_yolo_dataset``."""
        data = yaml.safe_load(Path(self.args.data).read_text())
        root = Path(data["path"])
        return {**data, "path": root, "train": str(root / data["train"]), "val": str(root / data["val"]),
                "nc": len(data["names"]), "channels": 3, "yaml_file": str(self.args.data)}

    def validate(self):
        """No metrics and no fitness, as the trainer's loop expects when it skips validation."""
        return self.metrics, None

    def final_eval(self):
        """Nothing to re-validate: ``best.pt`` is ``last.pt``."""


class YoloPeer:
    """YOLO11n (``yolo11n.yaml``, random init) trained with Ultralytics' defaults: ``optimizer=auto``,
    warm-up, mosaic then ``close_mosaic``, HSV / flip / translate / scale augmentation, EMA, nominal batch 64
    (gradients accumulate over ``round(64 / batch_size)`` batches). Only the image size, batch,
    device, seed, time budget and paths are set."""

    def __init__(self, num_classes: int, seed: int, work_dir, threads: int, batch_size: int):
        self.num_classes, self.seed, self.threads, self.batch_size = num_classes, seed, threads, batch_size
        self.work_dir = Path(work_dir)
        self.model = None
        self.imgsz = None
        self.threads_seen = set()  # torch thread counts observed at the end of each training batch

    def _pin_threads(self, _=None):
        torch.set_num_threads(self.threads)

    def train(self, images, targets, budget_seconds: float) -> dict:
        """Train until ``budget_seconds`` of Ultralytics' training loop have passed (data loading,
        augmentation, EMA and per-epoch checkpoints included; writing the PNG dataset, building the
        model and the trainer's setup excluded); returns ``train_seconds``, ``epochs`` (started, the
        last one cut by the budget), ``iterations`` (batches), ``planned_epochs``, ``wall_seconds``
        (the whole call), ``weights`` (the checkpoint ``predict`` uses) and ``ultralytics_version``
        (its results move between versions, so a comparison has to say which)."""
        if budget_seconds <= 0:
            raise ValueError(f"budget_seconds must be > 0, got {budget_seconds}")
        for i, t in enumerate(targets):
            classes = np.asarray(t["classes"])
            if classes.size and (classes.min() < 0 or classes.max() >= self.num_classes):
                # Ultralytics would drop the whole image as corrupt, with only a log line.
                raise ValueError(f"target {i}: classes must be in 0..{self.num_classes - 1}, got {classes.tolist()}")
        start = time.time()
        self._pin_threads()
        self.imgsz = max(max(np.shape(im)[:2]) for im in images)
        data_yaml = write_yolo_dataset(self.work_dir / "data", "train", images, targets,
                                       [str(i) for i in range(self.num_classes)])

        model = YOLO("yolo11n.yaml")  # the trainer rebuilds it from this yaml with nc = len(names) of data.yaml
        batches, epoch_ends = [0], []
        # The trainer's select_device has just reset torch's thread count (before this callback runs).
        model.add_callback("on_pretrain_routine_start", self._pin_threads)
        model.add_callback("on_train_batch_start", lambda _: batches.__setitem__(0, batches[0] + 1))
        model.add_callback("on_train_batch_end", lambda _: self.threads_seen.add(torch.get_num_threads()))
        # After the epoch's checkpoint and the trainer's own "past the budget?" check, which counts that save.
        model.add_callback("on_fit_epoch_end", lambda _: epoch_ends.append(time.time()))
        model.add_callback("on_predict_start", self._pin_threads)  # after the predictor's select_device
        model.train(trainer=_OfflineTrainer, data=str(data_yaml), imgsz=self.imgsz, batch=self.batch_size,
                    device="cpu", workers=0, seed=self.seed, time=budget_seconds / 3600, pretrained=False,
                    val=False, plots=False, project=str(self.work_dir), name="train", exist_ok=True)
        # model.train reloaded best.pt (= last.pt): the EMA weights after the last step, stored in fp16, loaded as fp32.
        self.model = model
        trainer = model.trainer
        return {"train_seconds": epoch_ends[-1] - trainer.train_time_start, "epochs": trainer.epoch + 1,
                "iterations": batches[0], "planned_epochs": trainer.epochs, "wall_seconds": time.time() - start,
                "weights": model.overrides["model"], "ultralytics_version": ultralytics_version}

    @torch.no_grad()
    def predict(self, images, chunk: int = 32) -> list:
        """Per image ``boxes`` (float32 N x 4 XYXY, pixels of the given image), ``scores``, ``classes``,
        best first, at most 100."""
        if self.model is None:
            raise RuntimeError("YoloPeer.predict called before train")
        outputs = []
        for first in range(0, len(images), chunk):
            # Ultralytics reads numpy images as OpenCV BGR (its loaders flip PIL RGB input to BGR).
            bgr = [np.ascontiguousarray(np.asarray(im)[..., ::-1]) for im in images[first:first + chunk]]
            results = self.model.predict(bgr, imgsz=self.imgsz, device="cpu", project=str(self.work_dir),
                                         name="predict", exist_ok=True, **PREDICT_ARGS)
            for r in results:
                order = torch.argsort(r.boxes.conf, descending=True, stable=True)
                outputs.append({"boxes": r.boxes.xyxy[order].numpy().astype(np.float32),
                                "scores": r.boxes.conf[order].numpy().astype(np.float32),
                                "classes": r.boxes.cls[order].numpy().astype(np.int64)})
        return outputs

