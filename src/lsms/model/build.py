"""The one builder: a model config (LSMS or a baseline) -> the network, with its text encoder and tokenizer."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from lsms.model.baselines import TextUNet
from lsms.model.config import LSMSConfig, ModelConfig, TextConfig, UNetConfig, model_config
from lsms.model.decoder import ExistenceHead, FullScaleDecoder, Refine
from lsms.model.encoder import LanguageGuidedEncoder
from lsms.model.lsms import LSMS
from lsms.text import TextEncoder, Tokenizer, load_text_encoder


def build(config: ModelConfig) -> nn.Module:
    """Build the network ``config`` describes. With text, the network's ``config`` is ``config`` with
    ``text.hf_config`` filled in from the loaded encoder (so a checkpoint can rebuild it without the weights'
    source); ``config`` itself is frozen and stays as it was."""
    text_encoder = tokenizer = None
    if config.use_text:
        text_encoder, tokenizer, hf_config = text_parts(config.text)
        config = dataclasses.replace(config, text=dataclasses.replace(config.text, hf_config=hf_config))
    if isinstance(config, UNetConfig):
        return TextUNet(config, text_encoder, tokenizer)
    if not isinstance(config, LSMSConfig):
        raise TypeError(f"build takes an LSMSConfig or a UNetConfig, got {type(config).__name__}")
    encoder = LanguageGuidedEncoder(config, text_encoder.hidden_size if text_encoder is not None else None)
    decoder = FullScaleDecoder(config, encoder.channels)
    existence = ExistenceHead(decoder.channels, config.existence_channels) if config.existence_head else None
    refine = Refine(config.in_channels, decoder.channels, config.refine_channels) if config.output_stride == 2 else None
    # proj of L_avg for the contrastive loss (Eq. 14)
    text_proj = nn.Linear(text_encoder.hidden_size, decoder.channels) if text_encoder is not None else None
    return LSMS(config, encoder, decoder, text_encoder, tokenizer, refine=refine, text_proj=text_proj,
                existence=existence)


def build_model(name: str = "tiny", **overrides: Any) -> nn.Module:
    """``build(model_config(name, **overrides))``: a registered model (``tiny``, ``small``, ``base``, ``unet``,
    ``film-unet``) with any field of its config overridden.

    Example: ``build_model("tiny", in_channels=1, conv_kernels=(11,), decoder="last")``.
    """
    return build(model_config(name, **overrides))


def tokenizer_for(text: TextConfig) -> Tokenizer:
    """The tokenizer of a model's text settings (source, max_tokens, normalize_segments)."""
    return Tokenizer(text.encoder, text.max_tokens, normalize_segments=text.normalize_segments)


def text_parts(text: TextConfig) -> tuple[TextEncoder, Tokenizer, dict[str, Any]]:
    """(encoder, tokenizer, HuggingFace config as a dict) for the text settings of a model."""
    tokenizer = tokenizer_for(text)
    if text.pretrained:
        text_encoder = load_text_encoder(text.encoder, freeze=text.freeze)
    else:
        if text.hf_config is None:
            raise ValueError("text.pretrained=False needs text.hf_config (the encoder's HuggingFace config as a dict)")
        from transformers import (  # deferred on purpose: transformers takes seconds to import
            AutoConfig,
            AutoModel,
        )

        hf_config = dict(text.hf_config)
        hf = AutoConfig.for_model(hf_config.pop("model_type", "bert"), **hf_config)
        text_encoder = TextEncoder(AutoModel.from_config(hf), freeze=text.freeze)
    vocab = text_encoder.backbone.config.vocab_size
    if len(tokenizer.hf) > vocab:
        raise ValueError(
            f"tokenizer of {text.encoder!r} has {len(tokenizer.hf)} tokens but the text model only {vocab}; "
            "use a tokenizer and model that belong together"
        )
    return text_encoder, tokenizer, text_encoder.backbone.config.to_diff_dict()


__all__ = ["build", "build_model", "text_parts", "tokenizer_for"]
