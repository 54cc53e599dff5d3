#!/usr/bin/env python
"""Train or evaluate SDCoNet models with detectron2.

    python tools/train_net.py --config-file configs/quick_schedules/dino_tiny_synthetic.yaml
    python tools/train_net.py --config-file C --eval-only MODEL.WEIGHTS output/model_final.pth
    python tools/train_net.py --config-file C --resume          # continue from OUTPUT_DIR/last_checkpoint
    python tools/train_net.py --config-file C --eval-only --lr-input MODEL.WEIGHTS W DATASETS.TEST "('my_lr_set',)"
    python tools/train_net.py --num-gpus 8 --config-file C      # one process per GPU (detectron2's launch)
    torchrun --nproc_per_node 2 tools/train_net.py --config-file C   # any device (gloo on CPU)
    python tools/train_net.py --config-file C --check-data  # validate every json and image; no training
    python tools/train_net.py --config-file C --dry-run     # build everything, one step on CPU; no training
    python tools/train_net.py --config-file C --register-coco my_train train.json train/images \
        DATASETS.TRAIN "('my_train',)" ...                  # a COCO json of your own (docs/own_data.md)

``--eval-only`` evaluates like the benchmark (HR tiles, degraded inside the model); add
``--lr-input`` when the test images are real low-resolution imagery to use them as they are.
SOLVER.IMS_PER_BATCH is the total batch of all processes; see docs/training_at_scale.md.
"""
import json
import logging
import os
import sys

from detectron2.engine import default_argument_parser, default_setup
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from sdconet import get_sdconet_cfg, lr_input_opts
from sdconet.data import register_sdconet_dataset
from sdconet.data.dataset_checks import report_data_check
from sdconet.engine.checkpoint import AtomicDetectionCheckpointer
from sdconet.engine.dry_run import dry_run
from sdconet.engine.ema import ModelEMA
from sdconet.engine.launch import check_total_batch, launch_training, launched_by_torchrun
from sdconet.engine.trainer import Trainer


def load_config(args):
    """The frozen config of ``args`` (file, then command-line overrides, then --lr-input); CPU when
    CUDA is missing."""
    opts = list(args.opts) + (lr_input_opts() if getattr(args, "lr_input", False) else [])
    return get_sdconet_cfg(args.config_file, opts, cpu_fallback=True)


def check_eval_weights(cfg, resume: bool) -> None:
    """--eval-only needs trained weights: without them it would score a randomly initialised model."""
    if cfg.MODEL.WEIGHTS or (resume and os.path.exists(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint"))):
        return
    where = f" and OUTPUT_DIR {cfg.OUTPUT_DIR} has no last_checkpoint to resume from" if resume else ""
    raise ValueError(f"--eval-only needs trained weights, but MODEL.WEIGHTS is empty{where}: add "
                     "MODEL.WEIGHTS path/to/model_final.pth (or --resume with the OUTPUT_DIR of a training run)")


def setup(args):
    cfg = load_config(args)
    if args.eval_only:
        check_eval_weights(cfg, args.resume)
    else:
        check_total_batch(cfg, comm.get_world_size())
    default_setup(cfg, args)
    # default_setup logs "detectron2" and "fvcore" only: add our package (weights loaded, boxes dropped...).
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="sdconet")
    return cfg


def report(cfg, results):
    """Write the final evaluation to OUTPUT_DIR/final_metrics.json and print the headline numbers."""
    if not results or not comm.is_main_process():
        return
    with open(os.path.join(cfg.OUTPUT_DIR, "final_metrics.json"), "w") as f:
        json.dump(results, f, indent=2)
    for dataset, res in results.items() if "bbox" not in results else [("", results)]:
        bbox = res.get("bbox", {})
        keys = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AP_vt", "AP_t", "AP_s_tod")
        print(f"[final] {dataset} " + "  ".join(f"{k}={bbox[k]:.2f}" for k in keys if k in bbox), flush=True)
        sr = res.get("sr_quality")
        if sr:
            print(f"[final] {dataset} SR: " + "  ".join(f"{k}={v:.3f}" for k, v in sr.items()), flush=True)


def register_datasets(args):
    """--register-coco: register the user's COCO json datasets (in every process: launched workers
    do not inherit the parent's catalog)."""
    for name, json_file, image_root in args.register_coco or ():
        register_sdconet_dataset(name, json_file, image_root)


def dry_run_status(cfg, args) -> int:
    """--dry-run: 0 when the step ran; 1, with the reason, when training would stop at its start."""
    setup_logger(name="sdconet")  # to the console only: a dry run writes nothing
    try:
        dry_run(cfg, allow_partial_weights=args.allow_partial_weights)
    except (ValueError, OSError, FloatingPointError) as e:  # wrong class count, missing file, bad weights
        print(f"dry run: FAILED: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


def main(args):
    register_datasets(args)
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        checkpoint = AtomicDetectionCheckpointer(
            model, save_dir=cfg.OUTPUT_DIR, allow_partial_weights=args.allow_partial_weights,
        ).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        if cfg.SOLVER.EMA.ENABLED and "ema" in checkpoint:
            ema = ModelEMA(model)
            ema.load_state_dict(checkpoint["ema"])
            logging.getLogger("detectron2").info("Evaluating with the EMA weights of the checkpoint")
            with ema.applied_to(model):
                res = Trainer.test(cfg, model)
        else:
            res = Trainer.test(cfg, model)
        report(cfg, res)
        if cfg.TEST.EXPECTED_RESULTS:
            verify_results(cfg, res)
        return res
    trainer = Trainer(cfg, allow_partial_weights=args.allow_partial_weights)
    trainer.resume_or_load(resume=args.resume)
    trainer.train()
    report(cfg, getattr(trainer, "_last_eval_results", None))


def argument_parser():
    """detectron2's ``default_argument_parser`` with SDCoNet's flags."""
    parser = default_argument_parser()
    parser.add_argument("--lr-input", action="store_true",
                        help="test images are real low-resolution imagery: do not degrade them at test time "
                             "(sets MODEL.SDCONET.DEGRADE.TEST False; boxes are in the images' own pixels)")
    parser.add_argument("--allow-partial-weights", action="store_true",
                        help="load MODEL.WEIGHTS even when more than half of the model's tensors are missing "
                             "from it (by default an error: likely a checkpoint of another config)")
    parser.add_argument("--check-data", action="store_true",
                        help="do not train: decode every image and validate every annotation of DATASETS.TRAIN "
                             "and DATASETS.TEST, print one summary; exit status 1 if anything is fatal")
    parser.add_argument("--dry-run", action="store_true",
                        help="do not train: build the loader, the model and its weights, run one forward/backward "
                             "on CPU (1 image per batch), print the data summary and the losses; exit status 1 "
                             "with the reason when training would stop at its start")
    parser.add_argument("--register-coco", nargs=3, action="append", metavar=("NAME", "JSON", "IMAGE_DIR"),
                        help="register a COCO json dataset under NAME (classes: its categories in increasing id "
                             "order) to use in DATASETS.TRAIN / DATASETS.TEST; repeat for each dataset")
    return parser


def run(args):
    """Start ``main`` in every process: under torchrun with its process group (gloo on CPU,
    nccl on CUDA), otherwise through detectron2's launch (``--num-gpus``, ``--num-machines``)."""
    register_datasets(args)
    if args.check_data:  # one process, no process group: the check reads files only
        sys.exit(report_data_check(load_config(args)))
    if args.dry_run:  # one process on CPU, whatever --num-gpus says
        sys.exit(dry_run_status(load_config(args), args))
    if launched_by_torchrun():
        return launch_training(main, args, device=load_config(args).MODEL.DEVICE)
    return launch_training(main, args)


if __name__ == "__main__":
    run(argument_parser().parse_args())
