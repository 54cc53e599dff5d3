"""tools/time_to_level.py: the training seconds at which a run's periodic evaluation first reaches a level."""
import json

import pytest
from common import load_tool

tool = load_tool("time_to_level")


def write_run(folder, rows):
    folder.mkdir()
    (folder / "metrics.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(folder)


def rows(values, seconds_per_iteration):
    """Logged every 20 iterations (train_seconds), evaluated every 100 (the value) as detectron2 writes
    them: the evaluation shares the row of its iteration."""
    out = []
    for it in range(19, 20 * 5 * len(values), 20):
        row = {"iteration": it, "train_seconds": (it + 1) * seconds_per_iteration, "total_loss": 1.0}
        if (it + 1) % 100 == 0:
            row["bbox/AP50"] = values[(it + 1) // 100 - 1]
        out.append(row)
    return out


def test_first_evaluation_at_or_above_the_level_and_its_seconds(tmp_path, capsys):
    a = write_run(tmp_path / "a", rows([10.0, 40.0, 55.0, 52.0], 0.5))   # 50 first at iteration 299: 150 s
    b = write_run(tmp_path / "b", rows([20.0, 50.0, 60.0, 70.0], 0.4))   # 50 first at 199: 80 s (>= counts)
    c = write_run(tmp_path / "c", rows([5.0, 10.0, 20.0, 30.0], 0.3))    # never
    summary = tool.main([a, b, c, "--levels", "50", "15"])
    at50 = summary[50.0]
    assert at50["runs"] == {a: (299, 150.0), b: (199, 80.0), c: None}
    assert at50["reached"] == 2 and at50["mean"] == pytest.approx(115.0)
    # two values 150 and 80: standard error 35, t(0.975, 1) = 12.706 -> half-width 12.706 * 35
    assert at50["half_width"] == pytest.approx(12.7062 * 35, rel=1e-4)
    assert summary[15.0]["runs"][c] == (299, 90.0) and summary[15.0]["reached"] == 3
    out = capsys.readouterr().out
    assert f"{c}: not reached" in out and "reached by 2 of 3; mean 115" in out


def test_evaluation_between_logged_iterations_takes_the_last_seconds_before_it(tmp_path):
    run = write_run(tmp_path / "r", [{"iteration": 19, "train_seconds": 9.0}, {"iteration": 39, "train_seconds": 20.0},
                                     {"iteration": 30, "bbox/AP50": 60.0}])
    assert tool.read_curve(run, "bbox/AP50") == [(30, 9.0, 60.0)]


def test_runs_without_evaluations_or_seconds_are_named(tmp_path):
    no_eval = write_run(tmp_path / "no_eval", [{"iteration": 19, "train_seconds": 9.0}])
    with pytest.raises(ValueError, match="no evaluation of bbox/AP50 in .*no_eval.*EVAL_PERIOD"):
        tool.main([no_eval, "--levels", "50"])
    no_seconds = write_run(tmp_path / "old", [{"iteration": 99, "bbox/AP50": 60.0}])
    with pytest.raises(ValueError, match="no train_seconds"):
        tool.read_curve(no_seconds, "bbox/AP50")
    with pytest.raises(FileNotFoundError, match="missing"):
        tool.read_curve(str(tmp_path / "missing"), "bbox/AP50")
