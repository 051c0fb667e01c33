"""Intensity scaling and the :class:`Preprocessing` saved with every model.

Training stores ``Preprocessing.to_dict()`` in the checkpoint; prediction rebuilds it with
``Preprocessing.from_dict()`` and calls :func:`preprocess_image`, so both see exactly the same pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from lsms.settings import DictRoundTrip

# Named CT windows, (width, level) in HU. Values as commonly used in radiology (Radiopaedia "Windowing (CT)").
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "liver": (150.0, 30.0),
    "abdomen": (400.0, 50.0),
    "lung": (1500.0, -600.0),
    "mediastinum": (350.0, 50.0),
    "bone": (1800.0, 400.0),
    "brain": (80.0, 40.0),
}
INTENSITY_MODES = ("window", "percentile", "range")
PREPROCESSING_VERSION = 1


def apply_window(hu: np.ndarray, width: float, level: float) -> np.ndarray:
    """Map HU to [0, 1]: ``level - width/2`` -> 0, ``level + width/2`` -> 1, clipped.

    Example: the liver window (W 150, L 30) maps -45 HU to 0, 30 HU to 0.5 and 105 HU to 1.
    """
    if width <= 0:
        raise ValueError(f"window width must be positive, got {width}")
    low = level - width / 2.0
    return np.clip((np.asarray(hu, dtype=np.float32) - low) / np.float32(width), 0.0, 1.0)


def percentile_scale(image: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Map the ``low``/``high`` percentiles of the whole image (all channels together) to 0/1, clipped.

    A constant image maps to zeros.
    """
    if not 0.0 <= low < high <= 100.0:
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got ({low}, {high})")
    a = np.asarray(image, dtype=np.float32)
    lo, hi = np.percentile(a, [low, high]).astype(np.float32)  # float64 bounds would promote the image (NumPy 2)
    if hi <= lo:
        return np.zeros_like(a)
    return np.clip((a - lo) / np.float32(hi - lo), 0.0, 1.0)


@dataclass(frozen=True)
class Preprocessing(DictRoundTrip):
    """How an image becomes the model's input; saved in the checkpoint and repeated at prediction.

    Attributes:
        image_size: model input (H, W); images are resized bilinearly (masks nearest).
        in_channels: 1 (grey; colour images become luminance) or 3 (grey images are repeated).
        intensity: ``window`` (CT: HU through a window), ``percentile`` (per image) or ``range``
            (fixed ``value_range``, e.g. 0..255 for 8-bit photos).
        window: name of a CT window in :data:`CT_WINDOWS`, or None to use ``window_width``/``window_level``.
        window_width: custom window width in HU (used when ``window`` is None).
        window_level: custom window level in HU.
        percentiles: low/high percentiles for ``percentile``.
        value_range: (min, max) mapped to 0/1 for ``range``.
        mean: subtracted after scaling to [0, 1] (one value per channel, or one for all).
        std: divided after subtracting ``mean``.
        context_slices: 2.5D input: this many neighbouring slices of the volume on each side of the slice, stacked
            with it as the channels in slice order (:func:`lsms.data.readers.context_stack`); ``in_channels`` is
            then ``2 * context_slices + 1``. 0: the slice alone (2D).
    """

    settings_name: ClassVar[str] = "preprocessing settings"

    image_size: tuple[int, int] = (256, 256)
    in_channels: int = 3
    intensity: str = "percentile"
    window: str | None = None
    window_width: float | None = None
    window_level: float | None = None
    percentiles: tuple[float, float] = (0.5, 99.5)
    value_range: tuple[float, float] = (0.0, 255.0)
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    context_slices: int = 0

    def __post_init__(self) -> None:
        size = (self.image_size, self.image_size) if isinstance(self.image_size, int) else self.image_size
        object.__setattr__(self, "image_size", tuple(int(s) for s in size))  # frozen: normalised once, here
        if len(self.image_size) != 2 or min(self.image_size) < 1:
            raise ValueError(f"image_size must be a positive int or (H, W), got {self.image_size}")
        if isinstance(self.context_slices, bool) or not isinstance(self.context_slices, int) or self.context_slices < 0:
            raise ValueError(f"context_slices must be a non-negative integer, got {self.context_slices!r}")
        if self.context_slices and self.in_channels != 2 * self.context_slices + 1:
            raise ValueError(f"context_slices={self.context_slices} stacks {2 * self.context_slices + 1} slices as "
                             f"channels, so in_channels must be {2 * self.context_slices + 1}, got {self.in_channels}")
        if not self.context_slices and self.in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {self.in_channels}")
        if self.intensity not in INTENSITY_MODES:
            raise ValueError(f"intensity must be one of {', '.join(INTENSITY_MODES)}, got {self.intensity!r}")
        if self.intensity == "window":
            if self.window is not None and self.window not in CT_WINDOWS:
                raise ValueError(f"unknown CT window {self.window!r}; use one of {', '.join(CT_WINDOWS)} or width/level")
            if self.window is None and (self.window_width is None or self.window_level is None):
                raise ValueError("intensity='window' needs a named window or both window_width and window_level")
            if self.window is None and self.window_width is not None and self.window_width <= 0:
                raise ValueError(f"window_width must be positive, got {self.window_width}")
        for name in ("percentiles", "value_range", "mean", "std"):
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
        for name in ("window_width", "window_level", "percentiles", "value_range", "mean", "std"):
            value = getattr(self, name)
            values = value if isinstance(value, tuple) else (() if value is None else (value,))
            if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
                raise ValueError(f"{name} must hold finite numbers, got {value!r}")
        if len(self.percentiles) != 2 or not 0.0 <= self.percentiles[0] < self.percentiles[1] <= 100.0:
            raise ValueError(f"percentiles must be (low, high) with 0 <= low < high <= 100, got {self.percentiles}")
        if len(self.value_range) != 2:
            raise ValueError(f"value_range must be (min, max), got {self.value_range}")
        if self.value_range[1] <= self.value_range[0]:
            raise ValueError(f"value_range must be (min, max) with max > min, got {self.value_range}")
        for name, values in (("mean", self.mean), ("std", self.std)):
            if len(values) not in (1, self.in_channels):
                raise ValueError(f"{name} needs 1 or in_channels={self.in_channels} values, got {len(values)}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std values must be positive, got {self.std}")

    @property
    def window_width_level(self) -> tuple[float, float]:
        """The (width, level) in HU of the ``window`` mode."""
        if self.window is not None:
            return CT_WINDOWS[self.window]
        assert self.window_width is not None and self.window_level is not None
        return float(self.window_width), float(self.window_level)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (lists for tuples) with a ``version`` key."""
        return {**super().to_dict(), "version": PREPROCESSING_VERSION}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        """Inverse of :meth:`to_dict`; unknown keys are an error (they would be silently ignored otherwise)."""
        data = dict(data)
        version = data.pop("version", PREPROCESSING_VERSION)
        if version != PREPROCESSING_VERSION:
            raise ValueError(f"preprocessing version {version} is not supported (this lsms reads {PREPROCESSING_VERSION})")
        return super().from_dict(data)


def parse_window(text: str) -> dict[str, Any]:
    """``"liver"`` -> {"window": "liver"}; ``"200,80"`` -> width 200, level 80 HU (Preprocessing fields)."""
    if text in CT_WINDOWS:
        return {"window": text, "window_width": None, "window_level": None}
    try:
        width, level = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"window must be one of {sorted(CT_WINDOWS)} or WIDTH,LEVEL in HU (e.g. 200,80), got {text!r}") from None
    if not (math.isfinite(width) and math.isfinite(level)) or width <= 0:
        raise ValueError(f"window WIDTH,LEVEL must be finite numbers with a positive width, got {text!r}")
    return {"window": None, "window_width": width, "window_level": level}


def default_preprocessing(modality: str | None, image_size: int | tuple[int, int] = 256, in_channels: int = 3) -> Preprocessing:
    """The default for a modality: CT -> liver window; anything else -> per-image percentile scaling."""
    if modality is not None and modality.upper() == "CT":
        return Preprocessing(image_size=image_size, in_channels=in_channels, intensity="window", window="liver")  # type: ignore[arg-type]
    return Preprocessing(image_size=image_size, in_channels=in_channels, intensity="percentile")  # type: ignore[arg-type]


def input_contract(prep: Preprocessing) -> str:
    """What a model with ``prep`` was trained to read, in words (named in a mismatch message)."""
    channels = f"{prep.in_channels} channel{'s' if prep.in_channels > 1 else ''}"
    if prep.context_slices:
        channels = f"{prep.in_channels} neighbouring slices of a volume as channels"
    if prep.intensity == "window":
        width, level = prep.window_width_level
        window = f"the {prep.window} window" if prep.window else "a window"
        return f"CT (modality CT, {channels}, HU through {window} W {width:g} L {level:g})"
    scaling = "its percentiles" if prep.intensity == "percentile" else f"the range {prep.value_range}"
    return f"images other than CT ({channels}, each scaled by {scaling})"


def input_mismatch(image: np.ndarray, modality: str | None, prep: Preprocessing, fmt: str | None = None) -> str | None:
    """Why ``image`` is clearly not what a model with ``prep`` was trained on, or None; then its prediction would
    mean nothing. The one rule of lsms: a CT model (HU through a window) given a colour image (a photo) or an
    image whose modality (a DICOM's Modality tag) is not CT, and a model trained on other images given a CT
    image. A grey image without a modality (PNG, NumPy, NIfTI) may be anything, and is taken as it is.

    Args:
        image: (H, W) or (H, W, C) as read.
        modality: the modality the file (or the record) states, if any.
        prep: the model's preprocessing (its input contract).
        fmt: the file format (``png``, ``dicom``, ...), named in the message.
    """
    ct_model = prep.intensity == "window"
    kind = f"{fmt.upper()} " if fmt else ""
    if ct_model and image.ndim == 3 and image.shape[-1] >= 3:
        found = f"a colour (RGB) {kind}image, a photo rather than a CT slice in HU"
    elif ct_model and modality is not None and modality.strip().upper() != "CT":
        found = f"a {kind}image of modality {modality}"
    elif not ct_model and modality is not None and modality.strip().upper() == "CT":
        found = f"a CT {kind}image (modality CT, HU)"
    else:
        return None
    return f"the model reads {input_contract(prep)} but this is {found}; its masks would be meaningless"


def scale_intensity(image: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """(H, W[, C]) raw values -> float32 in [0, 1] by ``prep.intensity``."""
    if not np.isfinite(image).all():
        raise ValueError("the image holds NaN or inf values")
    if prep.intensity == "window":
        return apply_window(image, *prep.window_width_level)
    if prep.intensity == "percentile":
        return percentile_scale(image, *prep.percentiles)
    lo, hi = prep.value_range
    return np.clip((np.asarray(image, dtype=np.float32) - lo) / np.float32(hi - lo), 0.0, 1.0)


def to_channels(image: np.ndarray, in_channels: int) -> np.ndarray:
    """(H, W) or (H, W, C) -> (in_channels, H, W). Grey is repeated; colour becomes luminance for 1 channel."""
    a = image
    if a.ndim == 2:
        a = a[None]  # (1, H, W)
    else:
        if a.shape[-1] in (2, 4):
            a = a[..., :-1]  # drop alpha
        a = np.moveaxis(a, -1, 0)  # (C, H, W)
    if a.shape[0] == in_channels:
        return np.ascontiguousarray(a)
    if in_channels == 3:
        return np.repeat(a[:1], 3, axis=0)
    weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)[:, None, None]  # ITU-R BT.601 luminance
    return (a[:3] * weights).sum(axis=0, keepdims=True).astype(np.float32)


def resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(C, H, W) float -> (C, *size), bilinear with anti-aliasing when shrinking."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]


def resize_labels(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(H, W) or (C, H, W) integer/binary map -> same at ``size``, nearest neighbour (labels stay labels)."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    x = labels[None, None] if labels.ndim == 2 else labels[None]
    out = F.interpolate(x.float(), size=size, mode="nearest-exact")
    return out[0, 0].to(labels.dtype) if labels.ndim == 2 else out[0].to(labels.dtype)


def preprocess_image(image: np.ndarray, prep: Preprocessing) -> torch.Tensor:
    """Raw (H, W[, C]) image -> model input float32 (in_channels, *image_size): scale, channels, resize, normalise."""
    scaled = scale_intensity(image, prep)
    x = torch.from_numpy(to_channels(scaled, prep.in_channels))
    x = resize_image(x, prep.image_size)
    mean = torch.tensor(prep.mean, dtype=torch.float32)[:, None, None]
    std = torch.tensor(prep.std, dtype=torch.float32)[:, None, None]
    return ((x - mean) / std).contiguous()
