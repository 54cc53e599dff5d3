"""``tools/train_net.py --dry-run``: everything a training run builds, then one step, on CPU, in seconds.

A long run that stops at its first iteration (a wrong dataset root, NUM_CLASSES not matching the
data, a weights file of another model) costs a queue slot and GPU hours; :func:`dry_run` finds
those mistakes first. It builds the training loader (which checks NUM_CLASSES against every
dataset), the model (which loads MODEL.SDCONET.SWIN.PRETRAINED) and MODEL.WEIGHTS as training
does, reads the first batch and runs one forward and backward pass at the config's image sizes.
Nothing is written and no weight changes.
"""
import math
import time

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model
from detectron2.structures import BoxMode
from detectron2.utils.env import seed_all_rng

from ..data.dataset_checks import count_annotations, training_dataset_dicts
from ..data.formats.coco_json import format_summary
from .checkpoint import AtomicDetectionCheckpointer
from .trainer import Trainer

# One image per batch and no loader workers: a step of the full batch would take minutes on CPU,
# and the shapes that can go wrong do not depend on the batch size.
DRY_RUN_OPTS = ("MODEL.DEVICE", "cpu", "SOLVER.IMS_PER_BATCH", 1, "DATALOADER.NUM_WORKERS", 0)


def dicts_summary(dicts, class_names, title: str) -> str:
    """The prepare scripts' summary (images, objects per class and per size band) of detectron2
    dataset dicts, i.e. of what training reads after the load dropped unusable boxes."""
    names = list(class_names)
    annotations = []
    for image_id, record in enumerate(dicts):
        for obj in record.get("annotations", []):
            box = BoxMode.convert(list(obj["bbox"]), obj["bbox_mode"], BoxMode.XYWH_ABS)
            annotations.append({"image_id": image_id, "category_id": obj["category_id"] + 1, "bbox": box})
    unknown = sorted({a["category_id"] for a in annotations} - set(range(1, len(names) + 1)))
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(names)]
    categories += [{"id": k, "name": f"<category {k - 1}: not in thing_classes>"} for k in unknown]
    coco = {"images": [{"id": i} for i in range(len(dicts))], "annotations": annotations, "categories": categories}
    return format_summary(coco, [c["name"] for c in categories], title)


def dry_run(cfg, allow_partial_weights: bool = False, print_fn=print) -> dict:
    """Build the loader, the model and its weights from ``cfg`` as training does, run one step's
    forward and backward on CPU with one image per batch, and print the data summary and the losses.

    Raises what training would raise at its start (``ValueError`` naming both numbers when
    MODEL.SDCONET.NUM_CLASSES differs from a dataset's class count, ``FileNotFoundError`` for a
    dataset or weights file that does not exist), and ``FloatingPointError`` for a non-finite
    loss. Returns the losses, the image count and the gradient coverage.
    """
    start = time.perf_counter()
    config_batch = cfg.SOLVER.IMS_PER_BATCH
    cfg = cfg.clone()
    cfg.defrost()
    cfg.merge_from_list(list(DRY_RUN_OPTS))
    cfg.freeze()
    seed_all_rng(cfg.SEED if cfg.SEED >= 0 else None)

    train_names = tuple(cfg.DATASETS.TRAIN)
    dicts = training_dataset_dicts(cfg)  # an error when they hold no annotation
    print_fn(dicts_summary(dicts, MetadataCatalog.get(train_names[0]).get("thing_classes") or [],
                           f"DATASETS.TRAIN {', '.join(train_names)}"))
    for name in cfg.DATASETS.TEST:
        if name not in train_names:
            print_fn(dicts_summary(DatasetCatalog.get(name), MetadataCatalog.get(name).get("thing_classes") or [],
                                   f"DATASETS.TEST {name}"))
    # The step draws from the images with boxes, so that the matcher and the box losses run too.
    with_boxes = [d for d in dicts if count_annotations([d])]
    loader = Trainer.build_train_loader(cfg, dataset=with_boxes)  # checks NUM_CLASSES against every dataset

    model = build_model(cfg)  # loads MODEL.SDCONET.SWIN.PRETRAINED
    swin = cfg.MODEL.SDCONET.SWIN
    print_fn(f"Swin {swin.NAME}: MODEL.SDCONET.SWIN.PRETRAINED {swin.PRETRAINED or '(empty: random init)'}")
    if cfg.MODEL.WEIGHTS:
        AtomicDetectionCheckpointer(model, allow_partial_weights=allow_partial_weights).load(cfg.MODEL.WEIGHTS)
        print_fn(f"MODEL.WEIGHTS: loaded {cfg.MODEL.WEIGHTS}")
    else:
        print_fn("MODEL.WEIGHTS: none (detector trained from the Swin weights up)")

    batch = next(iter(loader))
    sizes = ", ".join(f"{tuple(d['image'].shape[1:])} with {len(d['instances'])} boxes" for d in batch)
    print_fn(f"batch: {len(batch)} image(s) of {sizes} (on CPU the dry run reduces SOLVER.IMS_PER_BATCH "
             f"{config_batch} to {cfg.SOLVER.IMS_PER_BATCH} image per batch)")
    model.train()
    loss_dict = model(batch)
    losses = {k: float(v.detach()) for k, v in loss_dict.items()}
    bad = {k: v for k, v in losses.items() if not math.isfinite(v)}
    if bad:
        raise FloatingPointError(f"Non-finite losses in the dry run's step: {bad}")
    total = sum(loss_dict.values())
    total.backward()
    total = float(total.detach())
    trainable = [p for p in model.parameters() if p.requires_grad]
    with_grad = sum(1 for p in trainable if p.grad is not None)

    print_fn(f"losses ({len(losses)} terms, total {total:.4f}):")
    items = [f"{k}={v:.4f}" for k, v in sorted(losses.items())]
    for i in range(0, len(items), 4):
        print_fn("  " + "  ".join(items[i:i + 4]))
    print_fn(f"gradients reached {with_grad} of {len(trainable)} trainable tensors")
    seconds = time.perf_counter() - start
    print_fn(f"dry run: OK in {seconds:.1f} s (no weight updated, nothing written)")
    return {"images": len(dicts), "losses": losses, "total_loss": total, "tensors_with_grad": with_grad,
            "trainable_tensors": len(trainable), "ims_per_batch": cfg.SOLVER.IMS_PER_BATCH,
            "config_ims_per_batch": config_batch, "seconds": seconds}


__all__ = ["DRY_RUN_OPTS", "dicts_summary", "dry_run"]
