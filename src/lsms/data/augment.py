"""Training augmentation: lesion-aware patches, scale/rotation, text-consistent flips, intensity.

The spatial part follows nnU-Net's from-scratch recipe (Isensee et al. 2021): training patches whose centre
is, for a share of samples, a random foreground pixel ("foreground oversampling", so small lesions are seen at
full resolution), drawn through one affine map with random scale and rotation; mirroring; then brightness,
contrast, gamma and noise. Inference runs on the whole preprocessed image (the network is fully
convolutional), so a model trained on patches of a 448 px image predicts the 448 px image in one pass.

Everything here is drawn from ``numpy.random.default_rng([seed, epoch, index])``: the same seed, epoch and
sample index give the same result in any process, which makes training resumable bit for bit.

Position: :func:`sample_view` also returns, for every output pixel, where it lies in the whole (possibly
mirrored) image, as (x, y) in [-1, 1] (pixel centres, the ``align_corners=False`` convention). A model with
``coord_embed`` reads these, so that region words such as "upper-left region" keep their meaning inside a
patch: BTXRD's region words are positions in the image (``shared/data/README.md``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from lsms.settings import DictRoundTrip

_SIDE_WORDS = {"left": "right", "right": "left", "leftmost": "rightmost", "rightmost": "leftmost"}
_SIDE_RE = re.compile(r"\b(left|right|leftmost|rightmost)\b", re.IGNORECASE)
TEXT_FLIP_POLICIES = ("swap", "refuse")


def swap_left_right(text: str) -> str:
    """Swap the words left/right (and leftmost/rightmost), keeping capitalisation; hyphenated region words
    (``upper-left``) are covered, because a hyphen is a word boundary.

    >>> swap_left_right("Right femur, left of the Left knee, upper-right region")
    'Left femur, right of the Right knee, upper-left region'
    """

    def repl(m: re.Match[str]) -> str:
        word = m.group(0)
        out = _SIDE_WORDS[word.lower()]
        if word.isupper():
            return out.upper()
        return out.capitalize() if word[0].isupper() else out

    return _SIDE_RE.sub(repl, text)


@dataclass(frozen=True)
class Augmentation(DictRoundTrip):
    """Training augmentation (the paper trains without any; all of this is off unless asked for).

    Attributes:
        hflip_p: probability of a horizontal flip.
        vflip_p: probability of a vertical flip. Samples with text are never flipped vertically: "upper" and
            "lower" also name anatomy ("the lower limb"), which a flip must not rewrite.
        text_flip: what a horizontal flip does to a sample with text. ``refuse`` (default): text-bearing samples
            are never flipped, because words such as Couinaud segment numbers or "right lobe" describe anatomy
            a mirror image contradicts. ``swap``: flip and swap left/right words (:func:`swap_left_right`; use
            it when sides are only ever image positions, as in BTXRD). Samples without text are flipped either way.
        patch_size: train on square patches of this side (pixels of the preprocessed image); None: the whole image.
        foreground_p: share of patches centred on a random foreground pixel (nnU-Net's 0.33); the rest are
            centred uniformly. An image without foreground gets a uniform patch.
        spatial_p: probability of a random scale and rotation (nnU-Net: 0.2 each).
        scale: (min, max) zoom factor; > 1 magnifies.
        rotation: maximum rotation in degrees (uniform in [-rotation, rotation]).
        contrast: maximum relative contrast change (0.1 = x0.9..x1.1 around the mean).
        brightness: maximum brightness shift added after scaling (image units, e.g. 0.05).
        gamma: (min, max) gamma applied to the image rescaled to [0, 1] (then scaled back); (1, 1) = off.
        noise: maximum standard deviation of additive Gaussian noise (image units); 0 = off.
        seed: base seed; each item's randomness depends on (seed, epoch, index) only.
    """

    settings_name: ClassVar[str] = "augmentation settings"

    hflip_p: float = 0.5
    vflip_p: float = 0.0
    text_flip: str = "refuse"
    patch_size: int | None = None
    foreground_p: float = 0.33
    spatial_p: float = 0.0
    scale: tuple[float, float] = (1.0, 1.0)
    rotation: float = 0.0
    contrast: float = 0.0
    brightness: float = 0.0
    gamma: tuple[float, float] = (1.0, 1.0)
    noise: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("scale", "gamma"):  # frozen: normalised once, here
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
        for name in ("hflip_p", "vflip_p", "foreground_p", "spatial_p"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if self.text_flip not in TEXT_FLIP_POLICIES:
            raise ValueError(f"text_flip must be one of {', '.join(TEXT_FLIP_POLICIES)}, got {self.text_flip!r}")
        for name in ("contrast", "brightness", "rotation", "noise"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite non-negative number, got {value}")
        for name in ("scale", "gamma"):
            lo_hi = getattr(self, name)
            if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1] or not math.isfinite(lo_hi[1]):
                raise ValueError(f"{name} must be (min, max) with 0 < min <= max, got {lo_hi}")
        if self.patch_size is not None and (self.patch_size < 32 or self.patch_size % 32):
            raise ValueError(f"patch_size must be a multiple of 32 (the encoder's stride), got {self.patch_size}")

    @property
    def spatial(self) -> bool:
        """Whether items go through the affine sampler (patches, scale or rotation)."""
        return self.patch_size is not None or (self.spatial_p > 0 and (self.scale != (1.0, 1.0) or self.rotation > 0))


@dataclass
class View:
    """One augmented sample: image (C, P, P), mask (1, P, P), instances (P, P), coords (2, P, P), text."""

    image: torch.Tensor
    mask: torch.Tensor
    instances: torch.Tensor
    coords: torch.Tensor | None
    text: str


def draw(aug: Augmentation, epoch: int, index: int, image: torch.Tensor, mask: torch.Tensor,
         instances: torch.Tensor, text: str) -> View:
    """Augment one preprocessed sample: image (C, H, W), mask (H, W) {0, 1}, instances (H, W) int64."""
    rng = np.random.default_rng([aug.seed, epoch, index])
    hflip = bool(rng.random() < aug.hflip_p) and not (text and aug.text_flip == "refuse")
    vflip = bool(rng.random() < aug.vflip_p) and not text
    if hflip:
        text = swap_left_right(text)
    coords = None
    if aug.spatial:
        image, mask, instances, coords = sample_view(aug, rng, image, mask, instances, hflip, vflip)
    else:
        dims = [d for d, f in ((-1, hflip), (-2, vflip)) if f]
        if dims:
            image, mask, instances = image.flip(dims), mask.flip(dims), instances.flip(dims)
    return View(intensity(aug, rng, image), mask, instances, coords, text)


def sample_view(aug: Augmentation, rng: np.random.Generator, image: torch.Tensor, mask: torch.Tensor,
                instances: torch.Tensor, hflip: bool = False, vflip: bool = False):
    """A P x P view of the (mirrored) image through one affine map: centre, zoom, rotation.

    The centre is a pixel of the image (a random foreground pixel with probability ``foreground_p``), and it
    lands exactly on output pixel (P // 2, P // 2), so a foreground-centred patch always holds that lesion
    pixel, whatever the zoom and rotation. Images are sampled bilinearly, labels by nearest neighbour;
    outside the image is 0 (and -1 for the instance map).

    Returns image (C, P, P), mask (P, P), instances (P, P) and coords (2, P, P): (x, y) in [-1, 1] of each
    output pixel in the whole mirrored image.
    """
    H, W = image.shape[-2:]
    P = aug.patch_size
    ph, pw = (P, P) if P is not None else (H, W)
    # centre, as a pixel index of the mirrored image: a lesion pixel (mirrored), or uniform so that the patch
    # lies inside the image where it fits
    fg = torch.nonzero(mask) if rng.random() < aug.foreground_p else None
    if fg is not None and len(fg):
        cy, cx = (int(v) for v in fg[int(rng.integers(len(fg)))])
        cx, cy = (W - 1 - cx if hflip else cx), (H - 1 - cy if vflip else cy)
    else:
        cy = int(rng.integers(ph // 2, H - (ph - ph // 2) + 1)) if H > ph else H // 2
        cx = int(rng.integers(pw // 2, W - (pw - pw // 2) + 1)) if W > pw else W // 2
    zoom, angle = 1.0, 0.0
    if rng.random() < aug.spatial_p:
        zoom = math.exp(rng.uniform(math.log(aug.scale[0]), math.log(aug.scale[1])))
        angle = math.radians(rng.uniform(-aug.rotation, aug.rotation))
    # offsets of the output pixels from the centre pixel, rotated and zoomed (pixel units of the source)
    oy, ox = torch.meshgrid(torch.arange(ph, dtype=torch.float64) - ph // 2,
                            torch.arange(pw, dtype=torch.float64) - pw // 2, indexing="ij")
    cos, sin = math.cos(angle), math.sin(angle)
    dx, dy = (cos * ox - sin * oy) / zoom, (sin * ox + cos * oy) / zoom
    # positions in the mirrored image (what the model sees as "where"); mirror back to read the source
    mx, my = cx + dx, cy + dy
    sx = W - 1 - mx if hflip else mx
    sy = H - 1 - my if vflip else my

    def normalise(p: torch.Tensor, n: int) -> torch.Tensor:
        return (2 * p + 1) / n - 1  # pixel index -> [-1, 1], pixel centres (align_corners=False)

    grid = torch.stack([normalise(sx, W), normalise(sy, H)], dim=-1)[None].float()  # (1, ph, pw, 2)
    coords = torch.stack([normalise(mx, W), normalise(my, H)]).float()  # (2, ph, pw)
    image = F.grid_sample(image[None].float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
    mask = F.grid_sample(mask[None, None].float(), grid, mode="nearest", padding_mode="zeros",
                         align_corners=False)[0, 0].to(mask.dtype)
    shifted = F.grid_sample((instances + 1)[None, None].float(), grid, mode="nearest", padding_mode="zeros",
                            align_corners=False)[0, 0]
    return image, mask, shifted.to(instances.dtype) - 1, coords


def intensity(aug: Augmentation, rng: np.random.Generator, x: torch.Tensor) -> torch.Tensor:
    """Contrast (around the mean), brightness shift, gamma (on the image rescaled to [0, 1]), Gaussian noise."""
    if aug.contrast > 0:
        factor = 1.0 + rng.uniform(-aug.contrast, aug.contrast)
        mean = x.mean(dim=(-2, -1), keepdim=True)
        x = (x - mean) * factor + mean
    if aug.brightness > 0:
        x = x + float(rng.uniform(-aug.brightness, aug.brightness))
    if aug.gamma != (1.0, 1.0):
        g = math.exp(rng.uniform(math.log(aug.gamma[0]), math.log(aug.gamma[1])))
        lo, hi = x.min(), x.max()
        if hi > lo:
            x = ((x - lo) / (hi - lo)).pow(g) * (hi - lo) + lo
    if aug.noise > 0:
        sigma = rng.uniform(0.0, aug.noise)
        x = x + torch.from_numpy(rng.standard_normal(tuple(x.shape), dtype=np.float32)) * float(sigma)
    return x


__all__ = ["Augmentation", "TEXT_FLIP_POLICIES", "View", "draw", "intensity", "sample_view", "swap_left_right"]
