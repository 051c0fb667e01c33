"""Negative expressions end to end: training chooses the existence threshold on val and saves it, evaluation
reports the existence metrics, prediction says "not found" below the threshold."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from PIL import Image

from lsms.checkpoint import existence_threshold_of, load_checkpoint
from lsms.cli import main
from lsms.evaluate import evaluate_checkpoint
from lsms.metrics import existence_score
from lsms.predict import Predictor
from lsms.train import train

from toy_data import add_negatives, make_toy_dataset, tiny_run_config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    data = add_negatives(make_toy_dataset(tmp_path_factory.mktemp("toy_neg"), n_images=6, n_val=3))
    out = tmp_path_factory.mktemp("run") / "run"
    train(tiny_run_config(data, out, optim={"epochs": 1}))
    return data, out


def test_training_saves_the_threshold_chosen_on_val(run):
    data, out = run
    ckpt = load_checkpoint(out / "last.pt")
    t = existence_threshold_of(ckpt)
    assert t is not None and 0.5 <= t < 1.0
    assert ckpt["metrics"]["n_negative"] == 3 and ckpt["metrics"]["n_positive"] == 6
    assert existence_threshold_of({"metrics": {}}) is None


def test_evaluation_reports_existence_at_the_saved_threshold(run):
    data, out = run
    result = evaluate_checkpoint(out, data, "val", device="cpu", batch_size=4, prefer="last")
    s = result["summary"]
    assert s["existence_threshold"] == existence_threshold_of(load_checkpoint(out / "last.pt"))
    assert s["n_negative"] == 3 and 0.0 <= s["existence_AUROC"] <= 1.0
    records = {r["id"]: r for r in result["records"]}
    assert all(0.0 <= r["existence"] <= 1.0 for r in records.values())
    # a record's score is the highest probability of its logits
    predictor = Predictor.from_checkpoint(out, device="cpu", prefer="last")
    from lsms.data import load_samples, read_image

    sample = next(r for r in load_samples(data, "val") if r.extra.get("negative"))
    pred = predictor.predict(read_image(sample.image_path), sample.text)
    assert pred.existence == pytest.approx(records[sample.id]["existence"], abs=1e-5)
    # no negatives: no existence block
    plain = evaluate_checkpoint(out, make_toy_dataset(data.parent / "plain", n_images=1, n_val=2), "val",
                                device="cpu", prefer="last")["summary"]
    assert "existence_AUROC" not in plain


def test_predict_withholds_the_mask_below_the_existence_threshold(run, tmp_path, capsys):
    data, out = run
    image = data / "images" / "img006.png"
    never = Predictor.from_checkpoint(out, device="cpu", prefer="last", existence_threshold=0.0)
    shown = never.predict(image, "the round lesion on the left side of the image")
    assert shown.found and np.array_equal(shown.mask, shown.probability > 0.5)
    always = Predictor.from_checkpoint(out, device="cpu", prefer="last", existence_threshold=0.999999)
    hidden = always.predict(image, "the round lesion on the left side of the image")
    assert not hidden.found and not hidden.mask.any() and hidden.existence == pytest.approx(shown.existence)
    res = tmp_path / "pred"
    assert main(["predict", str(out), str(image), "--text", "a square lesion", "--out", str(res),
                 "--existence-threshold", "0.999999", "--checkpoint", "last", "--device", "cpu"]) == 0
    assert "not found: 'a square lesion'" in capsys.readouterr().out
    (row,) = list(csv.DictReader(open(res / "predictions.csv")))
    assert row["found"] == "False" and float(row["existence"]) < 0.999999 and row["area_px"] == "0"
    assert not np.asarray(Image.open(res / "img006_mask.png")).any()
    with pytest.raises(ValueError, match="existence threshold must lie in"):
        Predictor.from_checkpoint(out, device="cpu", prefer="last", existence_threshold=1.5)


def test_existence_score_matches_mask_rule():
    logits = torch.tensor([[[[-1.0, 0.5]]], [[[-2.0, -0.1]]]])
    score = existence_score(logits)
    assert bool(score[0] > 0.5) and bool(score[1] < 0.5)  # > 0.5 exactly when the mask is not empty
