"""torch.distributed on CPU: two gloo processes started by torchrun train exactly like one process
with the whole batch, end with the same weights, and evaluate every test image once.

The runs go through tests/engine/ddp_train_driver.py, which is tools/train_net.py plus a hook that saves
every rank's weights.
"""
import argparse
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import sdconet
import torch
from common import REPO, SDCONET_TINY
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from sdconet.data.datasets import datasets_root
from sdconet.data.synthetic import generate_split
from sdconet.engine.launch import check_total_batch, launch_training, launched_by_torchrun
from sdconet.engine.trainer import Trainer

DRIVER = os.path.join(REPO, "tests", "engine", "ddp_train_driver.py")

# Nothing random: no flips, no DN noise, no stochastic depth, no loader workers, fixed seed. Phase 2
# of gradient routing from iteration 1, with the two-backward (logged) step at iteration 2, so both
# ways routing.py averages gradients over ranks are exercised.
DETERMINISTIC = [
    "SOLVER.IMS_PER_BATCH", "4", "SOLVER.MAX_ITER", "3", "SOLVER.CHECKPOINT_PERIOD", "100000",
    "DATALOADER.NUM_WORKERS", "0", "SEED", "3", "INPUT.SDCONET.HFLIP_PROB", "0.0",
    "MODEL.SDCONET.DN.LABEL_NOISE", "0.0", "MODEL.SDCONET.DN.BOX_NOISE", "0.0",
    "MODEL.SDCONET.SWIN.DROP_PATH_RATE", "0.0", "MODEL.SDCONET.SR.DROP_PATH_RATE", "0.0",
    "SOLVER.GRADIENT_ROUTING.START_ITER", "1", "SOLVER.GRADIENT_ROUTING.LOG_PERIOD", "2",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keep_objects_per_image(root: str, per_image: int) -> int:
    """Rewrite the synthetic train split so that every image holds exactly ``per_image`` objects
    (images with fewer are left out); returns the number of images kept.

    Contrastive denoising sizes its query groups by the most objects in a process's batch and pads
    images with fewer, so with unequal counts half a batch and the whole batch give different DN
    losses (about 2e-3 apart in the weights after 3 iterations, against 1e-6 with equal counts).
    """
    path = os.path.join(root, "Synthetic_RS", "train", "annotations", "instances_train.json")
    with open(path) as f:
        coco = json.load(f)
    by_image = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    coco["images"] = [im for im in coco["images"] if len(by_image.get(im["id"], [])) >= per_image]
    coco["annotations"] = [ann for im in coco["images"] for ann in by_image[im["id"]][:per_image]]
    with open(path, "w") as f:
        json.dump(coco, f)
    return len(coco["images"])


def run_driver(opts, env, cwd, nproc=None, timeout=300):
    launcher = [sys.executable] if nproc is None else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    proc = subprocess.run([*launcher, DRIVER, "--config-file", SDCONET_TINY, *opts], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


def load_rank(out_dir, rank):
    return torch.load(os.path.join(out_dir, f"rank{rank}.pth"), map_location="cpu", weights_only=False)


def max_difference(a, b):
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """Synthetic data (module-wide, so the runs below are shared by the tests): 8 train tiles
    reduced to those with 2 or more objects, 4 test tiles."""
    root = str(tmp_path_factory.mktemp("ddp") / "datasets")
    generate_split(root, "train", 8, seed=0)
    generate_split(root, "test", 4, seed=0)
    assert keep_objects_per_image(root, per_image=2) >= 4
    sdconet.register_sdconet_datasets(root)
    yield root
    sdconet.register_sdconet_datasets(datasets_root())


@pytest.fixture(scope="module")
def runs(data_root):
    """Three iterations with a total batch of 4: two gloo processes (a checkpoint after iteration
    1, then the final evaluation), and one process."""
    base = os.path.dirname(data_root)
    env = dict(os.environ, SDCONET_DATASETS=data_root, OMP_NUM_THREADS="1")
    two, one = os.path.join(base, "two"), os.path.join(base, "one")
    log_two = run_driver([*DETERMINISTIC, "SOLVER.CHECKPOINT_PERIOD", "2", "OUTPUT_DIR", two], env, base, nproc=2)
    run_driver([*DETERMINISTIC, "OUTPUT_DIR", one, "DATASETS.TEST", "()"], env, base)
    return {"two": two, "one": one, "log_two": log_two, "env": env}


def test_torchrun_processes_join_gloo_with_a_local_group(runs):
    ranks = [load_rank(runs["two"], r) for r in (0, 1)]
    assert [(s["rank"], s["world_size"], s["local_rank"], s["local_size"]) for s in ranks] == [(0, 2, 0, 2), (1, 2, 1, 2)]
    assert all(s["backend"] == "gloo" and s["ddp"] for s in ranks)
    assert "Starting training from iteration 0" in runs["log_two"]


def test_both_ranks_hold_identical_weights(runs):
    rank0, rank1 = load_rank(runs["two"], 0), load_rank(runs["two"], 1)
    assert rank0["model"].keys() == rank1["model"].keys()
    different = [k for k in rank0["model"] if not torch.equal(rank0["model"][k], rank1["model"][k])]
    assert not different, different[:5]


def test_two_processes_train_like_one_with_the_whole_batch(runs):
    two, one = load_rank(runs["two"], 0), load_rank(runs["one"], 0)
    assert one["world_size"] == 1 and not one["ddp"]
    assert max_difference(two["initial"], one["initial"]) == 0.0  # same start: rank 0's seed
    # AdamW moves a weight by at most about BASE_LR (4e-4) per step: 3 steps give ~1e-3.
    moved = max_difference(one["model"], one["initial"])
    assert moved > 1e-4, "training did not change the weights; the comparison would prove nothing"
    assert max_difference(two["model"], one["model"]) <= 1e-5


def test_distributed_evaluation_gathers_every_image_and_matches_one_process(runs, data_root, tmp_path):
    inference = os.path.join(runs["two"], "inference", "synthetic_rs_test")
    with open(os.path.join(inference, "coco_instances_results.json")) as f:
        predicted_ids = {p["image_id"] for p in json.load(f)}
    with open(os.path.join(data_root, "Synthetic_RS", "test", "annotations", "instances_test.json")) as f:
        test_ids = {im["id"] for im in json.load(f)["images"]}
    assert predicted_ids == test_ids and len(test_ids) == 4  # rank 0 gathered rank 1's half
    with open(os.path.join(runs["two"], "final_metrics.json")) as f:
        distributed = json.load(f)

    # The same weights evaluated by one process (this one).
    cfg = get_cfg()
    sdconet.add_sdconet_config(cfg)
    cfg.merge_from_file(SDCONET_TINY)
    cfg.merge_from_list([*DETERMINISTIC, "OUTPUT_DIR", str(tmp_path / "eval")])
    model = Trainer.build_model(cfg)
    DetectionCheckpointer(model).load(os.path.join(runs["two"], "model_final.pth"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses, so the arithmetic is the same
    try:
        single = Trainer.test(cfg, model)
    finally:
        torch.set_num_threads(threads)
    single = json.loads(json.dumps(single))  # OrderedDicts of floats, as the file holds them
    assert distributed.keys() == single.keys() and "bbox" in single
    for task in single:
        assert distributed[task] == pytest.approx(single[task], abs=1e-6, nan_ok=True), task


def test_one_process_resumes_a_two_process_run_where_it_stopped(runs, tmp_path):
    """The data stream position is iterations x total batch, whatever the number of processes."""
    out = str(tmp_path / "resumed")
    os.makedirs(out)
    shutil.copy(os.path.join(runs["two"], "model_0000001.pth"), out)
    with open(os.path.join(out, "last_checkpoint"), "w") as f:
        f.write("model_0000001.pth")
    log = run_driver(["--resume", *DETERMINISTIC, "OUTPUT_DIR", out, "DATASETS.TEST", "()"], runs["env"], str(tmp_path))
    assert "Starting training from iteration 2" in log
    resumed, one = load_rank(out, 0), load_rank(runs["one"], 0)
    assert max_difference(resumed["initial"], one["initial"]) > 1e-4  # it started from the checkpoint
    assert max_difference(resumed["model"], one["model"]) <= 1e-5


def test_total_batch_must_split_evenly_over_processes():
    cfg = get_cfg()
    cfg.SOLVER.IMS_PER_BATCH = 6
    check_total_batch(cfg, 3)
    for world_size in (4, 8):
        with pytest.raises(ValueError, match=rf"SOLVER\.IMS_PER_BATCH=6 .* {world_size} processes"):
            check_total_batch(cfg, world_size)
    # With REFERENCE_WORLD_SIZE, detectron2 rescales the batch to the processes first: 16 for 8 -> 6 for 3.
    cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.REFERENCE_WORLD_SIZE = 16, 8
    check_total_batch(cfg, 3)


def test_torchrun_is_recognised_by_its_variables():
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    assert launched_by_torchrun(env)
    assert not launched_by_torchrun({k: v for k, v in env.items() if k != "LOCAL_WORLD_SIZE"})
    assert not launched_by_torchrun({})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_num_gpus_without_cuda_points_to_torchrun(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    args = argparse.Namespace(num_gpus=2, num_machines=1, machine_rank=0, dist_url="auto")
    with pytest.raises(RuntimeError, match="torchrun --nproc_per_node"):
        launch_training(lambda a: None, args)


def test_ema_is_the_same_on_every_rank(data_root, tmp_path):
    env = dict(os.environ, SDCONET_DATASETS=data_root, OMP_NUM_THREADS="1")
    out = str(tmp_path / "ema")
    run_driver([*DETERMINISTIC, "SOLVER.MAX_ITER", "1", "SOLVER.EMA.ENABLED", "True", "SOLVER.EMA.DECAY", "0.9",
                "DATASETS.TEST", "()", "OUTPUT_DIR", out], env, str(tmp_path), nproc=2)
    rank0, rank1 = load_rank(out, 0), load_rank(out, 1)
    assert max_difference(rank0["model"], rank1["model"]) == 0.0
    assert max_difference(rank0["ema"], rank1["ema"]) == 0.0
