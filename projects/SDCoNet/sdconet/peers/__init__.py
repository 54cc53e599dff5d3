"""Peer detectors for benchmarks only (``pip install --no-build-isolation -e ".[benchmark]"``): Ultralytics YOLO11n and
Hugging Face transformers' Deformable-DETR, trained from scratch on the same LR images as our models
and scored by our evaluator (``tools/train_peer.py``, ``tools/compare.py --peer``).

Nothing here is imported by the rest of ``sdconet``; each peer imports its library only when built,
so ``sdconet`` never depends on ``ultralytics`` or ``transformers``.

A peer is a class built as ``Peer(num_classes, seed, work_dir, threads, batch_size)`` with
- ``train(images, targets, budget_seconds) -> dict``: trains from scratch on ``images`` (uint8 RGB LR
  arrays, H x W x 3) with ``targets`` (dicts of ``boxes``: float32 N x 4 XYXY in LR pixels and
  ``classes``: int64 N, contiguous ids 0..num_classes-1) until ``budget_seconds`` of training have
  passed; returns what it did (at least ``train_seconds``, and ``iterations`` or ``epochs``);
- ``predict(images) -> list of dict``: per image ``boxes`` (float32 N x 4 XYXY, LR pixels),
  ``scores`` (float32 N) and ``classes`` (int64 N), at most 100 per image, best first.
"""
import importlib

PEERS = {
    "yolo11n": "sdconet.peers.yolo:YoloPeer",
    "deformable_detr": "sdconet.peers.deformable_detr:DeformableDetrPeer",
}


def peer_class(name: str):
    """The class of peer ``name``; an error naming the known peers and, when its library is missing,
    the extra to install."""
    if name not in PEERS:
        raise ValueError(f"unknown peer {name!r}; known: {sorted(PEERS)}")
    module, cls = PEERS[name].split(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] in ("ultralytics", "transformers"):
            raise ModuleNotFoundError(f"peer {name!r} needs {e.name.split('.')[0]}: pip install -e \".[benchmark]\"",
                                      name=e.name) from e
        raise
