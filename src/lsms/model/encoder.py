"""Language-guided visual encoder (paper Sec. III-B, with the SVLA of Sec. III-C, Eq. 1-10; spec 2.2-2.4).

Four stages; each down-samples and runs N_i encoder blocks whose attention (SVLA) mixes
multi-scale strip convolutions with a language-guided branch over the token features L.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lsms.model.config import LSMSConfig
from lsms.model.layers import Depthwise, GroupNorm, Pointwise, channels_last, from_pixel_rows, per_pixel_rows


def coordinate_grid(batch: int, height: int, width: int, device: torch.device | None = None,
                    dtype: torch.dtype = torch.float32) -> Tensor:
    """(x, y) of every pixel centre of a whole image in [-1, 1] (``align_corners=False``) -> (B, 2, H, W)."""
    ys = (2 * torch.arange(height, device=device, dtype=dtype) + 1) / height - 1
    xs = (2 * torch.arange(width, device=device, dtype=dtype) + 1) / width - 1
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"))  # (2, H, W): x varies along W, y along H
    return grid[None].expand(batch, -1, -1, -1)


class Stem(nn.Module):
    """conv3x3 s2 + BN + GELU + conv3x3 s2 + BN: image -> V_1 at 1/4 resolution [decision, SegNeXt]."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        mid = out_channels // 2
        self.proj = nn.Sequential(
            nn.Conv2d(in_channels, mid, 3, stride=2, padding=1),
            nn.BatchNorm2d(mid),
            nn.GELU(),
            nn.Conv2d(mid, out_channels, 3, stride=2, padding=1),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        """(B, C_in, H, W) -> (B, C1, H/4, W/4)."""
        return self.proj(x)


class Downsample(nn.Module):
    """Down(.) of Eq. 1: conv3x3, stride 2, padding 1, then BatchNorm."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1)
        self.norm = nn.BatchNorm2d(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C_in, H, W) -> (B, C_out, H/2, W/2)."""
        return self.norm(self.conv(x))


class ConvUnit(nn.Module):
    """ConvUnit_j = conv(d x 1) o conv(1 x d), both depthwise (Eq. 4)."""

    def __init__(self, channels: int, kernel: int):
        super().__init__()
        self.conv_w = Depthwise(channels, (1, kernel))
        self.conv_h = Depthwise(channels, (kernel, 1))

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        return self.conv_h(self.conv_w(x))


class ConvNorm(nn.Sequential):
    """1x1 conv + InstanceNorm: the w_v1, w_v2 and w_f projections of Eq. 6-9.

    The InstanceNorm is ``GroupNorm(C, C)`` (one group per channel: the statistics, parameters and state-dict
    keys of ``InstanceNorm2d(C, affine=True)``), normalised by the contiguous kernel (:class:`layers.GroupNorm`).
    """

    def __init__(self, channels: int):
        super().__init__(Pointwise(channels, channels), GroupNorm(channels, channels))


class LanguageGuidedBranch(nn.Module):
    """Att_L of Eq. 6-9: pixels attend to tokens; the result gates V_2 (the pixel map, PM).

    The attention logits are scaled by sqrt(C_l), the text width, as printed in the paper (not sqrt(C)).
    Padding tokens get -inf before the softmax, so a sentence padded to any length gives the same output.
    """

    def __init__(self, channels: int, text_channels: int, pixel_map: bool = True, gate_init: float = 0.0):
        super().__init__()
        self.w_v1 = ConvNorm(channels)
        self.w_v2 = ConvNorm(channels) if pixel_map else None
        self.w_l1 = nn.Conv1d(text_channels, channels, 1)
        self.w_l2 = nn.Conv1d(text_channels, channels, 1)
        self.w_f = ConvNorm(channels)
        # [decision] the branch starts closed (gate_init = LSMSConfig.language_gate_init = 0): w_f's InstanceNorm
        # scale is 0, so Att_L = 0 at initialisation and each block starts as the purely visual MSCAN block;
        # training opens it. With PyTorch's default scale of 1, the product of two unit-variance (instance-
        # normalised) maps is added at full strength to every block of an untrained network, and training from
        # scratch is much slower (docs/model.md, "Initialisation").
        nn.init.constant_(self.w_f[1].weight, gate_init)
        self.scale = 1.0 / math.sqrt(text_channels)

    @property
    def gate(self) -> nn.Parameter:
        """The scale of w_f's InstanceNorm: how strongly Att_L reaches the block (``optim.gate_lr_scale``)."""
        return self.w_f[1].weight

    def forward(self, v_pre: Tensor, text: Tensor, text_mask: Tensor) -> Tensor:
        """v_pre (B, C, H, W), text (B, T, C_l), text_mask (B, T) 1 = real token -> Att_L (B, C, H, W)."""
        H, W = v_pre.shape[-2:]
        v1 = per_pixel_rows(self.w_v1(v_pre))  # (B, HW, C)
        lt = text.transpose(1, 2)  # (B, C_l, T)
        l1 = self.w_l1(lt)  # (B, C, T)
        l2 = self.w_l2(lt)  # (B, C, T)
        alpha = torch.bmm(v1, l1) * self.scale  # (B, HW, C) @ (B, C, T) -> (B, HW, T)
        alpha = alpha.masked_fill(~text_mask.bool()[:, None, :], float("-inf"))
        attn = alpha.softmax(dim=-1)  # over tokens
        att = torch.bmm(attn, l2.transpose(1, 2))  # (B, HW, T) @ (B, T, C) -> (B, HW, C)
        att = self.w_f(from_pixel_rows(att, H, W))
        return att * self.w_v2(v_pre) if self.w_v2 is not None else att


class SVLA(nn.Module):
    """Scale-aware Vision-Language Attention (Eq. 4-10).

    F_att = Conv1x1(V_pre + sum_j ConvUnit_j(V_pre) + Att_L) * V with V_pre = DWConv5x5(V).
    """

    def __init__(self, channels: int, text_channels: int | None, kernels: tuple[int, ...], pixel_map: bool,
                 gate_init: float = 0.0):
        super().__init__()
        self.conv5x5 = Depthwise(channels, 5)  # [decision] depthwise
        self.conv_units = nn.ModuleList(ConvUnit(channels, k) for k in kernels)
        self.language = LanguageGuidedBranch(channels, text_channels, pixel_map, gate_init) if text_channels else None
        self.mix = Pointwise(channels, channels)

    def forward(self, v: Tensor, text: Tensor | None = None, text_mask: Tensor | None = None) -> Tensor:
        """v (B, C, H, W), text (B, T, C_l) or None -> (B, C, H, W)."""
        v_pre = self.conv5x5(v)
        att = v_pre
        for unit in self.conv_units:
            att = att + unit(v_pre)
        if self.language is not None:
            att = att + self.language(v_pre, text, text_mask)
        return self.mix(att) * v


class FFN(nn.Module):
    """1x1 conv C->rC, 3x3 depthwise conv, GELU, 1x1 conv rC->C [decision, SegNeXt]."""

    def __init__(self, channels: int, ratio: int):
        super().__init__()
        hidden = channels * ratio
        self.fc1 = Pointwise(channels, hidden)
        self.dwconv = Depthwise(hidden, 3)
        self.act = nn.GELU()
        self.fc2 = Pointwise(hidden, channels)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        return self.fc2(self.act(self.dwconv(self.fc1(x))))


def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth: drop the residual branch per sample with probability p."""
    if p == 0.0 or not training:
        return x
    keep = torch.rand(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype) >= p
    return x * keep / (1.0 - p)


def block_norm(kind: str, channels: int) -> nn.Module:
    """The Norm of Eq. 2-3: BatchNorm (``batch``) or GroupNorm with one group (``group``, per sample)."""
    return nn.BatchNorm2d(channels) if kind == "batch" else GroupNorm(1, channels)


class EncoderBlock(nn.Module):
    """F' = Norm(SVLA(V, L) + V); F = Norm(FFN(F') + F') (Eq. 2-3, post-norm as printed; Norm = BatchNorm, or
    GroupNorm with ``block_norm="group"``)."""

    def __init__(self, channels: int, text_channels: int | None, cfg: LSMSConfig, mlp_ratio: int, drop: float):
        super().__init__()
        self.svla = SVLA(channels, text_channels, cfg.conv_kernels, cfg.pixel_map, cfg.language_gate_init)
        self.norm1 = block_norm(cfg.block_norm, channels)
        self.ffn = FFN(channels, mlp_ratio)
        self.norm2 = block_norm(cfg.block_norm, channels)
        self.drop = drop

    def forward(self, v: Tensor, text: Tensor | None, text_mask: Tensor | None) -> Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        x = self.norm1(drop_path(self.svla(v, text, text_mask), self.drop, self.training) + v)
        return self.norm2(drop_path(self.ffn(x), self.drop, self.training) + x)


class EncoderStage(nn.Module):
    """One LGVE stage: down-sampling (the stem for stage 1), then N_i encoder blocks.

    With ``coord_embed`` [deviation], a 1x1 projection of the pixel positions (x, y) is added after the
    down-sampling (zero-initialised: the stage starts as without it).
    """

    def __init__(self, down: nn.Module, blocks: list[EncoderBlock], position: Pointwise | None = None):
        super().__init__()
        self.down = down
        self.blocks = nn.ModuleList(blocks)
        self.position = position

    def forward(self, x: Tensor, text: Tensor | None, text_mask: Tensor | None, coords: Tensor | None = None) -> Tensor:
        """x (B, C_in, H, W), coords (B, 2, H, W) when the stage embeds positions -> (B, C_i, H/2 or H/4, ...)."""
        x = self.down(x)
        if self.position is not None:
            x = x + self.position(F.interpolate(coords, size=x.shape[-2:], mode="bilinear", align_corners=False))
        for block in self.blocks:
            x = block(x, text, text_mask)
        return x


class LanguageGuidedEncoder(nn.Module):
    """The four-stage encoder; returns [F1, F2, F3, F4] at strides 4, 8, 16, 32.

    Args:
        cfg: the model config (widths, depths, kernels, PM, drop path, input channels).
        text_channels: C_l of the text encoder, or None for the no-text model.
    """

    strides = (4, 8, 16, 32)

    def __init__(self, cfg: LSMSConfig, text_channels: int | None):
        super().__init__()
        self.channels = cfg.widths
        rates = torch.linspace(0, cfg.drop_path, sum(cfg.depths), device="cpu").tolist()  # numbers, not weights
        stages, start, prev = [], 0, cfg.in_channels
        for i, (width, depth, ratio) in enumerate(zip(cfg.widths, cfg.depths, cfg.mlp_ratios)):
            down = Stem(prev, width) if i == 0 else Downsample(prev, width)
            blocks = [EncoderBlock(width, text_channels, cfg, ratio, rates[start + j]) for j in range(depth)]
            position = Pointwise(2, width) if cfg.coord_embed else None
            if position is not None:
                nn.init.zeros_(position.weight)
                nn.init.zeros_(position.bias)
            stages.append(EncoderStage(down, blocks, position))
            start, prev = start + depth, width
        self.stages = nn.ModuleList(stages)

    def forward(self, image: Tensor, text: Tensor | None = None, text_mask: Tensor | None = None,
                coords: Tensor | None = None) -> list[Tensor]:
        """image (B, C_in, H, W), text (B, T, C_l), coords (B, 2, H, W) (used with ``coord_embed``; default: the
        whole-image grid) -> [F_i (B, C_i, H/s_i, W/s_i) for s_i in 4, 8, 16, 32]."""
        if coords is None and self.stages[0].position is not None:
            coords = coordinate_grid(image.shape[0], *image.shape[-2:], device=image.device, dtype=image.dtype)
        # channels-last from here on: every convolution's fast CPU path, no per-layer copies (lsms.model.layers)
        features, x = [], channels_last(image)
        for stage in self.stages:
            x = stage(x, text, text_mask, coords)
            features.append(x)
        return features

    def language_gates(self) -> list[float] | None:
        """How open the language-guided branch is, per stage: the mean |scale| of w_f's InstanceNorm over the
        stage's blocks (0 at the closed start, 1 PyTorch's default scale); None for the no-text model."""
        gates = [[block.svla.language.gate.detach().abs().mean().item() for block in stage.blocks
                  if block.svla.language is not None] for stage in self.stages]
        return [sum(g) / len(g) for g in gates] if all(gates) else None


__all__ = ["LanguageGuidedEncoder", "SVLA", "ConvUnit", "EncoderBlock", "coordinate_grid"]
