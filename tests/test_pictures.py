"""lsms.pictures: golden overlay and heat-map pixels, and the viewer's arrays against the saved figures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lsms.data.intensity import Preprocessing
from lsms.pictures import (
    COLOURS,
    heat_map,
    heat_over,
    overlay_rgba,
    save_feature_maps,
    save_overlay,
    to_uint8,
)

# 8-bit photos: value 255 * g shows as grey g
PREP = Preprocessing(image_size=(64, 64), in_channels=1, intensity="range", value_range=(0.0, 255.0))


def _commonest_colour(path: Path) -> np.ndarray:
    """The most frequent non-white RGB of a saved figure: a uniform panel's colour."""
    rgb = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)
    rgb = rgb[(rgb != 255).any(1)]
    colours, counts = np.unique(rgb, axis=0, return_counts=True)
    return colours[counts.argmax()].astype(int)


def test_overlay_rgba_golden():
    mask = np.zeros((5, 5), bool)
    mask[1:4, 1:4] = True
    rgba = overlay_rgba(mask, (1.0, 0.2, 0.2))
    assert rgba.dtype == np.uint8 and rgba.shape == (5, 5, 4)
    assert (rgba[..., :3] == (255, 51, 51)).all()
    alpha = np.full((5, 5), 0)
    alpha[1:4, 1:4] = 255  # the outline, opaque
    alpha[2, 2] = 115  # the inside, 45 %
    np.testing.assert_array_equal(rgba[..., 3], alpha)


def test_heat_map_and_heat_over_golden():
    feature = torch.tensor([[[[0.0, 2.0], [4.0, 6.0]], [[0.0, -2.0], [-4.0, -6.0]]]])  # (1, 2, 2, 2)
    np.testing.assert_allclose(heat_map(feature, (2, 2)), [[0.0, 1 / 3], [2 / 3, 1.0]], atol=1e-6)
    grey = np.full((1, 2), 0.5)
    heat = np.array([[0.0, 1.0]])  # jet: dark blue (0, 0, 0.5) and dark red (0.5, 0, 0)
    # 0.45 * 0.5 + 0.55 * (0, 0, 0.5) = (0.225, 0.225, 0.5) -> (57, 57, 128); and (0.5, 0.225, 0.225)
    np.testing.assert_array_equal(heat_over(grey, heat), [[[57, 57, 128], [128, 57, 57]]])


def test_saved_overlay_matches_the_viewers(tmp_path):
    """A mask's fill in ``lsms predict``'s figure is the viewer's overlay laid over the same image."""
    image = np.full((40, 40), 127.0, np.float32)
    mask = np.ones((40, 40), bool)  # all lesion: no outline in either picture
    save_overlay(image, PREP, [mask], ["a cyst"], tmp_path / "overlay.png")
    rgba = overlay_rgba(mask, COLOURS[0])[20, 20].astype(float) / 255
    grey = 127.0 / 255
    composite = to_uint8(rgba[3] * rgba[:3] + (1 - rgba[3]) * grey).astype(int)
    assert np.abs(_commonest_colour(tmp_path / "overlay.png") - composite).max() <= 2


def test_saved_feature_maps_match_the_viewers(tmp_path):
    """A stage heat map in ``lsms predict --features``'s figure is the viewer's heat map over the image."""
    image = np.full((40, 40), 127.0, np.float32)
    maps = [np.full((40, 40), 0.3, np.float32)] * 4
    save_feature_maps(image, PREP, maps, tmp_path / "features.png")
    viewer = heat_over(np.full((40, 40), 127.0 / 255, np.float32), maps[0])[20, 20].astype(int)
    assert np.abs(_commonest_colour(tmp_path / "features.png") - viewer).max() <= 2
