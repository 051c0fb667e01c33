"""The model spec: a trained model's network config and its input contract, in one frozen object.

    spec = resolve_spec(model_config("tiny"), preprocessing)   # after the dataset scan, once
    spec.image_size, spec.in_channels, spec.max_tokens         # derived from the one place each is stored
    spec = spec.with_thresholds(metrics)                       # a new spec; a spec is never changed

What prediction needs besides the weights lives here and only here: the network's config (``model``, its
text settings with ``max_tokens`` and ``normalize_segments`` included), the :class:`~lsms.data.Preprocessing`
(image size, channels, intensity window or scaling), the probability ``threshold`` of a lesion pixel and the
existence thresholds chosen on the validation split. Training resolves it after the dataset scan (as timm's
``resolve_data_config`` derives the input settings from the model), checkpoints store it once (``"spec"``),
exported files store it once (their metadata), and every backend reads it back from there.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from lsms.data.intensity import Preprocessing
from lsms.data.readers import LIMIT_ENV, ImageTooLargeError, ReadLimits
from lsms.metrics import check_threshold
from lsms.model.build import build
from lsms.model.config import ModelConfig, activation_bytes, check_image_size, model_config_from_dict
from lsms.settings import DictRoundTrip
from lsms.text import check_text_source


@dataclass(frozen=True)
class ModelSpec(DictRoundTrip):
    """A trained model's network config and input contract (module docstring).

    Attributes:
        model: the network's config (:class:`~lsms.model.LSMSConfig` or a baseline's), text settings included.
        preprocessing: how an image becomes the network's input; its ``in_channels`` equals the model's.
        threshold: probability above which a pixel is lesion.
        existence_threshold: the existence score below which prediction says "not found" (chosen on the
            validation split during training; None: never).
        max_prob_threshold: for a model with an existence head, the threshold of the highest-probability score
            (chosen alike; for comparison only).
    """

    settings_name: ClassVar[str] = "model spec fields"

    model: ModelConfig
    preprocessing: Preprocessing
    threshold: float = 0.5
    existence_threshold: float | None = None
    max_prob_threshold: float | None = None

    def __post_init__(self) -> None:
        if self.model.in_channels != self.preprocessing.in_channels:
            raise ValueError(f"the model reads {self.model.in_channels} channels but its preprocessing gives "
                             f"{self.preprocessing.in_channels}; they must agree")
        check_image_size(*self.preprocessing.image_size, what="the spec's image size")
        text = self.model.text
        positions = (text.hf_config or {}).get("max_position_embeddings")
        if self.model.use_text and isinstance(positions, int) and text.max_tokens > positions:
            raise ValueError(f"the model reads sentences of up to max_tokens = {text.max_tokens} tokens but its text "
                             f"encoder has {positions} positions (max_position_embeddings); they must agree")
        check_threshold(self.threshold)
        for name in ("existence_threshold", "max_prob_threshold"):
            if getattr(self, name) is not None:
                check_threshold(getattr(self, name), name.replace("_", " "), low_inclusive=True)

    @property
    def image_size(self) -> tuple[int, int]:
        return self.preprocessing.image_size

    def check_text_source(self, where: str) -> None:
        """The text encoder of a spec read from the model file ``where`` is one lsms may load, checked before
        anything is loaded (:func:`lsms.text.check_text_source`)."""
        if self.model.use_text:
            check_text_source(self.model.text.encoder, where)

    def check_memory(self, batch: int, source: str, fix: str, device: torch.device | str | None = None) -> None:
        """:func:`check_memory` of inference on ``batch`` images at the spec's image size."""
        check_memory(self.model, self.image_size, batch, training=False, source=source, fix=fix, device=device)

    @property
    def in_channels(self) -> int:
        return self.model.in_channels

    @property
    def max_tokens(self) -> int | None:
        """Tokens per sentence the model reads (None for a model without text)."""
        return self.model.text.max_tokens if self.model.use_text else None

    def with_thresholds(self, metrics: dict[str, Any]) -> ModelSpec:
        """This spec with the existence thresholds of a validation summary (``existence_threshold``,
        ``existence_threshold_max_prob``; absent ones become None)."""
        def value(key: str) -> float | None:
            v = metrics.get(key)
            return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

        return dataclasses.replace(self, existence_threshold=value("existence_threshold"),
                                   max_prob_threshold=value("existence_threshold_max_prob"))

    def with_input(self, image_size: int | None = None, max_tokens: int | None = None,
                   threshold: float | None = None) -> ModelSpec:
        """This spec for another square input size, sentence length or pixel threshold (an export's
        ``--image-size`` / ``--max-tokens``, a prediction's ``--threshold``); None keeps each."""
        spec = self
        if image_size is not None:
            spec = dataclasses.replace(spec, preprocessing=dataclasses.replace(
                spec.preprocessing, image_size=(image_size, image_size)))
        if max_tokens is not None:
            if not spec.model.use_text:
                raise ValueError("max_tokens applies to text models only; this model was trained without text")
            spec = dataclasses.replace(spec, model=dataclasses.replace(
                spec.model, text=dataclasses.replace(spec.model.text, max_tokens=max_tokens)))
        if threshold is not None:
            spec = dataclasses.replace(spec, threshold=threshold)
        return spec

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "model spec") -> ModelSpec:
        """The spec of plain data; every error names ``where`` (a checkpoint, an exported file)."""
        if not isinstance(data, dict) or not isinstance(data.get("model"), dict) \
                or not isinstance(data.get("preprocessing"), dict):
            raise ValueError(f"{where} must be a mapping with 'model' and 'preprocessing' settings, got {data!r}")
        fields = {f.name for f in dataclasses.fields(cls)}
        if unknown := sorted(set(data) - fields):
            raise ValueError(f"unknown {cls.settings_name} {unknown} in {where}; known: {sorted(fields)}")
        try:
            return cls(**{**data, "model": model_config_from_dict(dict(data["model"])),
                          "preprocessing": Preprocessing.from_dict(dict(data["preprocessing"]))})
        except (ValueError, TypeError) as err:
            raise ValueError(f"{where}: {err}") from None


class WithSpec:
    """What a holder of a ``spec`` (a backend, a predictor) reads from it, by name."""

    spec: ModelSpec

    @property
    def config(self) -> ModelConfig:
        return self.spec.model

    @property
    def preprocessing(self) -> Preprocessing:
        return self.spec.preprocessing

    @property
    def threshold(self) -> float:
        return self.spec.threshold

    @property
    def existence_threshold(self) -> float | None:
        return self.spec.existence_threshold

    @property
    def max_prob_threshold(self) -> float | None:
        return self.spec.max_prob_threshold


def memory_limits(device: torch.device | str | None = None) -> ReadLimits:
    """The limits in force (:meth:`ReadLimits.from_env`); on a CUDA device ``max_tensor_bytes`` is the device's
    memory unless its environment variable is set."""
    limits = ReadLimits.from_env()
    if device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available() \
            and not os.environ.get(LIMIT_ENV["max_tensor_bytes"], "").strip():
        total = torch.cuda.get_device_properties(torch.device(device)).total_memory
        limits = dataclasses.replace(limits, max_tensor_bytes=int(total))
    return limits


def check_memory(model: ModelConfig, image_size: tuple[int, int], batch: int, *, training: bool, source: str, fix: str,
                 device: torch.device | str | None = None) -> None:
    """Refuse, before anything is allocated, a step of ``model`` on ``batch`` images of ``image_size`` whose
    activations :func:`~lsms.model.activation_bytes` puts above ``max_tensor_bytes``.

    Args:
        source: where the size comes from, first in the message (``--image-size 4096``, ``checkpoint 'x.pt': its
            image size``).
        fix: how to ask for less (``use a smaller --image-size or --batch-size``); the message adds the limit's
            environment variable.
        device: where the step runs (:func:`memory_limits`).
    """
    H, W = image_size
    amount = activation_bytes(model, H, W, batch, training)
    what = (f"the estimated memory of the network's {'training' if training else 'inference'} activations for "
            f"{batch} x {H} x {W} pixels (about {amount / 2**30:,.1f} GiB), in bytes")
    try:
        memory_limits(device).check(source, "max_tensor_bytes", amount, what, f"{fix}, or raise the limit")
    except ImageTooLargeError as err:  # a setting, not an image file: a plain ValueError
        raise ValueError(str(err)) from None


def resolve_spec(model: ModelConfig, preprocessing: Preprocessing) -> ModelSpec:
    """The spec of a new model: ``model`` reading as many channels as ``preprocessing`` gives."""
    return ModelSpec(dataclasses.replace(model, in_channels=preprocessing.in_channels), preprocessing)


def model_for(model: ModelConfig, preprocessing: Preprocessing) -> tuple[nn.Module, ModelSpec]:
    """A new network for ``model`` reading what ``preprocessing`` gives, and its spec (:func:`resolve_spec` with
    the built network's config: the text encoder's HuggingFace config filled in)."""
    spec = resolve_spec(model, preprocessing)
    network = build(spec.model)
    return network, dataclasses.replace(spec, model=network.config)


__all__ = ["ModelSpec", "WithSpec", "check_memory", "memory_limits", "model_for", "resolve_spec"]
