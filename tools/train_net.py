#!/usr/bin/env python
"""Train or evaluate SDCoNet models with detectron2.

    python tools/train_net.py --config-file configs/quick_schedules/dino_tiny_synthetic.yaml
    python tools/train_net.py --config-file C --eval-only MODEL.WEIGHTS output/model_final.pth
    python tools/train_net.py --config-file C --resume          # continue from OUTPUT_DIR/last_checkpoint
"""
import logging

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.evaluation import verify_results

from sdconet import add_sdconet_config, check_sdconet_config
from sdconet.engine.trainer import Trainer


def setup(args):
    cfg = get_cfg()
    add_sdconet_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logging.getLogger("sdconet").warning("CUDA is not available: running on CPU (MODEL.DEVICE=cpu)")
        cfg.MODEL.DEVICE = "cpu"
    check_sdconet_config(cfg)
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        res = Trainer.test(cfg, model)
        if cfg.TEST.EXPECTED_RESULTS:
            verify_results(cfg, res)
        return res
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
