"""Conv+BatchNorm folding for inference (eval-mode statistics into the convolution's weights)."""

from __future__ import annotations

from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from lsms.model.encoder import Downsample


def fuse_conv_bn(model: nn.Module) -> nn.Module:
    """Fold every BatchNorm that directly follows a Conv2d inside an ``nn.Sequential`` (the stem) or in a
    :class:`~lsms.model.encoder.Downsample` into the conv; in place, eval only.

    The encoder blocks' BatchNorms follow a residual sum (post-norm), so they stay.
    """
    if model.training:
        raise ValueError("fuse_conv_bn folds eval-mode statistics: call model.eval() first")
    for module in list(model.modules()):
        if isinstance(module, nn.Sequential):
            for i in range(len(module) - 1):
                if isinstance(module[i], nn.Conv2d) and isinstance(module[i + 1], nn.BatchNorm2d):
                    module[i] = fuse_conv_bn_eval(module[i], module[i + 1])
                    module[i + 1] = nn.Identity()
        if isinstance(module, Downsample) and isinstance(module.norm, nn.BatchNorm2d):
            module.conv = fuse_conv_bn_eval(module.conv, module.norm)
            module.norm = nn.Identity()
    return model


__all__ = ["fuse_conv_bn"]
