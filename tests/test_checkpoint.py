"""Checkpoints: atomic writes, safe loading (no code execution), RNG round trip."""

from __future__ import annotations

import os
import pickle
import random
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from lsms import checkpoint as C
from lsms.data import SegmentationDataset, load_samples
from lsms.data.loaders import make_loader
from lsms.distributed import DistEnv
from lsms.evaluate import evaluate_model
from lsms.seeding import rng_state, set_rng_state

from toy_data import make_toy_dataset

V1 = Path(__file__).parent / "fixtures" / "v1"
V2 = Path(__file__).parent / "fixtures" / "v2"


def _ckpt(value: float) -> dict:
    return {
        "format": C.FORMAT, "format_version": C.FORMAT_VERSION, "model": {"w": torch.full((3, 3), value)},
        "optimizer": None, "epoch": 1, "step": 7, "batch_in_epoch": 0, "rng": [rng_state()],
        "spec": {"model": {"preset": "tiny", "widths": [1, 2]}, "preprocessing": {}}, "run": {"optim": {"lr": 1e-3}},
    }


def test_save_and_load_round_trip(tmp_path):
    path = C.save_checkpoint(_ckpt(1.0), tmp_path / "run" / "last.pt")
    loaded = C.load_checkpoint(path)
    assert torch.equal(loaded["model"]["w"], torch.ones(3, 3))
    assert loaded["spec"]["model"]["widths"] == [1, 2]
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temporary files left behind


def test_interrupted_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    path = C.save_checkpoint(_ckpt(1.0), tmp_path / "last.pt")
    real_save = torch.save

    def crash_midway(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(f.tell() // 2)  # half a file written ...
        raise KeyboardInterrupt("killed while saving")  # ... then the process is interrupted

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        C.save_checkpoint(_ckpt(2.0), path)
    monkeypatch.undo()
    assert torch.equal(C.load_checkpoint(path)["model"]["w"], torch.ones(3, 3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


class _Payload:
    """Pickles to a call of os.system: what a malicious checkpoint would contain."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_checkpoint_does_not_execute(tmp_path):
    marker = tmp_path / "pwned"
    evil = _ckpt(1.0)
    evil["run"]["payload"] = _Payload(marker)
    path = tmp_path / "evil.pt"
    torch.save(evil, path)  # a real torch zip archive whose data.pkl calls os.system when unpickled
    with zipfile.ZipFile(path) as z:
        assert any(b"system" in z.read(n) for n in z.namelist() if n.endswith("data.pkl"))
    with pytest.raises(ValueError, match="cannot load checkpoint .* safely"):
        C.load_checkpoint(path)
    assert not marker.exists()
    # the same payload as a plain (non-zip) pickle
    raw = tmp_path / "evil_raw.pt"
    raw.write_bytes(pickle.dumps(evil))
    with pytest.raises(ValueError):
        C.load_checkpoint(raw)
    assert not marker.exists()


def test_load_rejects_foreign_and_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        C.load_checkpoint(tmp_path / "nope.pt")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an lsms checkpoint"):
        C.load_checkpoint(tmp_path / "other.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="safely"):
        C.load_checkpoint(tmp_path / "garbage.pt")


def test_resolve_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint in run folder"):
        C.resolve_checkpoint(tmp_path)
    C.save_checkpoint(_ckpt(1.0), tmp_path / "last.pt")
    assert C.resolve_checkpoint(tmp_path).name == "last.pt"
    C.save_checkpoint(_ckpt(1.0), tmp_path / "best.pt")
    assert C.resolve_checkpoint(tmp_path).name == "best.pt"
    assert C.resolve_checkpoint(tmp_path, prefer="last").name == "last.pt"
    assert C.resolve_checkpoint(tmp_path / "last.pt").name == "last.pt"


def test_rng_state_round_trip_through_file(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    ckpt = _ckpt(0.0)
    ckpt["rng"] = [rng_state()]
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    C.save_checkpoint(ckpt, tmp_path / "last.pt")
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(C.load_checkpoint(tmp_path / "last.pt")["rng"][0])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_format_1_checkpoint_loads_to_the_same_network():
    """A checkpoint written before the settings tree (tests/fixtures/v1/README.md) gives the same logits."""
    model, spec, ckpt = C.load_trained(V1 / "best.pt")
    assert ckpt["format_version"] == C.FORMAT_VERSION == 3
    expected = torch.load(V1 / "expected.pt", weights_only=True)
    with torch.no_grad():
        logits = model.forward_features(expected["image"], expected["input_ids"], expected["attention_mask"]).logits
        fast = model(expected["image"], expected["input_ids"], expected["attention_mask"])
    # the same weights and network; the thread count (the fixture was made on 1) only moves float rounding, and
    # forward takes the decoder's logits-only path: the same network, summed in another order
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast, expected["logits"], atol=1e-5, rtol=1e-5)
    run = C.run_config(ckpt)  # the flat 0.1 settings, each at its place in the tree
    assert (run.model.widths, run.model.text.max_tokens, run.model.text.pretrained) == ((8, 16, 16, 32), 16, False)
    assert (run.optim.lr, run.optim.warmup_steps, run.data.image_size, run.log_every) == (1e-3, 1, 64, 1)
    assert run.model.text.hf_config["hidden_size"] == 8 and run.loss.contrastive_weight == 0.125


def test_format_1_checkpoint_evaluates_to_its_saved_metrics(tmp_path):
    """The validation metrics the v1 run saved are what the same split gives now."""
    data = make_toy_dataset(tmp_path / "toy", n_images=4, n_val=2)  # the fixture's dataset (seeded)
    model, spec, ckpt = C.load_trained(V1)
    env = DistEnv(device=torch.device("cpu"))
    loader = make_loader(SegmentationDataset(load_samples(data, "val"), spec.preprocessing), 4, env,
                         tokenizer=model.tokenizer)
    summary = evaluate_model(model, loader, env.device, env)["summary"]
    assert summary.pop("n_nonfinite_logits") == 0  # counted since the fixture was made
    assert summary == ckpt["metrics"]


def test_format_2_checkpoint_loads_to_the_same_network_and_spec(tmp_path):
    """A checkpoint written before the model spec (tests/fixtures/v2/README.md) gives the same logits; its
    settings come back whole, the input settings stored once, in the spec."""
    model, spec, ckpt = C.load_trained(V2 / "best.pt")
    assert ckpt["format_version"] == 3 and "config" not in ckpt
    expected = torch.load(V2 / "expected.pt", weights_only=True)
    with torch.no_grad():
        logits = model.forward_features(expected["image"], expected["input_ids"], expected["attention_mask"]).logits
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-5, atol=1e-5)
    assert spec.image_size == (64, 64) and spec.in_channels == 3 and spec.max_tokens == 16
    assert spec.model.block_norm == "group" and spec.existence_threshold is None
    assert not {"image_size", "in_channels", "window"} & set(ckpt["run"]["data"]) and "model" not in ckpt["run"]
    run = C.run_config(ckpt)
    assert (run.data.image_size, run.data.in_channels, run.model.widths) == (64, 3, (8, 16, 16, 32))
    data = make_toy_dataset(tmp_path / "toy", n_images=4, n_val=2)  # the fixture's dataset (seeded)
    env = DistEnv(device=torch.device("cpu"))
    loader = make_loader(SegmentationDataset(load_samples(data, "val"), spec.preprocessing), 4, env,
                         tokenizer=model.tokenizer)
    summary = evaluate_model(model, loader, env.device, env)["summary"]
    assert {k: summary[k] for k in ("Dice", "mIoU", "n_images")} == {k: ckpt["metrics"][k] for k in ("Dice", "mIoU", "n_images")}


def test_upgrade_names_every_format_1_setting():
    flat = {"data": "d", "preset": "film-unet", "use_text": True, "lr": 0.1, "image_size": 96, "text_encoder": "x",
            "model_overrides": {"features": [8, 8, 8, 8, 8, 8], "text_config": {"a": 1}}, "loss": {"tau": 0.2}}
    old = {"format": C.FORMAT, "format_version": 1, "model": {}, "config": {
        "model": {"arch": "unet", "preset": "film-unet", "use_text": True, "features": [8, 8, 8, 8, 8, 8],
                  "text_encoder": "x", "text_config": {"a": 1}, "pretrained_text": True, "freeze_text": False,
                  "max_tokens": 20},
        "train": flat, "preprocessing": {"image_size": [96, 96]},
        "loss": {"tau": 0.2, "contrastive_weight": 0.125}}}
    new = C.upgrade_v2(C.upgrade_v1(old))
    run = C.run_config(new)
    assert run.model.preset == "film-unet" and run.model.features == (8,) * 6 and run.model.text.max_tokens == 20
    assert (run.data.path, run.data.image_size, run.optim.lr, run.loss.tau) == ("d", 96, 0.1, 0.2)
    assert new["spec"]["preprocessing"] == {"image_size": [96, 96]} and old["format_version"] == 1


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("config", [[1], "x", {"train": [1, 2]}, {"train": {}, "model": [1]}, {"run": [], "preprocessing": 3}])
def test_a_malformed_config_section_is_an_error_naming_what_is_missing(tmp_path, version, config):
    path = tmp_path / "bad.pt"
    torch.save({"format": C.FORMAT, "format_version": version, "model": {"w": torch.zeros(1)}, "config": config}, path)
    with pytest.raises(ValueError, match=r"bad\.pt.*'(run|spec)'.* is missing"):
        C.load_checkpoint(path)
