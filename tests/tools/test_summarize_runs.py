"""tools/summarize_runs.py: means, t intervals and paired differences of finished runs."""
import json
import math

import pytest
from common import load_tool

tool = load_tool("summarize_runs")


def write_run(folder, ap, psnr=None):
    folder.mkdir()
    metrics = {"bbox": {"AP": ap}}
    if psnr is not None:
        metrics["sr_quality"] = {"PSNR_SR": psnr}
    (folder / "final_metrics.json").write_text(json.dumps(metrics))
    return str(folder)


def test_mean_interval_and_paired_difference(tmp_path, capsys):
    a = [write_run(tmp_path / f"a{i}", ap, 40 + i) for i, ap in enumerate((10.0, 12.0, 14.0))]
    b = [write_run(tmp_path / f"b{i}", ap) for i, ap in enumerate((9.0, 12.0, 12.0))]
    summary = tool.main(["--group", "new", *a, "--group", "old", *b, "--reference", "old",
                         "--metrics", "bbox/AP", "sr_quality/PSNR_SR"])
    ap = summary["groups"]["new"]["bbox/AP"]
    # mean 12, sd 2, n 3: t(0.975, 2) = 4.3027 -> half-width 4.3027 * 2 / sqrt(3)
    assert ap["mean"] == pytest.approx(12.0) and ap["ci95"] == pytest.approx(4.3027 * 2 / math.sqrt(3), rel=1e-4)
    assert (ap["low"], ap["high"]) == pytest.approx((12.0 - ap["ci95"], 12.0 + ap["ci95"]))
    diff = summary["differences"]["new"]["bbox/AP"]  # paired: (1, 0, 2)
    assert diff["mean"] == pytest.approx(1.0) and diff["ci95"] == pytest.approx(4.3027 * 1 / math.sqrt(3), rel=1e-4)
    assert diff["p_value"] == pytest.approx(1 - math.sqrt(3 / 5))  # paired t = sqrt(3), 2 degrees of freedom
    assert math.isnan(summary["groups"]["old"]["sr_quality/PSNR_SR"]["mean"])  # no SR in those runs
    out = capsys.readouterr().out
    assert "| new | 3 | 12.00 ± 4.97 | 41.00 ± 2.48 |" in out and "| new - old (paired) |" in out


def test_unfinished_run_and_unpaired_groups_are_named(tmp_path):
    done = write_run(tmp_path / "done", 1.0)
    with pytest.raises(FileNotFoundError, match="missing.*is the run .* finished"):
        tool.main(["--group", "x", done, str(tmp_path / "missing")])
    with pytest.raises(ValueError, match="as many runs in 'x' \\(2\\) as in 'y' \\(1\\)"):
        tool.main(["--group", "x", done, done, "--group", "y", done, "--reference", "y", "--metrics", "bbox/AP"])
