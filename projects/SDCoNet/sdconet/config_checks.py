"""Allowed values of the SDCoNet config keys: a table (key -> rule), then the few checks that
involve several keys. :func:`check_sdconet_config` raises ``ValueError`` naming the key, so the
modules that use a value need not check it again.
"""
from functools import reduce
from typing import Any, Callable, NamedTuple


class Rule(NamedTuple):
    """``ok(value)`` is True for an allowed value; ``why`` is the error text otherwise."""

    ok: Callable[[Any], bool]
    why: str


def one_of(*choices) -> Rule:
    names = [str(c) for c in choices]
    return Rule(lambda v: v in choices, f"must be {', '.join(names[:-1])} or {names[-1]}")


def at_least(low) -> Rule:
    return Rule(lambda v: v >= low, f"must be >= {low}")  # False for NaN too


def pair(ok: Callable[[float, float], bool], why: str) -> Rule:
    """A (low, high) range given as two numbers."""
    return Rule(lambda v: len(v) == 2 and ok(*v), why)


PROBABILITY = Rule(lambda v: 0.0 <= v <= 1.0, "is a probability and must lie in [0, 1]")
DTYPES = one_of("bfloat16", "float16")
NON_NEGATIVE_RANGE = pair(lambda lo, hi: 0 <= lo <= hi, "must be (low, high) with 0 <= low <= high")
JITTER = Rule(lambda v: 0.0 <= v <= 1.0, "is a largest relative change (factor in [1 - v, 1 + v]) and must lie "
              "in [0, 1] (0 = off)")

RULES = {
    "MODEL.SDCONET.NUM_CLASSES": at_least(1),
    "MODEL.SDCONET.DEGRADE.SCALE": Rule(lambda v: v in (1, 2, 4), "must be one of 1, 2, 4"),
    "MODEL.SDCONET.DEGRADE.MODE": one_of("bicubic", "bilinear", "area"),
    "MODEL.SDCONET.DEGRADE.BLUR_SIGMA": NON_NEGATIVE_RANGE,
    "MODEL.SDCONET.DEGRADE.NOISE_STD": NON_NEGATIVE_RANGE,
    "MODEL.SDCONET.NECK.NAME": one_of("FPN", "ChannelMapper"),
    "MODEL.SDCONET.TRANSFORMER.NUM_QUERIES": at_least(1),
    "MODEL.SDCONET.TRANSFORMER.DEFORM_IMPL": one_of("auto", "grid_sample", "embedding_bag", "gather"),
    "MODEL.SDCONET.DN.LABEL_NOISE": Rule(lambda v: 0.0 <= v <= 1.0, "must lie in [0, 1]"),
    "MODEL.SDCONET.SR.HEAD": one_of("residual", "x2_bilinear", "full"),
    "MODEL.SDCONET.SR.DEPTHS": Rule(lambda v: len(v) == 4 and min(v) >= 1, "needs 4 stages of >= 1 block"),
    "MODEL.SDCONET.SR.NUM_HEADS": Rule(lambda v: len(v) in (0, 4), "needs 4 values (or none to derive)"),
    "MODEL.SDCONET.SR.LOSS_WEIGHT": at_least(0),
    "MODEL.SDCONET.SR.RESIDUAL_FEATURES": at_least(1),
    "MODEL.SDCONET.SR.RESIDUAL_CONVS": at_least(0),
    "MODEL.SDCONET.SALIENCY.ALPHA": one_of("learnable", "fixed"),
    "MODEL.SDCONET.SALIENCY.TOPK_PRE_ATTENTION": at_least(1),
    "MODEL.SDCONET.SALIENCY.PRE_ATTENTION_SCORE": one_of("logit_product", "sigmoid"),
    "TEST.SDCONET.COCO_BACKEND": one_of("auto", "faster", "pycocotools"),
    "TEST.SDCONET.PROTOCOL": one_of("coco", "mmdet"),
    "TEST.SDCONET.AMP.DTYPE": DTYPES,
    "SOLVER.GRADIENT_ROUTING.MODE": one_of("sum", "project", "stop"),
    "SOLVER.GRADIENT_ROUTING.PROJECTION": one_of("per_tensor", "global"),
    "SOLVER.GRADIENT_ROUTING.START_ITER": at_least(0),
    "SOLVER.AMP.DTYPE": DTYPES,
    "SOLVER.EMA.DECAY": Rule(lambda v: 0.0 < v < 1.0, "must lie in (0, 1)"),
    "SOLVER.OPTIMIZER": one_of("ADAMW", "SGD"),
    "INPUT.SDCONET.HFLIP_PROB": PROBABILITY,
    "INPUT.SDCONET.VFLIP_PROB": PROBABILITY,
    "INPUT.SDCONET.SCALE_JITTER": pair(lambda lo, hi: 0 < lo <= hi, "must be (low, high) scale factors with "
                                       "0 < low <= high; (1.0, 1.0) = off"),
    "INPUT.SDCONET.BRIGHTNESS": JITTER,
    "INPUT.SDCONET.CONTRAST": JITTER,
    "INPUT.SDCONET.SATURATION": JITTER,
    "INPUT.SDCONET.HUE": Rule(lambda v: 0.0 <= v <= 0.5, "is a fraction of the hue circle and must lie in "
                              "[0, 0.5] (0 = off)"),
    "INPUT.SDCONET.BANDS": Rule(lambda v: len(v) in (0, 1, 3) and all(isinstance(b, int) and b >= 1 for b in v),
                                "needs 3 band numbers (R, G, B) or 1 (gray), each >= 1 (bands count from 1), "
                                "or () for the first three"),
    "INPUT.SDCONET.SCALING": one_of("percentile", "max"),
    "INPUT.SDCONET.PERCENTILES": pair(lambda lo, hi: 0.0 <= lo < hi <= 100.0,
                                      "must be (low, high) with 0 <= low < high <= 100"),
    "INPUT.SDCONET.MAX_VALUE": Rule(lambda v: v >= 0, "must be >= 0 (0 = the data type's maximum)"),
    "INPUT.SDCONET.MOSAIC_PROB": PROBABILITY,
    "INPUT.SDCONET.MOSAIC_OFF_LAST": Rule(lambda v: 0.0 <= v <= 1.0, "is a fraction of SOLVER.MAX_ITER and must "
                                          "lie in [0, 1] (0 = mosaics to the end)"),
    "SOLVER.BASE_LR": at_least(0),
    "SOLVER.MAX_ITER": at_least(1),
    "SOLVER.IMS_PER_BATCH": at_least(1),
    "SOLVER.CHECKPOINT_PERIOD": at_least(1),
    "SOLVER.TIME_BUDGET_SECONDS": Rule(lambda v: v >= 0, "must be >= 0 seconds (0 = no budget)"),
}


def fail(key: str, value, why: str):
    shown = tuple(value) if isinstance(value, (list, tuple)) else value
    raise ValueError(f"Invalid config: {key}={shown!r}: {why}")


def value_of(cfg, key: str):
    return reduce(getattr, key.split("."), cfg)


# ------------------------------------------------------------------ checks across keys
def check_attention_heads(cfg):
    heads, channels = cfg.MODEL.SDCONET.TRANSFORMER.NUM_HEADS, cfg.MODEL.SDCONET.NECK.OUT_CHANNELS
    if heads < 1 or channels % heads:
        fail("MODEL.SDCONET.TRANSFORMER.NUM_HEADS", heads, f"must divide MODEL.SDCONET.NECK.OUT_CHANNELS={channels}")


def check_token_selection(cfg):
    """With saliency on, one ratio per neck level / encoder layer and one range per neck level."""
    s = cfg.MODEL.SDCONET
    if not s.SALIENCY.ENABLED:
        return
    num_levels = len(s.SWIN.OUT_FEATURES) + s.NECK.NUM_EXTRA_LEVELS
    for key, expected, what in (("LEVEL_RATIOS", num_levels, "neck levels"),
                                ("LAYER_RATIOS", s.TRANSFORMER.ENC_LAYERS, "MODEL.SDCONET.TRANSFORMER.ENC_LAYERS")):
        ratios = tuple(s.SALIENCY.get(key))
        if len(ratios) != expected:
            fail(f"MODEL.SDCONET.SALIENCY.{key}", ratios, f"needs {expected} values ({what})")
        if any(not 0.0 < r <= 1.0 for r in ratios):
            fail(f"MODEL.SDCONET.SALIENCY.{key}", ratios, "every ratio must lie in (0, 1]")
    if len(s.SALIENCY.RANGES) != num_levels:
        fail("MODEL.SDCONET.SALIENCY.RANGES", s.SALIENCY.RANGES,
             f"needs one (lo, hi] range per neck level ({num_levels})")


def has_sr_branch(cfg) -> bool:
    return cfg.MODEL.SDCONET.SR.ENABLED or cfg.MODEL.META_ARCHITECTURE == "SerialSRDetector"


def check_sr_skips(cfg):
    features = cfg.MODEL.SDCONET.SWIN.OUT_FEATURES
    missing = [f for f in ("res3", "res4", "res5") if f not in features]
    if has_sr_branch(cfg) and missing:
        fail("MODEL.SDCONET.SWIN.OUT_FEATURES", features,
             f"the SR decoder needs skips from res3, res4 and res5 (missing {missing})")


def check_sr_quality(cfg):
    if not cfg.TEST.SDCONET.SR_QUALITY:
        return
    if not has_sr_branch(cfg):
        fail("TEST.SDCONET.SR_QUALITY", True, "needs an SR branch (MODEL.SDCONET.SR.ENABLED True)")
    if not cfg.MODEL.SDCONET.DEGRADE.TEST:
        fail("TEST.SDCONET.SR_QUALITY", True, "needs the HR image as reference, but MODEL.SDCONET.DEGRADE.TEST is "
             "False (test images are real low-resolution input)")


def check_test_amp_device(cfg):
    amp = cfg.TEST.SDCONET.AMP
    if amp.ENABLED and amp.DTYPE == "float16" and not cfg.MODEL.DEVICE.startswith("cuda"):
        fail("TEST.SDCONET.AMP.DTYPE", amp.DTYPE, f"float16 needs CUDA (MODEL.DEVICE is "
             f"{cfg.MODEL.DEVICE!r}); use bfloat16 on CPU")


CROSS_CHECKS = (check_attention_heads, check_token_selection, check_sr_skips, check_sr_quality, check_test_amp_device)


def check_sdconet_config(cfg):
    """Raise ``ValueError`` naming the key when a config value is impossible; return ``cfg``."""
    for key, rule in RULES.items():
        value = value_of(cfg, key)
        if not rule.ok(value):
            fail(key, value, rule.why)
    for check in CROSS_CHECKS:
        check(cfg)
    return cfg
