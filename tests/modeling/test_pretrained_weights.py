"""ImageNet Swin weights: both checkpoint layouts load, forgetting them is an error, "none" and path expansion.

The checkpoints are a timm Swin-T with random weights (nothing is downloaded), saved in the official
release's layout and in timm's.
"""
import logging
import re

import pytest
import timm
import torch
from common import REPO, load_cfg, make_cfg, sample
from detectron2.modeling import build_backbone, build_model
from sdconet.utils.models import build_benchmark_model, random_weights_opts
from timm.models.swin_transformer import checkpoint_filter_fn

SWIN_T = "swin_tiny_patch4_window7_224"
FILE = f"{SWIN_T}.pth"
PAPER = str(REPO / "configs" / "SDCoNet" / "sdconet_swin-t_nwpu.yaml")
LOGGER = "sdconet.modeling.backbone"
CLASSIFIER = ("head.", "norm.")  # the ImageNet classifier, which the detection backbone does not have


def to_official(timm_state):
    """timm key names -> the official release's: the patch merging that timm runs at the start of
    stage N sits at the end of stage N-1 there, and the classifier is ``head`` instead of ``head.fc``."""
    official = {}
    for key, value in timm_state.items():
        key = re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m[1]) - 1}.downsample.", key)
        official[re.sub(r"^head\.fc\.", "head.", key)] = value
    return official


@pytest.fixture(scope="module")
def swin_t():
    torch.manual_seed(0)
    return timm.create_model(SWIN_T, pretrained=False)


@pytest.fixture(scope="module")
def weights(swin_t, tmp_path_factory):
    """{"official": folder, "timm": folder, "state": timm state dict}; each folder holds FILE in its layout."""
    state = swin_t.state_dict()
    official = to_official(state)
    # The release also stores these buffers (timm's are not persistent); the converter drops them.
    official.update({k: b for k, b in swin_t.named_buffers() if k.endswith(("relative_position_index", "attn_mask"))})
    folders = {"official": tmp_path_factory.mktemp("official"), "timm": tmp_path_factory.mktemp("timm")}
    torch.save({"model": official}, folders["official"] / FILE)
    torch.save(state, folders["timm"] / FILE)
    return {**folders, "state": state}


def swin_cfg(pretrained, *opts):
    """The paper config with ``pretrained`` as MODEL.SDCONET.SWIN.PRETRAINED."""
    return load_cfg(PAPER, ["MODEL.SDCONET.SWIN.PRETRAINED", pretrained, *opts])


def assert_holds(backbone, state):
    """Every Swin tensor of ``state`` is in ``backbone`` unchanged; only the new res norms are not in it."""
    loaded = backbone.state_dict()
    swin = {k: v for k, v in state.items() if not k.startswith(CLASSIFIER)}
    for key, value in swin.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0, msg=key)
    assert sorted(set(loaded) - set(swin)) == [f"norm{i}.{p}" for i in (1, 2, 3) for p in ("bias", "weight")]


def test_official_layout_helper_inverts_timms_conversion(swin_t, weights):
    official = torch.load(weights["official"] / FILE)["model"]
    assert "layers.0.downsample.reduction.weight" in official and "head.weight" in official
    assert "layers.3.downsample.reduction.weight" not in official and "head.fc.weight" not in official
    converted = checkpoint_filter_fn(official, swin_t)
    assert converted.keys() == weights["state"].keys()
    for key, value in weights["state"].items():
        assert torch.equal(converted[key], value), key


@pytest.mark.parametrize("layout", ["official", "timm"])
def test_both_layouts_load_every_swin_tensor(weights, layout, caplog):
    with caplog.at_level(logging.INFO, logger=LOGGER):
        backbone = build_backbone(swin_cfg(str(weights[layout] / FILE)))
    assert_holds(backbone, weights["state"])
    loaded = sum(not k.startswith(CLASSIFIER) for k in weights["state"])
    assert f"loaded {loaded} of {loaded + 6} backbone tensors; missing 6 (6 of them the new res" in caplog.text
    assert "skipped 4 unexpected (4 of them the classifier's head / norm) and 0 of another shape" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # nothing unexpected


def test_another_window_size_resizes_the_relative_position_tables(weights, caplog):
    """A window-8 Swin-T gets 15x15 tables from the window-7 file: interpolated by timm, not dropped."""
    with caplog.at_level(logging.INFO, logger=LOGGER):  # custom = the default widths, those of Swin-T
        backbone = build_backbone(swin_cfg(str(weights["timm"] / FILE), "MODEL.SDCONET.SWIN.NAME", "custom",
                                           "MODEL.SDCONET.SWIN.WINDOW_SIZE", 8))
    table = "layers.0.blocks.0.attn.relative_position_bias_table"
    assert backbone.state_dict()[table].shape == (15 * 15, 3)
    assert weights["state"][table].shape == (13 * 13, 3)
    assert "0 of another shape" in caplog.text and "12 resized by timm's checkpoint_filter_fn" in caplog.text
    torch.testing.assert_close(backbone.state_dict()["layers.2.blocks.5.mlp.fc1.weight"],
                               weights["state"]["layers.2.blocks.5.mlp.fc1.weight"], rtol=0, atol=0)


def test_paper_config_without_the_file_fails_at_build_and_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("SDCONET_WEIGHTS", str(tmp_path))
    with pytest.raises(FileNotFoundError) as error:
        build_model(load_cfg(PAPER))
    message = str(error.value)
    assert f"there is no file '{tmp_path / FILE}' (PRETRAINED='${{SDCONET_WEIGHTS}}/{FILE}')" in message
    assert f"official {FILE} from the Swin Transformer GitHub release" in message
    assert f"torch.save(timm.create_model('{SWIN_T}', pretrained=True).state_dict(), '{FILE}')" in message
    assert f"export SDCONET_WEIGHTS=<that folder>` (the configs read $SDCONET_WEIGHTS/{FILE})" in message
    assert "To train from scratch on purpose: MODEL.SDCONET.SWIN.PRETRAINED none" in message

    monkeypatch.delenv("SDCONET_WEIGHTS")
    with pytest.raises(FileNotFoundError, match=re.escape(f"no file '${{SDCONET_WEIGHTS}}/{FILE}'; $SDCONET_WEIGHTS "
                                                          "is not set")):
        build_backbone(load_cfg(PAPER))


def test_empty_value_fails_for_a_named_swin_only(caplog):
    cfg = make_cfg()
    cfg.MODEL.BACKBONE.NAME = "build_timm_swin_backbone"
    assert cfg.MODEL.SDCONET.SWIN.PRETRAINED == "" and cfg.MODEL.SDCONET.SWIN.NAME == SWIN_T
    with pytest.raises(FileNotFoundError, match=f"no ImageNet weights for the Swin '{SWIN_T}': PRETRAINED is empty"):
        build_backbone(cfg)
    swin = cfg.MODEL.SDCONET.SWIN
    swin.NAME, swin.EMBED_DIM, swin.DEPTHS, swin.NUM_HEADS = "custom", 16, (1, 1, 1, 1), (1, 1, 1, 1)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        build_backbone(cfg)  # the tiny configs: random weights, nothing to say
    assert not [r for r in caplog.records if r.name == LOGGER]


def test_trained_model_weights_make_the_imagenet_file_unnecessary(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("SDCONET_WEIGHTS", str(tmp_path))
    with caplog.at_level(logging.INFO, logger=LOGGER):
        build_backbone(load_cfg(PAPER, ["MODEL.WEIGHTS", "output/model_final.pth"]))
    assert "MODEL.WEIGHTS output/model_final.pth provides the backbone" in caplog.text


@pytest.mark.parametrize("value", ["none", "NONE", "None"])  # yacs turns "None" into None
def test_none_trains_from_scratch_with_a_warning(tmp_path, monkeypatch, caplog, value):
    monkeypatch.setenv("SDCONET_WEIGHTS", str(tmp_path))  # no file there: "none" does not look
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        build_backbone(swin_cfg(value))
    [record] = [r for r in caplog.records if r.name == LOGGER]
    assert record.levelno == logging.WARNING
    assert f"the Swin '{SWIN_T}' starts from random weights (no ImageNet initialisation)" in record.getMessage()


@pytest.mark.parametrize("form", ["paper config", "$VAR", "~"])
def test_variables_and_home_are_expanded(weights, monkeypatch, form):
    if form == "paper config":  # ${SDCONET_WEIGHTS}/swin_tiny_patch4_window7_224.pth
        monkeypatch.setenv("SDCONET_WEIGHTS", str(weights["timm"]))
        cfg = load_cfg(PAPER)
    elif form == "$VAR":
        monkeypatch.setenv("MY_SWIN_FOLDER", str(weights["timm"]))
        cfg = swin_cfg(f"$MY_SWIN_FOLDER/{FILE}")
    else:
        monkeypatch.setenv("HOME", str(weights["timm"].parent))
        cfg = swin_cfg(f"~/{weights['timm'].name}/{FILE}")
    assert_holds(build_backbone(cfg), weights["state"])


def test_measuring_tools_use_random_weights_unless_told_otherwise(monkeypatch):
    assert random_weights_opts(["SOLVER.AMP.ENABLED", "True"]) == [
        "SOLVER.AMP.ENABLED", "True", "MODEL.SDCONET.SWIN.PRETRAINED", "none"]
    given = ["MODEL.SDCONET.SWIN.PRETRAINED", "/w/swin.pth"]
    assert random_weights_opts(given) == given
    monkeypatch.delenv("SDCONET_WEIGHTS", raising=False)
    assert build_benchmark_model(PAPER).backbone.patch_embed.proj.weight.shape == (96, 3, 4, 4)


def test_paper_config_with_none_takes_a_training_step(tmp_path, monkeypatch, caplog):
    """`none` is a real way to train: the whole paper model builds, warns once and learns."""
    monkeypatch.setenv("SDCONET_WEIGHTS", str(tmp_path))  # empty: only "none" lets it build
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        model = build_model(load_cfg(PAPER, ["MODEL.SDCONET.SWIN.PRETRAINED", "none", "MODEL.DEVICE", "cpu"]))
    assert sum("starts from random weights" in r.getMessage() for r in caplog.records) == 1
    model.train()
    losses = model([sample(128, 128, [[10, 12, 40, 30], [60, 64, 90, 100]], [0, 3])])
    assert {"loss_class", "loss_sr", "loss_saliency"} <= losses.keys()
    sum(losses.values()).backward()
    grad = next(p.grad for n, p in model.backbone.named_parameters() if n.endswith("patch_embed.proj.weight"))
    assert grad is not None and grad.abs().sum() > 0  # the randomly initialised Swin learns
