"""tools/compare.py and sdconet/utils/stats.py: t intervals and paired differences against scipy,
and a comparison that picks up after a stop, a crash and a failed run without redoing finished runs."""
import json
import math
import os

import pytest
from common import REPO, TINY, load_tool
from scipy import stats
from sdconet.utils.stats import mean_interval, paired_difference

tool = load_tool("compare")

T_975_DF2 = 4.302652729749464  # scipy.stats.t.ppf(0.975, 2), as printed in t tables (4.303)


def test_intervals_and_paired_differences_match_scipy():
    values, reference = [10.0, 12.0, 14.0], [9.0, 12.0, 12.0]  # mean 12, sd 2; differences 1, 0, 2 (sd 1)
    interval = mean_interval(values)
    assert (interval.mean, interval.n) == (12.0, 3)
    assert interval.half_width == pytest.approx(T_975_DF2 * 2 / math.sqrt(3))
    assert (interval.low, interval.high) == pytest.approx(stats.t.interval(0.95, 2, loc=12, scale=2 / math.sqrt(3)))
    assert mean_interval([1.0, 2.0, 3.0, 4.0, 5.0]).half_width == pytest.approx(2.7764451 * math.sqrt(2.5 / 5))
    diff = paired_difference(values, reference)
    assert diff.mean == pytest.approx(1.0) and diff.half_width == pytest.approx(T_975_DF2 / math.sqrt(3))
    # t = 1 / (1 / sqrt(3)) with 2 degrees of freedom: p = 1 - sqrt(3) / sqrt(5)
    assert diff.p_value == pytest.approx(1 - math.sqrt(3 / 5)) == stats.ttest_rel(values, reference).pvalue
    single = mean_interval([3.0])
    assert single.mean == 3.0 and math.isnan(single.low) and math.isnan(single.half_width)
    equal = paired_difference([2.0, 3.0], [1.0, 2.0])  # no spread: a zero-width interval, no p
    assert (equal.low, equal.high) == (1.0, 1.0) and math.isnan(equal.p_value)
    assert math.isnan(mean_interval([1.0, math.nan]).mean)  # a metric a run lacks stays missing
    with pytest.raises(ValueError, match="as many values"):
        paired_difference([1.0, 2.0], [1.0])


def test_spec_file_and_flags_give_the_runs(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"seeds: [3, 4]\nreference: b\nopts: [SOLVER.MAX_ITER, 4]\nbudget_seconds: 60\nruns:\n"
                    f"  a: {{config: {TINY}}}\n  b: {{config: {TINY}, opts: [SOLVER.BASE_LR, 0.001]}}\n")
    args = tool.parse_args(["--spec", str(spec), "--out", str(tmp_path / "o"),
                            "--run", "c", TINY, "SOLVER.AMP.ENABLED", "True"])
    assert [(r.name, r.opts) for r in args.runs] == [("a", []), ("b", ["SOLVER.BASE_LR", "0.001"]),
                                                      ("c", ["SOLVER.AMP.ENABLED", "True"])]
    assert (args.seeds, args.reference, args.opts, args.budget_seconds) == ([3, 4], "b", ["SOLVER.MAX_ITER", "4"], 60.0)
    args = tool.parse_args(["--spec", str(spec), "--out", str(tmp_path / "o"), "--seeds", "0", "--budget-seconds", "0"])
    assert (args.seeds, args.budget_seconds) == ([0], 0.0)  # flags win over the file


@pytest.mark.parametrize("argv, message", [
    (["--run", "a", TINY, "--run", "a", TINY], "two runs are named 'a'"),
    (["--run", "a", TINY, "SOLVER.MAX_ITER"], "KEY VALUE pairs"),
    (["--run", "a", TINY, "SEED", "3"], "SEED is set by compare.py"),
    (["--run", "a", TINY, "--reference", "b"], "--reference 'b' is not one of the runs"),
    (["--run", "a", "nowhere.yaml"], "config file nowhere.yaml does not exist"),
    (["--peer", "a", "retinanet", TINY, "--peer-budget-seconds", "9"], "unknown peer 'retinanet'"),
    (["--run", "a", TINY, "--report-name", "sub/recipe"], "--report-name must be a plain file name"),
])
def test_bad_command_lines_are_refused(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit):
        tool.parse_args([*argv, "--out", str(tmp_path)])
    assert message in capsys.readouterr().err


def test_bad_runs_are_refused_before_any_training(tmp_path, capsys):
    out = str(tmp_path / "out")
    assert tool.main(["--run", "a", TINY, "SOLVER.NO_SUCH_KEY", "1", "--out", out]) == 2
    assert "run 'a'" in capsys.readouterr().err
    assert tool.main(["--run", "a", TINY, "DATASETS.TEST", "()", "--out", out]) == 2
    assert "DATASETS.TEST is empty" in capsys.readouterr().err
    folder = tmp_path / "out" / "a" / "seed_0"
    folder.mkdir(parents=True)
    (folder / "compare_run.json").write_text(json.dumps({"command": ["--config-file", "other.yaml"]}))
    assert tool.main(["--run", "a", TINY, "--seeds", "0", "--out", out]) == 2
    assert "hold runs of another command" in capsys.readouterr().err
    assert sorted(os.listdir(folder)) == ["compare_run.json"]  # nothing ran


def progress(out: str, name: str, seed: int) -> str:
    """The status word of one progress line."""
    for line in out.splitlines():
        words = line.split()
        if words[:4] == ["[compare]", name, "seed", str(seed)]:
            return words[4]
    raise AssertionError(f"no progress line for {name} seed {seed} in:\n{out}")


def final_ap(folder) -> float:
    with open(os.path.join(folder, "final_metrics.json")) as f:
        return json.load(f)["bbox"]["AP"]


def test_compare_picks_up_after_stop_crash_and_failure(synthetic_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SDCONET_DATASETS", synthetic_root)  # for the train_net.py subprocesses
    out = tmp_path / "cmp"
    command = ["--run", "base", TINY, "--run", "lr2", TINY, "SOLVER.BASE_LR", "0.0008", "--reference", "base",
               "--opts", "SOLVER.MAX_ITER", "4", "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0",
               "--budget-seconds", "600", "--out", str(out), "--jobs", "2", "--threads", "2"]
    run = {(name, seed): out / name / f"seed_{seed}" for name in ("base", "lr2") for seed in (0, 1)}

    # 1. Stopped after the first seed (as if killed then).
    assert tool.main([*command, "--seeds", "0"]) == 0
    printed = capsys.readouterr().out
    assert progress(printed, "base", 0) == progress(printed, "lr2", 0) == "done"
    base_ap = final_ap(run["base", 0])

    # 2. lr2 seed 0 crashed in its final evaluation (its checkpoint is there); lr2 seed 1 has a
    #    broken checkpoint, so its training fails. The others go on; exit status 1.
    os.remove(run["lr2", 0] / "final_metrics.json")
    run["lr2", 1].mkdir()
    (run["lr2", 1] / "model_final.pth").write_bytes(b"not a checkpoint")
    (run["lr2", 1] / "last_checkpoint").write_text("model_final.pth")
    assert tool.main([*command, "--seeds", "0", "1"]) == 1
    printed = capsys.readouterr().out
    assert progress(printed, "base", 0) == "skipped" and final_ap(run["base", 0]) == base_ap
    assert [progress(printed, "lr2", 0), progress(printed, "base", 1), progress(printed, "lr2", 1)] == \
        ["done", "done", "failed"]
    assert "Cannot resume" in printed  # the reason of the failure, from its log
    log = (run["lr2", 0] / "compare.log").read_text()
    assert "Starting training from iteration 4" in log  # resumed after the 4 iterations, not retrained
    with open(out / "compare.json") as f:
        assert json.load(f)["runs"]["lr2"]["seeds"]["1"]["status"] == "failed"

    # 3. Broken files removed: the same command trains only what is missing.
    for name in ("model_final.pth", "last_checkpoint"):
        os.remove(run["lr2", 1] / name)
    assert tool.main([*command, "--seeds", "0", "1"]) == 0
    printed = capsys.readouterr().out
    assert [progress(printed, n, s) for n, s in run] == ["skipped", "skipped", "skipped", "done"]

    with open(out / "compare.json") as f:
        report = json.load(f)
    ap = {key: final_ap(folder) for key, folder in run.items()}
    base = report["metrics"]["AP"]["runs"]["base"]
    assert base["values"] == {"0": ap["base", 0], "1": ap["base", 1]}
    expected = mean_interval([ap["base", 0], ap["base", 1]])
    assert (base["mean"], base["low"], base["high"]) == pytest.approx((expected.mean, expected.low, expected.high),
                                                                      nan_ok=True)
    diff = report["metrics"]["AP"]["differences"]["lr2"]
    expected = paired_difference([ap["lr2", 0], ap["lr2", 1]], [ap["base", 0], ap["base", 1]])
    assert diff["seeds"] == [0, 1] and diff["mean"] == pytest.approx(expected.mean)
    assert report["metrics"]["train_seconds"]["runs"]["lr2"]["mean"] > 0
    assert report["metrics"]["PSNR_SR"]["runs"]["base"]["mean"] is None  # no SR branch: no value
    assert report["threads_per_run"] == 1 and report["machine"]["cpu_cores"] == os.cpu_count()
    assert len(report.get("git_commit", "0" * 40)) == 40
    with open(run["lr2", 1] / "compare_run.json") as f:
        record = json.load(f)
    assert record["attempts"] == 2 and "--resume" in record["command"]
    assert record["command"][-2:] == ["SOLVER.TIME_BUDGET_SECONDS", "600.0"]
    table = (out / "compare.md").read_text()
    assert "| AP |" in table and "lr2 - base" in table
    assert (out / "plots" / "AP.png").is_file() and not (out / "plots" / "PSNR_SR.png").exists()

    # 4. A second report over the same runs (another spec sharing OUT) keeps the first one.
    first = (out / "compare.json").read_text()
    assert tool.main([*command, "--seeds", "0", "1", "--no-train", "--report-name", "again"]) == 0
    assert (out / "compare.json").read_text() == first
    with open(out / "again.json") as f:
        again = json.load(f)
    assert again["metrics"]["AP"]["runs"]["base"]["values"] == report["metrics"]["AP"]["runs"]["base"]["values"]
    assert (out / "again.md").is_file() and (out / "plots_again" / "AP.png").is_file()


def test_a_peer_run_goes_through_train_peer_into_the_table(synthetic_root, tmp_path, monkeypatch, capsys):
    """--peer runs tools/train_peer.py with the peer budget; its AP lands in the same report; --only
    leaves the other runs for a later call, which skips the finished one. (common.RememberingPeer
    scores 100 on its own training set.)"""
    monkeypatch.setenv("SDCONET_DATASETS", synthetic_root)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([os.path.dirname(os.path.dirname(__file__)),
                                                      os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "cmp"
    command = ["--peer", "mem", "common:RememberingPeer", TINY, "DATASETS.TEST", "('synthetic_rs_train',)",
               "--peer", "other", "common:RememberingPeer", TINY,
               "--seeds", "0", "--peer-budget-seconds", "7", "--out", str(out), "--threads", "1"]
    assert tool.main([*command, "--only", "mem"]) == 0  # --only: "other" is left for later
    printed = capsys.readouterr().out
    assert (progress(printed, "mem", 0), progress(printed, "other", 0)) == ("done", "missing")
    assert not (out / "other").exists()
    assert final_ap(out / "mem" / "seed_0") == pytest.approx(100.0)
    log = (out / "mem" / "seed_0" / "compare.log").read_text()
    assert "train_peer.py --peer common:RememberingPeer" in log and "--budget-seconds 7.0" in log
    assert "| mem | peer common:RememberingPeer on " in (out / "compare.md").read_text()
    assert tool.main(command) == 0
    printed = capsys.readouterr().out
    assert (progress(printed, "mem", 0), progress(printed, "other", 0)) == ("skipped", "done")


def test_a_peer_needs_a_training_time(tmp_path, capsys):
    with pytest.raises(SystemExit):
        tool.parse_args(["--peer", "y", "yolo11n", TINY, "--out", str(tmp_path)])
    assert "--peer-budget-seconds" in capsys.readouterr().err


def test_a_run_of_the_spec_can_have_its_own_seeds(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"seeds: [0, 1, 2]\nruns:\n  a: {{config: {TINY}}}\n  b: {{config: {TINY}, seeds: [1, 5]}}\n")
    args = tool.parse_args(["--spec", str(spec), "--out", str(tmp_path / "o")])
    assert [(j.run.name, j.seed) for j in tool.make_jobs(args)] == \
        [("a", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 5)]
    spec.write_text(f"runs:\n  a: {{config: {TINY}, seed: [1]}}\n")
    with pytest.raises(SystemExit):
        tool.parse_args(["--spec", str(spec), "--out", str(tmp_path / "o")])


@pytest.mark.parametrize("spec", sorted((REPO / "configs" / "compare").glob("*.yaml")), ids=lambda p: p.name)
def test_the_specs_in_the_repository_build_every_run(spec, tmp_path):
    args = tool.parse_args(["--spec", str(spec), "--out", str(tmp_path)])
    jobs = tool.make_jobs(args)  # builds every run's config: a wrong key fails here
    assert {j.run.name for j in jobs} == {r.name for r in args.runs}
    assert all(len(r.seeds) >= 3 for r in args.runs)


def test_a_run_of_the_spec_can_have_its_own_budget(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"seeds: [0]\npeer_budget_seconds: 100\nruns:\n  a: {{config: {TINY}}}\n"
                    f"  b: {{config: {TINY}, budget_seconds: 30}}\n  y: {{config: {TINY}, peer: yolo11n}}\n"
                    f"  y50: {{config: {TINY}, peer: yolo11n, budget_seconds: 50}}\n")
    jobs = {j.run.name: j.command for j in tool.make_jobs(tool.parse_args(["--spec", str(spec), "--out", str(tmp_path)]))}
    assert "SOLVER.TIME_BUDGET_SECONDS" not in jobs["a"]
    assert jobs["b"][jobs["b"].index("SOLVER.TIME_BUDGET_SECONDS") + 1] == "30.0"
    assert jobs["y"][jobs["y"].index("--budget-seconds") + 1] == "100.0"
    assert jobs["y50"][jobs["y50"].index("--budget-seconds") + 1] == "50.0"
