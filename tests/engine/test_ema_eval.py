"""Trainer.evaluate scores the EMA weights when SOLVER.EMA is on, then training holds its own weights again."""
import os

import torch
from common import TINY, load_cfg
from detectron2.utils.env import seed_all_rng
from sdconet.engine.launch import unwrap
from sdconet.engine.trainer import Trainer


class WeightsSeenByTest(Trainer):
    """The Trainer, with a test step that only notes the weights it is given (the periodic and the
    final evaluation both reach it through ``Trainer.evaluate``)."""

    seen = []

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        cls.seen.append({k: v.detach().clone() for k, v in unwrap(model).state_dict().items()})
        return {"bbox": {"AP": 0.0}}


def train_and_evaluate(output_dir, *opts):
    """Two iterations of the tiny DINO, then its final evaluation; the trainer and the weights evaluated."""
    cfg = load_cfg(TINY, ["SOLVER.IMS_PER_BATCH", 2, "DATALOADER.NUM_WORKERS", 0, "DATASETS.TEST", (), "SEED", 0,
                          "SOLVER.MAX_ITER", 2, "OUTPUT_DIR", str(output_dir), *opts])
    seed_all_rng(cfg.SEED)
    WeightsSeenByTest.seen = []
    trainer = WeightsSeenByTest(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert len(WeightsSeenByTest.seen) == 1  # EVAL_PERIOD 0: the final evaluation only
    return trainer, WeightsSeenByTest.seen[0]


def test_evaluation_uses_the_ema_weights_then_restores_the_trained_ones(synthetic_root, tmp_path):
    trainer, seen = train_and_evaluate(tmp_path, "SOLVER.EMA.ENABLED", True, "SOLVER.EMA.DECAY", 0.5)
    trained = unwrap(trainer.model).state_dict()
    floats = [k for k in trained if trained[k].is_floating_point()]
    assert seen.keys() == trained.keys()
    assert all(torch.equal(seen[k], trainer.ema.shadow[k].to(seen[k].dtype)) for k in floats)
    # The EMA is not the trained weights (else the check above would prove nothing) ...
    assert not all(torch.equal(seen[k], trained[k]) for k in floats)
    # ... and after the evaluation the model holds the trained weights again, as saved before it.
    final = torch.load(os.path.join(tmp_path, "model_final.pth"), map_location="cpu", weights_only=False)["model"]
    assert all(torch.equal(final[k], trained[k]) for k in trained)


def test_without_ema_evaluation_uses_the_trained_weights(synthetic_root, tmp_path):
    trainer, seen = train_and_evaluate(tmp_path)
    assert trainer.ema is None
    trained = unwrap(trainer.model).state_dict()
    assert all(torch.equal(seen[k], trained[k]) for k in trained)
