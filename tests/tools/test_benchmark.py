"""tools/analyze_model.py, tools/benchmark.py and tools/benchmark_page.py on the tiny config:
parameter, FLOP, latency and training-step figures, the cost models, and the benchmark page."""
import json

import pytest
import sdconet
import torch
import torch.nn.functional as F
from common import TINY, load_tool
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.utils.analysis import FlopCountAnalysis as DetectronFlopCount
from fvcore.nn import FlopCountAnalysis
from sdconet.utils.analysis import OP_HANDLES, count_parameters, inference_parameter_names
from sdconet.utils.models import build_benchmark_model
from sdconet.utils.report import machine_info
from sdconet.utils.timing import measure_training_step, random_inputs, synthetic_training_batch
from torch import nn

analyze_model = load_tool("analyze_model")
benchmark = load_tool("benchmark")
page_tool = load_tool("benchmark_page")


def analyze(tmp_path, size):
    out = tmp_path / f"analyze_{size}.json"
    result = analyze_model.main(["--config-file", TINY, "--input-size", str(size), str(size), "--json", str(out)])
    return result, json.loads(out.read_text())


@pytest.fixture(scope="module")
def small_and_large(tmp_path_factory):
    """HR 256 and 512 (LR 128 and 256): below that, Swin's window padding and the fixed number
    of queries dominate and the cost no longer grows near quadratically."""
    tmp = tmp_path_factory.mktemp("analyze")
    return analyze(tmp, 256), analyze(tmp, 512)


@pytest.fixture(scope="module")
def timed(tmp_path_factory):
    """tools/benchmark.py at HR 256: latency only (no training step, no matrix-product peak)."""
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    result = benchmark.main(["--config-file", TINY, "--input-size", "256", "256", "--warmup", "1", "--iters", "2",
                             "--threads", "1", "--train-iters", "0", "--gemm-size", "0", "--json", str(out)])
    return result, json.loads(out.read_text())


def test_printed_report_and_json_agree(small_and_large, timed, capsys, tmp_path):
    (returned, written), _ = small_and_large
    assert written["params"] == returned["params"]
    assert written["gflops"]["total"] == pytest.approx(returned["gflops"]["total"])
    assert written["input_size_hr"] == [256, 256] and written["input_size_model"] == [128, 128]
    assert "--input-size 256 256" in written["command"]
    assert written["machine"]["torch"] == torch.__version__
    returned, written = timed
    assert written["latency"] == returned["latency"] and written["input_size_model"] == [128, 128]
    assert written["command"].startswith("python tools/benchmark.py ") and "--input-size 256 256" in written["command"]
    assert written["machine"]["torch"] == torch.__version__

    capsys.readouterr()
    result = analyze_model.main(["--config-file", TINY, "--input-size", "64", "64"])
    printed = capsys.readouterr().out
    assert result["command"] in printed
    assert "1 fused multiply-add = 1 flop" in printed
    assert f"{result['params']['total'] / 1e6:.2f} M" in printed
    assert f": {result['gflops']['total']:.2f}" in printed


def test_parameters_match_an_independently_built_model(small_and_large):
    (_, figures), _ = small_and_large
    cfg = get_cfg()
    sdconet.add_sdconet_config(cfg)
    cfg.merge_from_file(TINY)
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    params = figures["params"]
    assert params["total"] == sum(p.numel() for p in model.parameters())
    assert sum(m["total"] for m in params["modules"].values()) == params["total"]
    assert sum(m["inference"] for m in params["modules"].values()) == params["inference"]
    assert 0 < params["inference"] <= params["total"]
    assert params["modules"]["backbone"]["total"] == sum(p.numel() for p in model.backbone.parameters())


def test_analyze_model_gflops_match_fvcore(small_and_large):
    """The printed total is fvcore's own count of the same eval forward (with the cost models)."""
    (_, figures), _ = small_and_large
    model = build_benchmark_model(TINY)
    analysis = DetectronFlopCount(model, random_inputs(256, 256)).set_op_handle(**OP_HANDLES)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    assert figures["gflops"]["total"] == pytest.approx(analysis.total() / 1e9)
    assert figures["gflops"]["by_module"]["backbone"] == pytest.approx(analysis.by_module()["model.backbone"] / 1e9)


def test_inference_path_leaves_out_training_only_parameters():
    model = build_benchmark_model(TINY, [], "cpu")
    used = inference_parameter_names(model, random_inputs(64, 64))
    assert "transformer.denoising.label_embedding.weight" not in used  # CDN queries exist only in training
    assert "backbone.patch_embed.proj.weight" in used
    assert "transformer.query_embedding.weight" in used  # read by indexing, not by calling the module
    counts = count_parameters(model, random_inputs(64, 64))
    # training-only: the CDN label embedding and the auxiliary (not last) decoder-layer class heads
    heads = model.transformer.class_heads[: len(model.transformer.decoder.layers) - 1]
    training_only = model.transformer.denoising.label_embedding.weight.numel() + sum(
        p.numel() for head in heads for p in head.parameters())
    assert counts["total"] - counts["inference"] == training_only
    assert count_parameters(model)["inference"] == counts["total"]  # no inputs: everything


def test_gflops_are_complete_and_grow_with_the_input(small_and_large):
    (_, small), (_, large) = small_and_large
    flops = small["gflops"]
    assert flops["total"] > 0
    assert flops["uncounted_unknown"] == {}, "an op without cost model appeared: add a handle or list it"
    assert sum(flops["by_module"].values()) == pytest.approx(flops["total"])
    for part in ("backbone", "neck", "transformer"):
        assert flops["by_module"][part] > 0
    assert flops["by_operator"]["grid_sampler"] > 0  # deformable attention is counted
    # 128x128 LR output of the bicubic degradation, 3 channels, 16 taps each.
    assert flops["by_module"]["degradation"] == pytest.approx(16 * 3 * 128 * 128 / 1e9)
    assert large["gflops"]["total"] > 2.5 * flops["total"]
    # Convolutions (the FPN) and the resize scale exactly with the pixel count.
    for part in ("neck", "degradation"):
        assert large["gflops"]["by_module"][part] == pytest.approx(4 * flops["by_module"][part])


def test_latency_figures(timed):
    _, figures = timed
    latency = figures["latency"]
    assert latency["threads"] == 1 and latency["iters"] == 2 and latency["warmup"] == 1
    assert 0 < latency["min_ms"] <= latency["median_ms"] <= latency["max_ms"]
    assert latency["min_ms"] <= latency["mean_ms"] <= latency["max_ms"]
    assert "training" not in figures and "gemm_peaks" not in figures  # both switched off


def test_benchmark_training_step_and_matrix_product_peak(capsys):
    """tools/benchmark.py's other two jobs: a timed training step with its peak memory, and the
    fp32 matrix-product peak of both CPU libraries; the report prints all of them."""
    capsys.readouterr()
    result = benchmark.main(["--config-file", TINY, "--input-size", "64", "64", "--warmup", "0", "--iters", "1",
                             "--train-warmup", "1", "--train-iters", "2", "--gemm-size", "256"])
    printed = capsys.readouterr().out
    train = result["training"]
    assert (train["batch"], train["warmup"], train["iters"]) == (2, 1, 2)
    assert train["median_ms"] > 0 and train["peak_memory_mb"] > 100 and train["peak_memory_kind"] == "process peak RSS"
    assert set(result["gemm_peaks"]) == {"mkl", "onednn"} and min(result["gemm_peaks"].values()) > 0
    assert result["command"] in printed
    assert f"median {result['latency']['median_ms']:.1f} ms" in printed
    assert f"1 warmup + 2 steps): median {train['median_ms']:.0f} ms; peak memory {train['peak_memory_mb']:.0f} MiB" in printed
    peaks = result["gemm_peaks"]
    assert f"(256^3): mkl {peaks['mkl']:.0f}, onednn {peaks['onednn']:.0f} G multiply-adds/s" in printed


class Attention(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


class Sampler(nn.Module):
    def __init__(self, mode):
        super().__init__()
        self.mode = mode

    def forward(self, x, grid):
        return F.grid_sample(x, grid, mode=self.mode, align_corners=False)


class Shrink(nn.Module):
    def forward(self, x):
        return F.interpolate(x, scale_factor=0.5, mode="bicubic", align_corners=False)


def fvcore_total(module, inputs):
    analysis = FlopCountAnalysis(module, inputs).set_op_handle(**OP_HANDLES)
    analysis.unsupported_ops_warnings(False)
    total = analysis.total()
    assert not analysis.unsupported_ops()
    return total


def test_cost_models():
    q, k, v = torch.randn(2, 4, 10, 8), torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 5)
    assert fvcore_total(Attention(), (q, k, v)) == 2 * 4 * 10 * 6 * (8 + 5)
    x, grid = torch.randn(2, 3, 9, 9), torch.rand(2, 7, 5, 2) * 2 - 1
    assert fvcore_total(Sampler("bilinear"), (x, grid)) == 4 * 2 * 3 * 7 * 5
    assert fvcore_total(Sampler("nearest"), (x, grid)) == 1 * 2 * 3 * 7 * 5
    assert fvcore_total(Shrink(), (torch.randn(1, 3, 16, 12),)) == 16 * 3 * 8 * 6


def test_page_row_and_page_format(tmp_path):
    """One benchmark-page row of the tiny config, then the page built from two such rows."""
    row = page_tool.measure_config(TINY, 64, 64, "cpu", warmup=0, iters=1, train_iters=1, train_warmup=2)
    assert row["params_inference"] > 0 and row["gflops"] > 0
    assert (row["train_warmup"], row["train_iters"], row["latency_warmup"], row["latency_iters"]) == (2, 1, 0, 1)
    assert row["latency_ms"] > 0 and row["train_step_ms"] > 0 and row["peak_memory_mb"] > 100
    other = dict(row, gflops=2 * row["gflops"], latency_ms=3 * row["latency_ms"])
    names = [name for name, *_ in page_tool.PAGE_MODELS[:2]]
    result = {"command": "python tools/benchmark_page.py", "machine": machine_info("cpu"),
              "rows": {names[0]: row, names[1]: other}, "input_size_hr": [64, 64], "device": "cpu",
              "baseline": {"before": {"latency_ms": 20.0, "train_step_ms": 300.0},
                           "after": {"latency_ms": 10.0, "train_step_ms": 200.0}, "commit": "0123456789abcdef",
                           "rounds": 2,
                           "per_round": [{"latency_ms": (22.0, 10.0), "train_step_ms": (300.0, 250.0)},
                                         {"latency_ms": (18.0, 10.0), "train_step_ms": (300.0, 150.0)}]}}
    page = page_tool.format_page(result)
    assert "| 1 | 22.0 / 10.0 | x2.20 | 300 / 250 | x1.20 |" in page
    assert "| 2 | 18.0 / 10.0 | x1.80 | 300 / 150 | x2.00 |" in page
    assert "median of 1 steps after 2 untimed ones" in page
    lines = [line for line in page.splitlines() if line.startswith(f"| {names[1]} ")]
    assert lines and lines[0].rstrip(" |").split("|")[-3:] == [" 2.00 ", " 3.00 ", " 1.00"]
    assert "| speed-up | x2.00 | x1.50 |" in page
    # The floor: the dense multiply-adds at the best matrix-product throughput of the run.
    assert row["train_gmacs"] > row["gflops"] > 0 and row["gemm_peak_gmacs"] > 1
    # Both CPU libraries are timed; the floor uses the faster, and the page names each.
    assert set(row["gemm_peaks"]) == {"mkl", "onednn"}
    assert row["gemm_peak_gmacs"] == max(row["gemm_peaks"].values())
    assert f"mkl {row['gemm_peaks']['mkl']:.0f}, onednn {row['gemm_peaks']['onednn']:.0f}" in page
    floor_ms = row["gflops"] / max(row["gemm_peak_gmacs"], other["gemm_peak_gmacs"]) * 1000
    assert f"| eval forward (fvcore) | {row['gflops']:.1f} | {floor_ms:.0f} | {row['latency_ms']:.0f} |" in page
    assert f"would need {20.0 / 1.5:.0f} ms (eval" in page


def test_bf16_page_row_autocasts_eval_and_training():
    """The page's bf16 row: its overrides reach the model, the eval forward and the timed training
    steps run in bf16 (as TEST.SDCONET.AMP and the trainer's SOLVER.AMP do), and the page names them."""
    name, config, opts = page_tool.PAGE_MODELS[1]
    assert config == page_tool.PAGE_MODELS[0][1] and opts == page_tool.BF16_OPTS
    model = build_benchmark_model(TINY, list(opts))
    seen = []
    model.backbone.register_forward_hook(lambda m, i, o: seen.append((m.training, next(iter(o.values())).dtype)))
    # 128 px, not 64: torch's CPU bf16 convolution gives non-finite weight gradients for a 3x3,
    # stride-2 convolution of a 1x1 map (the neck's extra level of a 64 px image).
    with torch.no_grad():
        model(random_inputs(128, 128))
    batch = synthetic_training_batch(128, 128, "cpu")
    measure_training_step(model, batch, warmup=0, iters=1, autocast_dtype=torch.bfloat16)
    measure_training_step(model, batch, warmup=0, iters=1)
    assert seen == [(False, torch.bfloat16), (True, torch.bfloat16), (True, torch.float32)]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    row = page_tool.measure_config(TINY, 128, 128, "cpu", warmup=0, iters=1, train_iters=1, train_warmup=0, opts=opts)
    assert row["opts"] == list(opts)
    page = page_tool.format_page({"command": "c", "machine": machine_info("cpu"), "rows": {
        page_tool.PAGE_MODELS[0][0]: dict(row, opts=[]), name: row}, "input_size_hr": [128, 128], "device": "cpu"})
    assert f"| {name} | `{TINY} {' '.join(opts)}` |" in page


def test_rewriting_the_page_keeps_the_hand_written_part(tmp_path):
    page = tmp_path / "BENCHMARKS.md"
    assert page_tool.kept_notes(str(page)) == ""  # no page yet
    page.write_text("# old measured part\n| 1 | 2 |\n")
    assert page_tool.kept_notes(str(page)) == ""  # no marker: nothing is hand-written
    notes = page_tool.NOTES_MARKER + "\n\n## GPU\n\nmeasured by hand\n"
    page.write_text("# old measured part\n| 1 | 2 |\n\n" + notes)
    kept = page_tool.kept_notes(str(page))
    assert kept.strip() == notes.strip() and "old measured part" not in kept


def test_benchmark_page_measures_each_row_in_its_own_process_and_writes_the_page(tmp_path, monkeypatch):
    """The whole tool on one tiny row: the row is measured by a child process
    (``benchmark_page.py --measure``), the page is rewritten and its hand-written part kept."""
    page = tmp_path / "BENCHMARKS.md"
    page.write_text("# old measured part\n\n" + page_tool.NOTES_MARKER + "\n\nmeasured by hand\n")
    monkeypatch.setattr(page_tool, "PAGE_MODELS", (("Tiny DINO", TINY, ()),))
    argv = ["--page", str(page), "--input-size", "64", "64", "--warmup", "0", "--iters", "1",
            "--train-warmup", "0", "--train-iters", "1", "--threads", "1"]
    result = page_tool.main(argv)
    text = page.read_text()
    row = result["rows"]["Tiny DINO"]
    assert row["threads"] == 1 and row["latency_iters"] == 1 and row["train_iters"] == 1
    assert text.startswith("# SDCoNet benchmarks\n\nWritten by `python tools/benchmark_page.py --page ")
    assert f"| Tiny DINO | `{TINY}` | {row['params_inference'] / 1e6:.2f} | {row['gflops']:.2f} |" in text
    assert "old measured part" not in text
    assert text.endswith(page_tool.NOTES_MARKER + "\n\nmeasured by hand\n")
