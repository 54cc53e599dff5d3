"""Faults during training: a bad image, NaN loss, divergence, SIGKILL + --resume, disk full while saving."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from common import TINY, TRAIN_NET, run_train_net, tiny_trainer
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import HookBase
from detectron2.modeling import build_model


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.mark.parametrize("kind, workers", [("corrupt", 1), ("missing", 0)])
def test_bad_image_in_training_set_stops_training_naming_the_file(synthetic_root, tmp_path, kind, workers):
    """Also through a DataLoader worker process the error names the file. (Ending that worker
    takes the DataLoader ~5 s, hence one case with a worker.)"""
    path = os.path.join(synthetic_root, "Synthetic_RS", "train", "images", "train_00003.png")
    if kind == "corrupt":
        with open(path, "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n" + b"\x00" * 100)
    else:
        os.remove(path)
    # All 8 images in the first batch.
    trainer = tiny_trainer(tmp_path / "out", "SOLVER.IMS_PER_BATCH", 8, "DATALOADER.NUM_WORKERS", workers,
                           "SOLVER.MAX_ITER", 1)
    trainer.resume_or_load(resume=False)
    with pytest.raises(OSError, match="train_00003.png"):
        trainer.train()


# =============================================================================== failures in training
def assert_checkpoint_intact(trainer, out, before):
    """Every file in ``out`` is as it was, and the last checkpoint loads into a fresh model with
    the weights the trainer still holds (no update was made from the bad step)."""
    assert {name: sha256(os.path.join(out, name)) for name in os.listdir(out) if name.endswith(".pth")} == before
    with open(os.path.join(out, "last_checkpoint")) as f:
        last = os.path.join(out, f.read().strip())
    model = build_model(trainer.cfg)
    DetectionCheckpointer(model).load(last)
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name


class FingerprintCheckpoints(HookBase):
    """After every step (and the checkpointer): the hash of each checkpoint file in ``out``."""

    def __init__(self, out):
        self.out, self.files = out, {}

    def after_step(self):
        self.files = {name: sha256(os.path.join(self.out, name)) for name in os.listdir(self.out)
                      if name.endswith(".pth")}


def test_nan_loss_stops_naming_the_iteration_and_the_loss(synthetic_root, tmp_path):
    """A loss weight that came out NaN (a sweep script's 0/0), given to a resumed run."""
    out = str(tmp_path / "out")
    first = tiny_trainer(out, "SOLVER.MAX_ITER", 1, "SOLVER.CHECKPOINT_PERIOD", 1)
    first.resume_or_load(resume=False)
    first.train()
    before = {name: sha256(os.path.join(out, name)) for name in os.listdir(out) if name.endswith(".pth")}
    assert "model_final.pth" in before

    trainer = tiny_trainer(out, "SOLVER.MAX_ITER", 3, "SOLVER.CHECKPOINT_PERIOD", 1,
                           "MODEL.SDCONET.LOSS.GIOU_WEIGHT", float("nan"))
    trainer.resume_or_load(resume=True)
    with pytest.raises(FloatingPointError, match=r"iteration 1: \{.*'loss_giou': nan") as e:
        trainer.train()
    assert "loss_bbox" not in str(e.value)  # only the non-finite losses are named
    assert_checkpoint_intact(trainer, out, before)


def test_diverging_training_stops_naming_the_iteration(synthetic_root, tmp_path):
    """An absurd learning rate: after the first update the weights are ~1e30 and everything overflows."""
    out = str(tmp_path / "out")
    trainer = tiny_trainer(out, "SOLVER.MAX_ITER", 5, "SOLVER.CHECKPOINT_PERIOD", 1, "SOLVER.BASE_LR", 1e30)
    fingerprint = FingerprintCheckpoints(out)
    trainer.register_hooks([fingerprint])
    trainer.resume_or_load(resume=False)
    with pytest.raises(FloatingPointError, match=r"Non-finite loss at iteration \d+"):
        trainer.train()
    assert fingerprint.files, "no checkpoint was written before the failure"
    assert_checkpoint_intact(trainer, out, fingerprint.files)


def test_killed_training_resumes_from_the_last_checkpoint(synthetic_root, tmp_path):
    env = dict(os.environ, SDCONET_DATASETS=synthetic_root, OMP_NUM_THREADS="1")
    out = str(tmp_path / "run")
    common = ["--config-file", TINY, "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0",
              "SOLVER.CHECKPOINT_PERIOD", "2", "DATASETS.TEST", "()", "OUTPUT_DIR", out]
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen([sys.executable, TRAIN_NET, *common, "SOLVER.MAX_ITER", "100000"],
                                cwd=str(tmp_path), env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 300
            # last_checkpoint is tagged just after the checkpoint file is renamed into place: wait for the tag
            while not os.path.exists(os.path.join(out, "last_checkpoint")):
                assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
                assert time.time() < deadline, "no checkpoint after 300 s"
                time.sleep(0.05)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    with open(os.path.join(out, "last_checkpoint")) as f:
        last = f.read().strip()
    iteration = torch.load(os.path.join(out, last), map_location="cpu", weights_only=False)["iteration"]
    assert last == f"model_{iteration:07d}.pth" and iteration >= 1

    log = run_train_net("--resume", *common, "SOLVER.MAX_ITER", str(iteration + 3), cwd=str(tmp_path), env=env)
    assert f"Starting training from iteration {iteration + 1}" in log
    with open(os.path.join(out, "last_checkpoint")) as f:
        assert f.read().strip() == "model_final.pth"
    final = torch.load(os.path.join(out, "model_final.pth"), map_location="cpu", weights_only=False)
    assert final["iteration"] == iteration + 2


# ------------------------------------------------------------------------------- disk full
# A real failing write: the child process may not write files beyond `limit` bytes
# (RLIMIT_FSIZE), and ignores SIGXFSZ so the write fails with EFBIG instead of killing it.
DISK_FULL_CHILD = r"""
import json, os, resource, signal, sys
import torch
from torch import nn
from sdconet.engine.checkpoint import AtomicDetectionCheckpointer

out = sys.argv[1]
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(128, 128), nn.Linear(128, 4))
checkpointer = AtomicDetectionCheckpointer(model, out)
checkpointer.save("model_0000001", iteration=1)
limit = os.path.getsize(os.path.join(out, "model_0000001.pth")) // 2
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
with torch.no_grad():
    model[0].weight.add_(1.0)
try:
    checkpointer.save("model_0000002", iteration=2)
    print(json.dumps({"type": None, "message": ""}))
except Exception as e:
    print(json.dumps({"type": type(e).__name__, "message": str(e)}))
"""


def reference_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.Linear(128, 4))


@pytest.fixture(scope="module")
def disk_full(tmp_path_factory):
    """Save one checkpoint, then another under a file-size limit half its size."""
    out = tmp_path_factory.mktemp("disk_full")
    proc = subprocess.run([sys.executable, "-c", DISK_FULL_CHILD, str(out)], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return str(out), json.loads(proc.stdout.strip().splitlines()[-1])


def test_disk_full_while_saving_keeps_the_previous_checkpoint(disk_full):
    out, error = disk_full
    assert error["type"] is not None, "the save under the file-size limit did not fail"
    assert sorted(os.listdir(out)) == ["last_checkpoint", "model_0000001.pth"]  # no temp file, no partial file
    with open(os.path.join(out, "last_checkpoint")) as f:
        assert f.read() == "model_0000001.pth"
    model = torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.Linear(128, 4))
    checkpoint = DetectionCheckpointer(model).load(os.path.join(out, "model_0000001.pth"))
    assert checkpoint["iteration"] == 1
    for name, value in reference_model().state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name


def test_disk_full_while_saving_says_the_previous_checkpoint_is_untouched(disk_full):
    _, error = disk_full
    assert error["type"] == "OSError"
    assert "model_0000002.pth" in error["message"] and "File too large" in error["message"]
    assert "previous checkpoint and last_checkpoint are untouched" in error["message"]
