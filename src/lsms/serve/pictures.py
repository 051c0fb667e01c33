"""Pictures the page shows: PNG encoding, mask overlays, probability colours, feature heat maps."""

from __future__ import annotations

import base64
import io

import numpy as np


def to_uint8(a: np.ndarray) -> np.ndarray:
    return np.round(np.clip(a, 0.0, 1.0) * 255).astype(np.uint8)


def png(a: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def data_url(a: np.ndarray) -> str:
    return "data:image/png;base64," + base64.b64encode(png(a)).decode("ascii")


def overlay(mask: np.ndarray, colour: tuple[float, float, float]) -> np.ndarray:
    """RGBA: the mask filled at 45% opacity with an opaque outline, transparent elsewhere."""
    from scipy.ndimage import binary_erosion

    rgba = np.zeros((*mask.shape, 4), np.uint8)
    rgba[..., :3] = to_uint8(np.asarray(colour, np.float32))
    rgba[..., 3] = np.where(mask, 115, 0)
    rgba[mask & ~binary_erosion(mask), 3] = 255
    return rgba


def colormap(a: np.ndarray, name: str) -> np.ndarray:
    from matplotlib import colormaps

    return to_uint8(colormaps[name](np.clip(a, 0.0, 1.0))[..., :3])


def heat_over(grey: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """A stage heat map in jet over the image at 55% (as ``lsms predict --features`` draws it)."""
    from matplotlib import colormaps

    g = grey if grey.ndim == 3 else np.repeat(grey[..., None], 3, -1)
    return to_uint8(0.45 * g[..., :3] + 0.55 * colormaps["jet"](np.clip(heat, 0.0, 1.0))[..., :3])
