"""Baselines for the benchmarks: MONAI's BasicUNet without text, and the same U-Net with late fusion of the
sentence by FiLM (feature-wise linear modulation of each decoder stage), the classic text-conditioned design
that LSMS's early, pixel-level fusion is compared against.

Both speak the LSMS interface (``config``, ``tokenize``, ``forward_features`` -> :class:`LSMSOutput`,
``forward`` -> logits), so training, evaluation and prediction treat them like LSMS.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lsms.model.config import UNetConfig
from lsms.model.encoder import coordinate_grid
from lsms.model.lsms import LSMSOutput, check_coords
from lsms.text import TextEncoder, Tokenizer


class FiLM(nn.Module):
    """x * (1 + gamma(s)) + beta(s) per channel, from the sentence embedding s (B, C_l)."""

    def __init__(self, text_channels: int, channels: int):
        super().__init__()
        self.to_gamma_beta = nn.Linear(text_channels, 2 * channels)

    def forward(self, x: Tensor, sentence: Tensor) -> Tensor:
        """x (B, C, H, W), sentence (B, C_l) -> (B, C, H, W)."""
        gamma, beta = self.to_gamma_beta(sentence)[:, :, None, None].chunk(2, dim=1)  # each (B, C, 1, 1)
        return x * (1 + gamma) + beta


class TextUNet(nn.Module):
    """MONAI BasicUNet; with a text encoder, each decoder stage is FiLM-modulated by the mean token feature."""

    def __init__(self, config: UNetConfig, text_encoder: TextEncoder | None = None, tokenizer: Tokenizer | None = None):
        super().__init__()
        # deferred on purpose: MONAI is slow to import, and only the baselines need it
        from monai.networks.nets import BasicUNet

        self.config = config
        extra = 2 if config.coord_embed else 0
        self.unet = BasicUNet(spatial_dims=2, in_channels=config.in_channels + extra, out_channels=1,
                              features=config.features)
        self.text_encoder = text_encoder if config.use_text else None
        self.tokenizer = tokenizer if config.use_text else None
        if self.text_encoder is not None:
            f, c_l = config.features, text_encoder.hidden_size
            self.film = nn.ModuleList(FiLM(c_l, c) for c in (f[3], f[2], f[1], f[5]))
            self.text_proj = nn.Linear(c_l, f[5])  # for the contrastive loss, as in LSMS
        else:
            self.film = self.text_proj = None

    def tokenize(self, texts: list[str]) -> dict[str, Tensor]:
        if self.tokenizer is None:
            raise ValueError("this U-Net was built without text (use_text=False); it takes images only")
        return self.tokenizer(texts)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """input_ids/attention_mask (B, T) -> (mean token feature (B, C_l), its projection (B, C_head))."""
        tokens = self.text_encoder(input_ids, attention_mask)  # (B, T, C_l)
        m = attention_mask.to(tokens.dtype).unsqueeze(-1)
        sentence = (tokens * m).sum(1) / m.sum(1)  # mean over real tokens, (B, C_l)
        return sentence, self.text_proj(sentence)

    def forward_features(self, image: Tensor, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                         coords: Tensor | None = None, text: tuple[Tensor, Tensor] | None = None) -> LSMSOutput:
        """image (B, C_in, H, W) with H, W multiples of 16 -> :class:`LSMSOutput`.

        ``coords`` as in :meth:`LSMS.forward_features` (read only with ``coord_embed``); ``text`` is
        :meth:`encode_text` of the same ids and mask, computed earlier (a cache of repeated sentences).
        """
        if image.ndim != 4 or image.shape[1] != self.config.in_channels or image.shape[-1] % 16 or image.shape[-2] % 16:
            raise ValueError(f"image must be (B, {self.config.in_channels}, H, W) with H and W multiples of 16, "
                             f"got {tuple(image.shape)}")
        check_coords(image, coords)
        u = self.unet
        if self.config.coord_embed:
            if coords is None:
                coords = coordinate_grid(image.shape[0], *image.shape[-2:], device=image.device, dtype=image.dtype)
            image = torch.cat([image, coords.to(image.dtype)], dim=1)
        x0 = u.conv_0(image)
        x1 = u.down_1(x0)
        x2 = u.down_2(x1)
        x3 = u.down_3(x2)
        x4 = u.down_4(x3)
        sentence = text_embedding = None
        if self.text_encoder is not None:
            if input_ids is None or attention_mask is None:
                raise ValueError("this U-Net uses text: pass input_ids and attention_mask (see model.tokenize)")
            sentence, text_embedding = text if text is not None else self.encode_text(input_ids, attention_mask)
        x = x4
        for i, (up, skip) in enumerate(zip((u.upcat_4, u.upcat_3, u.upcat_2, u.upcat_1), (x3, x2, x1, x0))):
            x = up(x, skip)
            if sentence is not None:
                x = self.film[i](x, sentence)
        return LSMSOutput(u.final_conv(x), [x0, x1, x2, x3, x4], x, text_embedding)

    def forward(self, image: Tensor, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                coords: Tensor | None = None, text: tuple[Tensor, Tensor] | None = None) -> Tensor:
        return self.forward_features(image, input_ids, attention_mask, coords, text).logits
