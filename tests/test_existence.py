"""Negative expressions end to end: training chooses the existence threshold on val and saves it, evaluation
reports the existence metrics, prediction says "not found" below the threshold."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from PIL import Image

from lsms.checkpoint import load_checkpoint, spec_of
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
    t = spec_of(ckpt).existence_threshold
    assert t is not None and 0.5 <= t < 1.0 and t == ckpt["metrics"]["existence_threshold"]
    assert ckpt["metrics"]["n_negative"] == 3 and ckpt["metrics"]["n_positive"] == 6
    assert spec_of(ckpt).with_thresholds({}).existence_threshold is None


def test_evaluation_reports_existence_at_the_saved_threshold(run):
    data, out = run
    result = evaluate_checkpoint(out, data, "val", device="cpu", batch_size=4, prefer="last")
    s = result["summary"]
    assert s["existence_threshold"] == spec_of(load_checkpoint(out / "last.pt")).existence_threshold
    assert s["n_negative"] == 3 and 0.0 <= s["existence_AUROC"] <= 1.0
    records = {r["id"]: r for r in result["records"]}
    assert all(0.0 <= r["existence"] <= 1.0 for r in records.values())
    # the manifest's kind of each negative reaches its record and the summary's per-kind figures
    assert sorted(r.get("negative", "") for r in records.values()) == [""] * 6 + ["type"] * 3
    assert s["n_negative_of_type"] == 3 and s["existence_AUROC_of_type"] == s["existence_AUROC"]
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


# --------------------------------------------------------------------------- the learned existence head


@pytest.fixture(scope="module")
def head_run(tmp_path_factory):
    data = add_negatives(make_toy_dataset(tmp_path_factory.mktemp("toy_neg_head"), n_images=6, n_val=3))
    out = tmp_path_factory.mktemp("run") / "head"
    train(tiny_run_config(data, out, optim={"epochs": 1}, model={"existence_head": True, "existence_channels": 8}))
    return data, out


def test_the_head_gives_one_logit_per_sentence_and_is_trained_by_its_loss():
    from lsms.losses import LSMSLoss, balanced_bce
    from lsms.model import build, model_config_from_dict

    from toy_data import tiny_model

    torch.manual_seed(0)
    model = build(model_config_from_dict({**tiny_model(), "in_channels": 1, "existence_head": True}))
    tokens = model.tokenize(["a round lesion", "a square lesion"])
    out = model.forward_features(torch.randn(2, 1, 64, 64), tokens["input_ids"], tokens["attention_mask"])
    assert out.existence.shape == (2,)
    target = torch.zeros(2, 1, 64, 64)
    target[0, 0, 10:20, 10:20] = 1  # the first sentence's lesion is there, the second's is not
    losses = LSMSLoss()(out.logits, target, existence=out.existence)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(out.existence, torch.tensor([1.0, 0.0]), reduction="none")
    expected = bce.mean()  # one of each class: the balanced loss is the plain mean
    assert float(balanced_bce(torch.tensor([2.0, 1.0, -1.0]), torch.tensor([True, True, False]))) == pytest.approx(
        0.5 * (float(torch.nn.functional.softplus(torch.tensor([-2.0, -1.0])).mean()) + float(torch.nn.functional.softplus(torch.tensor(-1.0)))))
    assert float(losses["existence"]) == pytest.approx(float(expected), rel=1e-5)
    assert float(losses["loss"]) == pytest.approx(float(losses["focal"] + losses["dice"] + losses["existence"]), rel=1e-5)
    losses["existence"].backward()
    assert model.existence.mlp[0].weight.grad.abs().sum() > 0
    # the head reads the network as constants: only the head learns from its loss
    assert all(p.grad is None for name, p in model.named_parameters() if not name.startswith("existence."))
    # without the head: the paper's loss, the existence term 0
    assert float(LSMSLoss()(out.logits, target)["existence"]) == 0
    with pytest.raises(ValueError, match="existence_head needs a sentence"):
        model_config_from_dict({**tiny_model(), "use_text": False, "existence_head": True})


def test_training_with_the_head_saves_both_thresholds_and_evaluation_uses_the_head(head_run):
    data, out = head_run
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["spec"]["model"]["existence_head"] is True
    t, t_max = spec_of(ckpt).existence_threshold, spec_of(ckpt).max_prob_threshold
    assert t is not None and 0.0 <= t < 1.0 and t_max is not None and 0.5 <= t_max < 1.0
    result = evaluate_checkpoint(out, data, "val", device="cpu", batch_size=4, prefer="last")
    s = result["summary"]
    assert s["existence_threshold"] == t and s["existence_threshold_max_prob"] == t_max
    assert 0.0 <= s["existence_AUROC"] <= 1.0 and 0.0 <= s["existence_AUROC_max_prob"] <= 1.0
    # the record's score is the head's probability, not the highest mask probability
    from lsms.backends import load_backend
    from lsms.data import load_samples, read_image

    backend = load_backend(out, device="cpu", prefer="last")
    sample = next(r for r in load_samples(data, "val") if r.extra.get("negative"))
    predictor = Predictor(backend)
    pred = predictor.predict(read_image(sample.image_path), sample.text)
    record = next(r for r in result["records"] if r["id"] == sample.id)
    assert pred.existence == pytest.approx(record["existence"], abs=1e-5)
    x, ids, attn = predictor._inputs(read_image(sample.image_path), sample.text)[1]
    logits, head = backend.answer(x, ids, attn)
    assert pred.existence == pytest.approx(float(torch.sigmoid(head[0])), abs=1e-6)
    assert record["existence_max_prob"] == pytest.approx(float(existence_score(logits)[0]), abs=1e-5)
    assert predictor.predict(read_image(sample.image_path), sample.text, features=True).existence == pytest.approx(
        pred.existence, abs=1e-6)
    # the viewer answers with the same score
    import io

    from lsms.serve import Viewer

    (data.parent / "sessions").mkdir(exist_ok=True)
    viewer = Viewer(predictor, root=data.parent / "sessions")
    sid = viewer.new_session()["sid"]
    buf = io.BytesIO()
    Image.open(sample.image_path).save(buf, format="PNG")
    viewer.open_upload(sid, [("x.png", buf.getvalue())])
    shown = viewer.predict(sid, 0, [sample.text], 0.5)["results"][0]
    assert shown["existence"] == pytest.approx(round(pred.existence, 4), abs=1e-4) and shown["found"] == pred.found


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_an_exported_file_carries_the_head(head_run, tmp_path, fmt):
    from lsms.backends import load_backend
    from lsms.export import export_model

    data, out = head_run
    path, metadata, diff = export_model(out, tmp_path / f"m.{fmt}", fmt, prefer="last", batch=2)
    assert metadata.outputs == ("logits", "existence") and diff < 1e-3
    exported, torch_backend = load_backend(path), load_backend(out, device="cpu", prefer="last")
    assert exported.existence_threshold == torch_backend.existence_threshold
    channels = exported.preprocessing.in_channels
    image = torch.randn(3, channels, 64, 64, generator=torch.Generator().manual_seed(1))  # a fixed batch of 2, padded
    tokens = exported.tokenize(["the round lesion", "a square lesion", "the lesion"])
    logits, head = exported.answer(image, tokens["input_ids"], tokens["attention_mask"])
    ref_logits, ref_head = torch_backend.answer(image, tokens["input_ids"], tokens["attention_mask"])
    assert head.shape == (3,) and torch.allclose(head, ref_head, atol=1e-3)
    assert torch.allclose(logits, ref_logits, atol=1e-3)
    result = evaluate_checkpoint(path, data, "val", batch_size=2)
    assert result["summary"]["existence_threshold"] == exported.existence_threshold


def test_the_head_is_fit_anew_on_the_frozen_network_once_training_is_over(head_run):
    import json

    from lsms.checkpoint import load_trained
    from lsms.config import RunConfig
    from lsms.data import load_samples
    from lsms.distributed import DistEnv
    from lsms.existence import head_inputs
    from lsms.train import refit_loader

    data, out = head_run
    refit = json.loads((out / "summary.json").read_text())["existence_refit"]
    records = load_samples(data, "train")
    negatives = sum(r.target_instance == 0 for r in records)
    assert refit["samples"] == len(records) and refit["negatives"] == negatives > 0 and refit["steps"] == 300
    # the saved head separates the train split's sentences it was fit on, read from the frozen network
    model, spec, _ = load_trained(out, prefer="last")
    from lsms.data import SegmentationDataset

    train_set = SegmentationDataset(records, spec.preprocessing)
    env = DistEnv(device=torch.device("cpu"))
    loader = refit_loader(train_set, RunConfig(), env, model.tokenizer)
    inputs, present = head_inputs(model, loader, env, None)
    logits = model.existence.mlp(inputs).squeeze(1)
    assert int((~present).sum()) == negatives and logits[present].min() > logits[~present].max()
    # 0 steps: the head stays as trained alongside the network
    from lsms.existence import refit_existence_head

    before = {k: v.clone() for k, v in model.existence.state_dict().items()}
    assert refit_existence_head(model, loader, 0, env) is None
    assert all(torch.equal(before[k], v) for k, v in model.existence.state_dict().items())


def test_a_best_checkpoint_older_than_the_last_step_gets_its_head_fit_anew(tmp_path, monkeypatch):
    """The refit after the last step fits the last network's head; best.pt of an earlier epoch is fit anew on its
    own network too, with its thresholds chosen again on val."""
    import json

    import lsms.train as T
    from lsms.checkpoint import load_trained
    from lsms.config import RunConfig
    from lsms.data import SegmentationDataset, load_samples
    from lsms.distributed import DistEnv
    from lsms.existence import head_inputs

    data = add_negatives(make_toy_dataset(tmp_path / "toy", n_images=6, n_val=3))
    calls, validate = [], T.validate

    def first_epoch_best(*args, **kwargs):  # val Dice 0.9 after epoch 1, 0.5 after epoch 2: best.pt is epoch 1's
        metrics = validate(*args, **kwargs)
        calls.append(metrics["existence_threshold"])
        return {**metrics, "Dice": [0.9, 0.5][len(calls) - 1]} if len(calls) <= 2 else metrics

    monkeypatch.setattr(T, "validate", first_epoch_best)
    out = tmp_path / "run"
    train(tiny_run_config(data, out, optim={"epochs": 2}, model={"existence_head": True, "existence_channels": 8}))
    summary = json.loads((out / "summary.json").read_text())
    best = load_checkpoint(out / "best.pt")
    assert 2 * best["step"] == summary["step"] > 0 and len(calls) == 3  # validated again after the refit
    records = load_samples(data, "train")
    assert summary["existence_refit_best"]["samples"] == len(records)
    assert best["spec"]["existence_threshold"] == calls[2]
    model, spec, _ = load_trained(out, prefer="best")
    env = DistEnv(device=torch.device("cpu"))
    loader = T.refit_loader(SegmentationDataset(records, spec.preprocessing), RunConfig(), env, model.tokenizer)
    inputs, present = head_inputs(model, loader, env, None)
    logits = model.existence.mlp(inputs).squeeze(1)
    assert logits[present].min() > logits[~present].max()  # fit on the best network's own inputs


def test_fitting_the_head_is_deterministic_and_blind_to_the_scale_of_its_inputs():
    from lsms.existence import fit_head
    from lsms.model.decoder import ExistenceHead

    g = torch.Generator().manual_seed(0)
    present = torch.arange(40) % 3 != 0
    x = torch.randn(40, 4 * 4 + 4, generator=g) + 2.0 * present[:, None]  # (N, 4C + 4) for C = 4
    scale, shift = torch.rand(x.shape[1], generator=g) * 100 + 0.01, torch.randn(x.shape[1], generator=g) * 50
    heads = [ExistenceHead(4, 8) for _ in range(3)]
    keys = set(heads[0].state_dict())
    state = torch.random.get_rng_state()
    fit_head(heads[0], x, present, 100, seed=1)
    fit_head(heads[1], x, present, 100, seed=1)
    fit_head(heads[2], x * scale + shift, present, 100, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)  # the training RNG streams are left alone
    assert set(heads[2].state_dict()) == keys
    with torch.no_grad():
        first, again, scaled = heads[0].mlp(x), heads[1].mlp(x), heads[2].mlp(x * scale + shift)
    assert torch.equal(first, again)
    # the standardisation is folded into the first layer: an affine change of the inputs changes nothing
    assert torch.allclose(first, scaled, atol=1e-3)
    assert first[present].min() > first[~present].max()


def test_the_head_reads_its_inputs_in_fp32_under_bf16_autocast():
    from lsms.model.decoder import ExistenceHead

    torch.manual_seed(0)
    head = ExistenceHead(4, 8)
    decoded, logits, text = torch.randn(2, 4, 8, 8) + 100.0, torch.randn(2, 1, 8, 8), torch.randn(2, 4)
    with torch.no_grad():
        fp32 = head(decoded, logits, text)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = head(decoded, logits, text)
    assert mixed.dtype == torch.float32 and torch.allclose(mixed, fp32, atol=1e-5)
