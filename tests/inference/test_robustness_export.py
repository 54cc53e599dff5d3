"""ONNX export of the SDCoNet model (SR branch + saliency-driven token selection).

DINO's export is tested in test_inference.py; SDCoNet adds the token selection, whose ranking
must stay computed inside the graph (not frozen at the trace input) and break ties as the eager
model does. Untrained tiny models, 128 px exports, real onnx / onnxruntime.
"""
import math
import os
import sys

import onnx
import onnxruntime as ort
import pytest
import sdconet
import torch
from common import REPO
from sdconet.data.synthetic import render_tile
from sdconet.inference.export import compare, decode_detections, export_onnx, normalise, run_pytorch
from sdconet.modeling.transformer.salient_encoder import SalientDeformableEncoder, select_salient_tokens
from torch import nn

SDCONET = os.path.join(REPO, "configs/quick_schedules/sdconet_tiny_synthetic.yaml")
sys.path.insert(0, os.path.join(REPO, "tools"))


def resize_modes(path):
    return [a.s.decode() for n in onnx.load(path).graph.node if n.op_type == "Resize"
            for a in n.attribute if a.name == "mode"]


SHAPES = [(8, 8), (4, 4), (2, 2), (1, 1)]
LEVEL_RATIOS, LAYER_RATIOS = (0.4, 0.8, 1.0, 1.0), (1.0, 0.6)


class Selector(nn.Module):
    def forward(self, scores):
        padding = torch.zeros(scores.shape, dtype=torch.bool)
        return select_salient_tokens(scores, padding, SHAPES, LEVEL_RATIOS, LAYER_RATIOS).indices


def reference_selection(scores):
    """Per level the best floor(n * ratio) tokens, then all of them by score; ties: lower flat index."""
    kept, start = [], 0
    for (h, w), ratio in zip(SHAPES, LEVEL_RATIOS):
        level = sorted(range(start, start + h * w), key=lambda i: (-scores[i], i))
        kept += level[:math.floor(h * w * ratio)]
        start += h * w
    return sorted(kept, key=lambda i: (-scores[i], i))


def test_token_selection_exports_with_the_eager_tie_order(tmp_path):
    """Scores full of ties (4 values), at the level quotas and the layer prefix: ONNX Runtime must
    select and order the tokens exactly as the eager run, lower flat index first among equals."""
    gen = torch.Generator().manual_seed(0)
    size = sum(h * w for h, w in SHAPES)
    trace_input = torch.randint(0, 4, (2, size), generator=gen).float()
    path = str(tmp_path / "select.onnx")
    torch.onnx.export(Selector(), (trace_input,), path, input_names=["scores"], output_names=["indices"],
                      opset_version=17, dynamo=False)
    assert "TopK" in {n.op_type for n in onnx.load(path).graph.node}
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for scores in (trace_input, torch.randint(0, 4, (2, size), generator=gen).float()):
        expected = torch.tensor([reference_selection(row.tolist()) for row in scores])
        assert torch.equal(Selector()(scores), expected)
        assert torch.equal(torch.from_numpy(session.run(None, {"scores": scores.numpy()})[0]), expected)


def test_sdconet_onnx_export_matches_pytorch(tmp_path):
    """HR in, degraded inside the graph (--degrade): ONNX Runtime = PyTorch = the model's own inference."""
    torch.manual_seed(0)
    predictor = sdconet.Predictor(SDCONET, weights=None, device="cpu")
    model = predictor.model
    encoder = model.transformer.encoder
    assert isinstance(encoder, SalientDeformableEncoder) and min(encoder.level_ratios) < 1
    assert model.sr_decoder is not None and model.input_scale == 2

    path = export_onnx(model, str(tmp_path / "sdconet.onnx"), 128, 128)  # traced on a zero image
    assert "cubic" in resize_modes(path)  # the bicubic degradation is in the graph

    selections = []
    hook = encoder.register_forward_hook(lambda module, args, out: selections.append(out[1].indices))
    run_pytorch(model, torch.zeros(1, 3, 128, 128))
    for index in (2, 3):
        image, _ = render_tile(0, "test", index, 128)
        tensor = normalise(model, image)
        diffs = compare(model, path, tensor)
        print(f"SDCoNet ONNX max diffs (scene {index}):", diffs)
        assert diffs["matched"] >= model.num_detections - 2  # at most a near tie swapped at the top-k border
        assert diffs["boxes_px"] < 1e-3 and diffs["scores"] < 1e-4
    hook.remove()
    # The scenes select other tokens than the trace input did: a selection frozen into the graph
    # at export time would have failed the comparison above.
    assert not torch.equal(selections[0], selections[1]) and not torch.equal(selections[0], selections[-1])

    decoded = decode_detections(*run_pytorch(model, tensor), 128, 128, model.num_detections)[0]
    direct = predictor(image)
    torch.testing.assert_close(decoded["boxes"], direct.pred_boxes.tensor, atol=1e-4, rtol=0)
    torch.testing.assert_close(decoded["scores"], direct.scores)
    assert torch.equal(decoded["classes"], direct.pred_classes)


@pytest.mark.parametrize("degrade", [False, True])
def test_export_tool_on_sdconet_config(degrade, tmp_path, capsys):
    """The config scores the SR branch against HR (TEST.SDCONET.SR_QUALITY True). Without --degrade
    the input is the LR image, with no HR: the tool turns that off instead of failing the config check."""
    import export_onnx as tool

    if not degrade:
        with pytest.raises(ValueError, match="TEST.SDCONET.SR_QUALITY"):
            sdconet.Predictor(SDCONET, device="cpu", opts=["MODEL.SDCONET.DEGRADE.TEST", "False"])
    torch.manual_seed(0)
    path = str(tmp_path / "sdconet.onnx")
    argv = ["--config-file", SDCONET, "--output", path, "--height", "128", "--width", "128"]
    diffs = tool.main(argv + (["--degrade"] if degrade else []))
    assert diffs["boxes_px"] < 1e-3 and diffs["unmatched"] <= 2
    assert "opset 17" in capsys.readouterr().out
    graph = onnx.load(path).graph
    assert [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim] == [1, 3, 128, 128]
    assert ("cubic" in resize_modes(path)) == degrade  # the bicubic degradation only with --degrade
