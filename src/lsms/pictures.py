"""Pictures of predictions, drawn in one place for ``lsms predict``, ``lsms serve`` and ``lsms demo``.

Two kinds of output share the colours and opacities below:

- arrays the viewer sends as PNGs (:func:`overlay_rgba`, :func:`heat_over`, :func:`colormap`, :func:`png`,
  :func:`data_url`): one image's pixels, composited by the browser;
- figure files (:func:`save_overlay`, :func:`save_feature_maps`): matplotlib panels with captions, as
  ``lsms predict`` and the demo's report write them.

Masks as files are 0/255 8-bit grey PNGs (:func:`save_mask_png`), the same bytes from the command and the viewer.
"""

from __future__ import annotations

import base64
import io
import textwrap
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lsms.data.intensity import scale_intensity

COLOURS = ((1.0, 0.2, 0.2), (0.2, 0.8, 1.0), (0.3, 1.0, 0.3), (1.0, 0.8, 0.1))  # one per sentence, RGB in [0, 1]
OVERLAY_ALPHA = 0.45  # opacity of a mask's fill over the image
HEAT_ALPHA = 0.55  # opacity of a feature heat map over the image
HEAT_COLORMAP = "jet"


# --------------------------------------------------------------------------- arrays


def display_image(array: np.ndarray, preprocessing) -> np.ndarray:
    """Raw image -> float (H, W) or (H, W, 3) in [0, 1] for display, scaled as the model sees it (CT window)."""
    a = scale_intensity(array, preprocessing)
    if a.ndim == 3:
        a = a[..., :3] if a.shape[-1] >= 3 else a[..., 0]
    return a


def heat_map(feature: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """(1, C, h, w) stage output -> (H, W) in [0, 1]: mean absolute activation over channels, min-max scaled."""
    m = feature.float().abs().mean(1, keepdim=True)  # (1, 1, h, w)
    m = F.interpolate(m, size=size, mode="bilinear", align_corners=False)[0, 0]
    lo, hi = m.min(), m.max()
    return ((m - lo) / (hi - lo + 1e-12)).cpu().numpy()


def to_uint8(a: np.ndarray) -> np.ndarray:
    """[0, 1] -> 0..255 (clipped, rounded)."""
    return np.round(np.clip(a, 0.0, 1.0) * 255).astype(np.uint8)


def overlay_rgba(mask: np.ndarray, colour: tuple[float, float, float]) -> np.ndarray:
    """(H, W, 4) uint8: the mask filled at :data:`OVERLAY_ALPHA` with an opaque outline, transparent elsewhere."""
    from scipy.ndimage import binary_erosion  # deferred on purpose: only the viewer draws outlines this way

    rgba = np.zeros((*mask.shape, 4), np.uint8)
    rgba[..., :3] = to_uint8(np.asarray(colour, np.float32))
    rgba[..., 3] = np.where(mask, round(OVERLAY_ALPHA * 255), 0)
    rgba[mask & ~binary_erosion(mask), 3] = 255
    return rgba


def colormap(a: np.ndarray, name: str) -> np.ndarray:
    """(H, W) in [0, 1] -> (H, W, 3) uint8 through the matplotlib colour map ``name``."""
    from matplotlib import colormaps

    return to_uint8(colormaps[name](np.clip(a, 0.0, 1.0))[..., :3])


def heat_over(grey: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8: a stage heat map over the image at :data:`HEAT_ALPHA` (as :func:`save_feature_maps` draws it)."""
    from matplotlib import colormaps

    g = grey if grey.ndim == 3 else np.repeat(grey[..., None], 3, -1)
    heat_rgb = colormaps[HEAT_COLORMAP](np.clip(heat, 0.0, 1.0))[..., :3]
    # 0.45 = 1 - HEAT_ALPHA written out: the float 1.0 - 0.55 is one bit lower and moves some pixels a level
    return to_uint8(0.45 * g[..., :3] + HEAT_ALPHA * heat_rgb)


# --------------------------------------------------------------------------- PNG


def png(a: np.ndarray) -> bytes:
    """A uint8 array (H, W), (H, W, 3) or (H, W, 4) as PNG bytes (fast compression: the viewer sends many)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def data_url(a: np.ndarray) -> str:
    """A uint8 array as a PNG ``data:`` URL, which the page shows without another request."""
    return "data:image/png;base64," + base64.b64encode(png(a)).decode("ascii")


def save_mask_png(mask: np.ndarray, target) -> None:
    """Write a mask as a 0/255 8-bit grey PNG to a path or binary file (``lsms serve`` sends the same bytes)."""
    from PIL import Image

    Image.fromarray(mask.astype(np.uint8) * 255).save(target, format="PNG")


# --------------------------------------------------------------------------- figures


def save_overlay(array: np.ndarray, preprocessing, masks: list[np.ndarray | None], captions: list[str], path: Path,
                 title: str | None = None, ncols: int | None = None,
                 colours: list[tuple[float, float, float]] | None = None) -> Path:
    """Panels of the image with each mask in colour and its sentence as caption (a None mask: image only)."""
    import matplotlib  # deferred on purpose: only the picture files need it, and it takes a second to import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = display_image(array, preprocessing)
    n = len(masks)
    ncols = ncols or n
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 4.9 * nrows), squeeze=False)
    colours = colours or list(COLOURS)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for i, (ax, mask, caption) in enumerate(zip(axes.flat, masks, captions, strict=False)):
        ax.imshow(shown, cmap="gray", vmin=0, vmax=1)
        colour = colours[i % len(colours)]
        if mask is not None:
            rgba = np.zeros((*mask.shape, 4), np.float32)
            rgba[mask.astype(bool)] = (*colour, OVERLAY_ALPHA)
            ax.imshow(rgba)
            if mask.any():
                ax.contour(mask.astype(float), levels=[0.5], colors=[colour], linewidths=1.0)
        ax.set_title("\n".join(textwrap.wrap(caption or "(no text)", 52)), fontsize=7.5)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_feature_maps(array: np.ndarray, preprocessing, maps: list[np.ndarray], path: Path,
                      caption: str = "", rows: list[tuple[str, list[np.ndarray]]] | None = None,
                      mask: np.ndarray | None = None) -> Path:
    """The image and the four stage heat maps in a row (paper Fig. 6 style).

    ``rows`` adds further labelled rows of heat maps (e.g. what the sentence changes); ``mask`` outlines the
    target in the image panel.
    """
    import matplotlib  # deferred on purpose: only the picture files need it, and it takes a second to import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = display_image(array, preprocessing)
    all_rows = [("mean |activation|", maps), *(rows or [])]
    ncols = len(maps) + 1
    fig, axes = plt.subplots(len(all_rows), ncols, figsize=(2.6 * ncols, 2.9 * len(all_rows)), squeeze=False)
    for r, (label, row_maps) in enumerate(all_rows):
        axes[r, 0].imshow(shown, cmap="gray", vmin=0, vmax=1)
        if mask is not None and mask.any():
            axes[r, 0].contour(mask.astype(float), levels=[0.5], colors=["red"], linewidths=1.0)
        axes[r, 0].set_title("image" if r == 0 else "", fontsize=8)
        axes[r, 0].text(-0.08, 0.5, label, transform=axes[r, 0].transAxes, rotation=90, va="center",
                        ha="right", fontsize=8)
        for i, (ax, m) in enumerate(zip(axes[r, 1:], row_maps, strict=True), start=1):
            ax.imshow(shown, cmap="gray", vmin=0, vmax=1)
            ax.imshow(m, cmap=HEAT_COLORMAP, alpha=HEAT_ALPHA, vmin=0, vmax=1)
            if r == 0:
                ax.set_title(f"stage {i} (F{i})", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    if caption:
        fig.suptitle("\n".join(textwrap.wrap(caption, 110)), fontsize=7.5)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
