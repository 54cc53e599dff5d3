"""Robustness of checkpoint loading: damaged files, a broken ``last_checkpoint``, weights of another
model, ``--eval-only`` without weights, and impossible SOLVER values.

    damaged .pth (empty, text, random bytes, truncated)   error naming the file and what is wrong;
                                                          the model is left untouched
    last_checkpoint: garbage, names a missing file,       --resume continues from the newest loadable
      names a damaged file                                model_*.pth, warning names what was skipped
    every checkpoint damaged                              --resume stops naming each file
    weights leaving > half of the tensors unset           error naming the file and the likely config
                                                          mismatch; --allow-partial-weights loads anyway
    --eval-only without MODEL.WEIGHTS                     error naming the key and the fix
    SOLVER.BASE_LR < 0, MAX_ITER / IMS_PER_BATCH /        ValueError naming the key
      CHECKPOINT_PERIOD < 1
"""
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import sdconet
import torch
from common import SDCONET_TINY, TINY, TRAIN_NET, load_cfg
from detectron2.modeling import build_model
from detectron2.utils.env import seed_all_rng
from sdconet.data.datasets import datasets_root
from sdconet.data.synthetic import generate_split
from sdconet.engine.checkpoint import (
    AtomicDetectionCheckpointer,
    IncompatibleCheckpointError,
    UnreadableCheckpointError,
)
from sdconet.engine.trainer import Trainer

# The tiny DINO with other widths: its checkpoint has the same names, but most shapes differ.
WIDER = ["MODEL.SDCONET.SWIN.EMBED_DIM", 48, "MODEL.SDCONET.NECK.OUT_CHANNELS", 32]


def train_net(*args, cwd, env):
    """tools/train_net.py in a subprocess; returns (exit status, stdout + stderr)."""
    proc = subprocess.run([sys.executable, TRAIN_NET, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)
    return proc.returncode, proc.stdout + proc.stderr


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_weights(model, expected):
    for name, value in model.state_dict().items():
        assert torch.equal(value, expected[name]), name


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """A synthetic set of small (64 px) tiles registered under the built-in names."""
    root = str(tmp_path_factory.mktemp("datasets"))
    generate_split(root, "train", 4, size=64, seed=0)
    generate_split(root, "test", 2, size=64, seed=0)
    sdconet.register_sdconet_datasets(root)
    yield root
    sdconet.register_sdconet_datasets(datasets_root())


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_model(load_cfg(TINY))


@pytest.fixture(scope="module")
def good_checkpoint(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("good")
    AtomicDetectionCheckpointer(tiny_model, str(folder)).save("model_final", iteration=0)
    return str(folder / "model_final.pth")


def truncate(path):
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def write_damaged(path, kind, good_checkpoint):
    """A real damaged checkpoint file of the given kind at ``path``."""
    if kind == "empty":
        open(path, "wb").close()
    elif kind == "text":
        with open(path, "w") as f:
            f.write("version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 1234\n")
    elif kind == "random":
        data = np.random.default_rng(0).bytes(4096)
        assert data[:1] != b"\x80" and not data.startswith(b"PK")  # neither a pickle nor a zip
        with open(path, "wb") as f:
            f.write(data)
    else:
        if path != good_checkpoint:
            shutil.copyfile(good_checkpoint, path)
        truncate(path)


DAMAGED = {"empty": "is empty (0 bytes)", "text": "is a text file, not a checkpoint (it begins 'version https",
           "random": "is not a checkpoint written by torch.save (4096 bytes of unrecognised content)",
           "truncated": "is truncated"}


# =============================================================================== damaged files
@pytest.mark.parametrize("kind", sorted(DAMAGED))
def test_damaged_checkpoint_is_named_with_what_is_wrong(tiny_model, good_checkpoint, tmp_path, kind):
    path = str(tmp_path / "model_final.pth")
    write_damaged(path, kind, good_checkpoint)
    before = state(tiny_model)
    with pytest.raises(UnreadableCheckpointError) as e:
        AtomicDetectionCheckpointer(tiny_model).load(path)
    assert str(e.value).startswith(f"Checkpoint {path} {DAMAGED[kind]}")
    assert_same_weights(tiny_model, before)


def test_checkpoint_that_is_no_dict_of_tensors_is_named(tiny_model, tmp_path):
    path = str(tmp_path / "other.pth")
    torch.save({"state_dict": {"w": torch.zeros(2)}, "epoch": 3}, path)  # another framework's layout
    with pytest.raises(UnreadableCheckpointError, match=rf"Checkpoint {path} is not a checkpoint of weights: "
                                                        r"its entries \['state_dict', 'epoch'\] are not tensors"):
        AtomicDetectionCheckpointer(tiny_model).load(path)


def test_missing_checkpoint_is_named(tiny_model, tmp_path):
    path = str(tmp_path / "nowhere.pth")
    with pytest.raises(FileNotFoundError, match=f"Checkpoint {path} does not exist"):
        AtomicDetectionCheckpointer(tiny_model).load(path)


def test_predictor_names_a_damaged_checkpoint(good_checkpoint, tmp_path):
    path = str(tmp_path / "w.pth")
    write_damaged(path, "truncated", good_checkpoint)
    with pytest.raises(UnreadableCheckpointError, match=f"Checkpoint {path} is truncated"):
        sdconet.Predictor(TINY, weights=path, device="cpu")


def test_good_checkpoint_loads(tiny_model, good_checkpoint):
    torch.manual_seed(1)
    model = build_model(load_cfg(TINY))
    extra = AtomicDetectionCheckpointer(model).load(good_checkpoint)
    assert extra["iteration"] == 0
    assert_same_weights(model, tiny_model.state_dict())


# =============================================================================== resuming
@pytest.fixture(scope="module")
def trained(data_root, tmp_path_factory):
    """A finished 3-iteration run: model_0000001.pth (iteration 1) and model_final.pth (2), which
    last_checkpoint names."""
    out = str(tmp_path_factory.mktemp("trained") / "out")
    trainer = tiny_trainer(out, "SOLVER.MAX_ITER", 3)
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert sorted(f for f in os.listdir(out) if f.endswith(".pth")) == ["model_0000001.pth", "model_final.pth"]
    return out


def tiny_trainer(out, *opts):
    cfg = load_cfg(TINY, ["SOLVER.IMS_PER_BATCH", 2, "DATALOADER.NUM_WORKERS", 0, "DATASETS.TEST", (), "SEED", 0,
                          "SOLVER.CHECKPOINT_PERIOD", 2, "OUTPUT_DIR", out, *opts])
    seed_all_rng(cfg.SEED)
    return Trainer(cfg)


@pytest.fixture
def run_dir(trained, tmp_path):
    """A copy of the trained run (modification times kept: model_final.pth is the newest)."""
    out = str(tmp_path / "out")
    shutil.copytree(trained, out)
    return out


def weights_of(path):
    return torch.load(path, map_location="cpu")["model"]


def resume(out, caplog):
    trainer = tiny_trainer(out, "SOLVER.MAX_ITER", 4)
    with caplog.at_level(logging.WARNING, logger="sdconet.engine.checkpoint"):
        trainer.resume_or_load(resume=True)
    return trainer


@pytest.mark.parametrize("kind", sorted(DAMAGED))
def test_resume_skips_a_damaged_last_checkpoint(run_dir, caplog, kind):
    final, previous = os.path.join(run_dir, "model_final.pth"), os.path.join(run_dir, "model_0000001.pth")
    write_damaged(final, kind, final)
    trainer = resume(run_dir, caplog)
    assert trainer.start_iter == 2  # model_0000001.pth holds iteration 1
    assert_same_weights(trainer.model, weights_of(previous))
    assert f"Resuming from {previous} instead of the last checkpoint: skipped Checkpoint {final} " \
           f"{DAMAGED[kind]}" in caplog.text


def test_resume_with_garbage_in_last_checkpoint(run_dir, caplog):
    tag = os.path.join(run_dir, "last_checkpoint")
    with open(tag, "wb") as f:
        f.write(np.random.default_rng(1).bytes(100))  # not UTF-8: UnicodeDecodeError in detectron2
    trainer = resume(run_dir, caplog)
    final = os.path.join(run_dir, "model_final.pth")
    assert trainer.start_iter == 3
    assert_same_weights(trainer.model, weights_of(final))
    assert f"Resuming from {final} instead of the last checkpoint: skipped {tag} holds no file name (100 bytes" \
        in caplog.text


def test_resume_when_last_checkpoint_names_a_missing_file(run_dir, caplog):
    with open(os.path.join(run_dir, "last_checkpoint"), "w") as f:
        f.write("model_0000009.pth")
    os.remove(os.path.join(run_dir, "model_final.pth"))
    trainer = resume(run_dir, caplog)
    previous = os.path.join(run_dir, "model_0000001.pth")
    assert trainer.start_iter == 2
    assert_same_weights(trainer.model, weights_of(previous))
    missing = os.path.join(run_dir, "model_0000009.pth")
    assert f"Resuming from {previous} instead of the last checkpoint: skipped Checkpoint {missing} does not exist" \
        in caplog.text


def test_resume_stops_when_every_checkpoint_is_damaged(run_dir):
    names = ["model_0000001.pth", "model_final.pth"]
    for name in names:
        truncate(os.path.join(run_dir, name))
    trainer = tiny_trainer(run_dir, "SOLVER.MAX_ITER", 4)
    before = state(trainer.model)
    with pytest.raises(UnreadableCheckpointError, match=f"Cannot resume from {run_dir}: no checkpoint there can "
                                                        "be loaded") as e:
        trainer.resume_or_load(resume=True)
    for name in names:
        assert f"Checkpoint {os.path.join(run_dir, name)} is truncated" in str(e.value)
    assert_same_weights(trainer.model, before)  # not silently started from scratch or MODEL.WEIGHTS


def test_train_net_resume_falls_back_to_the_previous_checkpoint(data_root, tmp_path):
    """The real command line: the newest checkpoint truncated (a copy cut short), --resume."""
    env = dict(os.environ, SDCONET_DATASETS=data_root, OMP_NUM_THREADS="1")
    out = str(tmp_path / "run")
    common = ["--config-file", TINY, "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0",
              "DATASETS.TEST", "()", "OUTPUT_DIR", out, "SOLVER.CHECKPOINT_PERIOD", "2"]
    rc, log = train_net(*common, "SOLVER.MAX_ITER", "3", cwd=str(tmp_path), env=env)
    assert rc == 0, log[-3000:]
    final, previous = os.path.join(out, "model_final.pth"), os.path.join(out, "model_0000001.pth")
    truncate(final)
    rc, log = train_net("--resume", *common, "SOLVER.MAX_ITER", "4", cwd=str(tmp_path), env=env)
    assert rc == 0, log[-3000:]
    assert f"Resuming from {previous} instead of the last checkpoint: skipped Checkpoint {final} is truncated" in log
    assert "Starting training from iteration 2" in log
    assert torch.load(final, map_location="cpu")["iteration"] == 3  # rewritten whole by the resumed run


# =============================================================================== weights of another model
def test_weights_of_another_config_are_refused(good_checkpoint):
    model = build_model(load_cfg(TINY, WIDER))
    with pytest.raises(IncompatibleCheckpointError) as e:
        AtomicDetectionCheckpointer(model).load(good_checkpoint)
    message = str(e.value)
    total = len(model.state_dict())
    assert message.startswith(f"Checkpoint {good_checkpoint} does not fit this model: ")
    missing = int(message.split(": ")[1].split(" of the model's ")[0])
    assert f"of the model's {total} tensors are missing from it" in message and missing * 2 > total
    assert "likely a checkpoint of another MODEL.META_ARCHITECTURE or config: this model is SDCoNet" in message
    assert "--allow-partial-weights" in message


def test_partial_weights_load_when_allowed(good_checkpoint, tiny_model):
    model = build_model(load_cfg(TINY, WIDER))
    AtomicDetectionCheckpointer(model, allow_partial_weights=True).load(good_checkpoint)
    loaded = [k for k, v in model.state_dict().items() if v.shape == tiny_model.state_dict()[k].shape]
    assert loaded and all(torch.equal(model.state_dict()[k], tiny_model.state_dict()[k]) for k in loaded)


def test_detector_weights_load_into_sdconet(good_checkpoint, tiny_model):
    """Fine-tuning SDCoNet from DINO weights: the SR decoder (under half the tensors) starts fresh."""
    model = build_model(load_cfg(SDCONET_TINY))
    AtomicDetectionCheckpointer(model).load(good_checkpoint)
    for name, value in tiny_model.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name


def test_train_net_refuses_weights_of_another_config_unless_allowed(data_root, tmp_path):
    env = dict(os.environ, SDCONET_DATASETS=data_root, OMP_NUM_THREADS="1")
    weights = str(tmp_path / "wider.pth")
    AtomicDetectionCheckpointer(build_model(load_cfg(TINY, WIDER)), str(tmp_path)).save("wider")
    common = ["--config-file", TINY, "--eval-only", "MODEL.WEIGHTS", weights, "DATASETS.TEST", "()",
              "OUTPUT_DIR", str(tmp_path / "eval")]
    rc, log = train_net(*common, cwd=str(tmp_path), env=env)
    assert rc != 0
    assert f"IncompatibleCheckpointError: Checkpoint {weights} does not fit this model" in log
    rc, log = train_net(common[0], common[1], "--allow-partial-weights", *common[2:], cwd=str(tmp_path), env=env)
    assert rc == 0, log[-3000:]
    assert "Some model parameters or buffers are not found in the checkpoint" in log  # detectron2's warning


# =============================================================================== --eval-only, SOLVER values
def test_eval_only_without_weights_is_refused(data_root, tmp_path):
    env = dict(os.environ, SDCONET_DATASETS=data_root, OMP_NUM_THREADS="1")
    rc, log = train_net("--config-file", TINY, "--eval-only", "OUTPUT_DIR", str(tmp_path / "eval"),
                        cwd=str(tmp_path), env=env)
    assert rc != 0
    assert "ValueError: --eval-only needs trained weights, but MODEL.WEIGHTS is empty: add MODEL.WEIGHTS " in log
    assert not os.path.exists(tmp_path / "eval")  # refused before anything was written


@pytest.mark.parametrize("key, value", [
    ("SOLVER.BASE_LR", -0.001), ("SOLVER.BASE_LR", float("nan")), ("SOLVER.MAX_ITER", 0),
    ("SOLVER.IMS_PER_BATCH", 0), ("SOLVER.CHECKPOINT_PERIOD", 0),
])
def test_impossible_solver_value_is_named(key, value):
    expected = "must be >= 0" if key == "SOLVER.BASE_LR" else "must be >= 1"
    with pytest.raises(ValueError, match=rf"Invalid config: {key.replace('.', r'[.]')}={value!r}: {expected}"):
        load_cfg(TINY, [key, value])
