"""CT windows, percentile scaling and the Preprocessing saved with a model: golden values by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lsms.data import (
    CT_WINDOWS,
    Preprocessing,
    apply_window,
    default_preprocessing,
    percentile_scale,
    preprocess_image,
)


def test_named_windows_golden_values() -> None:
    assert CT_WINDOWS["liver"] == (150.0, 30.0)
    hu = np.array([-1000, -45, 30, 67.5, 105, 2000], np.float32)
    np.testing.assert_allclose(apply_window(hu, *CT_WINDOWS["liver"]), [0, 0, 0.5, 0.75, 1, 1])
    # abdomen W400 L50 -> [-150, 250]
    np.testing.assert_allclose(apply_window(np.array([-150, 50, 150, 250.0]), *CT_WINDOWS["abdomen"]), [0, 0.5, 0.75, 1])
    # lung W1500 L-600 -> [-1350, 150]
    np.testing.assert_allclose(apply_window(np.array([-1350, -600, 150.0]), *CT_WINDOWS["lung"]), [0, 0.5, 1])
    # mediastinum W350 L50 -> [-125, 225]; bone W1800 L400 -> [-500, 1300]
    np.testing.assert_allclose(apply_window(np.array([-125, 225.0]), *CT_WINDOWS["mediastinum"]), [0, 1])
    np.testing.assert_allclose(apply_window(np.array([-500, 400, 1300.0]), *CT_WINDOWS["bone"]), [0, 0.5, 1])
    with pytest.raises(ValueError, match="window width must be positive"):
        apply_window(hu, 0, 10)


def test_custom_window_and_preprocess_golden() -> None:
    prep = Preprocessing(image_size=2, in_channels=1, intensity="window", window_width=100, window_level=0)
    x = preprocess_image(np.array([[-50, 0], [25, 50]], np.int16), prep)
    assert x.shape == (1, 2, 2) and x.dtype == torch.float32
    torch.testing.assert_close(x[0], torch.tensor([[0.0, 0.5], [0.75, 1.0]]))


def test_percentile_scale() -> None:
    a = np.arange(101, dtype=np.float32)  # percentiles of 0..100 are the values themselves
    out = percentile_scale(a, 10, 90)
    assert out[10] == 0 and out[50] == pytest.approx(0.5) and out[90] == 1 and out[0] == 0 and out[100] == 1
    assert not percentile_scale(np.full((4, 4), 7.0)).any()  # constant image -> zeros, no division by zero


def test_defaults_from_modality() -> None:
    ct = default_preprocessing("CT")
    assert ct.intensity == "window" and ct.window == "liver" and ct.window_width_level == (150.0, 30.0)
    assert default_preprocessing("XR").intensity == "percentile"
    assert default_preprocessing(None, image_size=(32, 48)).image_size == (32, 48)


def test_to_dict_round_trip_is_json_and_exact() -> None:
    prep = Preprocessing(image_size=(64, 96), in_channels=3, intensity="window", window="lung", mean=(0.5,), std=(0.25,))
    d = json.loads(json.dumps(prep.to_dict()))
    again = Preprocessing.from_dict(d)
    assert again == prep
    image = np.random.default_rng(0).normal(-500, 300, (50, 70)).astype(np.float32)
    torch.testing.assert_close(preprocess_image(image, prep), preprocess_image(image, again), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"unknown preprocessing settings \['windw'\]"):
        Preprocessing.from_dict({**d, "windw": "liver"})


def test_channels_and_resize() -> None:
    grey = np.random.default_rng(1).uniform(0, 255, (20, 30))
    x3 = preprocess_image(grey, Preprocessing(image_size=(10, 15), in_channels=3, intensity="range"))
    assert x3.shape == (3, 10, 15) and torch.equal(x3[0], x3[2])
    rgb = np.zeros((4, 4, 3), np.float32)
    rgb[..., 1] = 255
    x1 = preprocess_image(rgb, Preprocessing(image_size=4, in_channels=1, intensity="range"))
    torch.testing.assert_close(x1, torch.full((1, 4, 4), 0.587))  # BT.601 luminance of pure green


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"in_channels": 2}, "in_channels must be 1 or 3"),
        ({"intensity": "zscore"}, "intensity must be one of"),
        ({"intensity": "window", "window": "kidney"}, "unknown CT window 'kidney'"),
        ({"intensity": "window"}, "needs a named window or both"),
        ({"image_size": 0}, "image_size must be"),
    ],
)
def test_bad_settings_are_named(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Preprocessing(**kwargs)


def test_nan_image_rejected() -> None:
    with pytest.raises(ValueError, match="NaN or inf"):
        preprocess_image(np.array([[0, np.nan]], np.float32), Preprocessing())
