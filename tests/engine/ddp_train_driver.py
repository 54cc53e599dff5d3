"""Test-only driver: tools/train_net.py's ``run`` with one extra hook that saves every rank's
weights, so a test can compare the ranks with each other and with a one-process run.

    python -m torch.distributed.run --nproc_per_node 2 tests/engine/ddp_train_driver.py --config-file C ...
    python tests/engine/ddp_train_driver.py --config-file C ...      # one process

After training, rank r writes OUTPUT_DIR/rank{r}.pth: the model's state dict before and after
training, the EMA shadow (if enabled) and how the process group looked from that rank.
"""
import os
import sys

import torch
import torch.distributed as dist
from detectron2.engine import HookBase
from detectron2.utils import comm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "tools"))
import train_net  # noqa: E402
from sdconet.engine.launch import unwrap  # noqa: E402


class SaveEveryRank(HookBase):
    def before_train(self):
        self.initial = {k: v.clone() for k, v in unwrap(self.trainer.model).state_dict().items()}

    def after_train(self):
        trainer = self.trainer
        state = {
            "initial": self.initial,
            "model": unwrap(trainer.model).state_dict(),
            "ema": trainer.ema.state_dict()["shadow"] if trainer.ema is not None else None,
            "rank": comm.get_rank(), "world_size": comm.get_world_size(),
            "local_rank": comm.get_local_rank(), "local_size": comm.get_local_size(),
            "backend": dist.get_backend() if dist.is_initialized() else None,
            "ddp": isinstance(trainer.model, torch.nn.parallel.DistributedDataParallel),
        }
        torch.save(state, os.path.join(trainer.cfg.OUTPUT_DIR, f"rank{comm.get_rank()}.pth"))


class TrainerSavingEveryRank(train_net.Trainer):
    def build_hooks(self):
        return super().build_hooks() + [SaveEveryRank()]


if __name__ == "__main__":
    train_net.Trainer = TrainerSavingEveryRank  # train_net.main builds its trainer from this name
    train_net.run(train_net.argument_parser().parse_args())
