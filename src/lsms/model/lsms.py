"""The LSMS network: text encoder + language-guided visual encoder + Full-Scale Decoder (paper Fig. 4)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lsms.model.config import LSMSConfig, check_image_size
from lsms.model.decoder import ExistenceHead, FullScaleDecoder, Refine
from lsms.model.encoder import LanguageGuidedEncoder
from lsms.text import TextEncoder, Tokenizer


@dataclass
class LSMSOutput:
    """Everything one forward produces; losses and visualisations read the parts they need."""

    logits: Tensor  # (B, 1, H, W) at the input size
    stages: list[Tensor]  # F1..F4, (B, C_i, H/s_i, W/s_i)
    decoder: Tensor  # (B, C_head, H/4, W/4): final multi-modal features before Seg
    text_embedding: Tensor | None  # (B, C_head): proj(mean over real tokens of L), for L_con; None without text
    existence: Tensor | None = None  # (B,): logit that the described lesion is in the image; None without the head


class LSMS(nn.Module):
    """Language-guided Scale-aware MedSegmentor.

    Receives its built parts (SAM style); :func:`lsms.model.build` wires them from a config.

    Args:
        config: the architecture settings it was built from (kept for checkpoints).
        encoder: the four-stage language-guided visual encoder.
        decoder: the Full-Scale Decoder with the 1-logit Seg head.
        text_encoder: BERT-family encoder, or None for the no-text model.
        tokenizer: tokenizer matching ``text_encoder`` (None without text).
        refine: the 1/2-resolution refinement (``output_stride`` 2), or None.
        text_proj: proj of the mean token feature to C_head for the contrastive loss (Eq. 14); None without text.
        existence: the existence head (``config.existence_head``), or None.
    """

    def __init__(self, config: LSMSConfig, encoder: LanguageGuidedEncoder, decoder: FullScaleDecoder,
                 text_encoder: TextEncoder | None = None, tokenizer: Tokenizer | None = None, *,
                 refine: Refine | None = None, text_proj: nn.Linear | None = None,
                 existence: ExistenceHead | None = None):
        super().__init__()
        if config.use_text and (text_encoder is None or tokenizer is None or text_proj is None):
            raise ValueError("a text model (use_text=True) needs a text_encoder, a tokenizer and a text_proj")
        if (config.output_stride == 2) != (refine is not None):
            raise ValueError("output_stride 2 needs a Refine (and only it)")
        if config.existence_head and (existence is None or not config.use_text):
            raise ValueError("config.existence_head needs an ExistenceHead and a text model")
        self.config = config
        self.text_encoder = text_encoder if config.use_text else None
        self.tokenizer = tokenizer if config.use_text else None
        self.encoder = encoder
        self.decoder = decoder
        self.refine = refine
        self.text_proj = text_proj if config.use_text else None
        self.existence = existence

    def tokenize(self, texts: list[str]) -> dict[str, Tensor]:
        """Tokenise referring expressions: ``input_ids``, ``attention_mask`` (B, T) and ``truncated`` (B,)."""
        if self.tokenizer is None:
            raise ValueError("this model was built without text (use_text=False); it takes images only")
        return self.tokenizer(texts)

    def _check_inputs(self, image: Tensor, input_ids: Tensor | None, attention_mask: Tensor | None) -> None:
        if image.ndim != 4 or image.shape[1] != self.config.in_channels:
            raise ValueError(
                f"image must be (B, {self.config.in_channels}, H, W) for this model "
                f"(in_channels={self.config.in_channels}), got shape {tuple(image.shape)}"
            )
        check_image_size(*image.shape[-2:], what="image height and width")
        if self.text_encoder is None:
            return
        if input_ids is None or attention_mask is None:
            raise ValueError("this model uses text: pass input_ids and attention_mask (see model.tokenize)")
        if input_ids.shape != attention_mask.shape or input_ids.ndim != 2 or input_ids.shape[0] != image.shape[0]:
            raise ValueError(
                f"input_ids and attention_mask must both be (B, T) with B = {image.shape[0]} images, "
                f"got {tuple(input_ids.shape)} and {tuple(attention_mask.shape)}"
            )
        # a value check cannot be traced: an exported graph leaves it to its caller (lsms.backends)
        if not torch.compiler.is_exporting() and not torch.jit.is_tracing() and not bool(attention_mask[:, 0].all()):
            raise ValueError("every expression needs at least one real token (attention_mask[:, 0] must be 1)")

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """input_ids/attention_mask (B, T) -> (token features L (B, T, C_l), proj of their mean (B, C_head))."""
        text = self.text_encoder(input_ids, attention_mask)  # L (B, T, C_l)
        m = attention_mask.to(text.dtype).unsqueeze(-1)  # (B, T, 1)
        return text, self.text_proj((text * m).sum(1) / m.sum(1))  # mean over real tokens -> (B, C_head)

    def forward_features(self, image: Tensor, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                         coords: Tensor | None = None, text: tuple[Tensor, Tensor] | None = None) -> LSMSOutput:
        """image (B, C_in, H, W), input_ids/attention_mask (B, T) -> :class:`LSMSOutput`.

        ``coords`` (B, 2, H, W): where each pixel lies in the whole image, (x, y) in [-1, 1]; read only with
        ``coord_embed``, and only needed for a crop of an image (training patches); default: the image is whole.
        ``text`` is :meth:`encode_text` of the same ids and mask, computed earlier (a cache of repeated sentences).
        """
        stages, text_embedding = self._encode(image, input_ids, attention_mask, coords, text)
        logits, decoded = self.decoder(stages)
        existence = self.existence(decoded, logits, text_embedding) if self.existence is not None else None
        if self.refine is not None:  # output_stride 2: logits at 1/2 resolution
            logits = self.refine(image, decoded, logits)
        logits = F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False)
        return LSMSOutput(logits, stages, decoded, text_embedding, existence)

    def forward(self, image: Tensor, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                coords: Tensor | None = None, text: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """image (B, C_in, H, W), input_ids/attention_mask (B, T) -> logits (B, 1, H, W) (of :meth:`forward_features`)."""
        return self.forward_features(image, input_ids, attention_mask, coords, text).logits

    def _encode(self, image: Tensor, input_ids: Tensor | None, attention_mask: Tensor | None,
                coords: Tensor | None, text: tuple[Tensor, Tensor] | None) -> tuple[list[Tensor], Tensor | None]:
        """Checked inputs -> (stage features [F1..F4], text embedding (B, C_head) or None)."""
        self._check_inputs(image, input_ids, attention_mask)
        check_coords(image, coords)
        text_features = text_embedding = None
        if self.text_encoder is not None:
            text_features, text_embedding = text if text is not None else self.encode_text(input_ids, attention_mask)
        return self.encoder(image, text_features, attention_mask, coords), text_embedding


def check_coords(image: Tensor, coords: Tensor | None) -> None:
    """``coords`` must be None or (B, 2, H, W) like ``image``."""
    if coords is not None and (coords.ndim != 4 or coords.shape[1] != 2 or coords.shape[0] != image.shape[0]
                               or coords.shape[-2:] != image.shape[-2:]):
        raise ValueError(f"coords must be (B, 2, H, W) = ({image.shape[0]}, 2, {image.shape[-2]}, {image.shape[-1]}) "
                         f"like the image, got {tuple(coords.shape)}")


def count_parameters(module: nn.Module | None) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


__all__ = ["LSMS", "LSMSOutput", "count_parameters"]
