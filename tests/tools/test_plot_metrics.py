"""tools/plot_metrics.py turns a detectron2 metrics.json into loss / AP / routing PNGs."""
import json
import os

import numpy as np
from common import load_tool
from PIL import Image


def write_metrics(path, with_routing=True, with_ap=True):
    """Training rows every 20 iterations, an evaluation row every 100, like JSONWriter writes them."""
    rows = []
    for it in range(19, 400, 20):
        row = {"iteration": it, "total_loss": 3.0 - it / 400, "loss_class": 1.0 - it / 1000,
               "loss_bbox": 0.5, "loss_giou": 0.4, "loss_sr": 0.2 + 0.01 * np.sin(it), "loss_saliency": 0.1,
               "lr": 1e-4, "time": 0.3}
        if with_routing:
            row.update({"routing/cosine": float(np.cos(it)), "routing/conflict_fraction": 0.3,
                        "routing/phase": int(it > 200)})
        rows.append(row)
        if with_ap and (it + 1) % 100 == 0:
            rows.append({"iteration": it, "bbox/AP": it / 20, "bbox/AP50": it / 10, "bbox/APs": it / 40,
                         "bbox/AP-car": 1.0})
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
        f.write('{"iteration": 399, "total_lo')  # a line still being written


def test_writes_all_panels_with_expected_size(tmp_path):
    tool = load_tool("plot_metrics")
    metrics = tmp_path / "metrics.json"
    write_metrics(metrics)
    written = tool.plot_metrics(str(metrics), str(tmp_path / "plots"), smooth=3)
    assert sorted(os.path.basename(p) for p in written) == ["ap.png", "losses.png", "routing.png"]
    panel_w, panel_h = (round(v * tool.DPI) for v in tool.PANEL_INCHES)
    expected_panels = {"losses.png": 3,  # total+detection, SR, saliency
                       "ap.png": 1,  # bbox
                       "routing.png": 3}  # cosine, conflict_fraction, phase
    for path in written:
        assert os.path.getsize(path) > 0
        with Image.open(path) as image:
            assert image.size == (panel_w * expected_panels[os.path.basename(path)], panel_h)
            pixels = np.asarray(image.convert("L"))
        assert pixels.min() < 128  # something was drawn on the white background


def test_missing_keys_skip_their_files(tmp_path, capsys):
    tool = load_tool("plot_metrics")
    metrics = tmp_path / "metrics.json"
    write_metrics(metrics, with_routing=False, with_ap=False)
    written = tool.main([str(metrics), "--out", str(tmp_path / "plots")])
    assert [os.path.basename(p) for p in written] == ["losses.png"]
    out = capsys.readouterr().out
    assert "skipped ap.png" in out and "skipped routing.png" in out and written[0] in out
    assert not (tmp_path / "plots" / "ap.png").exists()


def test_loading_sums_and_smoothing(tmp_path):
    tool = load_tool("plot_metrics")
    metrics = tmp_path / "metrics.json"
    write_metrics(metrics)
    series = tool.load_metrics(str(metrics))
    assert "bbox/AP" in series and len(series["bbox/AP"][0]) == 4 and len(series["total_loss"][0]) == 20
    iters, total = tool.summed(series, ["loss_class", "loss_bbox", "loss_giou"])
    assert np.allclose(total, 1.0 - iters / 1000 + 0.9)
    assert np.allclose(tool.moving_average(np.array([1.0, 2.0, 3.0, 4.0]), 2), [1.0, 1.5, 2.5, 3.5])
    panels = tool.loss_panels(series)
    labels = [label for label, _, _ in panels[0]["curves"]]
    assert labels[:2] == ["total_loss", "detection (sum)"] and "loss_sr" not in labels


def test_compare_routing_overlays_runs(tmp_path):
    plot_metrics = load_tool("plot_metrics")
    paths = []
    for name, sign in (("sum", 1.0), ("project", -1.0)):
        path = tmp_path / f"{name}.json"
        with open(path, "w") as f:
            for it in range(0, 100, 20):
                f.write(json.dumps({"iteration": it, "routing/cosine": sign * it / 100,
                                    "routing/conflict_fraction": 0.5}) + "\n")
        paths.append(str(path))
    out = tmp_path / "cmp.png"
    written = plot_metrics.main([*paths, "--compare", "sum", "project", "--out", str(out)])
    assert written == [str(out)]
    with Image.open(out) as image:
        assert image.size == (1000, 360)  # two 500 x 360 panels
    import pytest
    with pytest.raises(ValueError, match="labels"):
        plot_metrics.compare_routing(paths, ["only one"], str(tmp_path / "x.png"))
