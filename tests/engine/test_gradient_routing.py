"""Gradient routing trainer: phases, sum/project/stop on shared parameters, bf16, EMA, resume."""
import contextlib
import os

import pytest
import sdconet
import torch
from common import SDCONET_TINY
from detectron2.config import get_cfg
from detectron2.engine import HookBase
from detectron2.utils.env import seed_all_rng
from detectron2.utils.events import EventStorage
from sdconet.engine.routing import project_conflicting, routing_statistics
from sdconet.engine.train_loop import GradientRoutingTrainer
from sdconet.engine.trainer import Trainer
from torch import nn


# ----------------------------------------------------------------------------- toy two-task model
class ToyTwoTask(nn.Module):
    """A shared linear layer, a detection head and an 'SR decoder'; the two losses pull the shared
    weight in directions set by ``det_target`` / ``sr_target``."""

    def __init__(self, det_target, sr_target):
        super().__init__()
        self.shared = nn.Linear(2, 2, bias=False)
        nn.init.eye_(self.shared.weight)
        self.det_head = nn.Linear(2, 1, bias=False)
        self.sr_decoder = nn.Linear(2, 1, bias=False)
        nn.init.ones_(self.det_head.weight)
        nn.init.ones_(self.sr_decoder.weight)
        self._sr = True
        self.det_target, self.sr_target = det_target, sr_target

    @contextlib.contextmanager
    def outputs(self, *, sr=None, saliency=None):
        """SDCoNet's switch: ``sr=False`` leaves the SR loss out (gradient-routing phase 1)."""
        previous = self._sr
        self._sr = previous if sr is None else sr
        try:
            yield self
        finally:
            self._sr = previous

    def losses(self, x):
        z = self.shared(x)
        out = {"loss_det": ((self.det_head(z) - self.det_target) ** 2).mean()}
        if self._sr:
            out["loss_sr"] = ((self.sr_decoder(z) - self.sr_target) ** 2).mean()
        return out

    def forward(self, batch):
        return self.losses(batch)


def toy_grads(model, x, which):
    model.zero_grad()
    losses = model.losses(x)
    sum(v for k, v in losses.items() if k in which).backward()
    return model.shared.weight.grad.clone()


def step_toy(mode, det_target, sr_target, projection="per_tensor"):
    torch.manual_seed(0)
    x = torch.randn(8, 2)
    model = ToyTwoTask(det_target, sr_target)
    g_det = toy_grads(model, x, {"loss_det"})
    g_sr = toy_grads(model, x, {"loss_sr"})
    model.zero_grad()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # keeps the gradients for inspection
    trainer = GradientRoutingTrainer(model, [x] * 4, optimizer, mode=mode, projection=projection, log_period=1)
    with EventStorage(0) as storage:
        trainer.iter = 0
        trainer.run_step()
    return model.shared.weight.grad, g_det, g_sr, storage


@pytest.mark.parametrize("projection", ["per_tensor", "global"])
def test_project_never_works_against_detection(projection):
    # det wants larger outputs, SR smaller ones: their gradients on `shared` conflict
    combined, g_det, g_sr, storage = step_toy("project", 10.0, -10.0, projection)
    assert (g_det * g_sr).sum() < 0
    assert (combined * g_det).sum() >= -1e-6
    assert not torch.allclose(combined, g_det + g_sr)
    assert storage.history("routing/cosine").latest() < 0
    assert storage.history("routing/conflict_fraction").latest() == 1.0


def test_project_equals_sum_without_conflict():
    combined, g_det, g_sr, storage = step_toy("project", 10.0, 20.0)
    assert (g_det * g_sr).sum() > 0
    assert torch.allclose(combined, g_det + g_sr)
    assert storage.history("routing/cosine").latest() > 0


def test_sum_is_the_plain_sum():
    combined, g_det, g_sr, _ = step_toy("sum", 10.0, -10.0)
    assert torch.allclose(combined, g_det + g_sr)


def test_stop_keeps_sr_gradient_off_shared_parameters():
    combined, g_det, _, _ = step_toy("stop", 10.0, -10.0)
    assert torch.equal(combined, g_det)


def test_projection_and_statistics_by_hand():
    sr, det = [torch.tensor([1.0, -1.0])], [torch.tensor([0.0, 2.0])]
    # <sr, det> = -2, |det|^2 = 4: sr - (-0.5) * det = [1, 0]
    assert torch.allclose(project_conflicting(sr, det)[0], torch.tensor([1.0, 0.0]))
    stats = routing_statistics(sr, det)
    assert stats["cosine"] == pytest.approx(-2 / (2**0.5 * 2))
    assert stats["conflict_fraction"] == 1.0


# ----------------------------------------------------------------------------- the real trainer
def tiny_cfg(tmp_path, *opts):
    cfg = get_cfg()
    sdconet.add_sdconet_config(cfg)
    cfg.merge_from_file(SDCONET_TINY)
    cfg.merge_from_list([
        "MODEL.DEVICE", "cpu", "SOLVER.IMS_PER_BATCH", 2, "DATALOADER.NUM_WORKERS", 0,
        "SOLVER.CHECKPOINT_PERIOD", 100000, "TEST.EVAL_PERIOD", 0, "DATASETS.TEST", (),
        "OUTPUT_DIR", str(tmp_path / "out"), *opts])
    sdconet.check_sdconet_config(cfg)
    if cfg.SEED >= 0:
        seed_all_rng(cfg.SEED)  # as tools/train_net.py's default_setup does before building
    return cfg


class Watch(HookBase):
    """Per iteration: how often the SR decoder ran, and a copy of its weights after the step."""

    def __init__(self, model):
        self.calls, self.snapshots, self.metrics = [], [], []
        self._count = 0
        model.sr_decoder.register_forward_hook(self._seen)

    def _seen(self, *_):
        self._count += 1

    def after_step(self):
        self.calls.append(self._count)
        self._count = 0
        sd = self.trainer.model.sr_decoder.state_dict()
        self.snapshots.append({k: v.clone() for k, v in sd.items()})
        self.metrics.append({k: v.latest() for k, v in self.trainer.storage.histories().items()})


def test_phase_one_freezes_and_skips_the_sr_decoder(synthetic_root, tmp_path):
    cfg = tiny_cfg(tmp_path, "SOLVER.MAX_ITER", 5, "SOLVER.GRADIENT_ROUTING.START_ITER", 3,
                   "SOLVER.GRADIENT_ROUTING.MODE", "project", "SEED", 1)
    trainer = Trainer(cfg)
    initial = {k: v.clone() for k, v in trainer.model.sr_decoder.state_dict().items()}
    watch = Watch(trainer.model)
    trainer.register_hooks([watch])
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert watch.calls == [0, 0, 0, 1, 1]
    for it in range(3):
        assert all(torch.equal(watch.snapshots[it][k], initial[k]) for k in initial), f"changed at {it}"
        assert "loss_sr" not in watch.metrics[it] and watch.metrics[it]["routing/phase"] == 1.0
    changed = [k for k in initial if not torch.equal(watch.snapshots[4][k], initial[k])]
    assert changed, "the SR decoder did not learn in phase 2"
    assert watch.metrics[4]["routing/phase"] == 2.0 and "loss_sr" in watch.metrics[4]
    assert "routing/cosine" in watch.metrics[3]  # project logs every step


def test_bf16_autocast_steps_on_cpu_are_finite(synthetic_root, tmp_path):
    cfg = tiny_cfg(tmp_path, "SOLVER.MAX_ITER", 2, "SOLVER.AMP.ENABLED", True, "SOLVER.AMP.DTYPE", "bfloat16",
                   "SOLVER.GRADIENT_ROUTING.START_ITER", 0)
    trainer = Trainer(cfg)
    dtypes = []
    trainer.model.backbone.register_forward_hook(lambda m, i, o: dtypes.append(o["res5"].dtype))
    watch = Watch(trainer.model)
    trainer.register_hooks([watch])
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert dtypes and all(d == torch.bfloat16 for d in dtypes)
    for metrics in watch.metrics:
        losses = {k: v for k, v in metrics.items() if k.startswith("loss_") or k == "total_loss"}
        assert "loss_sr" in losses and all(torch.isfinite(torch.tensor(v)) for v in losses.values())


def test_fp16_on_cpu_is_refused(synthetic_root, tmp_path):
    cfg = tiny_cfg(tmp_path, "SOLVER.AMP.ENABLED", True, "SOLVER.AMP.DTYPE", "float16")
    with pytest.raises(ValueError, match="float16 needs CUDA"):
        Trainer(cfg)


class StopAt(HookBase):
    def __init__(self, iteration):
        self.iteration = iteration

    def before_step(self):
        if self.trainer.iter == self.iteration:
            raise KeyboardInterrupt("simulated stop")


def test_resume_ends_with_the_weights_of_an_uninterrupted_run(synthetic_root, tmp_path):
    opts = ["SOLVER.MAX_ITER", 6, "SOLVER.GRADIENT_ROUTING.START_ITER", 2, "SOLVER.GRADIENT_ROUTING.MODE", "project",
            "SOLVER.EMA.ENABLED", True, "SOLVER.EMA.DECAY", 0.5, "SEED", 7, "INPUT.SDCONET.HFLIP_PROB", 0.5,
            "SOLVER.STEPS", (4,)]
    straight = Trainer(tiny_cfg(tmp_path / "a", *opts))
    straight.resume_or_load(resume=False)
    straight.train()

    cfg = tiny_cfg(tmp_path / "b", *opts, "SOLVER.CHECKPOINT_PERIOD", 3)
    first = Trainer(cfg)
    first.register_hooks([StopAt(4)])  # checkpoint after iteration 2 and 3 done, killed at 4
    first.resume_or_load(resume=False)
    with pytest.raises(KeyboardInterrupt):
        first.train()
    with open(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint")) as f:
        assert f.read().strip() == "model_0000002.pth"
    resumed_cfg = tiny_cfg(tmp_path / "b", *opts, "SOLVER.CHECKPOINT_PERIOD", 3)
    torch.manual_seed(12345)  # a different initialisation, which the resume must overwrite
    resumed = Trainer(resumed_cfg)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 3
    resumed.train()

    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]
    assert all(torch.equal(straight.ema.shadow[k], resumed.ema.shadow[k]) for k in a)
    assert not all(torch.equal(straight.ema.shadow[k], a[k]) for k in a if a[k].is_floating_point())
