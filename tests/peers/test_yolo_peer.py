"""The Ultralytics YOLO11n peer: a few seconds of training on generated rectangles, offline, with the
contract's outputs, its thread count and its time budget."""
import importlib.util
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

# Skip without importing: importing ultralytics at collection would set cv2.setNumThreads(0) and
# OMP_NUM_THREADS for every other test of the session.
if importlib.util.find_spec("ultralytics") is None:
    pytest.skip("needs ultralytics (pip install --no-build-isolation -e \".[benchmark]\")", allow_module_level=True)

SIDE, BUDGET, NUM_CLASSES = 64, 8.0, 4
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]


def rectangles(n, seed=0):
    """``n`` dark noisy SIDE x SIDE RGB images with 1-3 filled rectangles, coloured by class."""
    rng = np.random.default_rng(seed)
    images, targets = [], []
    for _ in range(n):
        image = rng.integers(0, 60, (SIDE, SIDE, 3), dtype=np.uint8)
        boxes, classes = [], []
        for _ in range(rng.integers(1, 4)):
            c = int(rng.integers(0, NUM_CLASSES))
            w, h = rng.integers(SIDE // 8, SIDE // 3, 2)
            x, y = rng.integers(0, SIDE - w), rng.integers(0, SIDE - h)
            image[y:y + h, x:x + w] = COLOURS[c]
            boxes.append([x, y, x + w, y + h])
            classes.append(c)
        images.append(image)
        targets.append({"boxes": np.array(boxes, np.float32), "classes": np.array(classes, np.int64)})
    return images, targets


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One peer trained for BUDGET seconds with every connection and DNS lookup refused and recorded."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("no network in this test")

    threads_before = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket, "getaddrinfo", refuse)
        from sdconet.peers import peer_class

        peer_cls = peer_class("yolo11n")  # imports ultralytics (offline) first: it probes DNS on import otherwise
        from ultralytics.utils import torch_utils

        # Ultralytics' select_device sets torch threads to NUM_THREADS = min(8, cpus - 1): make that differ from
        # the peer's count on any machine, so a reset that survived the peer would show in the thread count.
        threads = 1
        mp.setattr(torch_utils, "NUM_THREADS", threads + 1)
        peer = peer_cls(num_classes=NUM_CLASSES, seed=0, work_dir=tmp_path_factory.mktemp("yolo"), threads=threads,
                        batch_size=8)
        images, _ = data = rectangles(16)
        info = peer.train(*data, budget_seconds=BUDGET)
        threads_after_train = torch.get_num_threads()
        predictions = peer.predict(images)
        threads_after_predict = torch.get_num_threads()
    yield {"peer": peer, "info": info, "images": images, "predictions": predictions, "attempts": attempts,
           "threads": threads, "threads_after": (threads_after_train, threads_after_predict)}
    torch.set_num_threads(threads_before)


def test_stays_offline(trained):
    assert trained["attempts"] == []


def test_budget_stops_training(trained):
    """The trainer stops at the first optimizer step past the budget (not a timing test: a loose bound)."""
    info = trained["info"]
    assert BUDGET <= info["train_seconds"] < 5 * BUDGET
    assert info["wall_seconds"] >= info["train_seconds"]
    assert 1 <= info["epochs"] <= info["planned_epochs"] and info["iterations"] >= info["epochs"]
    assert Path(info["weights"]).name == "best.pt" and Path(info["weights"]).is_file()
    import ultralytics  # here, not at collection (see the skip above)
    assert info["ultralytics_version"] == ultralytics.__version__  # recorded with the run
    assert len(list((trained["peer"].work_dir / "data" / "labels" / "train").glob("*.txt"))) == 16


def test_keeps_thread_count(trained):
    """Ultralytics' select_device resets torch threads; the peer's callbacks set them back before any batch."""
    assert trained["peer"].threads_seen == {trained["threads"]}
    assert trained["threads_after"] == (trained["threads"], trained["threads"])


def test_prediction_contract(trained):
    predictions = trained["predictions"]
    assert len(predictions) == len(trained["images"])
    assert sum(len(p["scores"]) for p in predictions) > 0
    for p in predictions:
        n = len(p["scores"])
        assert n <= 100
        assert p["boxes"].dtype == np.float32 and p["boxes"].shape == (n, 4)
        assert p["scores"].dtype == np.float32 and p["classes"].dtype == np.int64 and p["classes"].shape == (n,)
        assert (p["boxes"] >= 0).all() and (p["boxes"] <= SIDE).all()
        assert (p["boxes"][:, 2:] >= p["boxes"][:, :2]).all()
        assert (np.diff(p["scores"]) <= 0).all() and (p["scores"] >= 0.001).all()
        assert ((p["classes"] >= 0) & (p["classes"] < NUM_CLASSES)).all()


def test_network_sees_rgb(trained):
    """Ultralytics reads numpy input as BGR and trains on RGB: the network must get our RGB image unchanged
    (caught at the input of the predictor's model with a forward pre-hook)."""
    peer, image = trained["peer"], trained["images"][0]
    seen = []
    handle = peer.model.predictor.model.register_forward_pre_hook(lambda _, args: seen.append(args[0].clone()))
    try:
        peer.predict([image])
    finally:
        handle.remove()
    assert len(seen) == 1 and seen[0].shape == (1, 3, SIDE, SIDE)
    np.testing.assert_allclose(seen[0][0].permute(1, 2, 0).numpy() * 255, image, atol=1e-3)


def test_rejects_bad_input(tmp_path):
    from sdconet.peers import peer_class

    peer = peer_class("yolo11n")(num_classes=NUM_CLASSES, seed=0, work_dir=tmp_path, threads=1, batch_size=2)
    images, targets = rectangles(2)
    with pytest.raises(RuntimeError, match="before train"):
        peer.predict(images)
    with pytest.raises(ValueError, match="budget_seconds"):
        peer.train(images, targets, budget_seconds=0)
    targets[1]["classes"][:] = NUM_CLASSES
    with pytest.raises(ValueError, match="target 1: classes must be in 0..3"):
        peer.train(images, targets, budget_seconds=1.0)
