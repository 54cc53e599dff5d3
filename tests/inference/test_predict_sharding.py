"""tools/predict.py on folders of scenes: resume after a kill, shards, retries, one summary.

Four 96 x 80 scenes (two named a.png in two folders), tiles of 64 px: 4 tiles, 2 forward passes
of 2 tiles per scene. The model is the untrained tiny DINO, seeded, so two runs give the same
detections; a forward pre-hook counts the passes (and cuts a run, as a kill would).
"""
import json
import os
import subprocess
import sys
import threading

import cv2
import pytest
import sdconet
import torch
from common import REPO, TINY, load_tool
from sdconet.data.synthetic import render_tile

PASSES_PER_SCENE = 2


def scene(seed):
    image, _ = render_tile(seed, "test", 1, 128)
    return image[:80, :96]


@pytest.fixture
def folders(tmp_path):
    in1, in2 = tmp_path / "in1", tmp_path / "in2"
    in1.mkdir()
    in2.mkdir()
    cv2.imwrite(str(in1 / "a.png"), scene(0))
    cv2.imwrite(str(in1 / "b.png"), scene(1))
    cv2.imwrite(str(in2 / "a.png"), scene(2))  # same name in another folder: output "a_2"
    cv2.imwrite(str(in2 / "c.tif"), scene(3))  # read by windows
    return [str(in1), str(in2)]


def run(monkeypatch, inputs, out, *extra, cut_at=None):
    """predict.main with seeded untrained weights; returns the batch size of every forward pass."""
    predict = load_tool("predict")
    calls = []

    class CountingPredictor(sdconet.Predictor):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.model.register_forward_pre_hook(self.count)

        def count(self, module, args):
            calls.append(len(args[0]))
            if len(calls) == cut_at:
                raise KeyboardInterrupt  # what Ctrl-C or a scheduler's SIGINT does mid-run

    monkeypatch.setattr(predict, "Predictor", CountingPredictor)
    torch.manual_seed(0)
    predict.main(["--config-file", TINY, "--weights", "", *inputs, "--output", str(out), "--tile", "64",
                  "--overlap", "16", "--batch", "2", "--score-thresh", "0", "--device", "cpu", *extra])
    return calls


def outputs(out):
    return sorted(name for name in os.listdir(out))


def stamp(path):
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns, path.read_bytes()


def test_a_killed_run_resumes_keeping_finished_scenes_and_redoing_the_cut_one(folders, tmp_path, monkeypatch,
                                                                             capsys):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):  # cut in the second pass of the second scene
        run(monkeypatch, folders, out, cut_at=PASSES_PER_SCENE + 2)
    assert outputs(out) == ["a.geojson", "a.png"]  # nothing of b, no summary, no temporary file
    assert not any(t.name == "scene-reader" for t in threading.enumerate())
    (out / "b.geojson.tmp-4242").write_text('{"type": "FeatureColl')  # as a kill during a write leaves it
    kept = {name: stamp(out / name) for name in ("a.geojson", "a.png")}

    calls = run(monkeypatch, folders, out)
    assert "1 of 4 scene(s) already done" in capsys.readouterr().out
    assert calls == [2] * 3 * PASSES_PER_SCENE  # b, a_2 and c only
    assert {name: stamp(out / name) for name in kept} == kept  # a untouched
    assert outputs(out) == sorted(f"{n}.{ext}" for n in ("a", "b", "a_2", "c") for ext in ("geojson", "png")) \
        + ["results.json", "summary.json"]
    results = json.loads((out / "results.json").read_text())
    assert sorted({(r["image_id"], os.path.basename(r["file_name"])) for r in results}) == \
        [(0, "a.png"), (1, "b.png"), (2, "a.png"), (3, "c.tif")]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["done"] == 4 and [s["output"] for s in summary["per_scene"]] == ["a", "b", "a_2", "c"]

    # --overwrite redoes every scene, and the resumed run's detections are those of a run never cut.
    calls = run(monkeypatch, folders, out, "--overwrite")
    assert calls == [2] * 4 * PASSES_PER_SCENE
    assert os.stat(out / "a.geojson").st_ino != kept["a.geojson"][0]
    assert json.loads((out / "results.json").read_text()) == results


def test_two_shards_cover_each_scene_once_and_the_last_writes_the_summary(folders, tmp_path, monkeypatch, capsys):
    out = tmp_path / "sharded"
    monkeypatch.setenv("RANK", "0")  # as torchrun --nproc_per_node 2 sets them for the first process
    monkeypatch.setenv("WORLD_SIZE", "2")
    calls0 = run(monkeypatch, folders, out)
    assert outputs(out) == ["a.geojson", "a.png", "a_2.geojson", "a_2.png"]  # scenes 0 and 2
    assert "written by the last shard to finish" in capsys.readouterr().out
    first = {name: stamp(out / name) for name in outputs(out)}

    calls1 = run(monkeypatch, folders, out, "--shard", "1/2")  # the flag wins over the environment
    assert len(calls0) == len(calls1) == 2 * PASSES_PER_SCENE  # each shard ran its 2 scenes, no more
    assert {name: stamp(out / name) for name in first} == first
    assert outputs(out) == sorted(list(first) + ["b.geojson", "b.png", "c.geojson", "c.png",
                                                 "results.json", "summary.json"])
    sharded = json.loads((out / "results.json").read_text())
    assert sorted({r["image_id"] for r in sharded}) == [0, 1, 2, 3]

    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    single = tmp_path / "single"
    assert len(run(monkeypatch, folders, single)) == 4 * PASSES_PER_SCENE
    assert json.loads((single / "results.json").read_text()) == sharded
    assert json.loads((single / "summary.json").read_text()) == json.loads((out / "summary.json").read_text())


def test_an_unreadable_scene_is_marked_and_retried_by_the_next_run(tmp_path, monkeypatch):
    folder = tmp_path / "in"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.png"), scene(0))
    (folder / "b.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        run(monkeypatch, [str(folder)], out)
    assert "1 of 2 file(s) skipped as unreadable" in str(e.value.code)
    failure = json.loads((out / "b.failed.json").read_text())
    assert failure["image"] == str(folder / "b.png") and "Cannot decode image file" in failure["error"]
    summary = json.loads((out / "summary.json").read_text())
    assert [s["status"] for s in summary["per_scene"]] == ["done", "failed"]
    assert summary["per_scene"][1]["error"] == failure["error"]

    cv2.imwrite(str(folder / "b.png"), scene(1))  # the file repaired
    assert run(monkeypatch, [str(folder)], out) == [2] * PASSES_PER_SCENE  # b only
    assert outputs(out) == ["a.geojson", "a.png", "b.geojson", "b.png", "results.json", "summary.json"]
    assert json.loads((out / "summary.json").read_text())["done"] == 2


@pytest.mark.parametrize("argv,env,error", [
    (["--shard", "2/2"], {}, "argument --shard: must be I/N with 0 <= I < N, got '2/2'"),
    (["--shard", "1"], {}, "argument --shard: must be I/N with 0 <= I < N, got '1'"),
    (["--prefetch", "0"], {}, "argument --prefetch: must be >= 1, got 0"),
    ([], {"RANK": "2", "WORLD_SIZE": "2"}, "RANK must be in [0, WORLD_SIZE), got RANK=2, WORLD_SIZE=2"),
    ([], {"RANK": "0"}, "RANK and WORLD_SIZE must both be integers, got RANK='0', WORLD_SIZE=None")])
def test_bad_shards_are_refused_naming_the_flag_or_variable(tmp_path, monkeypatch, capsys, argv, env, error):
    predict = load_tool("predict")
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    image = tmp_path / "a.png"
    cv2.imwrite(str(image), scene(0))
    with pytest.raises(SystemExit) as e:
        predict.main(["--config-file", TINY, str(image), "--output", str(tmp_path / "out"), *argv])
    assert e.value.code == 2 and error in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_two_live_processes_share_the_scenes_and_agree_with_one(folders, tmp_path):
    """Two predict.py processes at the same time, as torchrun --nproc_per_node 2 starts them."""
    weights = tmp_path / "weights.pth"
    torch.manual_seed(0)
    torch.save({"model": sdconet.Predictor(TINY).model.state_dict()}, weights)
    flags = ["--config-file", TINY, "--weights", str(weights), *folders, "--tile", "64", "--overlap", "16",
             "--batch", "2", "--score-thresh", "0", "--device", "cpu"]
    out = tmp_path / "live"
    procs = [subprocess.Popen([sys.executable, str(REPO / "tools" / "predict.py"), *flags, "--output", str(out)],
                              env=dict(os.environ, RANK=str(rank), WORLD_SIZE="2", OMP_NUM_THREADS="1"),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(logs)
    assert all("scenes: 100%" in log and "| 2/2 [" in log for log in logs), logs  # 2 scenes each, no more
    assert outputs(out) == sorted(f"{n}.{ext}" for n in ("a", "b", "a_2", "c") for ext in ("geojson", "png")) \
        + ["results.json", "summary.json"]
    single = tmp_path / "single"
    load_tool("predict").main([*flags, "--output", str(single)])
    assert json.loads((out / "summary.json").read_text()) == json.loads((single / "summary.json").read_text())
    assert json.loads((out / "results.json").read_text()) == json.loads((single / "results.json").read_text())


def test_no_drawing_writes_geojson_only_and_removes_an_old_drawing(folders, tmp_path, monkeypatch):
    out = tmp_path / "out"
    run(monkeypatch, folders[:1], out)
    drawn = json.loads((out / "results.json").read_text())
    assert (out / "a.png").exists()
    run(monkeypatch, folders[:1], out, "--overwrite", "--no-drawing")
    assert outputs(out) == ["a.geojson", "b.geojson", "results.json", "summary.json"]
    assert json.loads((out / "results.json").read_text()) == drawn  # the same detections
