"""detectron2 ``DefaultTrainer`` wiring for SDCoNet: AdamW with a backbone LR multiplier,
full-model gradient clipping, our dataset mapper, the gradient-routing step (phases, AMP,
EMA), atomic checkpoints, a resumable data order and COCO evaluation on the test split."""
import itertools
import logging
import os
import weakref

import torch
from torch.nn.parallel import DistributedDataParallel
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.data.samplers import TrainingSampler
from detectron2.engine import DefaultTrainer, hooks
from detectron2.engine.train_loop import TrainerBase
from detectron2.evaluation import DatasetEvaluators
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..data.dataset_checks import check_num_classes, training_dataset_dicts
from ..data.mapper import SDCoNetDatasetMapper
from ..evaluation import SRQualityEvaluator, SmallObjectCOCOEvaluator
from .checkpoint import AtomicDetectionCheckpointer
from .ema import ModelEMA
from .routing import GradientRoutingTrainer, unwrap

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


def with_gradients_laid_out_like_parameters(optimizer_cls):
    """Subclass ``optimizer_cls`` so ``step()`` first copies any gradient whose strides differ from
    its parameter's into the parameter's layout.

    torch's fused CPU AdamW walks gradient and parameter with the parameter's strides: a
    gradient laid out otherwise (``autograd.grad`` results of a transposed convolution, summed
    by the routing step) gets a wrong update. Autograd's own accumulation never produces such
    gradients, so this is normally a no-op loop.
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

    It updates every tensor in one pass instead of a dozen element-wise ops per tensor: 3.4x
    faster on CPU for SDCoNet's 86 M parameters (BENCHMARKS.md), same update up to rounding.
    """
    params = [p for group in groups for p in group["params"]]
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params) \
        and len({p.device for p in params}) == 1


def build_sdconet_optimizer(cfg, model):
    groups = build_param_groups(model, cfg.SOLVER.BASE_LR, cfg.SOLVER.WEIGHT_DECAY, cfg.SOLVER.BACKBONE_MULTIPLIER)
    if cfg.SOLVER.OPTIMIZER == "ADAMW":
        fused = fused_kernel_available(groups)
        cls = with_gradients_laid_out_like_parameters(torch.optim.AdamW) if fused else torch.optim.AdamW
        cls = with_full_model_clipping(cls, cfg.SOLVER.FULL_MODEL_CLIP_NORM)
        return cls(groups, lr=cfg.SOLVER.BASE_LR, fused=fused)
    cls = with_full_model_clipping(torch.optim.SGD, cfg.SOLVER.FULL_MODEL_CLIP_NORM)
    return cls(groups, lr=cfg.SOLVER.BASE_LR, momentum=cfg.SOLVER.MOMENTUM)


def wrap_ddp(model: torch.nn.Module) -> torch.nn.Module:
    """DistributedDataParallel when several processes train, on CPU (gloo) or CUDA (nccl).

    detectron2 0.6's ``create_ddp_model`` always passes CUDA device ids. The gradient-routing
    step averages gradients itself (inside ``no_sync``), so DDP here only broadcasts the initial
    weights and keeps the usual ``model.module`` layout.
    """
    if comm.get_world_size() == 1:
        return model
    device = next(model.parameters()).device
    device_ids = [device.index if device.index is not None else comm.get_local_rank()] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)


class ResumableTrainingSampler(TrainingSampler):
    """detectron2's infinite shuffled sampler that can skip what earlier iterations consumed, so
    a resumed run sees the same images in the same order as an uninterrupted one.

    ``skip`` counts this rank's samples (iterations done x images per rank).
    """

    def __init__(self, size: int, shuffle: bool = True, seed=None):
        super().__init__(size, shuffle=shuffle, seed=seed)
        self.skip = 0

    def __iter__(self):
        start = self._rank + self.skip * self._world_size
        yield from itertools.islice(self._infinite_indices(), start, None, self._world_size)


class Trainer(DefaultTrainer):
    """``DefaultTrainer`` with SDCoNet's optimizer, mapper, evaluator and training step.

    ``--resume`` restores weights, optimizer, LR schedule, EMA, GradScaler and the iteration (and
    with it the routing phase), and continues the data stream where it stopped. With SEED >= 0,
    DATALOADER.NUM_WORKERS 0 (augmentation draws happen in the main process) and one aspect-ratio
    group (square tiles), the resumed run ends with exactly the weights of an uninterrupted one.
    """

    def __init__(self, cfg, allow_partial_weights: bool = False):
        # DefaultTrainer.__init__, with our step, sampler, EMA and checkpointer.
        # allow_partial_weights: load MODEL.WEIGHTS even if it sets under half of the model's tensors.
        TrainerBase.__init__(self)
        logger = logging.getLogger("detectron2")
        if not logger.isEnabledFor(logging.INFO):
            setup_logger()
        cfg = self.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        dataset = training_dataset_dicts(cfg)  # an error when they hold no annotation at all
        self.train_sampler = ResumableTrainingSampler(len(dataset), seed=cfg.SEED if cfg.SEED >= 0 else None)
        data_loader = self.build_train_loader(cfg, dataset=dataset, sampler=self.train_sampler)
        model = wrap_ddp(model)  # DDP broadcasts rank 0's weights: the EMA must start from them
        self.ema = ModelEMA(unwrap(model), cfg.SOLVER.EMA.DECAY) if cfg.SOLVER.EMA.ENABLED else None
        gr = cfg.SOLVER.GRADIENT_ROUTING
        self._trainer = GradientRoutingTrainer(
            model, data_loader, optimizer, start_iter=gr.START_ITER, mode=gr.MODE, projection=gr.PROJECTION,
            log_period=gr.LOG_PERIOD, amp=cfg.SOLVER.AMP.ENABLED,
            amp_dtype=torch.float16 if cfg.SOLVER.AMP.DTYPE == "float16" else torch.bfloat16,
            seed=cfg.SEED, ema=self.ema)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        checkpointables = {"ema": self.ema} if self.ema is not None else {}
        self.checkpointer = AtomicDetectionCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self),
                                                        allow_partial_weights=allow_partial_weights,
                                                        **checkpointables)
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

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

    def resume_or_load(self, resume=True):
        super().resume_or_load(resume=resume)
        # Continue the data stream after the images the finished iterations consumed.
        images_per_rank = self.cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size()
        self.train_sampler.skip = self.start_iter * images_per_rank

    # detectron2 0.6's DefaultTrainer leaves the inner trainer out of its checkpoints, so the
    # optimizer (and GradScaler) state would be lost on --resume; later releases fixed it this way.
    def state_dict(self):
        ret = super().state_dict()
        ret["_trainer"] = self._trainer.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if "_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["_trainer"])
        else:
            logging.getLogger(__name__).warning("The checkpoint holds no optimizer state (saved by an older "
                                                "version?): the optimizer restarts from scratch")

    def build_hooks(self):
        """detectron2's hooks; with EMA, periodic evaluation uses the averaged weights."""
        ret = super().build_hooks()
        if self.ema is None:
            return ret

        def test_with_ema():
            with self.ema.applied_to(unwrap(self.model)):
                self._last_eval_results = self.test(self.cfg, self.model)
            return self._last_eval_results

        return [hooks.EvalHook(self.cfg.TEST.EVAL_PERIOD, test_with_ema) if isinstance(h, hooks.EvalHook) else h
                for h in ret]

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_sdconet_optimizer(cfg, model)

    @classmethod
    def build_train_loader(cls, cfg, dataset=None, sampler=None):
        """detectron2's loader with our mapper, then NUM_CLASSES checked against every dataset's classes."""
        kwargs = {"dataset": dataset, "sampler": sampler} if dataset is not None else {}
        loader = build_detection_train_loader(cfg, mapper=SDCoNetDatasetMapper(cfg, is_train=True), **kwargs)
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
                                               backend=cfg.TEST.SDCONET.COCO_BACKEND)]
        if cfg.TEST.SDCONET.SR_QUALITY:
            evaluators.append(SRQualityEvaluator())
        return DatasetEvaluators(evaluators)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """detectron2's test loop; asks the model for its SR image when SR quality is measured."""
        inner = unwrap(model)
        previous = getattr(inner, "return_sr", False)
        inner.return_sr = previous or bool(cfg.TEST.SDCONET.SR_QUALITY)
        try:
            return super().test(cfg, model, evaluators)
        finally:
            inner.return_sr = previous
