"""Host-device syncs of an SDCoNet forward on CUDA, counted by torch's sync debug mode.

CUDA only (CI has no GPU: these are skipped there and run on a GPU machine). Each sync stalls
the host until the GPU queue drains. The package allows two: the per-level token counts of the
salient encoder (one transfer) and the Hungarian matching's one round trip to scipy.
"""
import collections
import os
import traceback
import warnings

import detectron2
import pytest
import sdconet
import torch
from common import SDCONET_TINY
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

PACKAGE = os.path.dirname(os.path.abspath(sdconet.__file__))
DETECTRON2 = os.path.dirname(os.path.abspath(detectron2.__file__))
ALLOWED = {"training": {"salient_encoder.py": 1, "matcher.py": 2}, "eval": {"salient_encoder.py": 1}}


def sync_sites(fn):
    """Counter of syncs while ``fn`` runs, by the innermost frame of this package (its file name)
    or of detectron2 (``detectron2/<file>``, e.g. ``Boxes.clip``'s finiteness check)."""
    sites = collections.Counter()

    def record(*_args, **_kwargs):
        frames = [f for f in traceback.extract_stack() if f.filename.startswith((PACKAGE, DETECTRON2))]
        if not frames:
            sites["(elsewhere)"] += 1
        elif frames[-1].filename.startswith(DETECTRON2):
            sites["detectron2/" + os.path.basename(frames[-1].filename)] += 1
        else:
            sites[os.path.basename(frames[-1].filename)] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sites


def cuda_sample(h, w, seed):
    inst = Instances((h, w))
    inst.gt_boxes = Boxes(torch.tensor([[10.0, 12.0, 30.0, 28.0], [60.0, 70.0, 100.0, 90.0]]).to("cuda"))
    inst.gt_classes = torch.tensor([0, 3]).to("cuda")
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g).to("cuda")
    return {"image": image, "instances": inst, "height": h, "width": w}


@pytest.mark.parametrize("mode", ["training", "eval"])
def test_forward_syncs_only_where_allowed(mode):
    cfg = get_cfg()
    sdconet.add_sdconet_config(cfg)
    cfg.merge_from_file(SDCONET_TINY)
    cfg.MODEL.DEVICE = "cuda"
    torch.manual_seed(0)
    model = build_model(cfg).train(mode == "training")
    batch = [cuda_sample(128, 128, 0), cuda_sample(96, 128, 1)]

    def forward():
        if mode == "training":
            model(batch)
        else:
            with torch.no_grad():
                model(batch)

    forward()  # first call: lazily built state is not what is measured
    torch.cuda.synchronize()
    sites = sync_sites(forward)
    ours = {site: n for site, n in sites.items() if site.endswith(".py") and "/" not in site}
    assert all(site in ALLOWED[mode] and n <= ALLOWED[mode][site] for site, n in ours.items()), dict(sites)
