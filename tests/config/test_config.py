"""Config: every key commented, the checks table, impossible values and unknown keys named, every config builds."""
import glob
import logging
import os

import pytest
import torch
from common import REPO, SDCONET_TINY, TINY, load_cfg, make_cfg, sample
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from sdconet import add_sdconet_config, get_sdconet_cfg


# ------------------------------------------------------------------ config
def test_every_config_key_is_commented():
    import inspect

    from sdconet import config

    lines = inspect.getsource(config.add_sdconet_config).splitlines()
    missing = []
    for i, line in enumerate(lines):
        s = line.strip()
        if s.startswith("_C.") and "=" in s and "CN()" not in s:
            j = i - 1
            while j >= 0 and lines[j].strip().startswith("_C.") and "CN()" not in lines[j]:
                j -= 1  # consecutive keys may share one comment
            if not lines[j].strip().startswith("#") and "#" not in s:
                missing.append(s)
    assert not missing, f"keys without a comment: {missing}"


def test_impossible_config_names_key():
    from sdconet import check_sdconet_config

    cfg = make_cfg()
    cfg.MODEL.SDCONET.DEGRADE.SCALE = 3
    with pytest.raises(ValueError, match=r"MODEL\.SDCONET\.DEGRADE\.SCALE"):
        check_sdconet_config(cfg)
    cfg = make_cfg()
    cfg.INPUT.SDCONET.HFLIP_PROB = 1.5
    with pytest.raises(ValueError, match=r"INPUT\.SDCONET\.HFLIP_PROB"):
        check_sdconet_config(cfg)
    check_sdconet_config(make_cfg())  # defaults are valid


@pytest.mark.parametrize("key, value, why", [
    ("LEVEL_RATIOS", (0.4, 0.8, 1.0, 1.5), r"\(0, 1\]"),
    ("LEVEL_RATIOS", (0.0, 0.8, 1.0, 1.0), r"\(0, 1\]"),
    ("LEVEL_RATIOS", (0.4, 0.8, 1.0), "needs 4 values"),
    ("LAYER_RATIOS", (1.0, 0.8), "needs 6 values"),
])
def test_impossible_selection_ratios_are_refused(key, value, why):
    from sdconet import check_sdconet_config

    cfg = make_cfg()
    cfg.MODEL.SDCONET.SALIENCY.ENABLED = True
    cfg.MODEL.SDCONET.SALIENCY.get(key)  # the key exists
    setattr(cfg.MODEL.SDCONET.SALIENCY, key, value)
    with pytest.raises(ValueError, match=rf"MODEL\.SDCONET\.SALIENCY\.{key}.*{why}"):
        check_sdconet_config(cfg)


def test_sr_branch_needs_its_skip_features():
    from sdconet import check_sdconet_config

    cfg = make_cfg()
    cfg.MODEL.SDCONET.SR.ENABLED = True
    cfg.MODEL.SDCONET.SWIN.OUT_FEATURES = ("res4", "res5")
    cfg.MODEL.SDCONET.NECK.NUM_EXTRA_LEVELS = 2
    with pytest.raises(ValueError, match=r"MODEL\.SDCONET\.SWIN\.OUT_FEATURES.*res3"):
        check_sdconet_config(cfg)




def test_check_table_names_real_keys_whose_defaults_pass():
    from sdconet.config_checks import RULES, value_of

    cfg = make_cfg()
    refused = [key for key, rule in RULES.items() if not rule.ok(value_of(cfg, key))]  # a misspelt key: AttributeError
    assert not refused, f"the check table refuses the defaults of {refused}"


def test_get_sdconet_cfg_merges_file_and_opts_checks_and_freezes():
    cfg = get_sdconet_cfg(SDCONET_TINY, ["SOLVER.MAX_ITER", 7])
    assert cfg.is_frozen() and cfg.SOLVER.MAX_ITER == 7 and cfg.TEST.SDCONET.SR_QUALITY  # the file's keys, then opts
    copy = get_sdconet_cfg(cfg, ["SOLVER.MAX_ITER", 9], freeze=False)
    assert not copy.is_frozen() and copy.SOLVER.MAX_ITER == 9 and cfg.SOLVER.MAX_ITER == 7  # a copy, not the given one
    with pytest.raises(ValueError, match=r"Invalid config: SOLVER\.MAX_ITER=0: must be >= 1"):
        get_sdconet_cfg(SDCONET_TINY, ["SOLVER.MAX_ITER", 0])


def test_lr_input_opts_evaluate_real_low_resolution_images():
    from sdconet import lr_input_opts

    # Undegraded test images alone contradict the file's SR_QUALITY: there is no HR reference.
    with pytest.raises(ValueError, match=r"TEST\.SDCONET\.SR_QUALITY=True: needs the HR image as reference"):
        get_sdconet_cfg(SDCONET_TINY, ["MODEL.SDCONET.DEGRADE.TEST", False])
    cfg = get_sdconet_cfg(SDCONET_TINY, lr_input_opts())
    assert (cfg.MODEL.SDCONET.DEGRADE.TEST, cfg.TEST.SDCONET.SR_QUALITY) == (False, False)


def test_cpu_fallback_only_when_asked_and_cuda_is_missing(caplog):
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    with caplog.at_level(logging.WARNING, logger="sdconet"):
        cfg = get_sdconet_cfg(None, ["MODEL.DEVICE", "cuda"], cpu_fallback=True)
    assert cfg.MODEL.DEVICE == expected
    assert ("CUDA is not available: running on CPU" in caplog.text) == (expected == "cpu")
    assert get_sdconet_cfg(None, ["MODEL.DEVICE", "cuda"]).MODEL.DEVICE == "cuda"


# =============================================================================== configs
# impossible values, named by check_sdconet_config:
#   MODEL.SDCONET.DEGRADE.SCALE 3, INPUT.SDCONET.HFLIP_PROB 1.5 -> test_impossible_config_names_key (above)
#   MODEL.SDCONET.SALIENCY.LEVEL_RATIOS / LAYER_RATIOS outside (0, 1] or of the wrong length
#       -> test_impossible_selection_ratios_are_refused (above)
#   MODEL.SDCONET.SWIN.OUT_FEATURES without res3 for SR -> test_sr_branch_needs_its_skip_features (above)
#   SOLVER.IMS_PER_BATCH not a multiple of the processes -> test_distributed.py::test_total_batch_must_split_evenly_over_processes


def test_unknown_key_in_config_file_is_named(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text(f'_BASE_: "{TINY}"\nMODEL:\n  SDCONET:\n    SALIENCY:\n      LEVEL_RATIO: (0.5, 1.0, 1.0, 1.0)\n')
    cfg = get_cfg()
    add_sdconet_config(cfg)
    with pytest.raises(KeyError, match=r"MODEL\.SDCONET\.SALIENCY\.LEVEL_RATIO"):
        cfg.merge_from_file(str(path))


def test_unknown_key_on_command_line_is_named():
    with pytest.raises(AssertionError, match=r"Non-existent key: SOLVER\.BASE_LRR"):  # yacs' merge_from_list
        load_cfg(TINY, ["SOLVER.BASE_LRR", 0.1])


@pytest.mark.parametrize("key, value", [
    ("MODEL.SDCONET.TRANSFORMER.NUM_HEADS", 5),  # must divide the 64 channels of the tiny neck
    ("SOLVER.AMP.DTYPE", "float8"),
    ("TEST.SDCONET.AMP.DTYPE", "float8"),
    ("SOLVER.EMA.DECAY", 1.0),
    ("SOLVER.GRADIENT_ROUTING.MODE", "average"),
])
def test_impossible_value_is_named(key, value):
    with pytest.raises(ValueError, match="Invalid config: " + key.replace(".", r"\.")):
        load_cfg(TINY, [key, value])


def test_fp16_inference_on_cpu_is_refused_with_its_key():
    with pytest.raises(ValueError, match=r"TEST\.SDCONET\.AMP\.DTYPE='float16': float16 needs CUDA"):
        load_cfg(TINY, ["TEST.SDCONET.AMP.ENABLED", True, "TEST.SDCONET.AMP.DTYPE", "float16", "MODEL.DEVICE", "cpu"])
# configs/compare/ holds tools/compare.py specs, not configs (tests/tools/test_compare.py checks them).
ALL_CONFIGS = sorted(p for p in glob.glob(os.path.join(REPO, "configs/**/*.yaml"), recursive=True)
                     if os.sep + "compare" + os.sep not in os.path.relpath(p, REPO))


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: os.path.relpath(p, REPO))
def test_every_config_parses_and_builds(path):
    # The Swin-T configs read ImageNet weights from $SDCONET_WEIGHTS: random ones here, on purpose. The
    # tiny "custom" Swins build as they are (tests/modeling/test_pretrained_weights.py covers the rest).
    cfg = load_cfg(path, [] if "quick_schedules" in path else ["MODEL.SDCONET.SWIN.PRETRAINED", "none"])
    model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) > 0
    if "quick_schedules" in path:
        model.eval()
        with torch.no_grad():
            out = model([sample(64, 96, [], [])])
        assert len(out) == 1 and len(out[0]["instances"]) > 0
