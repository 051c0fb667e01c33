"""Layers for channels-last maps: the 1x1 convolution as one matrix product, depthwise convolutions run the fastest
measured way, and a GroupNorm that stays exact.

PyTorch runs a 1x1 convolution with a batch under 16 on one CPU thread through its fallback
``_slow_conv2d`` (a third of the LSMS training step, docs/results/throughput.md). Over channels-last
pixels the same layer is one GEMM, ``(B*H*W, C_in) @ (C_in, C_out)``, forward and backward, in fp32 and in
bf16 (oneDNN/MKL). The network keeps its activations channels-last end to end (the encoder converts the
image once), so no layer copies them between memory formats.

PyTorch's channels-last GroupNorm kernel on the CPU computes each group's variance in one pass
(E[x^2] - E[x]^2): on a map whose mean is 40 times its spread it is off by 4e-3 where the contiguous kernel is
off by 2e-6. :class:`GroupNorm` subtracts each group's mean first, which GroupNorm ignores, so it gives the
same outputs and gradients, exact again.

oneDNN's depthwise kernels on channels-last CPU maps (docs/model.md, "The training step on CPUs", measured forward +
backward at LSMS tiny's shapes): a horizontal strip (1 x k) is 2-4x slower than the vertical one (k x 1) on the
same map, so :class:`Depthwise` runs it as a vertical strip over the transposed map (two copies, same result); a
5 x 5 kernel is 1.6-2x slower in bf16 than in fp32, so under CPU bf16 autocast it runs in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def pointwise(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.conv2d(x, weight, bias)`` for a (C_out, C_in, 1, 1) weight: (B, C_in, H, W) -> (B, C_out, H, W), the
    result in channels-last memory (no copy when ``x`` is channels-last)."""
    return F.linear(x.permute(0, 2, 3, 1), weight.flatten(1), bias).permute(0, 3, 1, 2)


class Pointwise(nn.Conv2d):
    """``nn.Conv2d(in_channels, out_channels, 1)`` computed by :func:`pointwise` (same parameters and state-dict
    keys as the convolution, so checkpoints and imported weights are unchanged)."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True):
        super().__init__(in_channels, out_channels, 1, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C_in, H, W) -> (B, C_out, H, W)."""
        return pointwise(x, self.weight, self.bias)


class Depthwise(nn.Conv2d):
    """``nn.Conv2d(channels, channels, kernel, padding=kernel // 2, groups=channels)`` (same parameters and
    state-dict keys) computed the fastest measured way on channels-last CPU maps:

    - a horizontal strip (1 x k) as the vertical strip (k x 1) over the transposed map, when k is at most the
      map's width (with a kernel wider than the map the vertical kernel is the slower one);
    - a square kernel larger than 3 x 3 in fp32 under bf16 autocast (the output is bf16 as autocast's would be).

    Elsewhere (other devices, contiguous maps, and while tracing for export) it is the plain convolution.
    """

    def __init__(self, channels: int, kernel: int | tuple[int, int]):
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        super().__init__(channels, channels, (kh, kw), padding=(kh // 2, kw // 2), groups=channels)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        kh, kw = self.kernel_size
        if (x.device.type != "cpu" or not x.is_contiguous(memory_format=torch.channels_last)
                or torch.jit.is_tracing() or torch.compiler.is_compiling()):
            return super().forward(x)
        if kh == 1 and 1 < kw <= x.shape[-1]:
            x = x.transpose(2, 3).contiguous(memory_format=torch.channels_last)
            y = F.conv2d(x, self.weight.transpose(2, 3), self.bias, padding=(kw // 2, 0), groups=self.groups)
            return y.transpose(2, 3).contiguous(memory_format=torch.channels_last)
        if kh == kw > 3 and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16:
            with torch.autocast("cpu", enabled=False):
                return super().forward(x.float()).to(torch.bfloat16)
        return super().forward(x)


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (same parameters and state-dict keys) made exact on channels-last maps: each group's mean
    is subtracted first (without gradient: GroupNorm's output does not change under a per-group constant, so
    neither do its gradients), so the one-pass variance of PyTorch's channels-last kernel loses nothing."""

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        B, C = x.shape[:2]
        if self.num_groups == C and x.is_contiguous(memory_format=torch.channels_last):
            # one group per channel (an InstanceNorm) is 3-4x slower in bf16 with the channels-last kernel than
            # with the contiguous one plus two copies (docs/model.md, "The training step on CPUs"); that kernel is
            # exact as well
            y = F.group_norm(x.contiguous(), self.num_groups, self.weight, self.bias, self.eps)
            return y.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            mean = x.mean((2, 3)).view(B, self.num_groups, C // self.num_groups).mean(-1, keepdim=True)
            mean = mean.expand(B, self.num_groups, C // self.num_groups).reshape(B, C, 1, 1)
        return F.group_norm(x - mean, self.num_groups, self.weight, self.bias, self.eps)


def channels_last(x: Tensor) -> Tensor:
    """``x`` (B, C, H, W) with channels-last strides. ``x.contiguous(memory_format=torch.channels_last)`` keeps
    the strides of a one-channel map (it already counts as channels-last), and a convolution reads those strides
    as NCHW: a greyscale image (CT) would then run the stem and every depthwise convolution in NCHW, up to 1.33x
    slower per LSMS tiny training step (docs/results/throughput-one-channel.md). A one-channel map is copied into
    channels-last strides."""
    if x.shape[1] == 1 and x.stride(1) != 1:
        return x.clone(memory_format=torch.channels_last)
    return x.contiguous(memory_format=torch.channels_last)


def per_pixel_rows(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, H*W, C): the pixels as rows (a view when ``x`` is channels-last)."""
    return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1])


def from_pixel_rows(rows: Tensor, height: int, width: int) -> Tensor:
    """(B, H*W, C) -> (B, C, H, W) in channels-last memory (a view of contiguous rows)."""
    return rows.view(rows.shape[0], height, width, rows.shape[2]).permute(0, 3, 1, 2)


__all__ = ["Depthwise", "GroupNorm", "Pointwise", "channels_last", "from_pixel_rows", "per_pixel_rows", "pointwise"]
