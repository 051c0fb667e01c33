"""Typed configuration of the LSMS network and its named presets (spec sections 3 and 4)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from lsms.settings import DictRoundTrip
from lsms.text import DEFAULT_MAX_TOKENS, DEFAULT_TEXT_ENCODER


@dataclass
class LSMSConfig(DictRoundTrip):
    """Every architectural choice of LSMS, including each ablation of the paper's Table III.

    Sizes follow the SegNeXt MSCAN family (spec 3: the paper's Table I is not recoverable).
    """

    settings_name: ClassVar[str] = "LSMS config fields"

    preset: str = "tiny"
    in_channels: int = 3  # 1 for CT, 3 for RGB
    # Encoder (spec 2.2-2.4)
    widths: tuple[int, ...] = (32, 64, 160, 256)  # C1..C4
    depths: tuple[int, ...] = (3, 3, 5, 2)  # N1..N4
    mlp_ratios: tuple[int, ...] = (8, 8, 4, 4)
    drop_path: float = 0.0  # stochastic depth, linearly increasing over blocks
    conv_kernels: tuple[int, ...] = (7, 11, 21)  # ConvUnit sizes d_j; Table III(a)/(b)
    pixel_map: bool = True  # PM: Att_L = w_f(Att_L') * V_2; Table III(b)
    # [deviation, off by default] (x, y) of every pixel in the whole image, projected (1x1 conv) and added to
    # each stage's input, so that words naming image regions ("upper-left region") can be matched to pixels
    coord_embed: bool = False
    # Text (spec 2.1)
    use_text: bool = True  # False: classical segmentation, no language branch, no contrastive loss
    text_encoder: str = DEFAULT_TEXT_ENCODER  # tokenizer (and weights) source: package default, folder or hub id
    text_config: dict[str, Any] | None = None  # HuggingFace config of the encoder; filled in at build
    pretrained_text: bool = True  # load text weights from `text_encoder`; False: random init from text_config
    freeze_text: bool = False
    max_tokens: int = DEFAULT_MAX_TOKENS
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

    def __post_init__(self) -> None:
        for name in ("widths", "depths", "mlp_ratios", "conv_kernels", "decoder_stages"):
            setattr(self, name, tuple(getattr(self, name)))
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
        if self.ham_channels % 32 or self.head_channels % 32:
            raise ValueError(
                f"ham_channels and head_channels must be multiples of 32 (GroupNorm with 32 groups), "
                f"got {self.ham_channels} and {self.head_channels}"
            )
        if self.nmf_rank < 1 or self.nmf_steps_train < 1 or self.nmf_steps_eval < 1:
            raise ValueError("nmf_rank, nmf_steps_train and nmf_steps_eval must be >= 1")
        if self.output_stride not in (2, 4):
            raise ValueError(f"output_stride must be 4 (the paper's FSD) or 2 (refined at 1/2), got {self.output_stride}")
        if not 0.0 <= self.drop_path < 1.0 or not 0.0 <= self.head_dropout < 1.0:
            raise ValueError("drop_path and head_dropout must lie in [0, 1)")



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


PRESETS = {"tiny": tiny, "small": small, "base": base}


def preset_config(preset: str, **overrides: Any) -> LSMSConfig:
    """The named preset with ``overrides`` applied; unknown names raise a ValueError listing the valid ones."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    known = {f.name for f in dataclasses.fields(LSMSConfig)} - {"preset"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown model settings {unknown}; valid settings: {sorted(known)}")
    return dataclasses.replace(PRESETS[preset](), **overrides)


__all__ = ["LSMSConfig", "PRESETS", "preset_config"]
