"""Mosaic: exact placement and boxes, the canvas size, per-sample draws, the switch-off for the last
iterations, the same batches with loader workers and after a resume, and each DDP rank's own shard.

The DDP case runs this file as a script under torchrun (``ddp_worker`` below).
"""
import itertools
import os
import socket
import subprocess
import sys

import cv2
import numpy as np
import pytest
import sdconet
import torch
from common import REPO, TINY, load_cfg, record
from detectron2.data.common import MapDataset
from detectron2.data.samplers import TrainingSampler
from detectron2.structures import BoxMode
from sdconet.data.dataset_checks import training_dataset_dicts
from sdconet.data.mapper import SDCoNetDatasetMapper
from sdconet.data.mosaic import MosaicDataset, MosaicPlan, place_mosaic
from sdconet.engine.trainer import ResumableTrainingSampler, Trainer

# Four 100x100 tiles around the centre (x 40, y 60). The tiles' offsets on the canvas are
# (-60, -40), (40, -40), (-60, 60), (40, 60); their corners x 0..40 / 40..100, y 0..60 / 60..100.
CENTRE = (40, 60)
TILE_BOXES = [  # per tile: (XYWH box, class)
    [([70, 50, 20, 20], 0),      # -> (10, 10, 30, 30): inside its corner, moved only
     ([50, 45, 20, 10], 1),      # -> (-10, 5, 10, 15): cut by the left edge to (0, 5, 10, 15)
     ([10, 10, 20, 20], 2)],     # -> (-50, -30, -30, -10): wholly outside, left out and counted
    [([10, 50, 20, 20], 3),      # -> (50, 10, 70, 30)
     ([10, 30, 10, 20], 0)],     # -> (50, -10, 60, 10): cut by the top edge to (50, 0, 60, 10)
    [([80, 10, 15, 15], 1)],     # -> (20, 70, 35, 85)
    [([50, 30, 20, 20], 2),      # -> (90, 90, 110, 110): cut by the right and bottom edges
     ([59.5, 0, 10, 10], 3)],    # -> (99.5, 60, 110, 70): cut to a 0.5 px sliver
]
EXPECTED = [(10, 10, 30, 30), (0, 5, 10, 15), (50, 10, 70, 30), (50, 0, 60, 10), (20, 70, 35, 85),
            (90, 90, 100, 100), (99.5, 60, 100, 70)]
EXPECTED_CLASSES = [0, 1, 3, 0, 1, 2, 3]


def tile_images(seed=0, sizes=((100, 100),) * 4):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


@pytest.fixture
def tiles(tmp_path):
    """The four tiles written as PNG, and their records."""
    images, records = tile_images(), []
    for i, (image, boxes) in enumerate(zip(images, TILE_BOXES)):
        path = str(tmp_path / f"tile{i}.png")
        cv2.imwrite(path, image)
        records.append({**record(path, 100, 100, boxes), "image_id": i})
    return images, records


def plain_mapper(**kwargs):
    """The training mapper with no augmentation (so boxes can be checked exactly)."""
    return SDCoNetDatasetMapper(is_train=True, augmentations=[], min_box_size=1.0, **kwargs)


def test_placement_and_boxes_are_exact():
    images = tile_images()
    annos = [record("x", 100, 100, boxes)["annotations"] for boxes in TILE_BOXES]
    canvas, out, num_cut, num_outside = place_mosaic(images, annos, (100, 100), CENTRE)
    assert canvas.shape == (100, 100, 3) and canvas.dtype == np.uint8
    # Each corner shows the inner part of its tile at full resolution.
    np.testing.assert_array_equal(canvas[:60, :40], images[0][40:, 60:])
    np.testing.assert_array_equal(canvas[:60, 40:], images[1][40:, :60])
    np.testing.assert_array_equal(canvas[60:, :40], images[2][:40, 60:])
    np.testing.assert_array_equal(canvas[60:, 40:], images[3][:40, :60])
    np.testing.assert_allclose([a["bbox"] for a in out], EXPECTED)
    assert all(a["bbox_mode"] == BoxMode.XYXY_ABS for a in out)
    assert [a["category_id"] for a in out] == EXPECTED_CLASSES
    assert num_cut == 4 and num_outside == 1


def test_tiles_of_other_sizes_leave_fill_and_the_canvas_keeps_the_first_tiles_size():
    # A 30x40 top-right tile sits at x 40..80, y 30..60; a 150x150 bottom-right one is cropped.
    images = tile_images(sizes=[(100, 100), (30, 40), (100, 100), (150, 150)])
    canvas, _, _, _ = place_mosaic(images, [[]] * 4, (100, 100), CENTRE, fill=(1, 2, 3))
    assert canvas.shape == (100, 100, 3)
    np.testing.assert_array_equal(canvas[30:60, 40:80], images[1])
    assert (canvas[:30, 40:] == (1, 2, 3)).all() and (canvas[30:60, 80:] == (1, 2, 3)).all()
    np.testing.assert_array_equal(canvas[60:, 40:], images[3][:40, :60])


def test_mosaic_through_the_mapper_drops_and_counts(tiles):
    images, records = tiles
    mapper = plain_mapper()
    ds = MosaicDataset(records, mapper, prob=1.0, ims_per_batch=1)
    out = ds.mosaic(MosaicPlan((0, 1, 2, 3), CENTRE))
    assert out["image"].shape == (3, 100, 100) and out["mosaic"] == (0, 1, 2, 3)
    assert out["file_name"] == records[0]["file_name"]
    np.testing.assert_array_equal(out["image"].permute(1, 2, 0).numpy()[60:, 40:], images[3][:40, :60])
    # The 0.5 px sliver is dropped (and counted) by the mapper, the rest kept exactly.
    expected = torch.tensor(EXPECTED[:-1], dtype=torch.float32)
    torch.testing.assert_close(out["instances"].gt_boxes.tensor, expected, rtol=0, atol=1e-5)
    assert out["instances"].gt_classes.tolist() == EXPECTED_CLASSES[:-1]
    assert mapper.num_dropped == 1 and ds.num_cut == 4 and ds.num_outside == 1


def test_the_mappers_augmentations_follow_the_mosaic(tiles):
    _, records = tiles
    cfg = load_cfg(TINY, ["INPUT.SDCONET.HFLIP_PROB", 1.0])
    ds = MosaicDataset(records, SDCoNetDatasetMapper(cfg, is_train=True), prob=1.0, ims_per_batch=1)
    out = ds.mosaic(MosaicPlan((0, 1, 2, 3), CENTRE))
    flipped = [(100 - x1, y0, 100 - x0, y1) for x0, y0, x1, y1 in EXPECTED[:-1]]
    expected = torch.tensor(flipped, dtype=torch.float32)
    torch.testing.assert_close(out["instances"].gt_boxes.tensor, expected, rtol=0, atol=1e-5)


def test_draws_repeat_for_a_seed_and_position_and_leave_the_global_rngs_alone(tiles):
    _, records = tiles
    cfg = load_cfg(TINY, ["INPUT.SDCONET.HFLIP_PROB", 0.5, "INPUT.SDCONET.BRIGHTNESS", 0.3])
    ds = MosaicDataset(records, SDCoNetDatasetMapper(cfg, is_train=True), prob=0.5, ims_per_batch=2, seed=5)
    np.random.seed(1)
    before = np.random.get_state()[1].copy()
    a, b = ds[(2, 7)], ds[(2, 7)]
    assert (np.random.get_state()[1] == before).all()
    assert torch.equal(a["image"], b["image"]) and a.get("mosaic") == b.get("mosaic")
    assert torch.equal(a["instances"].gt_boxes.tensor, b["instances"].gt_boxes.tensor)
    plans = [ds.plan(0, p) for p in range(40)]
    assert 5 < sum(p is not None for p in plans) < 35  # prob 0.5
    centres = {p.centre for p in plans if p is not None}
    assert len(centres) > 1 and all(25 <= c <= 75 for centre in centres for c in centre)
    other_seed = MosaicDataset(records, ds.mapper, prob=0.5, ims_per_batch=2, seed=6)
    assert [other_seed.plan(0, p) for p in range(40)] != plans
    with pytest.raises(TypeError, match="with_positions=True"):
        ds[3]


def test_mosaics_stop_for_the_last_part_of_training(tiles):
    _, records = tiles
    cfg = load_cfg(TINY, ["SOLVER.MAX_ITER", 10, "SOLVER.IMS_PER_BATCH", 2, "INPUT.SDCONET.MOSAIC_PROB", 1.0,
                          "INPUT.SDCONET.MOSAIC_OFF_LAST", 0.3])
    ds = MosaicDataset(cfg, records, plain_mapper(), seed=0)
    assert ds.off_iter == 7
    assert [ds.plan(p % 4, p) is not None for p in range(20)] == [p // 2 < 7 for p in range(20)]
    assert ["mosaic" in ds[(p % 4, p)] for p in (13, 14, 19)] == [True, False, False]
    assert MosaicDataset(load_cfg(TINY, ["INPUT.SDCONET.MOSAIC_OFF_LAST", 0.1]), records, None).off_iter == 900
    assert MosaicDataset(load_cfg(TINY), records, None).off_iter == 1000  # 0: mosaics to the end


def test_sampler_positions_count_the_shared_stream_and_the_skip():
    plain = ResumableTrainingSampler(8, seed=3)
    positioned = ResumableTrainingSampler(8, seed=3, with_positions=True)
    pairs = list(itertools.islice(positioned, 10))
    assert [i for i, _ in pairs] == list(itertools.islice(plain, 10)) and [p for _, p in pairs] == list(range(10))
    positioned.skip = 6
    assert list(itertools.islice(positioned, 4)) == pairs[6:10]


def loader_batches(cfg, num_batches, skip=0):
    dataset = training_dataset_dicts(cfg)
    sampler = Trainer.build_train_sampler(cfg, len(dataset))
    loader = Trainer.build_train_loader(cfg, dataset=dataset, sampler=sampler)
    sampler.skip = skip
    return [[summary(d) for d in batch] for batch in itertools.islice(loader, num_batches)]


def summary(d):
    return {"image": d["image"], "boxes": d["instances"].gt_boxes.tensor, "classes": d["instances"].gt_classes,
            "mosaic": d.get("mosaic"), "file_name": d["file_name"]}


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for batch_a, batch_b in zip(a, b):
        assert [d["file_name"] for d in batch_a] == [d["file_name"] for d in batch_b]
        for x, y in zip(batch_a, batch_b):
            assert x["mosaic"] == y["mosaic"] and torch.equal(x["image"], y["image"])
            assert torch.equal(x["boxes"], y["boxes"]) and torch.equal(x["classes"], y["classes"])


# 4 iterations of 2 images, mosaics in the first 2; flips and brightness drawn per sample too.
MOSAIC_OPTS = ["SOLVER.IMS_PER_BATCH", 2, "SOLVER.MAX_ITER", 4, "SEED", 0, "INPUT.SDCONET.MOSAIC_PROB", 1.0,
               "INPUT.SDCONET.MOSAIC_OFF_LAST", 0.5, "INPUT.SDCONET.HFLIP_PROB", 0.5, "INPUT.SDCONET.BRIGHTNESS", 0.3]


def test_loader_workers_give_the_batches_of_the_main_process(synthetic_root):
    main = loader_batches(load_cfg(TINY, [*MOSAIC_OPTS, "DATALOADER.NUM_WORKERS", 0]), 4)
    assert [all(d["mosaic"] is not None for d in batch) for batch in main] == [True, True, False, False]
    assert any(len(d["boxes"]) for batch in main[:2] for d in batch)
    workers = loader_batches(load_cfg(TINY, [*MOSAIC_OPTS, "DATALOADER.NUM_WORKERS", 2]), 4)
    assert_same_batches(main, workers)


def test_a_resumed_loader_continues_the_stream_and_the_switch_off(synthetic_root):
    cfg = load_cfg(TINY, [*MOSAIC_OPTS, "DATALOADER.NUM_WORKERS", 0, "SOLVER.MAX_ITER", 6])  # off from iteration 3
    straight = loader_batches(cfg, 5)
    resumed = loader_batches(cfg, 3, skip=2 * 2)  # iterations 2, 3, 4 (2 images per iteration)
    assert_same_batches(straight[2:], resumed)
    assert [all(d["mosaic"] is not None for d in batch) for batch in resumed] == [True, False, False]


def test_mosaic_off_keeps_detectron2s_loader(synthetic_root):
    cfg = load_cfg(TINY, ["SOLVER.IMS_PER_BATCH", 2, "SEED", 0, "DATALOADER.NUM_WORKERS", 0])
    dataset = training_dataset_dicts(cfg)
    sampler = Trainer.build_train_sampler(cfg, len(dataset))
    loader = Trainer.build_train_loader(cfg, dataset=dataset, sampler=sampler)
    assert not sampler.with_positions
    assert isinstance(loader.dataset.dataset.dataset, MapDataset)  # detectron2's records + mapper
    np.random.seed(0)
    ours = [summary(d) for d in next(iter(loader))]
    np.random.seed(0)
    mapper = SDCoNetDatasetMapper(cfg, is_train=True)
    plain = [summary(mapper(dataset[i])) for i in itertools.islice(TrainingSampler(len(dataset), seed=0), 2)]
    assert_same_batches([ours], [plain])


# ------------------------------------------------------------------ two processes
DDP_OPTS = ["SOLVER.IMS_PER_BATCH", 4, "SOLVER.MAX_ITER", 2, "SEED", 0, "DATASETS.TEST", (),
            "DATALOADER.NUM_WORKERS", 1, "INPUT.SDCONET.MOSAIC_PROB", 1.0, "INPUT.SDCONET.MOSAIC_OFF_LAST", 0.5,
            "SOLVER.CHECKPOINT_PERIOD", 100000]


class Recorded:
    """The trainer's data stream, keeping a summary of every sample it hands to the step."""

    def __init__(self, stream):
        self.stream, self.samples = stream, []

    def open(self):
        self.stream.open()

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.stream)
        self.samples += [summary(d) for d in batch]
        return batch


def ddp_worker(root, out_dir):
    """One torchrun process: two training iterations of the tiny DINO with mosaics in the first."""
    import torch.distributed as dist
    from detectron2.utils import comm
    from sdconet.engine.launch import init_torchrun_process_group

    init_torchrun_process_group("cpu")
    sdconet.register_sdconet_datasets(root)
    trainer = Trainer(load_cfg(TINY, [*DDP_OPTS, "OUTPUT_DIR", out_dir]))
    trainer.resume_or_load(resume=False)
    trainer._data_loader_iter = recorded = Recorded(trainer._data_loader_iter)
    trainer.train()
    ddp = isinstance(trainer.model, torch.nn.parallel.DistributedDataParallel)
    torch.save({"samples": recorded.samples, "ddp": ddp}, os.path.join(out_dir, f"rank{comm.get_rank()}.pth"))
    dist.destroy_process_group()


def test_two_ddp_ranks_build_their_mosaics_from_their_own_shard(synthetic_root, tmp_path):
    out = str(tmp_path / "ddp")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO / "tests"),
                                                                             os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                           "127.0.0.1", "--master_port", str(port), __file__, synthetic_root, out],
                          cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ranks = [torch.load(os.path.join(out, f"rank{r}.pth"), weights_only=False) for r in (0, 1)]
    assert all(r["ddp"] for r in ranks)

    # What one process computes for the samples of the shared stream each rank was dealt.
    cfg = load_cfg(TINY, DDP_OPTS)
    dataset = training_dataset_dicts(cfg)
    ds = MosaicDataset(cfg, dataset, SDCoNetDatasetMapper(cfg, is_train=True), seed=0)
    stream = list(itertools.islice(TrainingSampler(len(dataset), seed=0)._infinite_indices(), 8))
    for rank, state in enumerate(ranks):
        samples = state["samples"]
        assert len(samples) == 4  # 2 iterations x 2 images per rank
        positions = [rank + 2 * k for k in range(4)]
        for k, (got, position) in enumerate(zip(samples, positions)):
            expected = summary(ds[(stream[position], position)])
            assert_same_batches([[got]], [[expected]])
            if k < 2:  # iteration 0: a mosaic whose first tile is the rank's own sample
                assert got["mosaic"][0] == stream[position]
            else:  # iteration 1 is past MAX_ITER x (1 - MOSAIC_OFF_LAST): whole tiles
                assert got["mosaic"] is None
    assert [s["mosaic"] for s in ranks[0]["samples"][:2]] != [s["mosaic"] for s in ranks[1]["samples"][:2]]


if __name__ == "__main__":
    ddp_worker(*sys.argv[1:3])


def test_mosaic_refuses_a_sampler_without_positions(synthetic_root):
    cfg = load_cfg(TINY, MOSAIC_OPTS)
    dataset = training_dataset_dicts(cfg)
    with pytest.raises(ValueError, match="build_train_sampler"):
        Trainer.build_train_loader(cfg, dataset=dataset, sampler=ResumableTrainingSampler(len(dataset), seed=0))
