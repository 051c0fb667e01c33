"""Typed configuration of the networks and the one registry of named models (spec sections 3 and 4).

Every architecture number is on this page (segment-anything's ``build_sam.py`` style): :data:`MODELS` maps a
name to a function returning its config; :func:`lsms.model.build` turns any config into the network. The
config is stored in every checkpoint and the network rebuilt from it (nanoGPT's ``GPTConfig``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from lsms.settings import DictRoundTrip
from lsms.text import DEFAULT_MAX_TOKENS, DEFAULT_TEXT_ENCODER, check_max_tokens

SIZE_MULTIPLE = 32  # the encoder's largest stride
MIN_IMAGE_SIZE = 64  # stage 4 (stride 32) must be at least 2x2: InstanceNorm needs more than one pixel


def check_image_size(height: int, width: int | None = None, what: str = "image size") -> None:
    """The one image-size check: sides must be multiples of 32 and at least 64 pixels (the message says the fix)."""
    sides = (height, height if width is None else width)
    if all(s % SIZE_MULTIPLE == 0 and s >= MIN_IMAGE_SIZE for s in sides):
        return
    fixed = [str(max(MIN_IMAGE_SIZE, round(s / SIZE_MULTIPLE) * SIZE_MULTIPLE)) for s in sides]
    if width is None:
        rule, got, fix = f"a multiple of {SIZE_MULTIPLE}", str(height), fixed[0]
    else:
        rule, got, fix = f"multiples of {SIZE_MULTIPLE}", f"{height}x{width}", "x".join(fixed)
    raise ValueError(f"{what} must be {rule} and at least {MIN_IMAGE_SIZE} pixels (stage 4, at stride 32, needs "
                     f"2x2 pixels), got {got}; use {fix}")


@dataclass(frozen=True)
class TextConfig(DictRoundTrip):
    """The text encoder of a model (spec 2.1); the same settings for LSMS and the FiLM U-Net."""

    settings_name: ClassVar[str] = "text config fields"

    encoder: str = DEFAULT_TEXT_ENCODER  # tokenizer (and weights) source: package default, folder or hub id
    hf_config: dict[str, Any] | None = None  # HuggingFace config of the encoder; the built model's config has it
    pretrained: bool = True  # load the weights from `encoder`; False: random init from hf_config
    freeze: bool = False
    max_tokens: int = DEFAULT_MAX_TOKENS
    normalize_segments: bool = False  # liver text: write every Couinaud segment spelling as "segment N"

    def __post_init__(self) -> None:
        check_max_tokens(self.max_tokens)


@dataclass(frozen=True)
class LSMSConfig(DictRoundTrip):
    """Every architectural choice of LSMS, including each ablation of the paper's Table III.

    Sizes follow the SegNeXt MSCAN family (spec 3: the paper's Table I is not recoverable).
    """

    settings_name: ClassVar[str] = "LSMS config fields"

    arch: Literal["lsms"] = "lsms"
    preset: str = "tiny"
    in_channels: int = 3  # 1 for CT, 3 for RGB
    # Encoder (spec 2.2-2.4)
    widths: tuple[int, ...] = (32, 64, 160, 256)  # C1..C4
    depths: tuple[int, ...] = (3, 3, 5, 2)  # N1..N4
    mlp_ratios: tuple[int, ...] = (8, 8, 4, 4)
    drop_path: float = 0.0  # stochastic depth, linearly increasing over blocks
    conv_kernels: tuple[int, ...] = (7, 11, 21)  # ConvUnit sizes d_j; Table III(a)/(b)
    pixel_map: bool = True  # PM: Att_L = w_f(Att_L') * V_2; Table III(b)
    # [deviation: the spec's BatchNorm is "batch", kept by the paper's recipe] Norm of the encoder blocks'
    # post-norms: "group" is GroupNorm with one group (per sample over C, H, W). With BatchNorm's running
    # statistics at evaluation, SVLA's gate (F_att = Conv1x1(...) * V) lets a sample whose activations leave the
    # training range grow quadratically block after block, up to inf/NaN (docs/model.md); per-sample statistics
    # cannot. Measured better on the demo and on Kvasir-SEG, so the default of every model
    block_norm: Literal["batch", "group"] = "group"
    # [deviation, off by default] (x, y) of every pixel in the whole image, projected (1x1 conv) and added to
    # each stage's input, so that words naming image regions ("upper-left region") can be matched to pixels
    coord_embed: bool = False
    # [decision] initial scale of w_f's InstanceNorm: 0 starts the language-guided branch closed (Att_L = 0, each
    # block the visual MSCAN block) and training opens it; 1 is PyTorch's default init (docs/model.md)
    language_gate_init: float = 0.0
    # Text (spec 2.1)
    use_text: bool = True  # False: classical segmentation, no language branch, no contrastive loss
    text: TextConfig = field(default_factory=TextConfig)
    # Decoder (spec 2.5)
    decoder: Literal["fsd", "last"] = "fsd"  # "last": w/o FSD, decode from F4 at 1/32; Table III(c)
    decoder_stages: tuple[int, ...] = (2, 3, 4)  # which P_i feed the FSD; Table III(d)/(e)
    hamburger: bool = True  # Table III(d): False = plain concat + 1x1 head
    stage_mlp: bool = False  # Table III(d): a 1x1 "MLP" per stage before concatenation
    ham_channels: int = 256  # C_ham
    head_channels: int = 256  # C_head
    nmf_rank: int = 16  # R
    nmf_steps_train: int = 6
    nmf_steps_eval: int = 7
    nmf_seed: int = 0  # seed of the NMF bases in eval, so eval is deterministic
    head_dropout: float = 0.1
    # [deviation, 4 = the paper's FSD] 2: a residual refinement at 1/2 resolution from the stem's first
    # convolution (small lesions); starts as the plain FSD output (its last conv is zero-initialised)
    output_stride: int = 4
    refine_channels: int = 32  # width of that refinement (output_stride 2)
    # [addition, off by default] a learned "is the described lesion in the image?" logit (ExistenceHead) on the
    # decoder features pooled under the predicted mask and the sentence; trained with LossConfig.existence_weight
    # on datasets with negative sentences (docs/model.md, "Not present")
    existence_head: bool = False
    existence_channels: int = 128  # hidden width of its MLP

    def __post_init__(self) -> None:
        for name in ("widths", "depths", "mlp_ratios", "conv_kernels", "decoder_stages"):
            object.__setattr__(self, name, tuple(getattr(self, name)))  # frozen: normalised once, here
        if self.in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {self.in_channels}")
        if not (len(self.widths) == len(self.depths) == len(self.mlp_ratios) == 4):
            raise ValueError(
                f"widths, depths and mlp_ratios need 4 entries (one per stage), got "
                f"{len(self.widths)}, {len(self.depths)}, {len(self.mlp_ratios)}"
            )
        if any(d < 1 for d in self.depths) or any(w < 1 for w in self.widths):
            raise ValueError(f"depths and widths must be positive, got {self.depths} and {self.widths}")
        if any(k < 1 or k % 2 == 0 for k in self.conv_kernels):
            raise ValueError(f"conv_kernels must be odd and positive (e.g. 7, 11, 21), got {self.conv_kernels}")
        if self.decoder not in ("fsd", "last"):
            raise ValueError(f"decoder must be 'fsd' or 'last' (w/o FSD), got {self.decoder!r}")
        if not self.decoder_stages or any(s not in (1, 2, 3, 4) for s in self.decoder_stages):
            raise ValueError(f"decoder_stages must be a non-empty subset of 1..4, got {self.decoder_stages}")
        if len(set(self.decoder_stages)) != len(self.decoder_stages):
            raise ValueError(f"decoder_stages has repeats: {self.decoder_stages}")
        if self.ham_channels < 32 or self.head_channels < 32 or self.ham_channels % 32 or self.head_channels % 32:
            raise ValueError(
                f"ham_channels and head_channels must be positive multiples of 32 (GroupNorm with 32 groups), "
                f"got {self.ham_channels} and {self.head_channels}"
            )
        if self.nmf_rank < 1 or self.nmf_steps_train < 1 or self.nmf_steps_eval < 1:
            raise ValueError("nmf_rank, nmf_steps_train and nmf_steps_eval must be >= 1")
        if self.block_norm not in ("batch", "group"):
            raise ValueError(f"block_norm must be 'batch' (BatchNorm) or 'group' (GroupNorm, one group), got {self.block_norm!r}")
        if self.output_stride not in (2, 4):
            raise ValueError(f"output_stride must be 4 (the paper's FSD) or 2 (refined at 1/2), got {self.output_stride}")
        if not 0.0 <= self.drop_path < 1.0 or not 0.0 <= self.head_dropout < 1.0:
            raise ValueError("drop_path and head_dropout must lie in [0, 1)")
        if self.existence_head and not self.use_text:
            raise ValueError("existence_head needs a sentence to judge (use_text=True); a model without text "
                             "cannot say whether a described lesion is present")
        if self.refine_channels < 32 or self.refine_channels % 32:
            raise ValueError(f"refine_channels must be a positive multiple of 32 (GroupNorm with 32 groups), "
                             f"got {self.refine_channels}")
        if self.existence_channels < 1:
            raise ValueError(f"existence_channels must be >= 1, got {self.existence_channels}")


@dataclass(frozen=True)
class UNetConfig(DictRoundTrip):
    """The baselines: a 2D BasicUNet (MONAI), and with ``use_text`` the same U-Net FiLM-conditioned on the sentence."""

    settings_name: ClassVar[str] = "U-Net config fields"

    arch: Literal["unet"] = "unet"
    preset: str = "unet"
    in_channels: int = 3
    features: tuple[int, ...] = (16, 16, 32, 64, 128, 16)  # BasicUNet's 6 widths, halved for CPU
    use_text: bool = False
    coord_embed: bool = False  # CoordConv: (x, y) of each pixel in the whole image as 2 extra input channels
    text: TextConfig = field(default_factory=TextConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "features", tuple(self.features))
        if len(self.features) != 6 or min(self.features) < 1:
            raise ValueError(f"features needs 6 positive widths (BasicUNet), got {self.features}")
        if self.in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {self.in_channels}")


ModelConfig = LSMSConfig | UNetConfig


# --------------------------------------------------------------------------- memory a size asks for

# Bytes per "unit" (one channel of one pixel of the input, summed over the feature maps a network keeps: see
# activation_units), measured as the growth of the peak resident memory of one step on the CPU in float32 at
# 128 x 128 and 256 x 256 (linear in the pixels): training (forward and backward) 34-37 B per unit for tiny,
# small and base, 14-18 for the U-Nets; inference 4-5 for the LSMS presets, 6 for the U-Nets. The constants round
# up, so the estimate is safe (up to twice the measured) rather than exact (docs/reliability.md).
TRAIN_BYTES_PER_UNIT = 40
INFERENCE_BYTES_PER_UNIT = 8


def activation_units(config: ModelConfig) -> float:
    """Channels per input pixel of the feature maps a network keeps: for LSMS each stage's blocks
    (``depth x width x (2 + mlp_ratio)``, the MLP's hidden maps included) over its stride squared (4, 8, 16, 32);
    for the U-Net three full-resolution maps of the first and last widths and two of each inner level."""
    if isinstance(config, UNetConfig):
        f = config.features
        return 3 * (f[0] + f[5]) + sum(2 * f[j] / 4**j for j in range(1, 5))
    return sum(n * c * (2 + r) / (4 * 2**i) ** 2
               for i, (n, c, r) in enumerate(zip(config.depths, config.widths, config.mlp_ratios, strict=True)))


def activation_bytes(config: ModelConfig, height: int, width: int, batch: int = 1, training: bool = False) -> int:
    """A rough but safe estimate of the memory of the network's activations for one step on ``batch`` images of
    ``height`` x ``width`` (training: forward and backward; else inference), in bytes. Weights, optimiser state
    and the text encoder are not included: they do not grow with the image size."""
    per_unit = TRAIN_BYTES_PER_UNIT if training else INFERENCE_BYTES_PER_UNIT
    return int(math.ceil(activation_units(config) * per_unit)) * int(height) * int(width) * int(batch)


# --------------------------------------------------------------------------- the registry


def tiny() -> LSMSConfig:
    return LSMSConfig(preset="tiny")


def small() -> LSMSConfig:
    return LSMSConfig(preset="small", widths=(64, 128, 320, 512), depths=(2, 2, 4, 2))


def base() -> LSMSConfig:
    """The paper stand-in (MSCAN-B sizes, the encoder of LSMS's predecessor SLViT)."""
    return LSMSConfig(
        preset="base", widths=(64, 128, 320, 512), depths=(3, 3, 12, 3),
        ham_channels=512, head_channels=512, nmf_rank=64, drop_path=0.1,
    )


def unet() -> UNetConfig:
    """MONAI's BasicUNet without text (classical segmentation)."""
    return UNetConfig(preset="unet", use_text=False)


def film_unet() -> UNetConfig:
    """The same U-Net with late fusion of the sentence by FiLM."""
    return UNetConfig(preset="film-unet", use_text=True)


MODELS: dict[str, Callable[[], ModelConfig]] = {
    "tiny": tiny, "small": small, "base": base, "unet": unet, "film-unet": film_unet,
}
PRESETS = ("tiny", "small", "base")  # the LSMS sizes among MODELS
BASELINES = ("unet", "film-unet")


def model_config(name: str = "tiny", **overrides: Any) -> ModelConfig:
    """The registered model ``name`` with ``overrides`` applied (any field of its config; ``text`` may be a
    partial dict merged over the default text settings). Unknown names and fields raise a ValueError listing
    the valid ones.

    Example: ``model_config("tiny", in_channels=1, conv_kernels=(11,), decoder="last")``.
    """
    if name not in MODELS:
        raise ValueError(f"unknown preset {name!r}; choose one of the registered models {list(MODELS)}")
    config = MODELS[name]()
    known = {f.name for f in dataclasses.fields(config)} - {"preset", "arch"}
    for fixed in ("arch", "preset"):  # present in saved configs; must agree with the name
        if fixed in overrides and overrides.pop(fixed) != getattr(config, fixed):
            raise ValueError(f"model {name!r} has {fixed} {getattr(config, fixed)!r}; "
                             f"choose the model by its name (one of {list(MODELS)})")
    if unknown := sorted(set(overrides) - known):
        raise ValueError(f"unknown model settings {unknown} for {name!r} (they do not apply to it); "
                         f"valid settings: {sorted(known)}")
    if name in BASELINES and overrides.get("use_text", config.use_text) != config.use_text:
        raise ValueError(f"{name} is fixed {'with' if config.use_text else 'without'} text; "
                         f"choose {'unet' if config.use_text else 'film-unet'} instead")
    text = overrides.get("text")
    if isinstance(text, dict):
        overrides["text"] = TextConfig.from_dict({**config.text.to_dict(), **text}, "model.text")
    return dataclasses.replace(config, **overrides)


def model_config_from_dict(data: dict[str, Any]) -> ModelConfig:
    """A model config from plain data: ``preset`` names the registered model, every other key overrides it
    (a full saved config overrides every field, so it comes back exactly; a short one from a YAML file takes
    the rest from the named model)."""
    if not isinstance(data, dict):
        raise ValueError(f"model settings must be a mapping (e.g. {{preset: tiny}}), got {data!r}")
    data = dict(data)
    return model_config(data.pop("preset", "tiny"), **data)


__all__ = [
    "BASELINES", "MIN_IMAGE_SIZE", "MODELS", "PRESETS", "SIZE_MULTIPLE", "LSMSConfig", "ModelConfig", "TextConfig",
    "UNetConfig", "activation_bytes", "check_image_size", "model_config", "model_config_from_dict",
]
