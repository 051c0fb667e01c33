"""The LSMS network: configs and presets, encoder, decoder, and the top model with its builder."""

from lsms.model.config import PRESETS, LSMSConfig, preset_config
from lsms.model.lsms import LSMS, LSMSOutput, build_model, build_model_from_config, count_parameters

__all__ = [
    "LSMS", "LSMSConfig", "LSMSOutput", "PRESETS", "build_model", "build_model_from_config",
    "count_parameters", "preset_config",
]
