"""Training loop: resume == uninterrupted, run-folder contents, evaluate determinism, CLI settings."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from lsms.checkpoint import load_checkpoint
from lsms.cli import main
from lsms.evaluate import evaluate_checkpoint
from lsms.train import TrainConfig, train

from toy_data import make_toy_dataset, tiny_train_settings


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy_dataset(tmp_path_factory.mktemp("toy"), n_images=6, n_val=2)


class Killed(Exception):
    pass


def _weights(run):
    return load_checkpoint(run / "last.pt")["model"]


REAL_RECIPE_LIKE = dict(  # the real recipe's augmentation and switches, at toy size
    augmentation=dict(patch_size=64, foreground_p=0.5, spatial_p=0.5, scale=[0.7, 1.4], rotation=15, vflip_p=0.5,
                      text_flip="swap", contrast=0.25, brightness=0.1, gamma=[0.7, 1.5], noise=0.05),
    model_overrides_extra=dict(coord_embed=True, output_stride=2),
)


@pytest.mark.parametrize("recipe", ["flips", "real"])
def test_resume_after_kill_matches_uninterrupted_run(toy, tmp_path, recipe):
    # 12 train samples, batch 4 -> 3 steps/epoch, 2 epochs = 6 steps; last.pt every 2 steps (mid-epoch too)
    settings = dict(epochs=2, save_every=2, augment=True)
    if recipe == "real":
        settings["augmentation"] = REAL_RECIPE_LIKE["augmentation"]
        base = tiny_train_settings(toy, tmp_path)["model_overrides"]
        settings["model_overrides"] = {**base, **REAL_RECIPE_LIKE["model_overrides_extra"]}
        settings["image_size"] = 96  # patches of 64 from 96 px images
    full = tmp_path / "full"
    train(TrainConfig(**tiny_train_settings(toy, full, **settings)))

    cut = tmp_path / "cut"

    def kill_at_step_5(step):
        if step == 5:
            raise Killed  # the process dies after step 5; the newest checkpoint is from step 4 (mid-epoch 2)

    with pytest.raises(Killed):
        train(TrainConfig(**tiny_train_settings(toy, cut, **settings)), on_step=kill_at_step_5)
    ckpt = load_checkpoint(cut / "last.pt")
    assert (ckpt["epoch"], ckpt["step"], ckpt["batch_in_epoch"]) == (1, 4, 1)
    summary = train(TrainConfig(**tiny_train_settings(toy, cut, **settings)), resume=cut)
    assert summary["step"] == 6 and summary["epoch"] == 2

    a, b = _weights(full), _weights(cut)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert load_checkpoint(full / "last.pt")["optimizer"]["state"].keys() == ckpt["optimizer"]["state"].keys()


def test_run_folder_contents(toy, tmp_path):
    run = tmp_path / "run"
    summary = train(TrainConfig(**tiny_train_settings(toy, run, epochs=2)))
    for name in ("last.pt", "best.pt", "config.json", "metrics.csv", "log.jsonl", "summary.json"):
        assert (run / name).is_file(), name
    assert any((run / "tensorboard").iterdir())
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert {"train_loss", "train_contrastive", "lr", "val_Dice", "val_mIoU", "val_referring_accuracy"} <= set(rows[0])
    ckpt = load_checkpoint(run / "last.pt")
    assert set(ckpt["config"]) >= {"model", "train", "preprocessing", "loss"}
    assert ckpt["config"]["model"]["text_config"]["hidden_size"] == 32
    assert ckpt["config"]["preprocessing"]["image_size"] == [64, 64]
    assert ckpt["optimizer"] is not None and len(ckpt["rng"]) == 1
    assert load_checkpoint(run / "best.pt")["optimizer"] is None  # best.pt is for inference
    assert summary["best"]["metric"] == "Dice" and 0.0 <= summary["best"]["value"] <= 1.0
    assert json.loads((run / "config.json").read_text())["train"]["epochs"] == 2


def test_evaluate_is_deterministic_and_matches_training(toy, tmp_path):
    run = tmp_path / "run"
    summary = train(TrainConfig(**tiny_train_settings(toy, run, epochs=1)))
    first = evaluate_checkpoint(run, toy, "val", device="cpu", batch_size=3, prefer="last")
    second = evaluate_checkpoint(run, toy, "val", device="cpu", batch_size=1, prefer="last")
    assert first["records"] == second["records"]  # batch size does not matter either
    assert first["summary"] == second["summary"]
    assert first["summary"]["Dice"] == summary["last_metrics"]["Dice"]
    assert first["summary"]["n_images"] == 4


def test_cli_train_evaluate_with_settings_file(toy, tmp_path):
    run = tmp_path / "run"
    settings = tiny_train_settings(toy, run, epochs=1)
    import yaml

    (tmp_path / "s.yaml").write_text(yaml.safe_dump({k: v for k, v in settings.items() if k not in ("data", "out")}))
    assert main(["train", str(toy), "--out", str(run), "--config", str(tmp_path / "s.yaml"), "--no-progress",
                 "--batch-size", "6"]) == 0
    cfg = load_checkpoint(run / "last.pt")["config"]["train"]
    assert cfg["batch_size"] == 6 and cfg["image_size"] == 64 and cfg["epochs"] == 1  # flag beats file
    out = tmp_path / "eval"
    assert main(["evaluate", str(run), str(toy), "--split", "val", "--text-level", "none", "--out", str(out),
                 "--json", str(tmp_path / "s.json"), "--save-predictions", "--device", "cpu"]) == 0
    rows = list(csv.DictReader(open(out / "per_sample.csv")))
    assert len(rows) == 4 and {"id", "dice", "iou", "referred_hit"} <= set(rows[0])
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["text_level"] == "none" and "referring_accuracy_multi" in summary
    assert len(list((out / "predictions").glob("*.png"))) == 4


def test_cli_errors_are_helpful(toy, tmp_path, capsys):
    assert main(["train", "--no-progress"]) == 2
    assert "give DATA" in capsys.readouterr().err
    assert main(["train", str(toy), "--image-size", "50"]) == 2
    assert "multiple of 32" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "nothing"), str(toy)]) == 2
    assert "does not exist" in capsys.readouterr().err
