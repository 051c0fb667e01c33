"""The LSMS network: configs and presets, encoder, decoder, and the top model with its builder."""

import dataclasses

from lsms.model.config import PRESETS, LSMSConfig, preset_config
from lsms.model.lsms import LSMS, LSMSOutput, build_model, build_model_from_config, count_parameters

__all__ = [
    "LSMS", "LSMSConfig", "LSMSOutput", "PRESETS", "build_model", "build_model_from_config",
    "count_parameters", "preset_config",
]

from lsms.model.baselines import TextUNet, UNetConfig, build_unet  # noqa: E402

# architecture name (the ``arch`` field of a saved config; LSMS configs have none) -> (config class, builder)
ARCHITECTURES = {"lsms": (LSMSConfig, build_model_from_config), "unet": (UNetConfig, build_unet)}


def config_from_dict(data: dict) -> LSMSConfig | UNetConfig:
    """Rebuild a saved model config of any architecture (``arch`` names it; absent means LSMS)."""
    arch = data.get("arch", "lsms")
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r} in the saved config; known: {sorted(ARCHITECTURES)}")
    cls = ARCHITECTURES[arch][0]
    return cls.from_dict(data if arch != "lsms" else {k: v for k, v in data.items() if k != "arch"})


def build_from_config(config: LSMSConfig | UNetConfig):
    """Build the network a config describes (LSMS or a U-Net baseline)."""
    return ARCHITECTURES[getattr(config, "arch", "lsms")][1](config)


__all__ += ["ARCHITECTURES", "TextUNet", "UNetConfig", "build_from_config", "build_unet", "config_from_dict"]

BASELINES = {"unet": False, "film-unet": True}  # name -> use_text


def build_named_model(name: str, **overrides):
    """An LSMS preset (``tiny``, ``small``, ``base``) or a baseline (``unet``, ``film-unet``) with overrides."""
    if name in BASELINES:
        if overrides.pop("use_text", BASELINES[name]) != BASELINES[name]:
            raise ValueError(f"{name} is fixed {'with' if BASELINES[name] else 'without'} text; "
                             f"choose {'unet' if BASELINES[name] else 'film-unet'} instead")
        known = {f.name for f in dataclasses.fields(UNetConfig)} - {"arch", "preset", "use_text"}
        if unknown := sorted(set(overrides) - known):
            raise ValueError(f"settings {unknown} do not apply to the {name} baseline; valid: {sorted(known)}")
        return build_unet(UNetConfig(preset=name, use_text=BASELINES[name], **overrides))
    return build_model(name, **overrides)


MODEL_NAMES = (*PRESETS, *BASELINES)
__all__ += ["BASELINES", "MODEL_NAMES", "build_named_model"]
