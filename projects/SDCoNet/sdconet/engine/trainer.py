"""SDCoNet's training from a config: AdamW with a backbone LR multiplier and full-model gradient
clipping, our dataset mapper, the gradient-routing step, EMA, atomic checkpoints, a resumable
data order and COCO evaluation on the test split.

``Trainer`` follows detectron2's ``DefaultTrainer`` workflow (``Trainer(cfg)``,
``resume_or_load``, ``train``, ``Trainer.test``) but is built as detrex's ``train_net`` builds
its trainer: the step (:class:`.train_loop.GradientRoutingTrainer`) is the trainer, and one hook
list does the rest. ``DefaultTrainer.__init__`` cannot be used: it wraps the model with
``create_ddp_model``, whose CUDA device ids DDP refuses for a model on CPU (gloo processes).
"""
import contextlib
import itertools
import logging
import os
import weakref
from collections import OrderedDict

import torch
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.data.samplers import TrainingSampler
from detectron2.engine import DefaultTrainer, default_writers, hooks
from detectron2.evaluation import DatasetEvaluators, inference_on_dataset, print_csv_format, verify_results
from detectron2.modeling import build_model
from detectron2.solver import build_lr_scheduler
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..data.dataset_checks import check_num_classes, training_dataset_dicts
from ..data.mapper import SDCoNetDatasetMapper
from ..data.mosaic import MosaicDataset
from ..evaluation import SRQualityEvaluator, SmallObjectCOCOEvaluator
from .checkpoint import AtomicDetectionCheckpointer
from .ema import ModelEMA
from .hooks import TimeBudget, TimeBudgetSpent
from .launch import unwrap, wrap_ddp
from .train_loop import GradientRoutingTrainer

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
    whole model at 0.1.
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


def with_gradients_laid_out_like_parameters(optimizer_cls):
    """Subclass ``optimizer_cls`` so ``step()`` first copies any gradient whose strides differ from
    its parameter's into the parameter's layout: the one place gradient layouts are fixed.

    ``.backward()`` lays every gradient out like its parameter (autograd's layout contract);
    ``autograd.grad`` results need not (a transposed convolution's, for one), and the routing step
    adds them to ``.grad``. torch's fused CPU AdamW walks gradient and parameter with the
    parameter's strides, so such a gradient would get a wrong update. Applied before the
    full-model clipping, so the whole step reads gradients laid out as ``.backward()`` lays them
    out. Normally a loop that copies nothing.
    """

    class LayoutSafe(optimizer_cls):
        def step(self, closure=None):
            for group in self.param_groups:
                for param in group["params"]:
                    if param.grad is not None and param.grad.stride() != param.stride():
                        param.grad = torch.empty_like(param).copy_(param.grad)
            return super().step(closure=closure)

    LayoutSafe.__name__ = f"LayoutSafe{optimizer_cls.__name__}"
    return LayoutSafe


def fused_kernel_available(groups) -> bool:
    """Whether torch's fused AdamW kernel can take these parameters (floating point, CPU or CUDA).

    It updates every tensor in one pass instead of a dozen element-wise ops per tensor (the same
    update up to rounding).
    """
    params = [p for group in groups for p in group["params"]]
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params) \
        and len({p.device for p in params}) == 1


def build_sdconet_optimizer(cfg, model):
    groups = build_param_groups(model, cfg.SOLVER.BASE_LR, cfg.SOLVER.WEIGHT_DECAY, cfg.SOLVER.BACKBONE_MULTIPLIER)
    if cfg.SOLVER.OPTIMIZER == "ADAMW":
        fused = fused_kernel_available(groups)
        cls = with_full_model_clipping(torch.optim.AdamW, cfg.SOLVER.FULL_MODEL_CLIP_NORM)
        return with_gradients_laid_out_like_parameters(cls)(groups, lr=cfg.SOLVER.BASE_LR, fused=fused)
    cls = with_full_model_clipping(torch.optim.SGD, cfg.SOLVER.FULL_MODEL_CLIP_NORM)
    return with_gradients_laid_out_like_parameters(cls)(groups, lr=cfg.SOLVER.BASE_LR, momentum=cfg.SOLVER.MOMENTUM)


class ResumableTrainingSampler(TrainingSampler):
    """detectron2's infinite shuffled sampler that can skip what earlier iterations consumed, so
    a resumed run sees the same images in the same order as an uninterrupted one.

    ``skip`` counts this rank's samples (iterations done x images per rank). With ``with_positions``
    it yields ``(index, position)``, ``position`` being the sample's place in the stream all ranks
    share (``skip`` included), so ``position // SOLVER.IMS_PER_BATCH`` is the iteration that uses
    it, known in loader workers too (``MosaicDataset`` in data/mosaic.py needs it).
    """

    def __init__(self, size: int, shuffle: bool = True, seed=None, with_positions: bool = False):
        super().__init__(size, shuffle=shuffle, seed=seed)
        self.skip = 0
        self.with_positions = with_positions

    def __iter__(self):
        start = self._rank + self.skip * self._world_size
        indices = itertools.islice(self._infinite_indices(), start, None, self._world_size)
        yield from zip(indices, itertools.count(start, self._world_size)) if self.with_positions else indices


class Trainer(GradientRoutingTrainer):
    """SDCoNet's training step built from a config, with detectron2's default hooks.

    ``--resume`` restores weights, optimizer, LR schedule, EMA, GradScaler and the iteration (and
    with it the routing phase), and continues the data stream where it stopped. With SEED >= 0,
    DATALOADER.NUM_WORKERS 0 (augmentation draws happen in the main process) and one aspect-ratio
    group (square tiles), the resumed run ends with exactly the weights of an uninterrupted one.

    Args:
        allow_partial_weights: load MODEL.WEIGHTS even if it sets under half of the model's tensors.
    """

    def __init__(self, cfg, allow_partial_weights: bool = False):
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = self.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        dataset = training_dataset_dicts(cfg)  # an error when they hold no annotation at all
        sampler = self.build_train_sampler(cfg, len(dataset))
        data_loader = self.build_train_loader(cfg, dataset=dataset, sampler=sampler)
        model = wrap_ddp(model)  # DDP broadcasts rank 0's weights: the EMA must start from them
        ema = ModelEMA(unwrap(model), cfg.SOLVER.EMA.DECAY) if cfg.SOLVER.EMA.ENABLED else None
        gr = cfg.SOLVER.GRADIENT_ROUTING
        super().__init__(
            model, data_loader, optimizer, routing_start=gr.START_ITER, mode=gr.MODE, projection=gr.PROJECTION,
            log_period=gr.LOG_PERIOD, amp=cfg.SOLVER.AMP.ENABLED,
            amp_dtype=torch.float16 if cfg.SOLVER.AMP.DTYPE == "float16" else torch.bfloat16,
            seed=cfg.SEED, ema=ema)
        self.cfg = cfg
        self.train_sampler = sampler
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.scheduler = build_lr_scheduler(cfg, optimizer)
        self.checkpointer = AtomicDetectionCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self),
                                                        allow_partial_weights=allow_partial_weights,
                                                        **({"ema": ema} if ema is not None else {}))
        self.register_hooks(self.build_hooks())

    def build_hooks(self):
        """detectron2's default hooks, in its order (no PreciseBN: SDCoNet has no BatchNorm), with
        :class:`.hooks.TimeBudget` right after the timer (it measures the step alone)."""
        main = comm.is_main_process()
        return [
            hooks.IterationTimer(),
            TimeBudget(self.cfg.SOLVER.TIME_BUDGET_SECONDS, self.checkpointer),
            hooks.LRScheduler(),  # the trainer's optimizer and scheduler
            hooks.PeriodicCheckpointer(self.checkpointer, self.cfg.SOLVER.CHECKPOINT_PERIOD) if main else None,
            hooks.EvalHook(self.cfg.TEST.EVAL_PERIOD, self.evaluate),
            hooks.PeriodicWriter(default_writers(self.cfg.OUTPUT_DIR, self.max_iter), period=20) if main else None,
        ]

    def evaluate(self):
        """The periodic and final evaluation, with the EMA weights when there is an EMA."""
        with self.ema.applied_to(unwrap(self.model)) if self.ema is not None else contextlib.nullcontext():
            self._last_eval_results = self.test(self.cfg, self.model)
        return self._last_eval_results

    def resume_or_load(self, resume=True):
        """With ``resume`` and a checkpoint in OUTPUT_DIR: continue from it (weights, optimizer, LR
        schedule, EMA, GradScaler, iteration, data stream); otherwise load MODEL.WEIGHTS."""
        self.checkpointer.resume_or_load(self.cfg.MODEL.WEIGHTS, resume=resume)
        if resume and self.checkpointer.has_checkpoint():
            self.start_iter = self.iter + 1  # the checkpoint holds the iteration that had finished
        # Continue the data stream after the images the finished iterations consumed.
        images_per_rank = self.cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size()
        self.train_sampler.skip = self.start_iter * images_per_rank

    def train(self):
        """Train from ``start_iter`` to SOLVER.MAX_ITER, or until SOLVER.TIME_BUDGET_SECONDS is spent;
        with TEST.EXPECTED_RESULTS, check the last evaluation against them and return it."""
        try:
            super().train(self.start_iter, self.max_iter)
        except TimeBudgetSpent:
            pass  # the loop ended like a finished one: final checkpoint and evaluation are done
        if len(self.cfg.TEST.EXPECTED_RESULTS) and comm.is_main_process():
            assert hasattr(self, "_last_eval_results"), "No evaluation results obtained during training!"
            verify_results(self.cfg, self._last_eval_results)
            return self._last_eval_results

    def load_state_dict(self, state_dict):
        # Checkpoints of earlier versions, whose trainer wrapped this step, hold the optimizer and
        # GradScaler states under "_trainer"; detectron2's own DefaultTrainer saves no optimizer.
        state_dict = {**state_dict.get("_trainer", {}), **state_dict}
        if "optimizer" not in state_dict:
            logger.warning("The checkpoint holds no optimizer state (saved by an older version?): the "
                           "optimizer restarts from scratch")
            state_dict["optimizer"] = self.optimizer.state_dict()
        super().load_state_dict(state_dict)

    @staticmethod
    def auto_scale_workers(cfg, num_workers: int):
        """detectron2's SOLVER.REFERENCE_WORLD_SIZE scaling, with the routing phase switch moved
        along with the schedule."""
        scaled = DefaultTrainer.auto_scale_workers(cfg, num_workers)
        if scaled is cfg or scaled.SOLVER.MAX_ITER == cfg.SOLVER.MAX_ITER:
            return scaled
        frozen = scaled.is_frozen()
        scaled.defrost()
        factor = cfg.SOLVER.MAX_ITER / scaled.SOLVER.MAX_ITER
        scaled.SOLVER.GRADIENT_ROUTING.START_ITER = int(round(cfg.SOLVER.GRADIENT_ROUTING.START_ITER / factor))
        if frozen:
            scaled.freeze()
        return scaled

    @classmethod
    def build_model(cls, cfg):
        model = build_model(cfg)
        logging.getLogger("detectron2").info("Model:\n{}".format(model))
        return model

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_sdconet_optimizer(cfg, model)

    @classmethod
    def build_train_sampler(cls, cfg, size: int) -> ResumableTrainingSampler:
        """The resumable sampler over ``size`` records, seeded by SEED; it yields sample positions too
        when the mosaic needs them (INPUT.SDCONET.MOSAIC_PROB > 0)."""
        return ResumableTrainingSampler(size, seed=cfg.SEED if cfg.SEED >= 0 else None,
                                        with_positions=cfg.INPUT.SDCONET.MOSAIC_PROB > 0)

    @classmethod
    def build_train_loader(cls, cfg, dataset=None, sampler=None):
        """detectron2's loader with our mapper, then NUM_CLASSES checked against every dataset's classes.

        With INPUT.SDCONET.MOSAIC_PROB > 0 the records and the mapper go into a :class:`MosaicDataset`,
        which maps its samples itself (no mapper for the loader) and reads each sample's iteration from
        the position the sampler yields with it.
        """
        mapper = SDCoNetDatasetMapper(cfg, is_train=True)
        if cfg.INPUT.SDCONET.MOSAIC_PROB > 0:
            dataset = training_dataset_dicts(cfg) if dataset is None else dataset
            sampler = cls.build_train_sampler(cfg, len(dataset)) if sampler is None else sampler
            if not getattr(sampler, "with_positions", False):
                raise ValueError("INPUT.SDCONET.MOSAIC_PROB > 0 needs a sampler that yields sample positions: "
                                 "Trainer.build_train_sampler(cfg, len(dataset))")
            loader = build_detection_train_loader(  # without cfg: a None mapper would become detectron2's
                MosaicDataset(cfg, dataset, mapper, seed=sampler._seed), mapper=None, sampler=sampler,
                total_batch_size=cfg.SOLVER.IMS_PER_BATCH, aspect_ratio_grouping=cfg.DATALOADER.ASPECT_RATIO_GROUPING,
                num_workers=cfg.DATALOADER.NUM_WORKERS)
        else:
            kwargs = {"dataset": dataset, "sampler": sampler} if dataset is not None else {}
            loader = build_detection_train_loader(cfg, mapper=mapper, **kwargs)
        check_num_classes(cfg, cfg.DATASETS.TRAIN, "DATASETS.TRAIN")
        check_num_classes(cfg, cfg.DATASETS.TEST, "DATASETS.TEST")  # before training, not at its end
        return loader

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        loader = build_detection_test_loader(cfg, dataset_name, mapper=SDCoNetDatasetMapper(cfg, is_train=False))
        check_num_classes(cfg, [dataset_name], "DATASETS.TEST")  # the loader loaded its classes
        return loader

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        """COCO AP with the tiny-object bands; plus PSNR/SSIM when TEST.SDCONET.SR_QUALITY."""
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        evaluators = [SmallObjectCOCOEvaluator(dataset_name, output_dir=output_folder,
                                               max_dets=cfg.TEST.DETECTIONS_PER_IMAGE,
                                               backend=cfg.TEST.SDCONET.COCO_BACKEND,
                                               protocol=cfg.TEST.SDCONET.PROTOCOL)]
        if cfg.TEST.SDCONET.SR_QUALITY:
            evaluators.append(SRQualityEvaluator())
        return DatasetEvaluators(evaluators)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """Evaluate ``model`` on every DATASETS.TEST (``evaluators``: one per dataset, by default
        :meth:`build_evaluator`'s), asking it for its SR image when SR quality is measured.

        Returns the results of the one dataset, or ``{dataset: results}`` for several (as
        ``DefaultTrainer.test``).
        """
        inner = unwrap(model)
        with_sr = cfg.TEST.SDCONET.SR_QUALITY and hasattr(inner, "outputs")
        results = OrderedDict()
        for i, name in enumerate(cfg.DATASETS.TEST):
            data_loader = cls.build_test_loader(cfg, name)
            evaluator = evaluators[i] if evaluators is not None else cls.build_evaluator(cfg, name)
            with inner.outputs(sr=True) if with_sr else contextlib.nullcontext():
                results[name] = inference_on_dataset(model, data_loader, evaluator)
            if comm.is_main_process():
                logging.getLogger("detectron2").info(f"Evaluation results for {name} in csv format:")
                print_csv_format(results[name])
        return next(iter(results.values())) if len(results) == 1 else results
