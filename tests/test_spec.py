"""The model spec: one frozen home of every input setting, resolved once, stored once in a checkpoint and once
in an exported file, and read back alike by every backend."""

from __future__ import annotations

import dataclasses
import json

import pytest

from lsms.backends import load_backend
from lsms.checkpoint import load_checkpoint, spec_of
from lsms.data import default_preprocessing
from lsms.export import export_model
from lsms.model import model_config
from lsms.spec import ModelSpec, resolve_spec
from lsms.train import train

from toy_data import add_negatives, make_toy_dataset, tiny_run_config


def test_a_spec_is_frozen_checked_and_round_trips():
    spec = resolve_spec(model_config("tiny"), default_preprocessing("CT", 128, in_channels=1))
    assert (spec.in_channels, spec.image_size, spec.max_tokens) == (1, (128, 128), spec.model.text.max_tokens)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.threshold = 0.3
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.model.text.max_tokens = 8
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.preprocessing.image_size = (64, 64)
    assert ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    with pytest.raises(ValueError, match="reads 3 channels but its preprocessing gives 1"):
        ModelSpec(model_config("tiny"), spec.preprocessing)
    with pytest.raises(ValueError, match="threshold must lie strictly between 0 and 1"):
        dataclasses.replace(spec, threshold=1.0)
    with pytest.raises(ValueError, match="multiples of 32"):
        spec.with_input(image_size=100)
    other = spec.with_input(image_size=96, max_tokens=12, threshold=0.4)
    assert (other.image_size, other.max_tokens, other.threshold) == ((96, 96), 12, 0.4) and spec.image_size == (128, 128)
    with pytest.raises(ValueError, match="unknown model spec fields"):
        ModelSpec.from_dict({**spec.to_dict(), "image_size": 64})


def test_train_export_and_load_agree_on_every_input_setting(tmp_path):
    data = add_negatives(make_toy_dataset(tmp_path / "toy", n_images=6, n_val=3))
    cfg = tiny_run_config(data, tmp_path / "run", optim={"epochs": 1})
    before = cfg.to_dict()
    train(cfg)
    assert cfg.to_dict() == before  # the settings given are not touched
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    spec = spec_of(ckpt)
    snapshot = spec.to_dict()
    assert spec.existence_threshold == ckpt["metrics"]["existence_threshold"]  # chosen on val, stored in the spec
    assert json.loads((tmp_path / "run" / "config.json").read_text())["spec"]["preprocessing"] == snapshot["preprocessing"]
    torch_backend = load_backend(tmp_path / "run", device="cpu", prefer="last")
    assert torch_backend.spec == spec
    path, metadata, _ = export_model(tmp_path / "run", tmp_path / "m.ts", "torchscript", prefer="last")
    assert metadata.spec == spec  # every input setting: model, text, preprocessing, thresholds
    exported = load_backend(path)
    assert exported.spec == spec and exported.tokenizer.max_tokens == spec.max_tokens
    assert exported.tokenizer.normalize_segments == spec.model.text.normalize_segments
    path, metadata, _ = export_model(tmp_path / "run", tmp_path / "other.onnx", image_size=96, max_tokens=12,
                                     prefer="last")
    assert metadata.spec == spec.with_input(image_size=96, max_tokens=12)  # only what the export changes
    assert load_backend(path).tokenizer.max_tokens == 12
    assert spec.to_dict() == snapshot and spec_of(load_checkpoint(tmp_path / "run" / "last.pt")) == spec
