"""The LSMS network and its baselines: configs and the registry of named models, parts, and the one builder."""

from lsms.model.baselines import TextUNet
from lsms.model.build import build, build_model
from lsms.model.config import (
    BASELINES,
    MODELS,
    PRESETS,
    LSMSConfig,
    ModelConfig,
    TextConfig,
    UNetConfig,
    activation_bytes,
    check_image_size,
    model_config,
    model_config_from_dict,
)
from lsms.model.lsms import LSMS, LSMSOutput, count_parameters

__all__ = [
    "BASELINES", "LSMS", "MODELS", "PRESETS", "LSMSConfig", "LSMSOutput", "ModelConfig", "TextConfig", "TextUNet",
    "UNetConfig", "activation_bytes", "build", "build_model", "check_image_size", "count_parameters", "model_config",
    "model_config_from_dict",
]
