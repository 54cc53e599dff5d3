"""ONNX export of SDCoNet's inference path and the post-processing shared by PyTorch and ONNX runs.

The exported graph takes one normalised image batch (B, 3, H, W) of a fixed size (the HR image
when ``MODEL.SDCONET.DEGRADE.TEST`` is on, degraded inside the graph; the LR image otherwise) and
returns the raw last-layer ``logits`` (B, Q, C) and ``boxes`` (B, Q, 4, sigmoid cxcywh relative to
the image). Top-k selection and scaling to pixels stay outside, in :func:`decode_detections`,
which both runners call, so they are compared after the very same post-processing.
"""
from typing import Tuple

import numpy as np
import torch
from torch import nn
from torchvision.ops import box_convert


class ExportableSDCoNet(nn.Module):
    """Normalised image tensor in, (logits, boxes) out; no padding (H, W must suit the model)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        model = self.model
        lr = model.degradation(image) if model.degrade_test else image  # as SDCoNet.degrade in eval
        sizes = [tuple(lr.shape[-2:])] * lr.shape[0]
        _, levels, masks = model.extract_features(lr, sizes)
        outputs = model.transformer(levels, masks, None)
        return outputs["pred_logits"], outputs["pred_boxes"]


def check_export_size(model, height: int, width: int):
    """Raise unless the model can take an unpadded (height, width) input."""
    divisibility = model.backbone.size_divisibility * model.input_scale
    if height % divisibility or width % divisibility:
        raise ValueError(f"export size {height}x{width} must be a multiple of {divisibility} "
                         "(backbone stride x degradation scale); pad the image to it")


def normalise(model, image_bgr: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 BGR -> (1, 3, H, W) float tensor normalised with the model's pixel mean/std."""
    chw = torch.from_numpy(np.ascontiguousarray(image_bgr.transpose(2, 0, 1))).float().to(model.device)
    return ((chw - model.pixel_mean) / model.pixel_std)[None]


def decode_detections(logits: torch.Tensor, boxes: torch.Tensor, height: int, width: int, num_detections: int):
    """Top-k (query, class) pairs -> one dict per image: "boxes" xyxy in pixels of an HxW image,
    "scores", "classes" and "pairs" (the flat query * C + class index, to match two runs).

    The same selection as ``SDCoNet.inference``; takes torch tensors or numpy arrays.
    """
    logits, boxes = torch.as_tensor(logits).float(), torch.as_tensor(boxes).float()
    _, q, c = logits.shape
    scores, index = logits.sigmoid().flatten(1).topk(min(num_detections, q * c), dim=1)
    query = torch.div(index, c, rounding_mode="floor")
    boxes = torch.gather(boxes, 1, query.unsqueeze(-1).expand(-1, -1, 4))
    boxes = box_convert(boxes, "cxcywh", "xyxy") * torch.tensor([width, height, width, height], dtype=boxes.dtype)
    boxes[..., 0::2] = boxes[..., 0::2].clamp(0, width)
    boxes[..., 1::2] = boxes[..., 1::2].clamp(0, height)
    return [{"boxes": b, "scores": s, "classes": i % c, "pairs": i} for b, s, i in zip(boxes, scores, index)]


def export_onnx(model, path: str, height: int, width: int, opset: int = 17):
    """Write the inference path of ``model`` (eval mode) for (1, 3, height, width) inputs to ``path``."""
    model.eval()
    check_export_size(model, height, width)
    wrapper = ExportableSDCoNet(model).eval()
    example = torch.zeros(1, 3, height, width, device=model.device)
    with torch.no_grad():
        torch.onnx.export(wrapper, (example,), path, input_names=["image"], output_names=["logits", "boxes"],
                          opset_version=opset, dynamo=False, do_constant_folding=True)
    return path


def run_pytorch(model, image: torch.Tensor):
    with torch.no_grad():
        logits, boxes = ExportableSDCoNet(model).eval()(image)
    return logits.cpu(), boxes.cpu()


def run_onnx(path: str, image: torch.Tensor):
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    logits, boxes = session.run(["logits", "boxes"], {"image": image.cpu().numpy()})
    return torch.from_numpy(logits), torch.from_numpy(boxes)


def compare(model, path: str, image: torch.Tensor) -> dict:
    """Max absolute differences between PyTorch and ONNX Runtime, raw and after :func:`decode_detections`.

    Decoded detections are matched by their (query, class) pair: a near tie in score may swap
    the order of two detections, or which of two enters the top-k ("unmatched" counts those).
    The model's own hard selections (the saliency token quotas, the order of the encoder
    proposals that become queries) see the two runtimes' rounding too: two scores within about
    1e-6 of each other at a cut can change a query, and then detections differ by more.
    """
    height, width = image.shape[-2:]
    torch_out, onnx_out = run_pytorch(model, image), run_onnx(path, image)
    ref = decode_detections(*torch_out, height, width, model.num_detections)[0]
    got = decode_detections(*onnx_out, height, width, model.num_detections)[0]
    position = {int(p): i for i, p in enumerate(got["pairs"])}
    common = [(i, position[int(p)]) for i, p in enumerate(ref["pairs"]) if int(p) in position]
    a, b = (torch.tensor(x, dtype=torch.long) for x in zip(*common))
    return {
        "logits": float((torch_out[0] - onnx_out[0]).abs().max()),
        "raw_boxes": float((torch_out[1] - onnx_out[1]).abs().max()),
        "boxes_px": float((ref["boxes"][a] - got["boxes"][b]).abs().max()),
        "scores": float((ref["scores"][a] - got["scores"][b]).abs().max()),
        "matched": len(common),
        "unmatched": len(ref["pairs"]) - len(common),
    }
