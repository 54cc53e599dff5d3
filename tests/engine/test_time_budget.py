"""SOLVER.TIME_BUDGET_SECONDS (engine/hooks.py TimeBudget): a run ends once its training steps have
taken the budget, with model_final and final_metrics.json as at MAX_ITER, and a resumed run goes on
counting from its checkpoint instead of starting a new budget."""
import json
import os

import pytest
import torch
from common import TINY, load_cfg, load_tool

train_net = load_tool("train_net")


def train(out, *flags):
    args = train_net.argument_parser().parse_args([
        "--config-file", TINY, *flags, "SOLVER.MAX_ITER", "10000", "SOLVER.TIME_BUDGET_SECONDS", "2.0",
        "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0", "SOLVER.CHECKPOINT_PERIOD", "100000",
        "SEED", "0", "OUTPUT_DIR", str(out)])
    train_net.main(args)
    return torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)


def test_budget_ends_training_with_final_checkpoint_and_evaluation(synthetic_root, tmp_path):
    out = tmp_path / "run"
    final = train(out)
    iteration = final["iteration"]
    assert 0 <= iteration < 9999  # stopped long before MAX_ITER
    assert final["trainer"]["iteration"] == iteration  # what --resume continues from
    assert final["trainer"]["hooks"]["TimeBudget"]["train_seconds"] >= 2.0
    assert (out / "last_checkpoint").read_text().strip() == "model_final.pth"
    with open(out / "final_metrics.json") as f:
        assert "AP" in json.load(f)["bbox"]
    rows = [json.loads(line) for line in open(out / "metrics.json")]
    steps = [r for r in rows if "train_seconds" in r]
    assert steps[-1]["iteration"] == iteration and steps[-1]["train_seconds"] >= 2.0
    assert "bbox/AP" in rows[-1] and rows[-1]["iteration"] == iteration + 1  # the final evaluation, as at MAX_ITER

    # The budget is spent: a resumed run trains no further step, saves and evaluates again.
    os.remove(out / "final_metrics.json")
    resumed = train(out, "--resume")
    assert resumed["iteration"] == iteration
    assert all(torch.equal(resumed["model"][k], final["model"][k]) for k in final["model"])
    assert os.path.isfile(out / "final_metrics.json")


def test_negative_budget_is_refused_by_name():
    with pytest.raises(ValueError, match="SOLVER.TIME_BUDGET_SECONDS=-1.0: must be >= 0"):
        load_cfg(TINY, ["SOLVER.TIME_BUDGET_SECONDS", -1.0])
