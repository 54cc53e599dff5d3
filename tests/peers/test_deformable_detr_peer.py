"""The Deformable-DETR peer (transformers): the peer contract of ``sdconet.peers``, offline, on
generated images, and its box conversion. Tests that need ``transformers`` skip without it."""
import socket
import time

import numpy as np
import pytest
import torch

from sdconet.peers import peer_class
from sdconet.peers.deformable_detr import MAX_DETECTIONS, to_detr_boxes

COLOURS = np.array([(230, 40, 40), (40, 230, 40), (40, 40, 230), (230, 230, 40)], dtype=np.uint8)
BUDGET = 8.0


def rectangles(n: int, size: int = 64, seed: int = 0):
    """``n`` dark images with 1-3 filled rectangles whose colour is the class; every 8th image is
    empty, as tiles without objects are in the real sets."""
    rng = np.random.default_rng(seed)
    images, targets = [], []
    for k in range(n):
        image = np.full((size, size, 3), 30, dtype=np.uint8)
        boxes, classes = [], []
        for _ in range(0 if k % 8 == 7 else rng.integers(1, 4)):
            w, h = rng.integers(6, size // 2, 2)
            x, y = rng.integers(0, size - w), rng.integers(0, size - h)
            c = int(rng.integers(0, len(COLOURS)))
            image[y:y + h, x:x + w] = COLOURS[c]
            boxes.append([x, y, x + w, y + h])
            classes.append(c)
        images.append(image)
        targets.append({"boxes": np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                        "classes": np.asarray(classes, dtype=np.int64)})
    return images, targets


def refuse_connect(*args, **kwargs):
    raise OSError("network use in an offline test")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One peer trained for ``BUDGET`` seconds with every socket connection refused, with the torch
    thread count set to something else first, then its predictions on its own training images."""
    pytest.importorskip("transformers")
    images, targets = rectangles(16)
    threads_before = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse_connect)
        torch.set_num_threads(2)
        peer = peer_class("deformable_detr")(num_classes=len(COLOURS), seed=0,
                                             work_dir=str(tmp_path_factory.mktemp("ddetr")), threads=1, batch_size=4)
        start = time.perf_counter()
        info = peer.train(images, targets, BUDGET)
        wall = time.perf_counter() - start
        threads_after_train = torch.get_num_threads()
        torch.set_num_threads(2)
        predictions = peer.predict(images)
        threads_after_predict = torch.get_num_threads()
    torch.set_num_threads(threads_before)
    return {"peer": peer, "images": images, "info": info, "wall": wall, "predictions": predictions,
            "threads": (threads_after_train, threads_after_predict)}


def test_to_detr_boxes_by_hand():
    boxes = torch.tensor([[0.0, 0.0, 64.0, 32.0], [10.0, 20.0, 30.0, 60.0]])
    got = to_detr_boxes(boxes, height=32, width=128)
    # (cx, cy, w, h) / (W, H, W, H): (32, 16, 64, 32) / (128, 32, 128, 32), (20, 40, 20, 40) / ...
    torch.testing.assert_close(got, torch.tensor([[0.25, 0.5, 0.5, 1.0], [20 / 128, 1.25, 20 / 128, 1.25]]))
    assert to_detr_boxes(torch.zeros(0, 4), 32, 32).shape == (0, 4)


def test_library_decoding_inverts_to_detr_boxes():
    """Our boxes, fed to the library's post-processing as if predicted, come back as the same pixels."""
    pytest.importorskip("transformers")
    from transformers import DeformableDetrImageProcessor
    from transformers.models.deformable_detr.modeling_deformable_detr import DeformableDetrObjectDetectionOutput

    boxes = torch.tensor([[3.0, 5.0, 40.0, 20.0], [50.0, 0.0, 100.0, 48.0]])
    logits = torch.full((1, 2, 4), -5.0)
    logits[0, 0, 2], logits[0, 1, 1] = 4.0, 2.0
    outputs = DeformableDetrObjectDetectionOutput(logits=logits, pred_boxes=to_detr_boxes(boxes, 48, 100)[None])
    decoded = DeformableDetrImageProcessor().post_process_object_detection(outputs, threshold=0.5,
                                                                           target_sizes=[(48, 100)])[0]
    torch.testing.assert_close(decoded["boxes"], boxes)
    assert decoded["labels"].tolist() == [2, 1]


def test_training_batch_flips_boxes_with_the_image(trained):
    peer, images = trained["peer"], trained["images"]
    target = {"boxes": np.array([[4.0, 8.0, 20.0, 16.0]], np.float32), "classes": np.array([3])}
    plain, _, (label,) = peer._training_batch(images[:1], [target], [False])
    flipped, mask, (flipped_label,) = peer._training_batch(images[:1], [target], [True])
    torch.testing.assert_close(flipped, plain.flip(-1))
    assert mask.shape == (1, 64, 64) and bool(mask.all())
    # (4, 8, 20, 16) in a 64-wide image -> (44, 8, 60, 16): centre x 52 / 64
    torch.testing.assert_close(flipped_label["boxes"], torch.tensor([[52 / 64, 12 / 64, 16 / 64, 8 / 64]]))
    torch.testing.assert_close(label["boxes"], torch.tensor([[12 / 64, 12 / 64, 16 / 64, 8 / 64]]))
    assert flipped_label["class_labels"].tolist() == [3]


def test_predictions_follow_the_contract(trained):
    assert len(trained["predictions"]) == len(trained["images"])
    for image, pred in zip(trained["images"], trained["predictions"]):
        boxes, scores, classes = pred["boxes"], pred["scores"], pred["classes"]
        assert boxes.dtype == np.float32 and scores.dtype == np.float32 and classes.dtype == np.int64
        n = len(scores)
        assert 0 < n <= MAX_DETECTIONS and boxes.shape == (n, 4) and classes.shape == (n,)
        assert np.all(np.diff(scores) <= 0), "scores are not sorted best first"
        assert np.all((scores >= 0) & (scores <= 1)) and np.all((classes >= 0) & (classes < len(COLOURS)))
        height, width = image.shape[:2]
        assert np.all(boxes[:, 0] >= 0) and np.all(boxes[:, 1] >= 0)
        assert np.all(boxes[:, 2] <= width) and np.all(boxes[:, 3] <= height)
        assert np.all(boxes[:, 2] >= boxes[:, 0]) and np.all(boxes[:, 3] >= boxes[:, 1])


def test_training_stops_at_the_budget_and_learns(trained):
    info = trained["info"]
    assert info["train_seconds"] >= BUDGET and info["iterations"] > 0
    # one iteration past the budget at most; a generous bound for a loaded machine
    assert trained["wall"] < BUDGET + 60
    assert info["epochs"] == info["iterations"] * 4 // 16
    assert info["loss_last"] < info["loss_first"]


def test_uses_the_requested_threads(trained):
    assert trained["threads"] == (1, 1)


def test_same_seed_same_model_other_seed_another(tmp_path):
    pytest.importorskip("transformers")
    images, _ = rectangles(2)
    Peer = peer_class("deformable_detr")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse_connect)
        first, again, other = (Peer(num_classes=4, seed=s, work_dir=str(tmp_path), threads=1, batch_size=2)
                               .predict(images) for s in (0, 0, 1))
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a["boxes"], b["boxes"])
        np.testing.assert_array_equal(a["scores"], b["scores"])
    assert not np.array_equal(first[0]["scores"], other[0]["scores"])


def test_whole_backbone_trains_with_its_own_batch_norms(trained):
    """From scratch, nothing may stay frozen: the library freezes backbone weights and batch norms
    (for pretrained weights), the peer undoes both; training then moves the norms' statistics."""
    model = trained["peer"].model
    assert all(p.requires_grad for p in model.parameters())
    norms = [m for m in model.model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 53 and not any("Frozen" in type(m).__name__ for m in model.modules())
    assert all(int(m.num_batches_tracked) > 0 for m in norms)
