"""SDCoNet as a detectron2 project: importing this package registers its datasets and models."""
from .config import add_sdconet_config, check_sdconet_config, get_sdconet_cfg, lr_input_opts
from .data.datasets import register_sdconet_datasets
from .data.mapper import SDCoNetDatasetMapper
from .modeling import SDCoNet
from .inference import Predictor

register_sdconet_datasets()

__all__ = ["add_sdconet_config", "check_sdconet_config", "get_sdconet_cfg", "lr_input_opts", "register_sdconet_datasets", "SDCoNetDatasetMapper", "SDCoNet", "Predictor"]
