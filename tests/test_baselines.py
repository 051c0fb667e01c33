"""The U-Net baselines: same interface as LSMS, text fusion by FiLM, config round trip."""

from __future__ import annotations

import pytest
import torch

from lsms.model import build, build_model, model_config_from_dict

from conftest import tiny_model_kwargs


def test_plain_unet_is_monais_basicunet():
    model = build_model("unet", in_channels=1).eval()
    image = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        out = model.forward_features(image)
        assert torch.equal(out.logits, model.unet(image))  # the manual forward is BasicUNet's forward
    assert out.text_embedding is None and out.logits.shape == (2, 1, 64, 64)
    assert not [n for n, _ in model.named_parameters() if "text" in n or "film" in n]


def test_film_unet_uses_the_sentence_and_every_parameter_learns():
    model = build_model("film-unet", **tiny_model_kwargs())
    tok = model.tokenize(["the cyst in segment VI", "the metastasis in segment II"])
    image = torch.randn(1, 3, 64, 64).expand(2, -1, -1, -1)
    out = model.forward_features(image, tok["input_ids"], tok["attention_mask"])
    assert out.logits.shape == (2, 1, 64, 64) and out.text_embedding.shape == (2, out.decoder.shape[1])
    assert (out.logits[0] - out.logits[1]).abs().max() > 1e-5  # same image, different sentence
    (out.logits.square().mean() + (out.decoder.mean((2, 3)) * out.text_embedding).mean()).backward()
    assert not [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]


def test_config_round_trip_and_dispatch():
    model = build_model("film-unet", **tiny_model_kwargs(in_channels=1))
    again = build(model_config_from_dict(model.config.to_dict()))
    assert type(again) is type(model) and again.config == model.config
    lsms = build_model("tiny", use_text=False)
    assert type(build(model_config_from_dict(lsms.config.to_dict()))) is type(lsms)
    with pytest.raises(ValueError, match="unknown preset 'transformer'"):
        model_config_from_dict({"preset": "transformer"})
    with pytest.raises(ValueError, match="has arch 'unet'"):
        model_config_from_dict({"preset": "unet", "arch": "lsms"})


def test_baseline_errors():
    with pytest.raises(ValueError, match="6 positive widths"):
        build_model("unet", features=(8, 8))
    model = build_model("unet")
    with pytest.raises(ValueError, match="multiples of 16"):
        model(torch.randn(1, 3, 40, 40))
    with pytest.raises(ValueError, match="without text"):
        model.tokenize(["a"])


def test_named_model_refuses_settings_that_do_not_apply():
    with pytest.raises(ValueError, match="choose film-unet"):
        build_model("unet", use_text=True)
    with pytest.raises(ValueError, match="do not apply"):
        build_model("unet", decoder="last")
