"""The models the measuring tools build: a config's detector with random weights (cost does not
depend on the weights), and the same detector without token selection for the ablation."""
from typing import Dict, List, Sequence

from detectron2.modeling import build_model
from torch import nn

from ..config import get_sdconet_cfg

PRETRAINED_KEY = "MODEL.SDCONET.SWIN.PRETRAINED"


def random_weights_opts(opts: Sequence = ()) -> List:
    """``opts`` plus ``MODEL.SDCONET.SWIN.PRETRAINED none`` unless they set that key themselves.

    Timings, FLOPs and parameter counts do not depend on the weights, so the measuring tools need
    no ImageNet file; without it a named Swin refuses to build."""
    opts = list(opts or [])
    return opts if PRETRAINED_KEY in opts[0::2] else opts + [PRETRAINED_KEY, "none"]


def build_benchmark_model(config_file: str, opts: Sequence = (), device: str = "cpu") -> nn.Module:
    """The detectron2 model of a config on ``device``, in eval mode, with random weights."""
    return build_model(get_sdconet_cfg(config_file, [*random_weights_opts(opts), "MODEL.DEVICE", device])).eval()


def no_selection_opts(config_file: str, opts: Sequence = ()) -> List[str]:
    """``opts`` plus the overrides that switch token selection off: every level and layer keeps all
    tokens (as released)."""
    saliency = get_sdconet_cfg(config_file, opts).MODEL.SDCONET.SALIENCY
    return list(opts or []) + ["MODEL.SDCONET.SALIENCY.LEVEL_RATIOS", str((1.0,) * len(saliency.LEVEL_RATIOS)),
                               "MODEL.SDCONET.SALIENCY.LAYER_RATIOS", str((1.0,) * len(saliency.LAYER_RATIOS))]


def selection_variants(config_file: str, opts: Sequence = (), device: str = "cpu") -> Dict[str, nn.Module]:
    """The config's model (``selected``) and the same with all selection ratios 1.0 (``all_tokens``)."""
    variants = {"selected": list(opts or []), "all_tokens": no_selection_opts(config_file, opts)}
    models = {name: build_benchmark_model(config_file, o, device) for name, o in variants.items()}
    if models["selected"].transformer.saliency is None:
        raise ValueError(f"{config_file}: the token-selection ablation needs MODEL.SDCONET.SALIENCY.ENABLED True")
    return models


def run_description(model: nn.Module, config_file: str, opts: Sequence, device: str,
                    height: int, width: int) -> Dict:
    """What a single-config report starts with: the config, the device and the input sizes (the
    model degrades the HR image by ``input_scale`` itself)."""
    scale = model.input_scale
    return {"config_file": config_file, "opts": list(opts or []), "device": device,
            "input_size_hr": [height, width], "degrade_scale": scale,
            "input_size_model": [-(-height // scale), -(-width // scale)]}
